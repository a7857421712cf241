"""Continual learning on permuted MNIST: active dendrites + k-WTA (Iyer et al. 2022) against parameter- and
information-matched controls.

Run: ``.venv/bin/python -m benchmarks.continual --seeds 3`` (10 and 25 tasks, one thread: 34.5 minutes of runs
on the shared 2-core machine while other jobs kept it loaded; the 10-task half took 6 minutes nearly quiet);
``--quick`` runs every arm on tiny synthetic tasks in seconds (a smoke test, not a result). Results:
``benchmarks/results/continual.md``, ``continual.png`` and the raw runs ``continual.json`` (``--out`` elsewhere).
``--resume`` skips runs already in the JSON file. The 25 tasks at the issue's calibration size, 10k images per
task, for the four arms that decide the question (56 minutes of runs, beyond the 30-minute budget, hence a
separate file): ``--tasks 25 --train-per-task 10000 --arms dendrites+kwta kwta-wide kwta-wide+context mlp
--max-extend 3 --name continual_10k``.

Protocol (domain-incremental, as in the paper). Task ``t`` is MNIST under a fixed random pixel permutation (drawn
per seed). The tasks are learned one after the other with one shared 10-way head; the optimizer (Adam) is
rebuilt at the start of every task; every arm gets the same images, batches, epochs and batch size. Each
task's training images are a random subset of a 50k pool of the official training images; its validation
images a subset of the 10k held out from that pool (never trained on); its test images a subset of the
official test set. Score: the mean test accuracy over all tasks after the last one has been learned.

Context (the arms that use it). Task ``t``'s prototype is the mean of its training images
(:class:`torch_dendrites.TaskPrototypes`, filled at the start of the task), projected to ``context_dim`` values
by a fixed random matrix (seeded). During training the current task's context is given; at test the task is
not: each image takes the context of the prototype nearest to it. Gated arms receive it through
``td.dendrite_context``; the information-matched control receives the very same vector as extra inputs.

Arms (784-H-H-10, k-WTA keeps 5 % of each hidden layer, else ReLU):

* ``dendrites+kwta``: both hidden layers wrapped with ``gated`` dendrites in the paper's configuration
  (``first_gate="full"``: one segment per task, the sigmoid of the strongest-|response| segment multiplies the
  neuron; ``init_scale=1``), then k-WTA;
* ``kwta``: k-WTA, no dendrites, no context; ``dendrites``: gated as above, then ReLU (no k-WTA);
  ``mlp``: ReLU, no context;
* ``kwta-wide``: the k-WTA net widened to ``dendrites+kwta``'s trainable parameter count (parameter-matched);
* ``kwta-wide+context``: the same with the context as extra inputs, widened to the same count (parameter- and
  information-matched);
* ``cascade+kwta`` (one cascade dendrite per hidden neuron) and ``sparse+kwta`` (dANN branches of 16 random
  inputs): the library's context-free dendrite types on the k-WTA net, ``init_scale=1`` (they cannot use a
  context, so they test whether added dendritic capacity alone protects against forgetting).

Learning rate: chosen per arm and per task count by validation accuracy (mean over tasks after the last) of a
search seed that is not among the reported seeds, on the grid of ``experiment.search_lr`` (extended while the best
is at an edge). "beats" follows ``stats.compare`` (difference of means beyond two standard errors).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

import torch_dendrites as td
from benchmarks import loop, stats
from benchmarks.experiment import RunLog, final_runs, search_lr
from benchmarks.models import dense_params, trainable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

SEARCH_SEED = 1000
# Iyer et al. 2022, mean test accuracy over all tasks after the last (8 seeds; 2 x 2048 units, context = the
# 784-d prototype, not parameter-matched: the segments hold several times the feed-forward weights; the MLP
# had no context).
PAPER = {
    10: {"dendrites+kwta": 94.6, "kwta": 91.3, "dendrites": 82.9, "mlp": 82.0},
    100: {"dendrites+kwta": 81.4, "kwta": 65.6, "dendrites": 61.5, "mlp": 48.3},
}


@dataclass(frozen=True)
class Setting:
    tasks: int
    train_per_task: int
    epochs: int
    val_per_task: int
    test_per_task: int
    hidden: int = 512
    context_dim: int = 32
    batch: int = 128
    fraction_on: float = 0.05
    sparse_sets: int = 2
    lr_grid: tuple = (3e-4, 1e-3, 3e-3)
    max_extend: int = 2


FULL = {
    10: Setting(tasks=10, train_per_task=2500, epochs=2, val_per_task=500, test_per_task=2000),
    25: Setting(tasks=25, train_per_task=2500, epochs=2, val_per_task=500, test_per_task=2000),
}
QUICK = {
    3: Setting(
        tasks=3, train_per_task=120, epochs=1, val_per_task=40, test_per_task=40, hidden=32, context_dim=8,
        batch=32, fraction_on=0.25, sparse_sets=1, lr_grid=(1e-3, 3e-3), max_extend=1,
    ),
}  # fmt: skip


# ------------------------------------------------------------------------------------------ data
def pools(quick: bool):
    """``(x, y)`` train pool, validation pool and test set, flattened to [N, 784]."""
    if quick:
        # Synthetic "digits": ten fixed random prototypes plus noise; learnable, tiny, no files.
        g = torch.Generator().manual_seed(0)
        protos = torch.randn(10, 784, generator=g)

        def split(n):
            y = torch.randint(0, 10, (n,), generator=g)
            return protos[y] + 1.5 * torch.randn(n, 784, generator=g), y

        return split(600), split(200), split(200)
    try:
        parts = td.datasets.load_mnist(ROOT / "data", train_size=50_000, val_size=10_000, seed=0)
    except td.datasets.DataNotFound as exc:
        raise SystemExit(
            f"{exc}\nFetch it with: .venv/bin/python examples/mnist/fetch_data.py --data-dir data"
        ) from None
    return tuple((x.flatten(1), y) for x, y in parts)


@dataclass
class Task:
    perm: torch.Tensor
    train: torch.Tensor  # indices into the train pool
    val: torch.Tensor
    test: torch.Tensor


def make_tasks(setting: Setting, seed: int, sizes) -> List[Task]:
    """The tasks of one seed: a permutation and image subsets each (the same for every arm)."""
    g = torch.Generator().manual_seed(7919 * seed + 17)
    out = []
    for _ in range(setting.tasks):
        perm = torch.randperm(784, generator=g)
        pick = [torch.randperm(n, generator=g)[:k] for n, k in zip(sizes, setting_sizes(setting))]
        out.append(Task(perm, *pick))
    return out


def setting_sizes(s: Setting):
    return s.train_per_task, s.val_per_task, s.test_per_task


def task_split(pool, task: Task, which: str):
    x, y = pool
    idx = getattr(task, which)
    return x[idx][:, task.perm], y[idx]


# ------------------------------------------------------------------------------------------ arms
@dataclass(frozen=True)
class Arm:
    name: str
    description: str
    build: Callable[[int], nn.Module]  # seed -> model
    context: str  # "none", "gate" or "input"


def mlp(hidden: int, act: str, fraction_on: float, extra: int = 0) -> nn.Sequential:
    def a():
        return td.KWTA(hidden, fraction=fraction_on) if act == "kwta" else nn.ReLU()

    return nn.Sequential(nn.Linear(784 + extra, hidden), a(), nn.Linear(hidden, hidden), a(), nn.Linear(hidden, 10))


def mlp_params(hidden: int, extra: int = 0) -> int:
    return dense_params(784 + extra, hidden, hidden, 10)


def with_dendrites(model: nn.Module, dtype: str, options: dict, sets: int, seed: int) -> nn.Module:
    cfg = td.DendriteConfig(dendrite_type=dtype, target_names=["0", "2"], dendrite_options=options, init_scale=1.0)
    model = td.add_dendrites(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(sets):
        td.grow(model, gen)
    return model


def arms_for(s: Setting) -> Dict[str, Arm]:
    h, f, d = s.hidden, s.fraction_on, s.context_dim
    gated = {"context_dim": d, "segments": s.tasks, "first_gate": "full"}

    def seeded(fn):
        def build(seed):
            torch.manual_seed(seed)  # every arm of a seed starts from its own, reproducible init
            return fn(seed)

        return build

    def dend(act):
        return seeded(lambda seed: with_dendrites(mlp(h, act, f), "gated", gated, 1, seed))

    budget = trainable(dend("kwta")(0))
    wide = min(range(h, 8 * h), key=lambda w: (abs(mlp_params(w) - budget), w))
    wide_ctx = min(range(h, 8 * h), key=lambda w: (abs(mlp_params(w, d) - budget), w))
    sparse = {"branch_inputs": 16}

    def plain(width, act, extra=0):
        return seeded(lambda seed: mlp(width, act, f, extra))

    def context_free(dtype, options, sets):
        return seeded(lambda seed: with_dendrites(mlp(h, "kwta", f), dtype, options, sets, seed))

    gate = f"gated (1 full gate, {s.tasks} segments x {d}-d context)"
    arms = [
        Arm("dendrites+kwta", f"{gate}, k-WTA", dend("kwta"), "gate"),
        Arm("kwta", f"784-{h}-{h}-10, k-WTA {f:.0%}, no context", plain(h, "kwta"), "none"),
        Arm("dendrites", f"{gate}, ReLU (no k-WTA)", dend("relu"), "gate"),
        Arm("mlp", f"784-{h}-{h}-10, ReLU, no context", plain(h, "relu"), "none"),
        Arm("kwta-wide", f"784-{wide}-{wide}-10, k-WTA, parameter-matched", plain(wide, "kwta"), "none"),
        Arm(
            "kwta-wide+context",
            f"(784+{d})-{wide_ctx}-{wide_ctx}-10, k-WTA, context as input, parameter-matched",
            plain(wide_ctx, "kwta", d),
            "input",
        ),
        Arm("cascade+kwta", "1 cascade dendrite per hidden neuron, k-WTA", context_free("cascade", {}, 1), "none"),
        Arm(
            "sparse+kwta",
            f"{s.sparse_sets} dANN branches (16 random inputs) per hidden neuron, k-WTA",
            context_free("sparse", sparse, s.sparse_sets),
            "none",
        ),
    ]
    return {a.name: a for a in arms}


# ------------------------------------------------------------------------------------------ training
def forward(arm: Arm, model: nn.Module, x: torch.Tensor, ctx: Optional[torch.Tensor]) -> torch.Tensor:
    if arm.context == "gate":
        with td.dendrite_context(model, ctx):
            return model(x)
    if arm.context == "input":
        return model(torch.cat([x, ctx.expand(x.shape[0], -1)], 1))
    return model(x)


@torch.no_grad()
def accuracy(arm: Arm, model: nn.Module, protos: td.TaskPrototypes, x, y, true_task: int):
    """``(accuracy %, fraction of images whose nearest prototype is their own task)``."""
    model.eval()
    correct = right_task = 0
    for i in range(0, len(y), 1000):
        xb = x[i : i + 1000]
        ctx = None
        if arm.context != "none":
            inferred = protos.nearest(xb)
            right_task += (inferred == true_task).sum().item()
            ctx = protos.contexts()[inferred]
        correct += (forward(arm, model, xb, ctx).argmax(1) == y[i : i + 1000]).sum().item()
    model.train()
    return 100.0 * correct / len(y), right_task / len(y)


def run(arm: Arm, s: Setting, data, seed: int, lr: float, test: bool) -> dict:
    """Train ``arm`` on the tasks of ``seed`` in sequence; score every task after the last."""
    train_pool, val_pool, test_pool = data
    tasks = make_tasks(s, seed, [len(p[1]) for p in data])
    model = arm.build(seed)
    protos = td.TaskPrototypes(s.tasks, 784, context_dim=s.context_dim, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    just_learned = []
    t0 = time.time()
    for t, task in enumerate(tasks):
        x, y = task_split(train_pool, task, "train")
        protos.update(x, t)  # the task's prototype: the mean of its training images
        ctx = protos.context(task=t)
        opt = torch.optim.Adam(model.parameters(), lr=lr)  # reset per task
        for _ in range(s.epochs):
            loop.train_epoch(model, opt, (x, y), nn.functional.cross_entropy, s.batch, gen,
                             forward=lambda m, xb, ctx=ctx: forward(arm, m, xb, ctx))  # fmt: skip
        # How well the task was learned before the later ones could interfere (its validation images).
        just_learned.append(round(accuracy(arm, model, protos, *task_split(val_pool, task, "val"), t)[0], 3))
    train_s = time.time() - t0
    res = {"params": trainable(model), "train_s": round(train_s, 2), "val_just_learned": just_learned}
    for split, pool in (("val", val_pool), ("test", test_pool)) if test else (("val", val_pool),):
        per_task, inferred = [], []
        for t, task in enumerate(tasks):
            acc, right = accuracy(arm, model, protos, *task_split(pool, task, split), t)
            per_task.append(round(acc, 3))
            inferred.append(right)
        res[split] = sum(per_task) / len(per_task)
        res[f"{split}_per_task"] = per_task
        if arm.context != "none":
            res[f"{split}_task_inference"] = round(sum(inferred) / len(inferred), 4)
    res["wall_s"] = round(time.time() - t0, 2)
    return res


# ------------------------------------------------------------------------------------------ driver
def experiment(s: Setting, data, seeds: int, log: RunLog, only: Optional[List[str]] = None) -> Dict[str, dict]:
    arms = arms_for(s)
    if only:
        arms = {k: v for k, v in arms.items() if k in only}
    chosen = {}
    for name, arm in arms.items():

        def score(lr, name=name, arm=arm):
            key = {"tasks": s.tasks, "phase": "search", "arm": name, "seed": SEARCH_SEED, "lr": lr}
            row, new = log.run_once(key, run, arm, s, data, SEARCH_SEED, lr, test=False)
            if new:
                print(f"{s.tasks:3d} tasks  search {name:18s} lr {lr:g}: val {row['val']:.2f} ({row['wall_s']:.0f} s)",
                      flush=True)  # fmt: skip
            return row["val"]

        lr, tried, at_edge = search_lr(score, s.lr_grid, s.max_extend)
        chosen[name] = {"lr": lr, "tried": tried, "at_edge": at_edge}
    lrs = {name: c["lr"] for name, c in chosen.items()}
    final_runs(log, run, arms, lrs, seeds, {"tasks": s.tasks}, lambda seed: (s, data, seed), f"{s.tasks:3d} tasks ")
    return {"arms": arms, "chosen": chosen}


# ------------------------------------------------------------------------------------------ report
PAIRS = [
    ("dendrites+kwta", "kwta-wide", "parameter-matched"),
    ("dendrites+kwta", "kwta-wide+context", "parameter- and information-matched"),
    ("dendrites+kwta", "kwta", "same base, no context"),
    ("dendrites+kwta", "mlp", "the plain ReLU net, no context, its own tuned lr"),
    ("kwta-wide+context", "kwta-wide", "what the context buys as plain input"),
    ("dendrites", "mlp", "paper's 'dendrites only' row"),
    ("kwta", "mlp", "paper's 'kWTA only' row"),
    ("dendrites+kwta", "dendrites", "what k-WTA adds to the dendrites"),
    ("cascade+kwta", "kwta", "context-free dendrites"),
    ("sparse+kwta", "kwta", "context-free dendrites"),
]


def report(settings: Dict[int, dict], rows: List[dict], meta: dict, quick: bool) -> List[str]:
    md = ["# Continual learning: permuted MNIST with active dendrites and matched controls", ""]
    if quick:
        md += ["**quick smoke run: not a result** (synthetic data, tiny sizes).", ""]
    md += [
        f"Command: `{meta['command']}`. Runs took {meta['run_min']:.1f} min in all (search and reported seeds; "
        f"this invocation {meta['wall_min']:.1f} min) on torch {meta['torch']}, "
        f"{meta['threads']} thread(s); reported seeds {meta['seeds']}, learning rates searched on seed {SEARCH_SEED}. "
        "Protocol, arms and the search: the docstring of `benchmarks/continual.py`.",
        "",
    ]
    verdicts = []
    for tasks, res in settings.items():
        s: Setting = res["setting"]
        final = [r for r in rows if r["tasks"] == tasks and r["phase"] == "final"]
        md += [
            f"## {tasks} tasks ({s.train_per_task:,} training images x {s.epochs} epochs per task, batch {s.batch}, "
            f"{s.val_per_task} validation / {s.test_per_task:,} test images per task; hidden {s.hidden}, "
            f"context {s.context_dim}-d)",
            "",
            "| arm | structure | trainable params | test % (mean ± sd) | val % | val % just learned | lr (searched) | "
            "task inferred | wall s |",
            "|---|---|---:|---:|---:|---:|---|---:|---:|",
        ]
        for name, arm in res["arms"].items():
            rs = [r for r in final if r["arm"] == name]
            if not rs:
                continue
            c = res["chosen"][name]
            tried = ", ".join(f"{lr:g}{'*' if lr == c['lr'] else ''}: {v:.1f}" for lr, v in sorted(c["tried"].items()))
            edge = " (edge)" if c["at_edge"] else ""
            inf = [r.get("test_task_inference") for r in rs if r.get("test_task_inference") is not None]
            inf_s = f"{100 * sum(inf) / len(inf):.1f} %" if inf else "-"
            md.append(
                f"| {name} | {arm.description} | {rs[0]['params']:,} | {stats.fmt_mean_sd(r['test'] for r in rs)} | "
                f"{stats.mean_sd(r['val'] for r in rs)[0]:.2f} | "
                f"{stats.mean_sd(sum(r['val_just_learned']) / len(r['val_just_learned']) for r in rs)[0]:.2f} | "
                f"{tried}{edge} | {inf_s} | "
                f"{stats.mean_sd(r['wall_s'] for r in rs)[0]:.0f} |"
            )
        md += [
            "",
            "Columns: test/val % = mean accuracy over all tasks after the last task; 'just learned' = mean over "
            "tasks of the validation accuracy on each task right after training it (before later tasks "
            "interfere); lr: validation accuracy (%) of the search seed per value tried, * = chosen, (edge) = the "
            "best was still at the end of the ladder searched; task inferred: test images whose nearest prototype "
            "is their own task.",
            "",
        ]
        md += ["Verdicts (difference of mean test accuracy; 'beats' only beyond two standard errors):", ""]
        for a, b, why in PAIRS:
            ra = [r["test"] for r in final if r["arm"] == a]
            rb = [r["test"] for r in final if r["arm"] == b]
            if not ra or not rb:
                continue
            c = stats.compare(ra, rb)
            pa = stats.mean_sd(r["params"] for r in final if r["arm"] == a)[0]
            pb = stats.mean_sd(r["params"] for r in final if r["arm"] == b)[0]
            md.append(f"- {c.sentence(a, b)}, at {pa / pb:.2f}x its parameters ({why}).")
            verdicts.append({"tasks": tasks, "a": a, "b": b, "why": why, **asdict(c)})
        md.append("")
    md += [
        "## Beside the published rows",
        "",
        "Iyer et al. 2022 (2 x 2048 units, 784-d prototype context, full MNIST per task, 8 seeds). Their arms are "
        "not parameter-matched (the segments hold several times the feed-forward weights) and their MLP had no "
        "context; ours differ in size and data per task (above), so compare the ordering, not the numbers.",
        "",
        "| arm | paper, 10 tasks | ours, 10 tasks | paper, 100 tasks | ours, 25 tasks |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in PAPER[10]:
        ours = {}
        for tasks in (10, 25):
            rs = [r["test"] for r in rows if r["tasks"] == tasks and r["phase"] == "final" and r["arm"] == name]
            ours[tasks] = stats.fmt_mean_sd(rs) if rs else "-"
        md.append(f"| {name} | {PAPER[10][name]} | {ours[10]} | {PAPER[100][name]} | {ours[25]} |")
    meta["verdicts"] = verdicts
    return md


def figure(settings: Dict[int, dict], rows: List[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 1 + len(settings), figsize=(5 + 5 * len(settings), 4.2))
    ax = axes[0]
    names = list(next(iter(settings.values()))["arms"])
    for j, tasks in enumerate(settings):
        ms = [stats.mean_sd(r["test"] for r in rows if r["tasks"] == tasks and r["phase"] == "final" and r["arm"] == n)
              for n in names]  # fmt: skip
        pos = [i + (j - (len(settings) - 1) / 2) * 0.35 for i in range(len(names))]
        ax.bar(pos, [m for m, _ in ms], 0.35, yerr=[s for _, s in ms], capsize=2, label=f"{tasks} tasks")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("mean test accuracy over tasks after the last (%)")
    lo = min(r["test"] for r in rows if r["phase"] == "final")
    ax.set_ylim(max(0, lo - 10), 100)
    ax.legend(fontsize=8)
    ax.set_title("all arms (mean ± sd over seeds)")
    for ax, tasks in zip(axes[1:], settings):
        for n in ("dendrites+kwta", "kwta-wide", "kwta-wide+context", "kwta", "mlp"):
            rs = [r["test_per_task"] for r in rows if r["tasks"] == tasks and r["phase"] == "final" and r["arm"] == n]
            if rs:
                mean = [sum(v) / len(v) for v in zip(*rs)]
                ax.plot(range(1, len(mean) + 1), mean, marker=".", label=n)
        ax.set_xlabel("task (learned in this order)")
        ax.set_ylabel("test accuracy after the last task (%)")
        ax.set_title(f"{tasks} tasks: forgetting by task (mean over seeds)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--tasks", type=int, nargs="+", default=None, help="task counts to run (default: 10 25)")
    ap.add_argument("--arms", nargs="+", default=None, help="run only these arms")
    ap.add_argument("--quick", action="store_true", help="synthetic data, tiny sizes: a smoke run, not a result")
    ap.add_argument("--train-per-task", type=int, default=None, help="override the training images per task")
    ap.add_argument("--epochs", type=int, default=None, help="override the epochs per task")
    ap.add_argument("--max-extend", type=int, default=None, help="override how far the lr search may go past an edge")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--name", default="continual", help="base name of the result files (default: continual)")
    ap.add_argument("--resume", action="store_true", help="skip the runs already in <out>/<name>.json")
    # One torch thread: on 2 shared cores two OpenMP threads competing with other jobs can be far slower.
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    table = QUICK if args.quick else FULL
    wanted = args.tasks or list(table)
    unknown = [t for t in wanted if t not in table]
    if unknown:
        raise SystemExit(f"--tasks {unknown}: choose from {list(table)}")
    settings = {}
    for t in wanted:
        s = table[t]
        if args.train_per_task:
            s = replace(s, train_per_task=args.train_per_task)
        if args.epochs:
            s = replace(s, epochs=args.epochs)
        if args.max_extend is not None:
            s = replace(s, max_extend=args.max_extend)
        settings[t] = s
    command = "python -m benchmarks.continual " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"command": command.strip(), "torch": torch.__version__, "threads": args.threads,
            "seeds": list(range(args.seeds)), "settings": {t: asdict(s) for t, s in settings.items()}}  # fmt: skip
    log = RunLog(args.out / f"{args.name}.json", args.resume, meta)
    start = time.time()
    data = pools(args.quick)
    done = {}
    for t, s in settings.items():
        done[t] = {"setting": s, **experiment(s, data, args.seeds, log, args.arms)}
    meta["wall_min"] = (time.time() - start) / 60
    meta["run_min"] = sum(r["wall_s"] for r in log.doc["runs"]) / 60
    # Report the runs of this configuration only: a resumed log may also hold runs at learning rates that a
    # longer search has since replaced, or of more seeds.
    rows = [
        r
        for r in log.doc["runs"]
        if r["tasks"] in done
        and r["arm"] in done[r["tasks"]]["chosen"]
        and (
            r["phase"] == "search" or (r["lr"] == done[r["tasks"]]["chosen"][r["arm"]]["lr"] and r["seed"] < args.seeds)
        )
    ]
    md = report(done, rows, meta, args.quick)
    meta["chosen_lr"] = {
        t: {n: {**c, "tried": {f"{k:g}": v for k, v in c["tried"].items()}} for n, c in d["chosen"].items()}
        for t, d in done.items()
    }
    log.doc["meta"] = meta
    log.save()
    (args.out / f"{args.name}.md").write_text("\n".join(md) + "\n")
    figure(done, rows, args.out / f"{args.name}.png")
    print(f"wrote {args.out / args.name}.md, .png and .json in {meta['wall_min']:.1f} min")
    return done, log.doc


if __name__ == "__main__":
    main()
