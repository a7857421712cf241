"""The one timing harness (benchmarks/timing.py): what it runs and how it summarises, never how fast."""

from __future__ import annotations

import pytest

from benchmarks import timing


def test_interleaved_warms_up_then_runs_every_function_in_rotating_order():
    calls = []
    fns = {name: (lambda n=name: calls.append(n)) for name in ("a", "b", "c")}
    med = timing.interleaved(fns, rounds=3, steps=2, warmup=1)
    assert set(med) == {"a", "b", "c"} and all(t >= 0 for t in med.values())
    assert calls[:3] == ["a", "b", "c"]  # warm-up, once each
    rounds = [calls[3 + 6 * r : 3 + 6 * (r + 1)] for r in range(3)]
    # each round runs every function `steps` times; who goes first rotates
    assert [r[0] for r in rounds] == ["a", "b", "c"]
    assert all(sorted(r) == ["a", "a", "b", "b", "c", "c"] for r in rounds)


def test_ratios_rebuild_the_functions_for_every_repeat_and_give_a_spread():
    built = []

    def make():
        built.append(1)
        return {"plain": lambda: None, "other": lambda: None}

    out = timing.ratios(make, "plain", repeats=3, rounds=2, steps=1, warmup=0)
    assert len(built) == 3 and set(out) == {"other"}
    assert len(out["other"].values) == 3 and out["other"].q1 <= out["other"].median <= out["other"].q3


def test_spread_is_the_median_and_interquartile_range():
    s = timing.spread([3.0, 1.0, 2.0])
    assert (s.median, s.q1, s.q3, s.values) == (2.0, 1.5, 2.5, (1.0, 2.0, 3.0))
    assert str(timing.spread([2.0])) == "2.00x (2.00-2.00)"
    with pytest.raises(ValueError):
        timing.spread([])
