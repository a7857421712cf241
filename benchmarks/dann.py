"""Class-ordered Fashion-MNIST: dANN (the library's ``sparse`` dendrites, Chavlis & Poirazi 2025) against the
dense network of the same widths and a 784-h-10 MLP with the same trainable parameters, with noise robustness.

Run: ``.venv/bin/python -m benchmarks.dann --seeds 3`` (one thread: 32.4 minutes of runs on the shared 2-core
machine while other jobs kept it loaded); ``--quick`` runs every arm on tiny synthetic data in seconds (a smoke
test, not a result). Results:
``benchmarks/results/dann.md``, ``dann.png`` and the raw runs ``dann.json`` (``--out`` elsewhere);
``--resume`` skips runs already in the JSON file. Every class-ordered run was still improving at its last epoch;
the same runs at 20 epochs with the learning rates searched at 10: ``--orders class-ordered --epochs 20
--lrs-from benchmarks/results/dann.json --name dann_20epochs`` (10 minutes of runs).

Data: Fashion-MNIST from ``/usr/share/datasets/fashion-mnist`` (``apt-get install -y dataset-fashion-mnist``) or
``data/fashion-mnist``; pixels in [0, 1]; a fixed split of the official training images into 50k train and
10k validation; the official 10k test images.

Orders. ``class-ordered``: the training images sorted by class (all T-shirts, then all trousers, ...; within a
class in a seeded random order), fed in that order every epoch without shuffling, as in the paper's sequential
learning experiment; ``shuffled``: reshuffled every epoch (the control). Every epoch ends with the validation
and test accuracy; the score is the test accuracy at the best-validation epoch ("best model"), and the noise
columns are that model's test accuracy with additive Gaussian noise of standard deviation sigma on the pixels
(no clipping; the same noise draws for every arm of a seed).

Arms (LeakyReLU 0.1 after every hidden layer):

* ``dann-random`` / ``dann-local``: 784 -> 32 somata, each fed only by its 16 dendrites (library ``sparse``
  dendrites: 16 branch sets of 16 inputs each, random or local 28x28 receptive fields, LeakyReLU branches),
  -> 10. The wrapped layer's dense input weights are zero and frozen (a soma reads its dendrites only, as in
  dANN), and the dendrite-to-soma weights (the units' ``out_gain``) start at PyTorch's default uniform
  initialisation instead of zero (no function to preserve here).
* ``vann-same-widths``: the dense network of the same widths, 784-512-32-10 (512 = 32 x 16 dendrites).
* ``mlp-same-params``: 784-h-10 with h solved to the dANN's trainable parameter count.

Learning rate: per arm and per order, the best validation accuracy of a search seed that is not among the
reported seeds, over the ladder of ``experiment.search_lr`` (extended while the best is at an edge); the
paper's single 1e-3 is on the grid, so its validation score is in the table. "beats" follows
``stats.compare`` (difference of means beyond two standard errors).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List

import torch
from torch import nn

import torch_dendrites as td
from benchmarks import loop, stats
from benchmarks.experiment import RunLog, final_runs, search_lr
from benchmarks.models import dense_params, trainable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

SEARCH_SEED = 1000
ORDERS = ("class-ordered", "shuffled")
# Chavlis & Poirazi 2025, class-ordered Fashion-MNIST, best-model test accuracy (%): dANN variants vs the dense
# network of the same widths, at their single learning rate 1e-3.
PAPER = {"dann": "56.8-59.7", "vann-same-widths": "28.5"}


@dataclass(frozen=True)
class Setting:
    epochs: int = 10
    batch: int = 128
    somata: int = 32
    dendrites: int = 16  # per soma
    inputs: int = 16  # per dendrite
    noise: tuple = (0.1, 0.25, 0.5)
    lr_grid: tuple = (1e-4, 3e-4, 1e-3)
    max_extend: int = 2
    quick: bool = False


FULL = Setting()
QUICK = Setting(epochs=2, batch=32, somata=16, dendrites=8, inputs=16, lr_grid=(1e-3, 3e-3), max_extend=1, quick=True)


# ------------------------------------------------------------------------------------------ data
def fashion(quick: bool):
    """``(x, y)`` train, validation and test; x flattened to [N, 784] in [0, 1]."""
    if quick:
        # Synthetic "garments": ten fixed random images plus noise; learnable, tiny, no files.
        g = torch.Generator().manual_seed(0)
        protos = torch.rand(10, 784, generator=g)

        def split(n):
            y = torch.randint(0, 10, (n,), generator=g)
            return (protos[y] + 0.3 * torch.randn(n, 784, generator=g)).clamp(0, 1), y

        return split(400), split(150), split(150)
    try:
        found = td.datasets.fashion_mnist_files(ROOT / "data")
    except td.datasets.DataNotFound as exc:
        raise SystemExit(str(exc)) from None
    files = [found[k] for k in ("train_images", "train_labels", "test_images", "test_labels")]
    arrays = [td.datasets.read_idx(f) for f in files]
    xtr, ytr, xte, yte = (
        torch.from_numpy(a.astype("float32" if i % 2 == 0 else "int64")) for i, a in enumerate(arrays)
    )
    xtr, xte = xtr.flatten(1) / 255.0, xte.flatten(1) / 255.0
    perm = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(0))
    tr, va = perm[:50_000], perm[50_000:]
    return (xtr[tr], ytr[tr]), (xtr[va], ytr[va]), (xte, yte)


# ------------------------------------------------------------------------------------------ arms
@dataclass(frozen=True)
class Arm:
    name: str
    description: str
    build: Callable[[int], nn.Module]  # seed -> model


def mlp_params(hidden: int) -> int:
    return dense_params(784, hidden, 10)


def dann(s: Setting, receptive: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(784, s.somata), nn.LeakyReLU(0.1), nn.Linear(s.somata, 10))
    opts = {"branch_inputs": s.inputs, "receptive": receptive}
    if receptive == "local":
        opts["input_shape"] = [28, 28]
    cfg = td.DendriteConfig(dendrite_type="sparse", target_names=["0"], dendrite_options=opts, init_scale=1.0)
    net = td.add_dendrites(net, cfg)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(s.dendrites):
        td.grow(net, gen)
    layer = net[0]
    with torch.no_grad():
        layer.base.weight.zero_()  # somata read their dendrites only
        bound = 1.0 / s.dendrites**0.5  # PyTorch's default bound for a layer with `dendrites` inputs
        for unit in layer.dendrites.units:
            nn.init.uniform_(unit.out_gain, -bound, bound, generator=gen)
    layer.base.weight.requires_grad_(False)
    return net


def arms_for(s: Setting) -> Dict[str, Arm]:
    budget = trainable(dann(s, "random", 0))
    hidden = min(range(1, 200), key=lambda h: (abs(mlp_params(h) - budget), h))
    width = s.somata * s.dendrites

    def vann(seed):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Linear(784, width), nn.LeakyReLU(0.1), nn.Linear(width, s.somata), nn.LeakyReLU(0.1),
            nn.Linear(s.somata, 10),
        )  # fmt: skip

    def mlp(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(784, hidden), nn.LeakyReLU(0.1), nn.Linear(hidden, 10))

    tree = f"{s.somata} somata x {s.dendrites} dendrites x {s.inputs} inputs"
    arms = [
        Arm("dann-random", f"dANN: {tree}, random inputs", lambda seed: dann(s, "random", seed)),
        Arm("dann-local", f"dANN: {tree}, local 28x28 receptive fields", lambda seed: dann(s, "local", seed)),
        Arm("vann-same-widths", f"784-{width}-{s.somata}-10 dense", vann),
        Arm("mlp-same-params", f"784-{hidden}-10 dense, parameter-matched to dANN", mlp),
    ]
    return {a.name: a for a in arms}


# ------------------------------------------------------------------------------------------ training
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return loop.evaluate(model, (x, y), loop.accuracy, 5000)


def run(arm: Arm, s: Setting, data, order: str, seed: int, lr: float, test: bool) -> dict:
    (xtr, ytr), (xva, yva), (xte, yte) = data
    model = arm.build(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    within = torch.randperm(len(ytr), generator=gen)
    class_order = within[ytr[within].argsort(stable=True)]  # sorted by class, seeded order inside a class
    best = {"val": -1.0}
    curve = []
    t0 = time.time()
    fixed = class_order if order == "class-ordered" else None  # else a fresh permutation every epoch
    for epoch in range(1, s.epochs + 1):
        loop.train_epoch(model, opt, (xtr, ytr), nn.functional.cross_entropy, s.batch, gen, order=fixed)
        val = accuracy(model, xva, yva)
        curve.append(round(val, 3))
        if val > best["val"]:
            best = {"val": val, "epoch": epoch, "state": copy.deepcopy(model.state_dict())}
    res = {"params": trainable(model), "val": best["val"], "best_epoch": best["epoch"], "val_curve": curve}
    if test:
        model.load_state_dict(best["state"])
        res["test"] = accuracy(model, xte, yte)
        noise_gen = torch.Generator().manual_seed(99 + seed)
        for sigma in s.noise:
            noisy = xte + sigma * torch.randn(xte.shape, generator=noise_gen)
            res[f"test_noise_{sigma:g}"] = accuracy(model, noisy, yte)
    res["wall_s"] = round(time.time() - t0, 2)
    return res


def experiment(s: Setting, data, seeds: int, log: RunLog, orders, only=None, reuse=None) -> dict:
    """Search every arm's learning rate (or take it from ``reuse``, ``{(order, arm): chosen}``), then run the seeds."""
    arms = arms_for(s)
    if only:
        arms = {k: v for k, v in arms.items() if k in only}
    chosen = {}
    for order in orders:
        for name, arm in arms.items():

            def score(lr, name=name, arm=arm, order=order):
                key = {"order": order, "phase": "search", "arm": name, "seed": SEARCH_SEED, "lr": lr}
                row, new = log.run_once(key, run, arm, s, data, order, SEARCH_SEED, lr, test=False)
                if new:
                    print(f"{order:13s} search {name:16s} lr {lr:g}: val {row['val']:.2f} ({row['wall_s']:.0f} s)",
                          flush=True)  # fmt: skip
                return row["val"]

            if reuse is not None:
                chosen[(order, name)] = reuse[(order, name)]
                continue
            lr, tried, at_edge = search_lr(score, s.lr_grid, s.max_extend)
            chosen[(order, name)] = {"lr": lr, "tried": tried, "at_edge": at_edge}
        lrs = {name: chosen[(order, name)]["lr"] for name in arms}
        final_runs(
            log, run, arms, lrs, seeds, {"order": order}, lambda seed, o=order: (s, data, o, seed), f"{order:13s}"
        )
    return {"arms": arms, "chosen": chosen}


# ------------------------------------------------------------------------------------------ report
PAIRS = [
    ("dann-random", "mlp-same-params", "parameter-matched"),
    ("dann-local", "mlp-same-params", "parameter-matched"),
    ("dann-random", "vann-same-widths", "the paper's comparison"),
    ("dann-local", "vann-same-widths", "the paper's comparison"),
    ("mlp-same-params", "vann-same-widths", "a small dense net against the same-widths one"),
]


def report(s: Setting, res: dict, rows: List[dict], meta: dict) -> List[str]:
    md = ["# dANN on class-ordered Fashion-MNIST against parameter-matched and same-width dense networks", ""]
    if s.quick:
        md += ["**quick smoke run: not a result** (synthetic data, tiny sizes).", ""]
    md += [
        f"Command: `{meta['command']}`. Runs took {meta['run_min']:.1f} min in all (search and reported seeds; "
        f"this invocation {meta['wall_min']:.1f} min) on torch {meta['torch']}, {meta['threads']} thread(s); "
        f"reported seeds {meta['seeds']}, learning rates "
        + (
            f"taken from `{meta['lrs_from']}` (searched there)"
            if meta.get("lrs_from")
            else f"searched on seed {SEARCH_SEED}"
        )
        + f". {s.epochs} epochs, "
        f"Adam, batch {s.batch}; score: test accuracy at the best-validation epoch. Protocol and arms: the "
        "docstring of `benchmarks/dann.py`.",
        "",
    ]
    noise_cols = " | ".join(f"noise σ={sg:g} %" for sg in s.noise)
    verdicts = []
    for order in ORDERS:
        final = [r for r in rows if r.get("order") == order and r["phase"] == "final"]
        if not final:
            continue
        md += [
            f"## {order}",
            "",
            f"| arm | structure | trainable params | test % (mean ± sd) | {noise_cols} | best epoch | lr (searched) | "
            "wall s |",
            "|---|---|---:|---:|" + "---:|" * len(s.noise) + "---:|---|---:|",
        ]
        for name, arm in res["arms"].items():
            rs = [r for r in final if r["arm"] == name]
            if not rs:
                continue
            c = res["chosen"][(order, name)]
            tried = ", ".join(f"{lr:g}{'*' if lr == c['lr'] else ''}: {v:.1f}" for lr, v in sorted(c["tried"].items()))
            noise = " | ".join(stats.fmt_mean_sd(r[f"test_noise_{sg:g}"] for r in rs) for sg in s.noise)
            md.append(
                f"| {name} | {arm.description} | {rs[0]['params']:,} | {stats.fmt_mean_sd(r['test'] for r in rs)} | "
                f"{noise} | {stats.mean_sd(r['best_epoch'] for r in rs)[0]:.1f} | "
                f"{tried}{' (edge)' if c['at_edge'] else ''} | {stats.mean_sd(r['wall_s'] for r in rs)[0]:.0f} |"
            )
        cols = [("test", "clean")] + [(f"test_noise_{sg:g}", f"σ={sg:g}") for sg in s.noise]
        # A best score at the final epoch means the run was still improving when the budget ended.
        last = sum(r["best_epoch"] == len(r["val_curve"]) for r in final)
        md += [
            "",
            f"{last} of {len(final)} reported runs had their best validation accuracy at the last epoch.",
            "",
            "lr: best validation accuracy (%) of the search seed per value tried; * = chosen; (edge) = the best was "
            "still at the end of the ladder searched.",
            "",
            "Verdicts: difference of mean test accuracy, A - B, in points (two standard errors in brackets); "
            "**beats** / **worse** only beyond two standard errors, else 'n.s.'.",
            "",
            "| A | B | comparison | params A / B | " + " | ".join(label for _, label in cols) + " |",
            "|---|---|---|---:|" + "---|" * len(cols),
        ]
        for a, b, why in PAIRS:
            cells = []
            for col, _ in cols:
                c = stats.compare([r[col] for r in final if r["arm"] == a], [r[col] for r in final if r["arm"] == b])
                tag = "**beats**" if c.beats else ("**worse**" if c.worse else "n.s.")
                cells.append(f"{c.diff:+.2f} ({c.two_se:.2f}) {tag}")
                verdicts.append({"order": order, "column": col, "a": a, "b": b, **asdict(c)})
            if not any(r["arm"] == a for r in final) or not any(r["arm"] == b for r in final):
                continue
            pa = stats.mean_sd(r["params"] for r in final if r["arm"] == a)[0]
            pb = stats.mean_sd(r["params"] for r in final if r["arm"] == b)[0]
            md.append(f"| {a} | {b} | {why} | {pa / pb:.2f}x | " + " | ".join(cells) + " |")
        md.append("")
    md += [
        "## Beside the published rows",
        "",
        "Chavlis & Poirazi 2025, class-ordered Fashion-MNIST, best-model test accuracy at their learning rate 1e-3: "
        f"dANN variants {PAPER['dann']} %, the dense network of the same widths {PAPER['vann-same-widths']} %; no "
        "parameter-matched dense network and no per-arm learning-rate search were reported.",
        "",
    ]
    meta["verdicts"] = verdicts
    return md


def figure(s: Setting, res: dict, rows: List[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    orders = [o for o in ORDERS if any(r.get("order") == o and r["phase"] == "final" for r in rows)]
    fig, axes = plt.subplots(1, len(orders), figsize=(6 * len(orders), 4.2), squeeze=False)
    for ax, order in zip(axes[0], orders):
        sigmas = [0.0, *s.noise]
        for name in res["arms"]:
            rs = [r for r in rows if r.get("order") == order and r["phase"] == "final" and r["arm"] == name]
            if not rs:
                continue
            cols = ["test"] + [f"test_noise_{sg:g}" for sg in s.noise]
            ms = [stats.mean_sd(r[c] for r in rs) for c in cols]
            ax.errorbar(sigmas, [m for m, _ in ms], yerr=[sd for _, sd in ms], marker="o", capsize=3,
                        label=f"{name} ({rs[0]['params']:,} params)")  # fmt: skip
        ax.set_xlabel("Gaussian noise σ added to the test pixels")
        ax.set_ylabel("best-model test accuracy (%)")
        ax.set_title(f"Fashion-MNIST, {order} (mean ± sd over seeds)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--orders", nargs="+", default=list(ORDERS), choices=ORDERS)
    ap.add_argument("--arms", nargs="+", default=None, help="run only these arms")
    ap.add_argument("--epochs", type=int, default=None, help="override the epoch budget")
    ap.add_argument("--max-extend", type=int, default=None, help="override how far the lr search may go past an edge")
    ap.add_argument("--quick", action="store_true", help="synthetic data, tiny sizes: a smoke run, not a result")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--name", default="dann", help="base name of the result files (default: dann)")
    ap.add_argument("--resume", action="store_true", help="skip the runs already in <out>/<name>.json")
    ap.add_argument(
        "--lrs-from", type=Path, default=None,
        help="take every arm's learning rate from this earlier result JSON instead of searching (a sensitivity run)",
    )  # fmt: skip
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    s = QUICK if args.quick else FULL
    if args.epochs:
        s = replace(s, epochs=args.epochs)
    if args.max_extend is not None:
        s = replace(s, max_extend=args.max_extend)
    command = "python -m benchmarks.dann " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"command": command.strip(), "torch": torch.__version__, "threads": args.threads,
            "seeds": list(range(args.seeds)), "setting": asdict(s)}  # fmt: skip
    log = RunLog(args.out / f"{args.name}.json", args.resume, meta)
    start = time.time()
    data = fashion(args.quick)
    reuse = None
    if args.lrs_from is not None:
        saved = json.loads(args.lrs_from.read_text())["meta"]["chosen_lr"]
        reuse = {
            tuple(k.split("/", 1)): {**c, "tried": {float(lr): v for lr, v in c["tried"].items()}}
            for k, c in saved.items()
        }
        src = args.lrs_from.resolve()
        meta["lrs_from"] = str(src.relative_to(ROOT) if src.is_relative_to(ROOT) else src)
    res = experiment(s, data, args.seeds, log, args.orders, args.arms, reuse)
    meta["wall_min"] = (time.time() - start) / 60
    meta["run_min"] = sum(r["wall_s"] for r in log.doc["runs"]) / 60
    # Report the runs of this configuration only (a resumed log may hold runs at replaced learning rates).
    chosen = res["chosen"]
    rows = [
        r
        for r in log.doc["runs"]
        if (r["order"], r["arm"]) in chosen
        and (r["phase"] == "search" or (r["lr"] == chosen[(r["order"], r["arm"])]["lr"] and r["seed"] < args.seeds))
    ]
    md = report(s, res, rows, meta)
    meta["chosen_lr"] = {
        f"{o}/{n}": {**c, "tried": {f"{k:g}": v for k, v in c["tried"].items()}} for (o, n), c in res["chosen"].items()
    }
    log.doc["meta"] = meta
    log.save()
    (args.out / f"{args.name}.md").write_text("\n".join(md) + "\n")
    figure(s, res, rows, args.out / f"{args.name}.png")
    print(f"wrote {args.out / args.name}.md, .png and .json in {meta['wall_min']:.1f} min")
    return res, log.doc


if __name__ == "__main__":
    main()
