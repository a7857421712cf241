"""Dendrite types side by side at equal parameter budgets.

Run: ``.venv/bin/python -m benchmarks.dendrite_types --seeds 3`` (about 15 minutes on 2 CPU cores); ``--quick`` runs
every arm on small synthetic data in seconds (a smoke test, not a result). Results:
``benchmarks/results/types.md`` and ``types.csv`` (``--out`` elsewhere).

Two tasks:

* ``mnist``: a one-hidden-layer MLP (784-64-10) on real MNIST (10k train / 5k val, seeded split of the
  official training set; the official 10k test set). Each dendrite arm wraps both Linear layers and gets its
  dendrites before training (no growth schedule: every arm holds its final parameter count from the first
  step, so the table compares what the parameters buy). The budget is the cascade arm's size (the MLP plus
  one full cascade dendrite per layer); ``lowrank`` (4 dendrites) solves its rank, ``sparse`` and
  ``sparse_linear`` (16 inputs per branch) solve their branch count, and the width-matched MLP solves its
  hidden width to land nearest that budget. 20 epochs; score: test accuracy at the best-validation epoch.
* ``permuted``: permuted MNIST, 5 tasks, each a fixed random pixel permutation of the same 10k training
  images (test: the 10k test images under each permutation). ``gated`` is the 784-64-10 MLP with one gate of
  10 segments per neuron on both layers, context = the task's one-hot code. It is compared with the MLP
  width-matched to its budget and no context, and with the same MLP fed the one-hot code as 5 extra inputs
  (the obvious way to give a plain MLP the context). Two protocols: ``sequential`` (tasks one after the other,
  3 epochs each, one Adam throughout: the continual-learning setting of Iyer et al.; score = mean test
  accuracy over all 5 tasks after the last) and ``joint`` (all tasks interleaved, 5 epochs; score = mean
  test accuracy over tasks at the best-validation epoch).

Every dendrite arm runs twice: at the library's default ``init_scale`` 0.01 and at 1.0 (PyTorch's default
initialisation for the new weights). Output gains start at zero either way, so each dendrite arm starts as
exactly its base MLP; at 0.01 the dendrites' inputs barely move their activations, so they train slowly.
Everything else is shared: Adam (lr 1e-3), batch 128, the default activation (sigmoid, for cascade and
lowrank), 3 seeds. "beats" in the verdicts means a mean difference beyond two standard errors.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn

import torch_dendrites as td
from benchmarks import loop
from benchmarks.models import dense_params, n_params
from benchmarks.stats import compare, mean_sd

ROOT = Path(__file__).resolve().parents[1]

HIDDEN, QUICK_HIDDEN = 64, 16
LOWRANK_DENDRITES = 4
SPARSE_INPUTS = 16
TASKS, SEGMENTS = 5, 10


# ------------------------------------------------------------------------------------------ data
def mnist(seed: int, quick: bool):
    """``((x, y) train, val, test)`` with x flattened to [N, 784]."""
    if quick:
        # Synthetic "digits": ten fixed random prototypes plus noise; learnable, tiny, no files.
        g = torch.Generator().manual_seed(seed)
        protos = torch.randn(10, 784, generator=g)

        def split(n):
            y = torch.randint(0, 10, (n,), generator=g)
            return protos[y] + 2.0 * torch.randn(n, 784, generator=g), y

        return split(400), split(200), split(200)
    parts = td.datasets.load_mnist(ROOT / "data", train_size=10_000, val_size=5_000, seed=seed)
    return tuple((x.flatten(1), y) for x, y in parts)


# ------------------------------------------------------------------------------------------ models
def mlp(hidden: int, extra_inputs: int = 0) -> nn.Module:
    return nn.Sequential(nn.Linear(784 + extra_inputs, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def mlp_params(hidden: int, extra_inputs: int = 0) -> int:
    return dense_params(784 + extra_inputs, hidden, 10)


def dendritic(hidden: int, dtype: str, options: dict, count: int, seed: int, init_scale: float = 0.01) -> nn.Module:
    torch.manual_seed(seed)  # the same base MLP as the plain arms of this seed
    cfg = td.DendriteConfig(dendrite_type=dtype, dendrite_options=options, init_scale=init_scale)
    model = td.add_dendrites(mlp(hidden), cfg)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(count):
        td.grow(model, gen)
    return model


def nearest(candidates, size, budget):
    return min(candidates, key=lambda c: (abs(size(c) - budget), c))


def plain(hidden: int, extra: int = 0):
    def build(seed, init_scale=None):
        torch.manual_seed(seed)
        return mlp(hidden, extra)

    return build


def mnist_arms(hidden: int):
    """``name -> (build(seed, init_scale), description, has dendrites)``, sized to the cascade arm's budget."""
    budget = n_params(dendritic(hidden, "cascade", {}, 1, 0))
    rank = nearest(range(1, hidden + 1), lambda r: n_params(dendritic(hidden, "lowrank", {"rank": r}, 4, 0)), budget)
    k = min(SPARSE_INPUTS, hidden)
    per_set = n_params(dendritic(hidden, "sparse", {"branch_inputs": k}, 1, 0)) - n_params(mlp(hidden))
    branches = max(1, round((budget - n_params(mlp(hidden))) / per_set))
    width = nearest(range(hidden, 20 * hidden), mlp_params, budget)
    sparse_opts = {"branch_inputs": k}
    return budget, {
        "mlp": (plain(hidden), f"784-{hidden}-10, no dendrites (below budget)", False),
        "mlp-wide": (plain(width), f"784-{width}-10, width-matched to the budget", False),
        "cascade": (
            lambda s, i: dendritic(hidden, "cascade", {}, 1, s, i),
            "1 full cascade dendrite per neuron",
            True,
        ),
        "lowrank": (
            lambda s, i: dendritic(hidden, "lowrank", {"rank": rank}, LOWRANK_DENDRITES, s, i),
            f"{LOWRANK_DENDRITES} dendrites of rank {rank}",
            True,
        ),
        "sparse": (
            lambda s, i: dendritic(hidden, "sparse", sparse_opts, branches, s, i),
            f"{branches} LeakyReLU branches of {k} random inputs",
            True,
        ),
        "sparse_linear": (
            lambda s, i: dendritic(hidden, "sparse_linear", sparse_opts, branches, s, i),
            f"{branches} linear branches of {k} random inputs",
            True,
        ),
    }


def permuted_arms(hidden: int):
    opts = {"context_dim": TASKS, "segments": SEGMENTS}
    budget = n_params(dendritic(hidden, "gated", opts, 1, 0))
    width = nearest(range(hidden, 20 * hidden), mlp_params, budget)
    width_ctx = nearest(range(hidden, 20 * hidden), lambda h: mlp_params(h, TASKS), budget)
    return budget, {
        "mlp": (plain(hidden), f"784-{hidden}-10, no context (below budget)", False),
        "mlp-wide": (plain(width), f"784-{width}-10, width-matched, no context", False),
        "mlp-wide+context": (plain(width_ctx, TASKS), f"(784+{TASKS})-{width_ctx}-10, one-hot task as input", False),
        "gated": (
            lambda s, i: dendritic(hidden, "gated", opts, 1, s, i),
            f"1 gate of {SEGMENTS} segments per neuron, one-hot task context",
            True,
        ),
    }


# ------------------------------------------------------------------------------------------ training
def forward(arm: str, model: nn.Module, x: torch.Tensor, task: torch.Tensor):
    """The model's output, with the task given the way the arm takes it (or not at all)."""
    onehot = nn.functional.one_hot(task, TASKS).float()
    if arm.startswith("gated"):
        with td.dendrite_context(model, onehot):
            return model(x)
    if arm.endswith("+context"):
        return model(torch.cat([x, onehot], 1))
    return model(x)


def accuracy(arm, model, x, y, task) -> float:
    return loop.evaluate(model, (x, y, task), loop.accuracy, 2000, forward=partial(forward, arm))


def train_epoch(arm, model, opt, x, y, task, gen, batch=128):
    loop.train_epoch(model, opt, (x, y, task), nn.functional.cross_entropy, batch, gen, forward=partial(forward, arm))


def run_mnist(arm, model, data, epochs, seed):
    (xtr, ytr), (xva, yva), (xte, yte) = data
    t0 = [torch.zeros(len(v), dtype=torch.long) for v in (ytr, yva, yte)]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    best = (-1.0, 0.0, 0)
    for epoch in range(1, epochs + 1):
        train_epoch(arm, model, opt, xtr, ytr, t0[0], gen)
        val, test = accuracy(arm, model, xva, yva, t0[1]), accuracy(arm, model, xte, yte, t0[2])
        if val > best[0]:
            best = (val, test, epoch)
    return {"best_val": best[0], "test": best[1], "best_epoch": best[2]}


def permutations(seed: int):
    g = torch.Generator().manual_seed(10_000 + seed)
    return [torch.randperm(784, generator=g) for _ in range(TASKS)]


def task_data(split, perms):
    x, y = split
    xs = torch.cat([x[:, p] for p in perms])
    ys = y.repeat(len(perms))
    ts = torch.arange(len(perms)).repeat_interleave(len(y))
    return xs, ys, ts


def run_permuted(arm, model, data, protocol, epochs, seed):
    perms = permutations(seed)
    train, val, test = (task_data(s, perms) for s in data)
    n_tr, n_va, n_te = (len(s[1]) for s in data)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)

    def mean_over_tasks(split, n):
        x, y, t = split
        per_task = [accuracy(arm, model, *(v[i * n : (i + 1) * n] for v in (x, y, t))) for i in range(TASKS)]
        return statistics.fmean(per_task)

    if protocol == "sequential":
        x, y, t = train
        for i in range(TASKS):
            sl = slice(i * n_tr, (i + 1) * n_tr)
            for _ in range(epochs):
                train_epoch(arm, model, opt, x[sl], y[sl], t[sl], gen)
        return {"best_val": mean_over_tasks(val, n_va), "test": mean_over_tasks(test, n_te), "best_epoch": ""}
    best = (-1.0, 0.0, 0)
    for epoch in range(1, epochs + 1):
        train_epoch(arm, model, opt, *train, gen)
        v, te = mean_over_tasks(val, n_va), mean_over_tasks(test, n_te)
        if v > best[0]:
            best = (v, te, epoch)
    return {"best_val": best[0], "test": best[1], "best_epoch": best[2]}


# ------------------------------------------------------------------------------------------ report
def verdict(arm, rows, ref, ref_rows):
    """``(beats, line)``: whether ``arm`` beats ``ref`` beyond two standard errors (stats.py), and the sentence."""
    c = compare([r["test"] for r in rows], [r["test"] for r in ref_rows])
    ratio = statistics.fmean(r["params"] for r in rows) / statistics.fmean(r["params"] for r in ref_rows)
    return c.beats, f"- {c.sentence(arm, ref, 'test points')}, at {ratio:.2f}x its parameters."


def table(rows, arms, pairs, epochs=None):
    """The results table of one experiment, then a verdict per (arm, reference) pair."""
    lines = [
        "| arm | structure | parameters | test % (mean ± sd) | best val % (mean) | wall s (mean) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for arm, desc in arms.items():
        rs = [r for r in rows if r["arm"] == arm]
        m, sd = mean_sd([r["test"] for r in rs])
        lines.append(
            f"| {arm} | {desc} | {rs[0]['params']:,} | {m:.2f} ± {sd:.2f} | "
            f"{statistics.fmean(r['best_val'] for r in rs):.2f} | {statistics.fmean(r['wall_s'] for r in rs):.1f} |"
        )
    if epochs is not None:
        # A best score at the final epoch means the run was still improving when the budget ended.
        last = [r for r in rows if r["best_epoch"] == epochs]
        lines += ["", f"{len(last)} of {len(rows)} runs had their best validation score at the last epoch."]
    lines += ["", "Verdicts (difference of mean test scores; 'beats' only beyond two standard errors):"]
    losers = []
    for arm, ref in pairs:
        beats, line = verdict(arm, [r for r in rows if r["arm"] == arm], ref, [r for r in rows if r["arm"] == ref])
        lines.append(line)
        if not beats:
            losers.append(f"{arm} (vs {ref})")
    lines += ["", f"**Not better than their width-matched reference: {', '.join(losers) if losers else 'none'}.**"]
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="synthetic data, tiny sizes: a smoke run, not a result")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    # One torch thread by default: on 2 shared cores, two OpenMP threads competing with other jobs ran some
    # arms 10x slower than one thread did.
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--init-scales", type=float, nargs="+", default=[0.01, 1.0],
        help="DendriteConfig.init_scale values to run every dendrite arm with (0.01 is the library default)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    quick = args.quick
    hidden = QUICK_HIDDEN if quick else HIDDEN
    mnist_epochs, seq_epochs, joint_epochs = (2, 1, 2) if quick else (20, 3, 5)
    scales = args.init_scales
    rows = []
    start = time.time()
    mnist_budget, m_arms = mnist_arms(hidden)
    p_budget, p_arms = permuted_arms(hidden)
    experiments = [("mnist", "", m_arms, mnist_epochs)] + [
        ("permuted", proto, p_arms, ep) for proto, ep in (("sequential", seq_epochs), ("joint", joint_epochs))
    ]

    def runs(arms):
        """``(label, arm, init_scale)`` for every run of one experiment: plain MLPs once, dendrites per scale."""
        return [
            (f"{arm} @{i:g}" if dend else arm, arm, i if dend else None)
            for arm, (_, _, dend) in arms.items()
            for i in (scales if dend else [None])
        ]

    for seed in range(args.seeds):
        data = mnist(seed, quick)
        for task, proto, arms, epochs in experiments:
            for label, arm, scale in runs(arms):
                model = arms[arm][0](seed, scale)
                t = time.time()
                if task == "mnist":
                    res = run_mnist(label, model, data, epochs, seed)
                else:
                    res = run_permuted(label, model, data, proto, epochs, seed)
                row = {"task": task, "protocol": proto, "arm": label, "type": arm,
                       "init_scale": "" if scale is None else scale, "seed": seed, "params": n_params(model),
                       **res, "wall_s": round(time.time() - t, 2)}  # fmt: skip
                rows.append(row)
                print(f"{task:8s} {proto:10s} {label:16s} seed {seed}: test {res['test']:.2f} "
                      f"({row['params']:,} params, {row['wall_s']:.0f} s)", flush=True)  # fmt: skip
    total = time.time() - start
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "types.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    seeds = ", ".join(str(s) for s in range(args.seeds))
    md = ["# Dendrite types at equal parameter budgets", ""]
    if quick:
        md += ["**quick smoke run: not a result** (synthetic data, tiny sizes).", ""]
    cmd = f"--seeds {args.seeds}{' --quick' if quick else ''} --init-scales {' '.join(f'{i:g}' for i in scales)}"
    md += [
        f"Command: `.venv/bin/python -m benchmarks.dendrite_types {cmd}`. "
        f"Budget: {total / 60:.1f} min wall in all on 2 shared CPU cores (torch {torch.__version__}, "
        f"{args.threads} threads); seeds {seeds}; Adam lr 1e-3, batch 128; sigmoid (cascade, lowrank). "
        "Dendrites are added before training (fixed structures, no growth schedule). Each dendrite arm runs at "
        f"every `init_scale` in {{{', '.join(f'{i:g}' for i in scales)}}} (`@0.01` is the library default; "
        "the output gains start at zero either way, so every dendrite arm starts as exactly its base MLP). "
        "See the docstring of `benchmarks/dendrite_types.py` for the full protocol.",
        "",
        f"## MNIST MLP (10k train / 5k val / 10k test, {mnist_epochs} epochs; budget {mnist_budget:,} parameters)",
        "",
        "Score: test accuracy at the best-validation epoch.",
        "",
    ]

    def described(arms):
        return {label: arms[arm][1] for label, arm, _ in runs(arms)}

    m_pairs = [(label, "mlp-wide") for label, _, scale in runs(m_arms) if scale is not None]
    md += table([r for r in rows if r["task"] == "mnist"], described(m_arms), m_pairs, mnist_epochs)
    for proto, ep in (("sequential", seq_epochs), ("joint", joint_epochs)):
        how = (
            f"tasks one after the other, {ep} epochs each; score: mean test accuracy over the {TASKS} tasks after "
            "the last task (the val column: the same mean on validation, also after the last task; the spread "
            "over seeds is large because each seed draws other permutations)"
            if proto == "sequential"
            else f"tasks interleaved, {ep} epochs; score: mean test accuracy over tasks at the best-validation epoch"
        )
        md += ["", f"## Permuted MNIST, {TASKS} tasks, {proto} (budget {p_budget:,} parameters)", "", how + ".", ""]
        sub = [r for r in rows if r["task"] == "permuted" and r["protocol"] == proto]
        gated = [label for label, _, scale in runs(p_arms) if scale is not None]
        pairs = [(g, ref) for g in gated for ref in ("mlp-wide", "mlp-wide+context")]
        md += table(
            sub, described(p_arms), pairs + [("mlp-wide+context", "mlp-wide")], ep if proto == "joint" else None
        )
    (args.out / "types.md").write_text("\n".join(md) + "\n")
    print(f"wrote {args.out / 'types.md'} and types.csv in {total:.0f} s")


if __name__ == "__main__":
    main()
