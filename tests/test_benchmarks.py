"""The benchmark harness end to end on its quick variants: every task, every arm, one seed."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmarks_run_every_arm(tmp_path):
    pytest.importorskip("sklearn")
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "all", "--quick", "--seeds", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    for task in ("tabular", "mnist", "unet", "imdb", "lora"):
        rows = list(csv.DictReader(open(tmp_path / f"{task}.csv")))
        arms = {r["arm"]: r for r in rows}
        want = {"baseline", "width-matched", "gd", "correlation", "perforatedai"}
        assert set(arms) == (want | {"minilm-finetune"} if task == "imdb" else want), task
        assert all(not r["error"] for r in rows), [r["error"] for r in rows if r["error"]]
        # growth ran in both of our dendritic arms (a set that did not help is rolled back) and in the peer's
        assert int(arms["gd"]["grown"]) >= 1 and int(arms["correlation"]["grown"]) >= 1, task
        if task in ("tabular", "mnist", "lora"):  # tasks where the quick run's sets are known to help
            assert int(arms["gd"]["dendrites"]) >= 1, task
        md = (tmp_path / f"{task}.md").read_text()
        assert "quick smoke run: not a result" in md and "Verdicts" in md
        assert (tmp_path / f"{task}.png").stat().st_size > 1000
        # the width-matched arm matches the GD arm's final size within 5 %
        assert abs(int(arms["width-matched"]["params"]) / int(arms["gd"]["params"]) - 1) < 0.05, task
