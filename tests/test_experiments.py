"""The issue-16 experiments (``benchmarks.continual``, ``benchmarks.dann``) on their quick synthetic variants,
in-process, and the helpers they share: the one "beats" rule (``benchmarks.stats``) and the learning-rate search
(``benchmarks.experiment``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("MPLBACKEND", "Agg")


# ------------------------------------------------------------------------------ stats
def test_beats_rule_is_two_standard_errors_of_the_difference(bench):
    from benchmarks import stats

    a, b = [10.0, 11.0, 12.0], [8.0, 9.0, 10.0]  # diff 2, sd 1 each: se = sqrt(2/3), 2 se = 1.633
    c = stats.compare(a, b)
    assert math.isclose(c.diff, 2.0) and math.isclose(c.two_se, 2 * math.sqrt(2 / 3))
    assert c.beats and c.word == "beats" and stats.beats(a, b)
    assert stats.compare(b, a).word == "is worse than" and not stats.beats(b, a)
    close = [9.0, 10.5, 12.0]  # diff 0.5, well inside 2 s.e.
    assert stats.compare(close, b).word == "does not significantly beat"
    assert stats.compare(b, close).word == "does not beat"
    assert not stats.compare([12.0], [1.0]).beats  # one seed: no spread, no verdict
    assert stats.mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0) and stats.fmt_mean_sd([1.0, 2.0, 3.0]) == "2.00 ± 1.00"
    assert stats.compare([1.0, 1.0], [1.0, 1.0]).word == "does not beat"


def test_lr_search_extends_past_an_edge_and_flags_it(bench):
    from benchmarks.experiment import search_lr

    calls = []

    def peak_at(best):
        def score(lr):
            calls.append(lr)
            return -abs(math.log10(lr) - math.log10(best))

        return score

    lr, tried, edge = search_lr(peak_at(1e-3), [3e-4, 1e-3, 3e-3])
    assert (lr, edge, sorted(tried)) == (1e-3, False, [3e-4, 1e-3, 3e-3])  # interior: no extension
    lr, tried, edge = search_lr(peak_at(1e-5), [3e-4, 1e-3, 3e-3], max_extend=2)
    assert (lr, edge) == (3e-5, True) and sorted(tried) == [3e-5, 1e-4, 3e-4, 1e-3, 3e-3]
    with pytest.raises(ValueError, match="ladder"):
        search_lr(peak_at(1e-3), [2e-3])


def test_run_log_resumes_without_repeating_runs(bench, tmp_path):
    from benchmarks.experiment import RunLog

    calls = []
    log = RunLog(tmp_path / "x.json", resume=False, meta={"a": 1})
    row, new = log.run_once({"arm": "a", "seed": 0}, lambda: calls.append(1) or {"test": 1.0})
    assert new and row == {"arm": "a", "seed": 0, "test": 1.0}
    again = RunLog(tmp_path / "x.json", resume=True, meta={})
    row, new = again.run_once({"arm": "a", "seed": 0}, lambda: calls.append(2) or {"test": 2.0})
    assert not new and row["test"] == 1.0 and calls == [1]


# ------------------------------------------------------------------------------ experiments, quick
def test_continual_quick_runs_every_arm_with_matched_budgets(bench, tmp_path):
    from benchmarks import continual

    done, doc = continual.main(["--quick", "--seeds", "2", "--out", str(tmp_path)])
    names = {"dendrites+kwta", "kwta", "dendrites", "mlp", "kwta-wide", "kwta-wide+context", "cascade+kwta",
             "sparse+kwta"}  # fmt: skip
    final = [r for r in doc["runs"] if r["phase"] == "final"]
    assert {r["arm"] for r in final} == names and {r["seed"] for r in final} == {0, 1}
    # every arm's learning rate came from its own search on the search seed (validation only)
    search = [r for r in doc["runs"] if r["phase"] == "search"]
    assert {r["arm"] for r in search} == names and {r["seed"] for r in search} == {continual.SEARCH_SEED}
    assert all("test" not in r for r in search)
    chosen = done[3]["chosen"]
    for r in final:
        tried = chosen[r["arm"]]["tried"]
        assert r["lr"] == chosen[r["arm"]]["lr"] == max(sorted(tried), key=tried.get)
    params = {r["arm"]: r["params"] for r in final}
    for control in ("kwta-wide", "kwta-wide+context"):  # parameter-matched within 3 %
        assert abs(params[control] / params["dendrites+kwta"] - 1) < 0.03, control
    # context arms infer the task from the nearest prototype at test; the others never see it
    assert all("test_task_inference" in r for r in final if r["arm"] in ("dendrites+kwta", "kwta-wide+context"))
    assert all("test_task_inference" not in r for r in final if r["arm"] in ("kwta", "mlp"))
    assert all(len(r["test_per_task"]) == 3 and len(r["val_just_learned"]) == 3 for r in final)
    md = (tmp_path / "continual.md").read_text()
    assert "quick smoke run: not a result" in md and "parameter- and information-matched" in md
    assert "| dendrites+kwta | 94.6 |" in md and "81.4" in md  # the paper's rows beside ours
    assert (tmp_path / "continual.png").stat().st_size > 1000
    assert json.loads((tmp_path / "continual.json").read_text())["meta"]["verdicts"]


def test_dann_quick_runs_both_orders_with_matched_budgets(bench, tmp_path):
    from benchmarks import dann

    res, doc = dann.main(["--quick", "--seeds", "2", "--out", str(tmp_path)])
    final = [r for r in doc["runs"] if r["phase"] == "final"]
    arms = {"dann-random", "dann-local", "vann-same-widths", "mlp-same-params"}
    assert {(r["order"], r["arm"]) for r in final} == {(o, a) for o in dann.ORDERS for a in arms}
    params = {r["arm"]: r["params"] for r in final}
    assert abs(params["mlp-same-params"] / params["dann-random"] - 1) < 0.05
    assert params["dann-local"] == params["dann-random"] < params["vann-same-widths"]
    for r in final:
        assert {f"test_noise_{sg:g}" for sg in dann.QUICK.noise} <= set(r) and 1 <= r["best_epoch"] <= 2
    md = (tmp_path / "dann.md").read_text()
    assert "quick smoke run: not a result" in md and "## class-ordered" in md and "## shuffled" in md
    assert "σ=0.25" in md and "56.8-59.7" in md
    assert (tmp_path / "dann.png").stat().st_size > 1000


def test_dann_arm_is_a_soma_fed_only_by_sparse_dendrites(bench):
    import torch

    import torch_dendrites as td
    from benchmarks import dann

    net = dann.dann(dann.FULL, "random", 0)
    layer = net[0]
    assert isinstance(layer, td.DendriticLayer) and layer.num_dendrites == 16
    assert not layer.base.weight.requires_grad and layer.base.weight.abs().sum() == 0
    assert dann.trainable(net) == 32 * 16 * (16 + 2) + 32 + 33 * 10  # branches, soma biases, output layer
    assert all(int(u.mask.sum(1).unique()) == 16 for u in layer.dendrites.units)
    # a soma's output depends only on the 16 x 16 inputs its dendrites read
    x = torch.rand(1, 784)
    reads = torch.stack([u.mask[0] for u in layer.dendrites.units]).any(0)
    y = layer(x)[0, 0]
    x2 = x.clone()
    x2[0, ~reads] = torch.rand(int((~reads).sum()))
    assert torch.equal(layer(x2)[0, 0], y)
