"""Benchmark tasks: a model family with a width knob, offline data with a seeded split, a score.

``--quick`` variants shrink data, models and epochs (and use synthetic stand-ins for data that needs a
download) so that every arm runs end to end in seconds: they test the pipeline, not the method.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Tuple

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
Split = Tuple[torch.Tensor, torch.Tensor]


@dataclass
class Task:
    name: str
    build: Callable[[float], nn.Module]  # width multiplier -> model (the baseline and dendritic arms use 1.0)
    wide: Callable[[float], nn.Module]  # the width-matched family (1.0 = the baseline model)
    data: Callable[[int, bool], Tuple[Split, Split, Split]]  # (seed, quick) -> train, val, test
    metric: str  # higher is better
    epochs: int  # epoch budget for every arm
    patience: int
    batch: int
    lr: float
    max_dendrites: int = 3
    note: str = ""

    def score(self, logits: torch.Tensor, y: torch.Tensor) -> float:
        return 100.0 * (logits.argmax(1) == y).float().mean().item()

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y)


def _split(x: torch.Tensor, y: torch.Tensor, seed: int, fractions=(0.6, 0.2)) -> Tuple[Split, Split, Split]:
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    a = int(fractions[0] * len(y))
    b = a + int(fractions[1] * len(y))
    return (x[perm[:a]], y[perm[:a]]), (x[perm[a:b]], y[perm[a:b]]), (x[perm[b:]], y[perm[b:]])


# ------------------------------------------------------------------------------------------ tabular
class TabularMLP(nn.Module):
    def __init__(self, width: float = 1.0, n_in: int = 30):
        super().__init__()
        h1, h2 = max(1, round(32 * width)), max(1, round(16 * width))
        self.net = nn.Sequential(nn.Linear(n_in, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, 2))

    def forward(self, x):
        return self.net(x)


def tabular_data(seed: int, quick: bool):
    from sklearn.datasets import load_breast_cancer  # bundled with scikit-learn: offline

    d = load_breast_cancer()
    x = torch.tensor(d.data, dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.long)
    tr, va, te = _split(x, y, seed)
    mean, std = tr[0].mean(0), tr[0].std(0).clamp_min(1e-6)  # statistics of the training split only
    norm = lambda s: ((s[0] - mean) / std, s[1])  # noqa: E731
    return norm(tr), norm(va), norm(te)


# ------------------------------------------------------------------------------------------ mnist
def _mnist_net(c1: int, c2: int, hidden: int):
    sys.path.insert(0, str(ROOT / "examples" / "mnist"))
    from demo import Net

    return Net(c1, c2, hidden)


def mnist_build(width: float = 1.0):
    return _mnist_net(max(1, round(32 * width)), max(1, round(64 * width)), max(1, round(128 * width)))


def mnist_wide(width: float, scale: float = 1.0):
    """Width-matched: the example's convolutions, the hidden layer widened (where the parameters are)."""
    return _mnist_net(max(1, round(32 * scale)), max(1, round(64 * scale)), max(1, round(128 * width)))


def mnist_data(seed: int, quick: bool):
    if quick:  # a synthetic stand-in: class templates plus noise, 28x28
        g = torch.Generator().manual_seed(seed)
        templates = torch.randn(10, 1, 28, 28, generator=g)
        y = torch.randint(0, 10, (600,), generator=g)
        x = 0.5 * templates[y] + torch.randn(600, 1, 28, 28, generator=g)
        return _split(x, y, seed)
    sys.path.insert(0, str(ROOT / "examples" / "mnist"))
    import data as mnist

    return mnist.load(ROOT / "data", train_size=10_000, val_size=5_000, seed=seed)


TASKS = {
    "tabular": Task(
        "tabular", lambda w: TabularMLP(w), lambda w: TabularMLP(w), tabular_data, "accuracy (%)",
        epochs=60, patience=6, batch=32, lr=1e-3,
        note="sklearn breast-cancer (569 rows), 60/20/20 seeded split, MLP 30-32-16-2",
    ),
    "mnist": Task(
        "mnist", lambda w: _mnist_net(round(16 * w), round(32 * w), round(128 * w)), lambda w: mnist_wide(w, scale=0.5),
        mnist_data, "accuracy (%)",
        epochs=20, patience=3, batch=64, lr=1e-3, max_dendrites=2,
        note="PyTorch MNIST example CNN with half-width convolutions (16-32, fc 128, as in `make demo`; the "
        "width-matched arm widens fc) on 10k train / 5k val (seeded) / 10k test, at most 20 epochs: the largest "
        "budget that fits 2 CPU cores for 5 arms x 3 seeds",
    ),
}  # fmt: skip


def quick_variant(task: Task) -> Task:
    """Tiny models, 5 epochs, synthetic MNIST, growth every epoch: every arm end to end in seconds."""
    if task.name == "mnist":
        build, wide = (lambda w: mnist_build(w * 0.125)), (lambda w: mnist_wide(w * 0.125, scale=0.125))
    else:
        build, wide = task.build, task.wide
    return Task(
        task.name, build, wide, task.data, task.metric, epochs=5, patience=1, batch=64, lr=task.lr,
        max_dendrites=2, note=task.note + " (quick)",
    )  # fmt: skip
