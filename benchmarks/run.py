"""Run the benchmark arms for one task (or all) over several seeds; write a results table and a figure.

Run: ``python -m benchmarks.run mnist --seeds 3`` from the repository root (or ``all``; ``--quick`` for the smoke
variant).
Results: ``benchmarks/results/<task>.csv``, ``<task>.md`` and ``<task>.png`` (quick runs write elsewhere).

Per arm: the test score at the best-validation epoch (mean ± sd over seeds), parameters, epochs and wall
time. The width-matched arm, per seed, widens the model to the parameter count the GD arm ended with.
Each arm runs in its own process, ``python -m benchmarks.run_arm`` (the peer library keeps global state and
writes into its working directory, which is a fresh temporary folder here). The arms are those of the registry
``benchmarks.run_arm.ARMS``.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import tempfile
from pathlib import Path

from benchmarks.run_arm import ARMS, arms_of, run_sequence
from benchmarks.spawn import child_env, module_command
from benchmarks.stats import compare, mean_sd
from benchmarks.tasks import TASKS, quick_variant

HERE = Path(__file__).resolve().parent
COMMON = [name for name, arm in ARMS.items() if arm.tasks is None]  # the arms every task has


def run_one(task, arm, seed, quick, target, work: Path, report_only: bool = False) -> dict:
    out = work / f"{task}-{arm}-{seed}.json"
    if out.exists():  # a resumed run (--work): this arm finished before
        return json.loads(out.read_text())
    if report_only:
        return {"task": task, "arm": arm, "seed": seed, "error": "not run"}
    cmd = module_command("run_arm", "--task", task, "--arm", arm, "--seed", str(seed), "--out", str(out))
    if quick:
        cmd.append("--quick")
    if target is not None:
        cmd += ["--target-params", str(target)]
    cwd = work / f"{task}-{arm}-{seed}"
    cwd.mkdir(parents=True, exist_ok=True)
    # stdin closed: the peer library's interactive prompts and pdb stops fail fast instead of hanging
    proc = subprocess.run(cmd, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=child_env())
    if proc.returncode != 0 or not out.exists():
        lines = [ln.strip() for ln in (proc.stdout + "\n" + proc.stderr).splitlines()]
        lines = [ln for ln in lines if ln and "Warning" not in ln and not ln.startswith("warnings.warn")]
        how = f"exit {proc.returncode}" + (" (sys.exit) without a result" if proc.returncode == 0 else "")
        return {"task": task, "arm": arm, "seed": seed, "error": f"{how}: {' | '.join(lines[-4:])}"}
    return json.loads(out.read_text())


def verdict(name, arm_rows, ref_rows, ref_name):
    """One verdict line: ``name`` against ``ref_name`` on the test score, by the one rule in stats.py."""
    a = [r["test"] for r in arm_rows if "test" in r]
    b = [r["test"] for r in ref_rows if "test" in r]
    if not a or not b:
        return f"- {name} vs {ref_name}: no comparison ({name if not a else ref_name} did not run)."
    pa = mean_sd([r["params"] for r in arm_rows if "params" in r])[0]
    pb = mean_sd([r["params"] for r in ref_rows if "params" in r])[0]
    return f"- {compare(a, b).sentence(name, ref_name, 'test points')}, at {pa / pb:.2f}x its parameters."


def write_results(task, rows, seeds, quick, out_dir: Path):
    t = quick_variant(TASKS[task]) if quick else TASKS[task]
    out_dir.mkdir(parents=True, exist_ok=True)
    for r in rows:  # dendrite sets grown during the run, kept or rolled back
        r["grown"] = sum(1 for _, event in r.get("events", []) if event in ("grow", "retry", "candidates"))
    with open(out_dir / f"{task}.csv", "w", newline="") as f:
        cols = ["task", "arm", "seed", "params", "dendrites", "grown", "epochs", "best_val", "test", "pre_growth_test"]
        cols += ["wall_s", "error"]
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore", restval="")
        w.writeheader()
        w.writerows(rows)
    by_arm = {arm: [r for r in rows if r["arm"] == arm] for arm in arms_of(t.name)}
    by_arm = {arm: rs for arm, rs in by_arm.items() if rs or arm in COMMON}  # task-specific arms left out: no row
    base_wall = mean_sd([r.get("wall_s") for r in by_arm["baseline"] if "wall_s" in r])[0]
    lines = [
        f"# {task}{' (quick smoke run: not a result)' if quick else ''}",
        "",
        f"{t.note}. Budget: at most {t.epochs} epochs per arm, patience {t.patience}, Adam lr {t.lr}, batch "
        f"{t.batch}, up to {t.max_dendrites} dendrite sets; {len(seeds)} seeds ({', '.join(map(str, seeds))}). "
        f"Score: {t.metric} on the test split at the best-validation epoch.",
        "",
        "Plain arms (baseline, width-matched) train the whole epoch budget and keep their best-validation weights; "
        "dendritic arms stop when growth stops paying (or at the budget). `kept`: runs that end with at least one "
        "dendrite set; `gain`: test score minus the same run's test score at its best epoch before any growth.",
        "",
        "| arm | test (mean ± sd) | best val (mean) | parameters (mean) | dendrites | kept | gain over pre-growth "
        "| epochs (mean) | wall s (mean) | wall / baseline |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arm, rs in by_arm.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            why = rs[0]["error"] if rs else "not run"
            lines.append(f"| {arm} | could not run: {why} | | | | | | |")
            continue
        mt, st = mean_sd([r["test"] for r in ok])
        wall = mean_sd([r["wall_s"] for r in ok])[0]
        dend = ", ".join(str(r["dendrites"]) for r in ok)
        grew = ARMS[arm].grows
        kept = f"{sum(1 for r in ok if r['dendrites'] >= 1)} / {len(ok)}" if grew else ""
        gains = [r["test"] - r["pre_growth_test"] for r in ok if r.get("pre_growth_test") is not None]
        gain = f"{mean_sd(gains)[0]:+.2f} ± {mean_sd(gains)[1]:.2f}" if gains and ARMS[arm].kind == "ours" else ""
        done = ", ".join(str(r["seed"]) for r in ok)
        name = arm if len(ok) == len(seeds) else f"{arm} (seed{'s' if len(ok) > 1 else ''} {done} only)"
        lines.append(
            f"| {name} | {mt:.2f} ± {st:.2f} | {mean_sd([r['best_val'] for r in ok])[0]:.2f} | "
            f"{mean_sd([r['params'] for r in ok])[0]:,.0f} | {dend} | {kept} | {gain} | "
            f"{mean_sd([r['epochs'] for r in ok])[0]:.1f} | {wall:.1f} | {wall / base_wall:.2f}x |"
        )
    lines += ["", "Verdicts (difference of mean test scores; 'beats' only beyond two standard errors):"]
    for arm in ("gd", "correlation"):
        for ref in ("baseline", "width-matched", "perforatedai"):
            lines.append(verdict(arm, by_arm[arm], by_arm[ref], ref))
    lines.append(verdict("perforatedai", by_arm["perforatedai"], by_arm["width-matched"], "width-matched"))
    for extra in [a for a in by_arm if a not in COMMON]:  # task-specific arms (left out with --skip-extra)
        subset = next((r["subset"] for r in by_arm[extra] if "subset" in r), "")
        lines.append(verdict("gd", by_arm["gd"], by_arm[extra], extra) + (f" ({extra}: {subset})" if subset else ""))
    reused = sorted({(r["arm"], r["reused_from"]) for r in rows if r.get("reused_from")})
    if reused:
        lines += ["", "Reused runs (same task, seeds and budget; their code did not change since):"]
        lines += [f"- {arm}: {where}; its wall / baseline compares runs of different times" for arm, where in reused]
    (out_dir / f"{task}.md").write_text("\n".join(lines) + "\n")
    (out_dir / f"{task}.json").write_text(json.dumps(rows))  # every run with its curve, to redraw or re-table
    plot(task, by_arm, out_dir / f"{task}.png")
    return "\n".join(lines)


def plot(task, by_arm, path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4), dpi=100)
    ax1, ax2 = fig.subplots(1, 2)
    for i, (arm, rs) in enumerate(by_arm.items()):
        ok = [r for r in rs if "error" not in r]
        if not ok:
            continue
        for j, r in enumerate(ok):
            ax1.plot(range(1, len(r["curve"]) + 1), r["curve"], color=f"C{i}", alpha=0.7, label=arm if j == 0 else None)
        ax2.scatter([r["params"] for r in ok], [r["test"] for r in ok], color=f"C{i}", label=arm)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("validation score")
    ax1.set_title(f"{task}: validation per epoch (all seeds)")
    ax1.legend(fontsize=8)
    sizes = [r["params"] for rs in by_arm.values() for r in rs if "params" in r]
    if sizes and max(sizes) > 3 * min(sizes):  # a log axis only where sizes span a range (else unreadable ticks)
        ax2.set_xscale("log")
    else:
        ax2.ticklabel_format(axis="x", style="sci", scilimits=(0, 0), useOffset=False)
    ax2.set_xlabel("parameters")
    ax2.set_ylabel("test at best validation")
    ax2.set_title("test score vs size")
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task", help=f"one of {sorted(TASKS)}, several joined by commas, or all")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument(
        "--first-seed", type=int, default=0, help="run seeds first-seed .. seeds-1 (split a run over processes)"
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--report-only", action="store_true", help="tables from the arms in --work only; run nothing")
    ap.add_argument(
        "--skip-extra", action="store_true", help="leave out the tasks' own reference arms (imdb's MiniLM fine-tune)"
    )
    ap.add_argument("--arms", default=",".join(COMMON), help="the arms every task has, comma-separated")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    ap.add_argument(
        "--work",
        type=Path,
        default=None,
        help="keep each arm's result here and skip arms already there (resume a long run); default: a temporary folder",
    )
    args = ap.parse_args(argv)
    out = args.out or (Path(tempfile.mkdtemp(prefix="bench-quick-")) if args.quick else HERE / "results")
    arms = [a for a in args.arms.split(",") if a]
    seeds = list(range(args.first_seed, args.seeds))
    tasks = sorted(TASKS) if args.task == "all" else args.task.split(",")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        ap.error(f"unknown task(s) {unknown}; choose from {sorted(TASKS)} or all")
    extra = (lambda task: []) if args.skip_extra else (lambda task: [a for a in arms_of(task) if a not in COMMON])
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        tmp = args.work or tmp
        for task in tasks:
            rows = []
            for seed in seeds:
                done = {}
                # in run order: width-matched runs after gd, whose final size it matches
                for arm in run_sequence([a for a in COMMON if a in arms] + extra(task)):
                    target = None
                    source = ARMS[arm].target_from
                    if source is not None:
                        if "params" not in done.get(source, {}):
                            rows.append({"task": task, "arm": arm, "seed": seed, "error": f"needs the {source} arm"})
                            continue
                        target = done[source]["params"]
                    res = run_one(task, arm, seed, args.quick, target, Path(tmp), args.report_only)
                    done[arm] = res
                    rows.append(res)
                    print(f"{task} seed {seed} {arm:>13}: " + (res.get("error") or
                          f"test {res['test']:.2f}, params {res['params']:,}, dendrites {res['dendrites']}, "
                          f"epochs {res['epochs']}, {res['wall_s']:.1f}s"), flush=True)  # fmt: skip
            print(write_results(task, rows, seeds, args.quick, out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
