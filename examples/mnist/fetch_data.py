"""Fetch MNIST into a data directory (offline sources only): ``python examples/mnist/fetch_data.py``."""

import argparse
import sys
from pathlib import Path

from torch_dendrites.datasets import DataNotFound, fetch_mnist

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data-dir", default="data", type=Path)
    args = ap.parse_args()
    try:
        files = fetch_mnist(args.data_dir)
    except DataNotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    for key, path in sorted(files.items()):
        print(f"{key:>13}: {path}")
