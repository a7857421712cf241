"""Training-step overhead of dendritic layers relative to plain PyTorch, and controller bookkeeping cost.

For each model (the demo's MNIST CNN, and a stack of Linear layers over [batch, tokens, features]) the
plain model and the wrapped model with 0, 1, 2 and 3 dendrite sets are timed in the same process,
interleaved round by round; the table gives median step time relative to plain, next to the FLOP-ideal
ratio (the training step's FLOPs counted by torch.utils.flop_counter, relative to plain) and their
quotient. Goals (Foundation issue): 0 dendrites <= 1.03x plain; k dendrites <= 1.10x the FLOP ideal;
``controller.step`` <= 20 ms per epoch.

Run: ``python -m benchmarks.overhead`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import torch_dendrites as td
from benchmarks.models import MnistNet


class TokenStack(nn.Module):
    def __init__(self, d=256, layers=4):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))

    def forward(self, x):
        for lin in self.layers:
            x = F.gelu(lin(x))
        return x


def make_step(model, x, y, loss_fn):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return step


def step_flops(model, x, y, loss_fn) -> int:
    with FlopCounterMode(display=False) as counter:
        loss_fn(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def variants(base: nn.Module, max_k: int):
    out = {"plain": copy.deepcopy(base)}
    for k in range(max_k + 1):
        m = td.add_dendrites(copy.deepcopy(base))
        g = torch.Generator().manual_seed(k)
        for _ in range(k):
            td.grow(m, g)
        # Non-zero gains, as after training (zero gains would not change the work done anyway).
        for layer in td.dendritic_layers(m).values():
            for u in layer.dendrites.units:
                nn.init.normal_(u.out_gain, std=0.1)
        out[f"{k} dendrites"] = m
    # A correlation candidate phase: the model frozen, one candidate per layer trained through the tap.
    for k in (0, 1):
        m = copy.deepcopy(out[f"{k} dendrites"])
        for layer in td.dendritic_layers(m).values():
            layer.dendrites.add_candidates(1, torch.Generator().manual_seed(10 + k))
        cand = {id(p) for layer in td.dendritic_layers(m).values() for p in layer.dendrites.candidates.parameters()}
        for p in m.parameters():
            p.requires_grad_(id(p) in cand)
        out[f"{k} dendrites + 1 candidate"] = m
    return out


def bench_model(name, base, x, y, loss_fn, max_k, rounds, steps):
    models = variants(base, max_k)
    steps_fn = {k: make_step(m, x, y, loss_fn) for k, m in models.items()}
    flops = {k: step_flops(m, x, y, loss_fn) for k, m in models.items()}
    for fn in steps_fn.values():  # warm-up
        for _ in range(3):
            fn()
    times = {k: [] for k in models}
    for _ in range(rounds):  # interleaved: each round times every variant once
        for k, fn in steps_fn.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            times[k].append((time.perf_counter() - t0) / steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for k in models:
        if k == "plain":
            continue
        ratio = med[k] / med["plain"]
        ideal = flops[k] / flops["plain"]
        rows.append((name, k, ratio, ideal, ratio / ideal))
    return rows


def bench_controller(rounds: int):
    model = td.add_dendrites(MnistNet(16, 32, 128))
    td.grow(model)
    out = {}
    for label, out_dir in (("no out_dir", None), ("with out_dir (CSV)", tempfile.mkdtemp())):
        ctl = td.GrowthController(model, td.GrowthConfig(mode="never", patience=10**6), out_dir=out_dir)
        ctl.step(1.0, train_loss=0.1)  # the first step snapshots the best weights (an "improved" epoch)
        ts = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            ctl.step(0.5, train_loss=0.1)  # a non-improving epoch: bookkeeping only
            ts.append(time.perf_counter() - t0)
        out[label] = statistics.median(ts) * 1e3
    # An improving epoch also snapshots the best weights (and writes them when out_dir is set).
    ctl = td.GrowthController(model, td.GrowthConfig(mode="never", patience=10**6), out_dir=tempfile.mkdtemp())
    ts = []
    for i in range(rounds // 4 + 1):
        t0 = time.perf_counter()
        ctl.step(float(i))
        ts.append(time.perf_counter() - t0)
    out["improving epoch, with out_dir (writes best/)"] = statistics.median(ts) * 1e3
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    rounds, steps = (3, 2) if args.quick else (args.rounds, 5)
    torch.manual_seed(0)
    rows = []
    cnn_x, cnn_y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    rows += bench_model(
        "MNIST CNN (demo, half width)", MnistNet(16, 32, 128), cnn_x, cnn_y, F.nll_loss, 3, rounds, steps
    )
    tok_x = torch.randn(16, 64, 256)
    rows += bench_model(
        "Linear stack on [16, 64, 256]", TokenStack(), tok_x, torch.randn(16, 64, 256), F.mse_loss, 3, rounds, steps
    )
    ctl = bench_controller(8 if args.quick else 60)

    lines = [
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, medians of {rounds} interleaved rounds",
        "",
        "| model | variant | step time / plain | FLOP-ideal ratio | time / ideal | goal |",
        "|---|---|---:|---:|---:|---|",
    ]
    for name, k, ratio, ideal, q in rows:
        if "candidate" in k:
            goal = "(no goal set; candidate phase)"
        elif k.startswith("0 "):
            goal = f"<= 1.03x plain: {'met' if ratio <= 1.03 else 'MISSED'}"
        else:
            goal = f"<= 1.10x ideal: {'met' if q <= 1.10 else 'MISSED'}"
        lines.append(f"| {name} | {k} | {ratio:.3f} | {ideal:.3f} | {q:.3f} | {goal} |")
    lines += ["", "| controller.step per epoch | median ms | goal <= 20 ms |", "|---|---:|---|"]
    for label, ms in ctl.items():
        lines.append(f"| {label} | {ms:.2f} | {'met' if ms <= 20 else 'MISSED'} |")
    text = "\n".join(lines)
    print(text)
    if not args.quick:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "overhead.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
