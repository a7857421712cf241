"""The dendrite-type benchmark (``python -m benchmarks.dendrite_types``) end to end on its quick synthetic variant."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_type_benchmark_runs_every_arm(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.dendrite_types", "--quick", "--seeds", "1", "--out", str(tmp_path),
         "--threads", "1"],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "types.csv")))
    arms = {(r["task"], r["protocol"], r["type"], r["init_scale"]) for r in rows}
    scales = ("0.01", "1.0")
    mnist = {("mnist", "", a, "") for a in ("mlp", "mlp-wide")}
    mnist |= {("mnist", "", a, i) for a in ("cascade", "lowrank", "sparse", "sparse_linear") for i in scales}
    permuted = {(p, a, "") for p in ("sequential", "joint") for a in ("mlp", "mlp-wide", "mlp-wide+context")}
    permuted |= {(p, "gated", i) for p in ("sequential", "joint") for i in scales}
    assert arms == mnist | {("permuted", *a) for a in permuted}
    # equal budgets: every dendrite arm within 5 % of its width-matched MLP
    wide = {(r["task"], r["protocol"]): int(r["params"]) for r in rows if r["arm"] == "mlp-wide"}
    for r in rows:
        if r["init_scale"]:
            assert abs(int(r["params"]) / wide[(r["task"], r["protocol"])] - 1) < 0.05, r["arm"]
    md = (tmp_path / "types.md").read_text()
    assert "quick smoke run: not a result" in md and "Not better than their width-matched reference" in md
    assert "| cascade @0.01 |" in md and "| gated @1 |" in md
