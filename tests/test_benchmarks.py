"""The benchmark harness on its quick variants.

By default one task runs in-process (every arm of ours, the table, the verdicts and the figure); every
task and arm end to end in subprocesses (``python -m benchmarks.run``, the peer included) runs with
``make test-all``.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("tabular", "mnist", "unet", "imdb", "lora")
COMMON = {"baseline", "width-matched", "gd", "correlation", "perforatedai"}


def _check_table(tmp_path, task, want):
    rows = list(csv.DictReader(open(tmp_path / f"{task}.csv")))
    arms = {r["arm"]: r for r in rows}
    assert want <= set(arms), task
    assert all(not r["error"] for r in rows if r["arm"] in want), [r["error"] for r in rows if r["error"]]
    # quick runs grow every epoch (mode="every"), so growth ran in both of our dendritic arms whatever the
    # scores; whether a set is kept depends on them and is not asserted
    assert int(arms["gd"]["grown"]) >= 1 and int(arms["correlation"]["grown"]) >= 1, task
    md = (tmp_path / f"{task}.md").read_text()
    assert "quick smoke run: not a result" in md and "Verdicts" in md
    assert (tmp_path / f"{task}.png").stat().st_size > 1000
    # the width-matched arm matches the GD arm's final size within 5 %
    assert abs(int(arms["width-matched"]["params"]) / int(arms["gd"]["params"]) - 1) < 0.05, task
    return arms


def test_quick_task_in_process(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import run as bench_run
    from benchmarks import run_arm
    from benchmarks.tasks import TASKS, quick_variant

    task = quick_variant(TASKS["tabular"])
    rows = []
    for seed in (0,):
        splits = task.data(seed, True)
        gd = None
        for arm in ("baseline", "gd", "correlation", "width-matched"):
            target = gd["params"] if arm == "width-matched" else None
            res = run_arm.run_ours(task, arm, seed, splits, target, quick=True)
            res.update(task="tabular", arm=arm, seed=seed)
            gd = res if arm == "gd" else gd
            rows.append(res)
    bench_run.write_results("tabular", rows, [0], True, tmp_path)
    arms = _check_table(tmp_path, "tabular", {"baseline", "gd", "correlation", "width-matched"})
    assert int(arms["gd"]["epochs"]) <= task.epochs


def test_arm_registry_is_what_run_and_run_arm_use(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import run as bench_run
    from benchmarks import run_arm

    assert set(bench_run.COMMON) == COMMON and run_arm.ARMS["width-matched"].target_from == "gd"
    assert run_arm.arms_of("imdb") == [*bench_run.COMMON, "minilm-finetune"]
    assert run_arm.arms_of("tabular") == bench_run.COMMON
    # gd runs before width-matched, which matches its final size
    assert run_arm.run_sequence(run_arm.arms_of("imdb")) == [
        "baseline", "gd", "correlation", "width-matched", "perforatedai", "minilm-finetune"
    ]  # fmt: skip
    with pytest.raises(SystemExit):
        run_arm.main(["--task", "tabular", "--arm", "minilm-finetune", "--out", "unused.json"])


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_quick_benchmark_runs_every_arm(tmp_path, task):
    """``python -m benchmarks.run <task> --quick``, started outside the repository (each arm in a subprocess)."""
    pytest.importorskip("sklearn")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", task, "--quick", "--seeds", "1", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=1800, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    want = COMMON | ({"minilm-finetune"} if task == "imdb" else set())
    arms = _check_table(tmp_path / "out", task, want)
    assert set(arms) == want, task


def test_compression_budget_keeps_every_arm_and_shrinks_the_sample():
    """The MNIST compression experiment runs at its CPU-sized budget (smaller samples and fewer epochs, every
    arm and control kept); an override changes only the fields it names; other tasks keep their own budget."""
    from benchmarks.compression import BUDGETS, budgeted
    from benchmarks.tasks import TASKS

    mnist = budgeted(TASKS["mnist"])
    assert (mnist.epochs, mnist.patience) == (BUDGETS["mnist"]["epochs"], BUDGETS["mnist"]["patience"])
    assert mnist.build is TASKS["mnist"].build and mnist.lr == TASKS["mnist"].lr
    assert "3k train / 2k val" in mnist.note and mnist.data(0, True)[0][0].shape[1:] == (1, 28, 28)
    longer = budgeted(TASKS["mnist"], epochs=20, patience=3)
    assert (longer.epochs, longer.patience) == (20, 3) and "at most 20 epochs" in longer.note
    assert budgeted(TASKS["imdb"]) is TASKS["imdb"]
    assert budgeted(TASKS["imdb"], epochs=5).epochs == 5


def test_compression_widens_the_narrow_base_within_its_own_family():
    """The parameter-matched control of a narrow base keeps that base's convolutions and widens its hidden layer:
    at the narrow base's own parameter count it is the narrow base."""
    from benchmarks.compression import _at
    from benchmarks.models import n_params
    from benchmarks.run_arm import width_for
    from benchmarks.tasks import TASKS

    for w in (0.25, 0.5):
        task = _at(TASKS["mnist"], w, 1e-3)
        narrow = task.build(1.0)
        same = task.wide(width_for(task, n_params(narrow)))
        assert [tuple(p.shape) for p in same.parameters()] == [tuple(p.shape) for p in narrow.parameters()]
        wider = task.wide(width_for(task, 2 * n_params(narrow)))
        assert (
            wider.conv2.out_channels == narrow.conv2.out_channels and wider.fc1.out_features > narrow.fc1.out_features
        )
    assert _at(TASKS["imdb"], 0.25, 1e-3).wide is TASKS["imdb"].wide
