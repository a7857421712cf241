"""Fetch MNIST into a data directory (offline sources only): ``python examples/mnist/fetch_data.py``."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import data  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data-dir", default="data", type=Path)
    args = ap.parse_args()
    try:
        files = data.fetch(args.data_dir)
    except data.DataNotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    for key, path in sorted(files.items()):
        print(f"{key:>13}: {path}")
