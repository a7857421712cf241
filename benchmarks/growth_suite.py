"""Capacity-limited tasks for choosing the growth defaults, and the two-spirals benchmark.

Tasks (each starts from a model too small for it, so dendrites have something to add):

- ``spirals``: Lang & Witbrock's two spirals as in Fahlman & Lebiere (1990): 194 training points, 3 turns,
  coordinates divided by 6.5; the 192 points halfway between them along the spirals are the test set. Base
  model ``Linear(2, 1)`` (logistic regression): with dendrites on its one neuron it is a Cascade-Correlation
  network. Full batch; an "epoch" is 10 Adam steps (lr 0.05); the controller's score is minus the
  training loss (the task is to fit the training set).
- ``parity``: 6-bit parity, all 64 patterns, base ``Linear(6, 1)``, otherwise as spirals.
- ``mnist_narrow``: an MLP 784-16-10 on 10k MNIST training images (5k validation, the 10k test set),
  Adam 1e-3, batch 128; score: validation accuracy.
- ``tabular``: the breast-cancer task of ``benchmarks.tasks`` (the real benchmark task; its MLP is in
  ``benchmarks.models``).

Run ``python -m benchmarks.growth_suite sweep`` (the defaults sweep: init scale x dendrite learning-rate
scale for gd, candidate init scale x pool for correlation; >= 5 seeds each; resumable: finished runs are kept
in ``benchmarks/results/defaults_sweep.json``), ``... table`` (``defaults_sweep.md``) and ``... spirals``
(10 seeds with the library's defaults beside a parameter-matched plain MLP: ``spirals.md``). The gd freezing
check: ``... sweep --grid defaults --training gd --tasks parity,tabular,mnist_narrow --knobs
'{"freeze_earlier": false}' --out benchmarks/results/freeze_sweep.json`` and again with ``true``, then ``... table
--out benchmarks/results/freeze_sweep.json``.
Every run uses one thread.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

import torch_dendrites as td
from benchmarks.loop import evaluate, train_epoch
from benchmarks.models import TabularMLP, n_params
from benchmarks.stats import mean_sd
from benchmarks.tasks import tabular_data

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# ------------------------------------------------------------------------------------------------ data


def spirals_data(offset: float = 0.0, n: int = 97):
    """Two interleaved spirals of ``n`` points each (3 turns); ``offset=0.5`` gives the points between."""
    pts, lab = [], []
    for i in range(n):
        t = i + offset
        angle, radius = t * math.pi / 16, 6.5 * (104 - t) / 104
        x, y = radius * math.cos(angle), radius * math.sin(angle)
        pts += [(x, y), (-x, -y)]
        lab += [1.0, 0.0]
    return torch.tensor(pts) / 6.5, torch.tensor(lab)[:, None]


def parity_data(bits: int = 6):
    x = torch.tensor([[(i >> b) & 1 for b in range(bits)] for i in range(2**bits)], dtype=torch.float32)
    return x * 2 - 1, (x.sum(1, keepdim=True) % 2)


@dataclasses.dataclass
class SuiteTask:
    name: str
    build: Callable[[], nn.Module]
    data: Callable[[int], Any]  # seed -> (train, val, test) splits of (x, y); val/test may repeat train
    lr: float
    max_epochs: int
    max_dendrites: int
    batch: Optional[int] = None  # None: full batch, `steps` steps per epoch
    steps: int = 10
    kind: str = "binary"  # "binary" (one logit, BCE) or "classes" (cross entropy)
    score: str = "-train_loss"  # what the controller is given: "-train_loss" or "val_acc"
    note: str = ""


def _binary_loss(out, y):
    return nn.functional.binary_cross_entropy_with_logits(out, y)


def _accuracy(out, y, kind):
    pred = (out > 0).float() if kind == "binary" else out.argmax(1)
    return (pred == y).float().mean().item()


def _mnist(seed: int):
    tr, va, te = td.datasets.load_mnist(Path(os.environ.get("DATA_DIR", HERE.parent / "data")), 10_000, 5_000, seed)
    flat = lambda s: (s[0].flatten(1), s[1])  # noqa: E731
    return flat(tr), flat(va), flat(te)


def _tabular(seed: int):
    return tabular_data(seed, False)


def _tabular_model():
    return TabularMLP(1.0)


def _fixed(split):
    return lambda seed: (split, split, split)


TASKS: Dict[str, SuiteTask] = {
    "spirals": SuiteTask(
        "spirals",
        lambda: nn.Sequential(nn.Linear(2, 1)),
        lambda seed: (spirals_data(), spirals_data(), spirals_data(0.5, 96)),
        lr=0.05,
        max_epochs=1500,
        max_dendrites=40,
        note="194 points, base Linear(2, 1), full batch, 10 Adam steps (lr 0.05) per epoch",
    ),
    "parity": SuiteTask(
        "parity",
        lambda: nn.Sequential(nn.Linear(6, 1)),
        _fixed(parity_data(6)),
        lr=0.05,
        max_epochs=800,
        max_dendrites=20,
        note="6-bit parity (64 patterns), base Linear(6, 1), full batch, 10 Adam steps (lr 0.05) per epoch",
    ),
    "mnist_narrow": SuiteTask(
        "mnist_narrow",
        lambda: nn.Sequential(nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 10)),
        _mnist,
        lr=1e-3,
        max_epochs=60,
        max_dendrites=3,
        batch=128,
        kind="classes",
        score="val_acc",
        note="MLP 784-16-10, 10k/5k/10k MNIST, Adam 1e-3, batch 128",
    ),
    "tabular": SuiteTask(
        "tabular",
        _tabular_model,
        _tabular,
        lr=1e-3,
        max_epochs=150,
        max_dendrites=3,
        batch=32,
        kind="classes",
        score="val_acc",
        note="breast-cancer MLP 30-32-16-2 (benchmarks/tasks.py), Adam 1e-3, batch 32",
    ),
}

# ------------------------------------------------------------------------------------------------ one run


def _loss(task: SuiteTask, out, y):
    return _binary_loss(out, y) if task.kind == "binary" else nn.functional.cross_entropy(out, y)


def _evaluate(task: SuiteTask, model: nn.Module, split):
    """``(loss, accuracy)`` over ``split``, 2000 samples at a time."""
    return evaluate(model, split, lambda out, y: (_loss(task, out, y).item(), _accuracy(out, y, task.kind)), 2000)


def _train_epoch(task: SuiteTask, model, opt, split, gen):
    train_epoch(model, opt, split, partial(_loss, task), task.batch, gen, steps=task.steps)


def run_growth(task: SuiteTask, seed: int, training: str = "gd", **knobs) -> Dict[str, Any]:
    """One dendritic run of ``task``. ``knobs``: ``init_scale``, ``lr_scale`` (dendrite learning-rate
    multiplier), and any ``GrowthConfig`` field (``candidate_pool``, ``candidate_init_scale``, ...); anything
    not given is the library's default."""
    torch.manual_seed(seed)
    train, val, test = task.data(seed)
    dcfg = td.DendriteConfig(**({"init_scale": knobs.pop("init_scale")} if "init_scale" in knobs else {}))
    lr_scale = knobs.pop("lr_scale", td.optim.DENDRITE_LR_SCALE)
    keep_state = knobs.pop("keep_state", False)  # after growth: td.sync_optimizer keeping Adam's moments
    model = td.add_dendrites(task.build(), dcfg)
    cfg = td.GrowthConfig(
        dendrite_training=training,
        max_dendrites=task.max_dendrites,
        max_epochs=task.max_epochs,
        seed=seed,
        **knobs,
    )
    ctl = td.GrowthController(model, cfg)

    def make_opt():
        return torch.optim.Adam(td.param_groups(model, task.lr, lr_scale))

    opt, gen = make_opt(), torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    while not ctl.done:
        _train_epoch(task, model, opt, train, gen)
        tr_loss, tr_acc = _evaluate(task, model, train)
        va_loss, va_acc = _evaluate(task, model, val)
        score = -tr_loss if task.score == "-train_loss" else va_acc
        r = ctl.step(score, test_acc=_evaluate(task, model, test)[1], train_acc=tr_acc, val_acc=va_acc)
        if r.restructured:
            if keep_state:
                td.sync_optimizer(opt, model, reset_state=False)
            else:
                opt = make_opt()
    tr_loss, tr_acc = _evaluate(task, model, train)
    events = [row["event"] for row in ctl.history if row["event"]]
    return {
        "train_acc": tr_acc,
        "val_acc": _evaluate(task, model, val)[1],
        "test_acc": _evaluate(task, model, test)[1],
        "dendrites": ctl.num_dendrites,
        "params": n_params(model),
        "epochs": ctl.epoch,
        "wall_s": time.perf_counter() - t0,
        "kept": sum(1 for row in ctl.history if row.get("kept") == 1),
        "grown": sum(1 for e in events if e in ("grow", "retry", "candidates")) if training == "gd" else
        sum(1 for e in events if e in ("candidates", "retry")),
        "events": events,
    }  # fmt: skip


def run_plain(task: SuiteTask, seed: int, hidden: int, epochs: int) -> Dict[str, Any]:
    """A plain tanh MLP ``in-hidden-out`` trained for exactly ``epochs`` epochs (the same budget)."""
    torch.manual_seed(seed)
    train, val, test = task.data(seed)
    n_in = train[0].shape[1]
    n_out = 1 if task.kind == "binary" else int(train[1].max()) + 1
    model = nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, n_out))
    opt, gen = torch.optim.Adam(model.parameters(), lr=task.lr), torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    best = (-math.inf, None)
    for _ in range(epochs):
        _train_epoch(task, model, opt, train, gen)
        tr_loss, tr_acc = _evaluate(task, model, train)
        if tr_acc > best[0]:
            best = (tr_acc, _evaluate(task, model, test)[1])
    return {
        "train_acc": _evaluate(task, model, train)[1],
        "best_train_acc": best[0],
        "test_acc": _evaluate(task, model, test)[1],
        "params": n_params(model),
        "epochs": epochs,
        "wall_s": time.perf_counter() - t0,
    }


def hidden_for(n_in: int, n_out: int, params: int) -> int:
    """The hidden width of an ``n_in-h-n_out`` MLP with the parameter count closest to ``params``."""
    per = n_in + 1 + n_out
    return max(1, round((params - n_out) / per))


# ------------------------------------------------------------------------------------------------ the sweep
GD_GRID = [{"init_scale": s, "lr_scale": m} for s in (0.01, 0.3, 1.0) for m in (1.0, 3.0)]
CORR_GRID = [{"candidate_init_scale": s, "candidate_pool": p} for s in (0.3, 1.0) for p in (1, 4)]


def _key(task: str, training: str, knobs: Dict[str, Any], seed: int) -> str:
    return json.dumps([task, training, sorted(knobs.items()), seed])


def sweep(
    tasks: List[str],
    seeds: int,
    out: Path,
    trainings=("gd", "correlation"),
    extra: Optional[dict] = None,
    grid: str = "full",
):
    """Every ``task`` x ``training`` x setting x seed not yet in ``out`` (one JSON line each). ``grid="full"``:
    the settings of GD_GRID / CORR_GRID; ``"defaults"``: the library's defaults only (with ``extra``)."""
    done = {}
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done[_key(r["task"], r["training"], r["knobs"], r["seed"])] = r
    for task in tasks:
        for training in trainings:
            for knobs in [{}] if grid == "defaults" else GD_GRID if training == "gd" else CORR_GRID:
                knobs = {**knobs, **(extra or {})}
                for seed in range(seeds):
                    if _key(task, training, knobs, seed) in done:
                        continue
                    res = run_growth(TASKS[task], seed, training, **dict(knobs))
                    res.update(task=task, training=training, knobs=knobs, seed=seed)
                    with open(out, "a") as f:
                        f.write(json.dumps(res) + "\n")
                    print(
                        f"{task:>12} {training:>11} {knobs} seed {seed}: train {res['train_acc']:.3f} "
                        f"val {res['val_acc']:.3f} test {res['test_acc']:.3f} dendrites {res['dendrites']} "
                        f"epochs {res['epochs']} {res['wall_s']:.0f}s",
                        flush=True,
                    )


def table(path: Path, md: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["training"], json.dumps(r["knobs"], sort_keys=True)), []).append(r)
    metric = {"spirals": "train_acc", "parity": "train_acc", "mnist_narrow": "test_acc", "tabular": "test_acc"}
    lines = [
        "# Growth defaults sweep",
        "",
        "Capacity-limited tasks (see `benchmarks/growth_suite.py`); every other setting at the library's",
        "defaults. Score: training accuracy for spirals and parity (the task is to fit them), test accuracy at the",
        "end of the run (best-validation weights) for mnist_narrow and tabular; mean ± sd over seeds, sets kept,",
        "epochs. `lr_scale` multiplies the dendrites' learning rate (`td.param_groups`).",
        "",
    ]
    for task in dict.fromkeys(r["task"] for r in rows):
        for training in ("gd", "correlation"):
            sub = {k: v for k, v in groups.items() if k[0] == task and k[1] == training}
            if not sub:
                continue
            lines += [
                f"## {task}, {training} ({TASKS[task].note})",
                "",
                "| settings | score (mean ± sd) | solved / runs | dendrites (mean) | epochs (mean) | wall s (mean) |",
                "|---|---:|---:|---:|---:|---:|",
            ]
            ranked = sorted(sub.items(), key=lambda kv: -statistics.fmean(r[metric[task]] for r in kv[1]))
            for (_, _, knobs), rs in ranked:
                m, s = mean_sd([100 * r[metric[task]] for r in rs])
                solved = sum(r["train_acc"] == 1.0 for r in rs)
                lines.append(
                    f"| {', '.join(f'{k}={v}' for k, v in json.loads(knobs).items())} | {m:.2f} ± {s:.2f} | "
                    f"{solved} / {len(rs)} | {statistics.fmean(r['dendrites'] for r in rs):.1f} | "
                    f"{statistics.fmean(r['epochs'] for r in rs):.0f} | "
                    f"{statistics.fmean(r['wall_s'] for r in rs):.0f} |"
                )
            lines.append("")
    text = "\n".join(lines) + "\n"
    md.write_text(text)
    return text


# ------------------------------------------------------------------------------------------------ spirals
def spirals_benchmark(seeds: int, out_md: Path, patience: int = 5) -> str:
    task = TASKS["spirals"]
    runs = {"gd": [], "correlation": [], "mlp": []}
    for seed in range(seeds):
        for training in ("gd", "correlation"):
            r = run_growth(task, seed, training, patience=patience)
            runs[training].append(r)
            print(f"spirals {training} seed {seed}: {r}", flush=True)
        # The plain MLP: as many parameters as the larger dendritic model of this seed, the full epoch budget.
        target = max(runs["gd"][-1]["params"], runs["correlation"][-1]["params"])
        r = run_plain(task, seed, hidden_for(2, 1, target), task.max_epochs)
        runs["mlp"].append(r)
        print(f"spirals mlp seed {seed}: {r}", flush=True)
    (out_md.with_suffix(".json")).write_text(json.dumps(runs))
    lines = [
        "# Two spirals (Fahlman & Lebiere 1990)",
        "",
        f"{task.note}. Growth with the library's defaults (`GrowthConfig(patience={patience})`, `DendriteConfig()`,",
        f"`td.param_groups` at its default dendrite learning-rate scale) and a budget of at most {task.max_dendrites}",
        f"dendrite sets and {task.max_epochs} epochs; the controller's score is minus the training loss. The plain MLP",
        "(2-h-1, tanh) has as many parameters as the larger dendritic model of the same seed and trains for the",
        f"whole {task.max_epochs}-epoch budget. Test: the 192 points halfway between the training points.",
        "Cascade-Correlation (Fahlman & Lebiere 1990) solved 100 of 100 runs with 12-19 hidden units (mean 15.2).",
        "",
        "| arm | solved | train acc % | test acc % (192 points) | dendrites | parameters | epochs | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arm, rs in runs.items():
        solved = sum(r["train_acc"] == 1.0 for r in rs)
        tr, te = mean_sd([100 * r["train_acc"] for r in rs]), mean_sd([100 * r["test_acc"] for r in rs])
        ks = [r.get("dendrites", 0) for r in rs]
        dend = "" if arm == "mlp" else f"{statistics.fmean(ks):.1f} ({min(ks)}-{max(ks)})"
        lines.append(
            f"| {arm} | {solved} / {len(rs)} | {tr[0]:.1f} ± {tr[1]:.1f} | {te[0]:.1f} ± {te[1]:.1f} | {dend} | "
            f"{statistics.fmean(r['params'] for r in rs):.0f} | {statistics.fmean(r['epochs'] for r in rs):.0f} | "
            f"{statistics.fmean(r['wall_s'] for r in rs):.0f} |"
        )
    lines += ["", "Per seed (train / test accuracy %, dendrites, epochs):", ""]
    for seed in range(seeds):
        cells = []
        for arm, rs in runs.items():
            r = rs[seed]
            cells.append(f"{arm} {100 * r['train_acc']:.1f} / {100 * r['test_acc']:.1f}" +
                         ("" if arm == "mlp" else f", {r['dendrites']} sets, {r['epochs']} epochs"))  # fmt: skip
        lines.append(f"- seed {seed}: " + "; ".join(cells))
    text = "\n".join(lines) + "\n"
    out_md.write_text(text)
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["sweep", "table", "spirals", "one"])
    ap.add_argument("--tasks", default="spirals,parity,tabular,mnist_narrow")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--training", default="gd,correlation")
    ap.add_argument("--out", type=Path, default=RESULTS / "defaults_sweep.json")
    ap.add_argument("--knobs", default="{}", help="JSON: extra knobs for every run (e.g. a trial cap)")
    ap.add_argument("--grid", choices=["full", "defaults"], default="full", help="sweep: the grid, or defaults only")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.what == "sweep":
        trainings = tuple(args.training.split(","))
        sweep(args.tasks.split(","), args.seeds, args.out, trainings, json.loads(args.knobs), args.grid)
    elif args.what == "table":
        print(table(args.out, args.out.with_suffix(".md")))
    elif args.what == "spirals":
        print(spirals_benchmark(max(args.seeds, 10), RESULTS / "spirals.md"))
    else:
        task = args.tasks.split(",")[0]
        for training in args.training.split(","):
            print(run_growth(TASKS[task], 0, training, **json.loads(args.knobs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
