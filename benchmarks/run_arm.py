"""Run one arm of one task for one seed and write its result as JSON (started by ``python -m benchmarks.run``).

The arms, in :data:`ARMS` (the one registry, which ``benchmarks.run`` reads too): ``baseline`` (the model
alone), ``width-matched`` (the model's family widened to ``--target-params``), ``gd`` and ``correlation``
(torch-dendrites), ``perforatedai`` (the peer, GD mode), and task-specific reference arms (``minilm-finetune``
for imdb). Every arm of ours and the peer's use the same data, seed, optimizer (Adam), batch size, epoch budget
and patience, and report the test score at the best-validation epoch. The peer keeps global state and writes
files into the working directory, so each arm runs in its own process and folder.

Run: ``python -m benchmarks.run_arm --task tabular --arm gd --quick --out /tmp/gd.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch

import torch_dendrites as td
from benchmarks import peer, text
from benchmarks.loop import evaluate, train_epoch
from benchmarks.models import n_params
from benchmarks.tasks import TASKS, Task, quick_variant


def _train(task: Task, model, opt, split, gen) -> None:
    train_epoch(model, opt, split, task.loss, task.batch, gen)


def _score(task: Task, model, split) -> float:
    return evaluate(model, split, task.score, batch=1000)


def width_for(task, target: int) -> float:
    """The width multiplier whose model has the parameter count closest to ``target`` (bisection)."""
    lo, hi = 0.05, 64.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if n_params(task.wide(mid)) < target:
            lo = mid
        else:
            hi = mid
    return min((lo, hi), key=lambda w: abs(n_params(task.wide(w)) - target))


def run_ours(task, arm, seed, splits, target, quick=False):
    train, val, test = splits
    width = width_for(task, target) if arm == "width-matched" else None  # builds models: before seeding
    torch.manual_seed(seed)
    model = task.wide(width) if width is not None else task.build(1.0)
    if arm in ("gd", "correlation"):
        td.add_dendrites(model)
        # The trial rule, dendrite initialisation and learning-rate scale are the library's defaults.
        cfg = td.GrowthConfig(
            mode="every" if quick else "plateau",  # quick: grow every epoch, to exercise growth
            patience=task.patience,
            max_dendrites=task.max_dendrites,
            max_epochs=task.epochs,
            seed=seed,
            dendrite_training="gd" if arm == "gd" else "correlation",
            improvement_rel=task.improvement_rel,
        )
    else:
        # Plain arms train the whole epoch budget (patience = budget) and keep their best-validation weights:
        # the dendritic arms' several phases get no more epochs than they do.
        cfg = td.GrowthConfig(
            mode="never", patience=task.epochs, max_epochs=task.epochs, improvement_rel=task.improvement_rel
        )
    ctl = td.GrowthController(model, cfg)

    def make_opt():
        return torch.optim.Adam(td.param_groups(model, task.lr))

    opt = make_opt()
    gen = torch.Generator().manual_seed(seed)
    curve = []
    t0 = time.perf_counter()
    while not ctl.done:
        _train(task, model, opt, train, gen)
        r = ctl.step(_score(task, model, val), test=_score(task, model, test))
        curve.append(r.score)
        if r.restructured:
            opt = make_opt()
    plain = ctl.architectures.get(0, {}).get("extras", {})
    return {
        "params": n_params(model),
        "dendrites": ctl.num_dendrites,
        # the test score at the best epoch without dendrites (the model before any growth)
        "pre_growth_test": plain.get("test"),
        "epochs": ctl.epoch,
        "best_val": ctl.best_score,
        "test": ctl.best_extras["test"],
        "wall_s": time.perf_counter() - t0,
        "curve": curve,
        "events": [(row["epoch"], row["event"]) for row in ctl.history if row["event"]],
    }


def run_peer(task, seed, splits, quick=False):
    """perforatedai 3.2.9, gradient-descent dendrites, driven non-interactively with the same budget."""
    train, val, test = splits
    torch.manual_seed(seed)
    model = task.build(1.0)
    ids = None
    if task.peer_only:  # the same layers as ours (e.g. only the LoRA adapters; frozen layers make it stop)
        named = model.named_modules()
        ids = ["." + n for n, m in named if task.peer_only in n + "." and type(m).__name__ in task.peer_modules]
    try:
        # quick runs switch every epoch (to exercise growth), real runs on a plateau of `patience` epochs
        GPA, UPA = peer.configure(
            task.peer_modules, ids, "every" if quick else "history", task.patience, task.max_dendrites, 2
        )
    except ImportError as exc:
        return {"error": str(exc)}
    model = UPA.perforate_model(model, save_name="pai", making_graphs=False, maximizing_score=True)
    if task.peer_output_dims is not None:  # [batch, tokens, C] outputs: the layout its docs ask for
        for m in model.modules():
            if hasattr(m, "set_this_output_dimensions"):
                m.set_this_output_dimensions(list(task.peer_output_dims))
    GPA.pai_tracker.set_optimizer(torch.optim.Adam)

    def make_opt(m):
        return GPA.pai_tracker.setup_optimizer(m, {"params": m.parameters(), "lr": task.lr})[0]

    opt = make_opt(model)
    gen = torch.Generator().manual_seed(seed)
    curve = []
    best = (-float("inf"), None, 0)
    t0 = time.perf_counter()
    epochs = 0
    while epochs < task.epochs:
        _train(task, model, opt, train, gen)
        v, t = _score(task, model, val), _score(task, model, test)
        epochs += 1
        curve.append(v)
        if v > best[0]:  # test at the best-validation epoch, the same rule as the other arms
            best = (v, t, n_params(model))
        model, restructured, complete = GPA.pai_tracker.add_validation_score(v, model)
        if complete:
            break
        if restructured:
            opt = make_opt(model)
    return {
        "params": best[2],  # at the best-validation epoch, like the other arms' restored models
        "dendrites": int(GPA.pai_tracker.member_vars.get("num_dendrites_added", 0)),
        "epochs": epochs,
        "best_val": best[0],
        "test": best[1],
        "wall_s": time.perf_counter() - t0,
        "curve": curve,
        "events": [],
    }


# ------------------------------------------------------------------------------------------ the arms
@dataclass(frozen=True)
class Arm:
    """One arm of the task benchmarks: what it is and how it runs."""

    description: str
    run: Callable[[Task, int, bool, Optional[int]], dict]  # (task, seed, quick, target_params) -> result
    kind: str  # "plain" (no dendrites, the whole budget), "ours" / "peer" (grow dendrites), "reference"
    run_order: int  # a seed's arms run in this order (width-matched after gd, whose final size it matches)
    target_from: Optional[str] = None  # the arm whose final parameter count this one is widened to
    tasks: Optional[Tuple[str, ...]] = None  # None: every task; else the tasks this reference arm belongs to

    @property
    def grows(self) -> bool:
        return self.kind in ("ours", "peer")

    def belongs_to(self, task: str) -> bool:
        return self.tasks is None or task in self.tasks


def _ours(arm: str):
    def run(task, seed, quick, target):
        return run_ours(task, arm, seed, task.data(seed, quick), target, quick)

    return run


def _peer(task, seed, quick, target):
    return run_peer(task, seed, task.data(seed, quick), quick)


def _minilm(task, seed, quick, target):
    return text.minilm_finetune(seed, quick)


# The one registry of arms, in the order of the results tables.
ARMS = {
    "baseline": Arm("the model alone", _ours("baseline"), "plain", 0),
    "width-matched": Arm(
        "the model's family widened to the gd arm's final parameter count", _ours("width-matched"), "plain", 3,
        target_from="gd",
    ),
    "gd": Arm("torch-dendrites, dendrites trained by gradient descent", _ours("gd"), "ours", 1),
    "correlation": Arm("torch-dendrites, correlation-trained candidates", _ours("correlation"), "ours", 2),
    "perforatedai": Arm("perforatedai 3.2.9, its gradient-descent dendrites", _peer, "peer", 4),
    "minilm-finetune": Arm(
        "the whole MiniLM fine-tuned on a subset of the same split (text.minilm_finetune)", _minilm, "reference", 5,
        tasks=("imdb",),
    ),
}  # fmt: skip


def arms_of(task: str):
    """The names of the arms of ``task``, in table order."""
    return [name for name, arm in ARMS.items() if arm.belongs_to(task)]


def run_sequence(names):
    """``names`` in the order one seed runs them."""
    return sorted(names, key=lambda name: ARMS[name].run_order)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--task", required=True, choices=sorted(TASKS))
    ap.add_argument("--arm", required=True, help=f"one of {list(ARMS)} (some belong to one task only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--target-params", type=int, default=None)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")
    torch.set_num_threads(max(1, int(os.environ.get("BENCH_THREADS", "2"))))
    task = TASKS[args.task]
    if args.quick:
        task = quick_variant(task)
    if args.arm not in arms_of(task.name):
        ap.error(f"--arm {args.arm!r} is not an arm of task {task.name!r}")
    arm = ARMS[args.arm]
    if arm.target_from is not None and args.target_params is None:
        ap.error(f"--target-params is required for the {args.arm} arm")
    res = arm.run(task, args.seed, args.quick, args.target_params)
    budget = res["epochs"] if arm.kind == "reference" else task.epochs  # a reference arm has its own budget
    res.update(task=task.name, arm=args.arm, seed=args.seed, quick=args.quick, epoch_budget=budget)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
