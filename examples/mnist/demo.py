"""Do dendrites help PyTorch's MNIST example CNN? Baseline vs dendrites vs width-matched, same rules.

Every arm trains with the same optimizer, batch size, data, seed and best-weight restore. The dendritic arm
grows a dendrite set at each plateau (``patience`` epochs without a new best validation accuracy) under
:class:`torch_dendrites.GrowthController` and stops when growth stops paying; the plain arms (baseline,
width-matched) train the whole epoch budget, so the dendritic arm's several phases get no more epochs than they
do. The width-matched arm widens the CNN's hidden layer until it has as many parameters as the final dendritic
model. Test accuracy is measured once per arm, on the restored best-validation weights.

Run: ``make demo`` (a few minutes on 2 CPU cores) or ``python examples/mnist/demo.py --data-dir data``;
``--full`` is the long version (twice the data, 40 epochs, up to 3 dendrite sets).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import torch_dendrites as td

try:
    from tqdm.auto import tqdm
except ImportError:  # progress bars are optional
    tqdm = None


# The long version (--full): the sizes of the original demo.
FULL = {"train_size": 10_000, "val_size": 5_000, "patience": 3, "max_dendrites": 3, "max_epochs": 40}


class Net(nn.Module):
    """The CNN of PyTorch's MNIST example (pytorch/examples, mnist/main.py), with adjustable widths."""

    def __init__(self, c1: int = 32, c2: int = 64, hidden: int = 128):
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 3, 1)
        self.conv2 = nn.Conv2d(c1, c2, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(c2 * 12 * 12, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = torch.flatten(self.dropout1(x), 1)
        x = self.dropout2(F.relu(self.fc1(x)))
        return F.log_softmax(self.fc2(x), dim=1)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def accuracy(model: nn.Module, xy, batch: int = 1000) -> float:
    model.eval()
    x, y = xy
    correct = sum((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum().item() for i in range(0, len(y), batch))
    return 100.0 * correct / len(y)


def train_epoch(model, opt, xy, batch: int, gen: torch.Generator) -> float:
    model.train()
    x, y = xy
    perm = torch.randperm(len(y), generator=gen)
    total = 0.0
    for i in range(0, len(y), batch):
        idx = perm[i : i + batch]
        opt.zero_grad(set_to_none=True)
        loss = F.nll_loss(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        total += loss.item() * len(idx)
    return total / len(y)


def run_arm(name, model, growth, splits, args, out_dir):
    """Train one arm under its controller; resumable from ``out_dir/<arm>/latest`` with ``--resume``."""
    train, val, test = splits
    arm_dir = out_dir / name
    if not args.resume and arm_dir.exists():
        shutil.rmtree(arm_dir)
    ctl = td.GrowthController(model, growth, out_dir=arm_dir)
    gen = torch.Generator().manual_seed(args.seed)

    def make_opt(m):
        return torch.optim.Adam(td.param_groups(m, args.lr))  # dendrites at the library's learning-rate scale

    start = ctl.resume(make_opt, generators={"shuffle": gen})
    opt, wall = start.optimizer, start.extra.get("wall_s", 0.0)
    bar = tqdm(total=args.max_epochs, initial=ctl.epoch, desc=f"{name:>13}", leave=True) if tqdm else None
    while not ctl.done:
        t0 = time.perf_counter()
        loss = train_epoch(model, opt, train, args.batch_size, gen)
        val_acc = accuracy(model, val)
        r = ctl.step(val_acc, train_loss=loss)
        if r.restructured:
            opt = make_opt(model)  # new parameters (or restored ones): a fresh optimizer
        wall += time.perf_counter() - t0
        # Every epoch: an atomic checkpoint that a killed run resumes from (--resume).
        ctl.save_latest(opt, generators={"shuffle": gen}, extra={"wall_s": wall})
        if bar:
            bar.update(1)
            bar.set_postfix(dendrites=r.num_dendrites, val=f"{val_acc:.2f}", best=f"{r.best_score:.2f}", event=r.event)
    if bar:
        bar.close()
    return {
        "arm": name,
        "dendrites": ctl.num_dendrites,
        "parameters": n_params(model),
        "epochs": ctl.epoch,
        "best_val": ctl.best_score,
        "test_at_best_val": accuracy(model, test),  # the model now holds the best-validation weights
        "wall_s": wall,
        "history": ctl.history,
    }


def width_for(params: int, c1: int, c2: int) -> int:
    """The hidden width whose plain CNN has about ``params`` parameters."""
    per_unit = c2 * 144 + 1 + 10
    fixed = n_params(Net(c1, c2, 1)) - per_unit
    return max(1, round((params - fixed) / per_unit))


def plot(results, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for i, r in enumerate(results):
        h = r["history"]
        style = dict(lw=3.0, alpha=0.5) if r["arm"] == "baseline" else dict(lw=1.3)  # visible under overlaps
        ax.plot(
            [row["epoch"] for row in h], [row["score"] for row in h], color=f"C{i}", label=f"{r['arm']} (val)", **style
        )
        for row in h:
            if row["event"] in ("grow", "retry"):
                ax.axvline(row["epoch"] + 0.5, color=f"C{i}", ls="--", lw=0.8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    lo = min(row["score"] for r in results for row in r["history"][1:] or r["history"])
    ax.set_ylim(max(lo - 0.5, 0), None)
    ax.legend(loc="lower right")
    ax.set_title("MNIST CNN: validation accuracy per epoch (dashed: dendrite growth)")
    fig.tight_layout()
    fig.savefig(path)


def table(results) -> str:
    head = "| arm | dendrites | parameters | epochs | best val acc (%) | test acc at best val (%) | wall time (s) |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(
            f"| {r['arm']} | {r['dendrites']} | {r['parameters']:,} | {r['epochs']} | {r['best_val']:.2f} | "
            f"{r['test_at_best_val']:.2f} | {r['wall_s']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=Path("data"))
    ap.add_argument("--out-dir", type=Path, default=Path("runs/demo"))
    ap.add_argument(
        "--full",
        action="store_true",
        help="the long version: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in FULL.items()),
    )
    ap.add_argument("--train-size", type=int, default=5_000)
    ap.add_argument("--val-size", type=int, default=2_500)
    ap.add_argument("--width", type=float, default=0.5, help="channel multiplier of the example CNN (1 = original)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--patience", type=int, default=2)
    ap.add_argument("--max-dendrites", type=int, default=2)
    ap.add_argument("--max-epochs", type=int, default=14)
    ap.add_argument(
        "--arms",
        default="baseline,dendrites,width-matched",
        help="comma-separated: baseline, dendrites (GD), correlation (Perforated Backpropagation), width-matched",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="continue each arm from OUT_DIR/<arm>/latest")
    args = ap.parse_args(argv)
    if args.full:
        for k, v in FULL.items():
            setattr(args, k, v)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(min(torch.get_num_threads(), 2))

    try:
        splits = td.datasets.load_mnist(args.data_dir, args.train_size, args.val_size, seed=args.seed)
    except td.datasets.DataNotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    c1, c2, hidden = max(1, round(32 * args.width)), max(1, round(64 * args.width)), 128
    args.out_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"MNIST: {args.train_size} train / {args.val_size} validation / {len(splits[2][1])} test images; "
        f"CNN conv {c1}-{c2}, fc {hidden}-10; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )

    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    stop = dict(patience=args.patience, max_epochs=args.max_epochs, maximize=True)
    # Plain arms: the whole budget (patience = budget), keeping their best-validation weights.
    plain = dict(patience=args.max_epochs, max_epochs=args.max_epochs, maximize=True)
    results = []
    dendritic_params = None
    for arm in arms:
        torch.manual_seed(args.seed)  # every arm starts from the same base weights
        if arm == "baseline":
            model, growth = Net(c1, c2, hidden), td.GrowthConfig(mode="never", **plain)
        elif arm == "dendrites":
            model = td.add_dendrites(Net(c1, c2, hidden))
            growth = td.GrowthConfig(mode="plateau", max_dendrites=args.max_dendrites, seed=args.seed, **stop)
        elif arm == "correlation":
            model = td.add_dendrites(Net(c1, c2, hidden))
            growth = td.GrowthConfig(
                mode="plateau",
                dendrite_training="correlation",
                max_dendrites=args.max_dendrites,
                seed=args.seed,
                **stop,
            )
        elif arm == "width-matched":
            if dendritic_params is None:
                print("skipping width-matched: it needs the dendrites arm first", file=sys.stderr)
                continue
            model, growth = Net(c1, c2, width_for(dendritic_params, c1, c2)), td.GrowthConfig(mode="never", **plain)
        else:
            print(
                f"error: unknown arm {arm!r}; choose from baseline, dendrites, correlation, width-matched",
                file=sys.stderr,
            )
            return 2
        res = run_arm(arm, model, growth, splits, args, args.out_dir)
        results.append(res)
        if arm in ("dendrites", "correlation"):
            if dendritic_params is None:  # the width-matched arm matches the first dendritic arm
                dendritic_params = res["parameters"]
            print(td.summary(model))

    print()
    print(table(results))
    plot(results, args.out_dir / "demo.png")
    (args.out_dir / "results.md").write_text(table(results) + "\n")
    (args.out_dir / "results.json").write_text(
        json.dumps([{k: v for k, v in r.items() if k != "history"} for r in results], indent=1)
    )
    print(
        f"\nfigure: {args.out_dir / 'demo.png'}; per-arm records (history.csv, architectures.csv, growth.png) "
        f"under {args.out_dir}/<arm>/"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
