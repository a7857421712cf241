"""The one timing harness (benchmarks/timing.py): what it runs and how it summarises, never how fast."""

from __future__ import annotations

import itertools

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


def test_two_runs_agree_when_their_interquartile_ranges_overlap():
    a = timing.spread([2.0, 2.1, 2.2, 2.3, 2.4])  # IQR 2.1-2.3
    assert timing.agree(a, timing.spread([2.2, 2.3, 2.4, 2.5, 2.6]))  # IQR 2.3-2.5: touching at 2.3
    assert timing.agree(timing.spread([2.2, 2.3, 2.4, 2.5, 2.6]), a)  # symmetric
    assert not timing.agree(a, timing.spread([2.35, 2.4, 2.45, 2.5, 2.55]))
    assert timing.Spread.from_json(a.to_json()) == a


def _results(path, rows):
    import json

    path.write_text(json.dumps({"meta": {}, "rows": [
        {"model": m, "variant": v, "precision": "fp32", "ratio": timing.spread(vals).to_json()} for m, v, vals in rows
    ]}))  # fmt: skip
    return path


def test_agreement_compares_the_rows_two_runs_share(tmp_path):
    from benchmarks import agreement

    a = _results(tmp_path / "a.json", [("cnn", "1 dendrites", [2.0, 2.1, 2.2]), ("cnn", "2 dendrites", [3.0, 3.1, 3.2]),
                                       ("mlp", "1 dendrites", [2.0, 2.0, 2.0])])  # fmt: skip
    b = _results(tmp_path / "b.json", [("cnn", "2 dendrites", [3.5, 3.6, 3.7]),
                                       ("cnn", "1 dendrites", [2.1, 2.2, 2.3])])  # fmt: skip
    out = tmp_path / "agreement.md"
    assert agreement.main([str(a), str(b), "--out", str(out)]) == 0
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| cnn")]
    assert len(rows) == 2  # the mlp row is in one run only
    assert rows[0].endswith("| yes | 0.500 |") and "+4.8 %" in rows[0]  # ties share their mean rank
    assert rows[1].endswith("| NO | 0.100 |")  # 3 against 3 all apart: 2 of the 20 splits are as extreme
    assert "1 of 2 shared rows agree (interquartile ranges overlap)." in text  # no chance rate for 3 repeats
    assert "0 of 2 rows differ at p < 0.05 in the rank test (at most 0.1 expected by chance)." in text


def test_agreement_sets_the_counts_against_what_chance_gives_for_five_repeats(tmp_path):
    from benchmarks import agreement

    a = _results(tmp_path / "a.json", [("cnn", "1 dendrites", [1.0, 1.1, 1.2, 1.3, 1.4])])
    b = _results(tmp_path / "b.json", [("cnn", "1 dendrites", [2.0, 2.1, 2.2, 2.3, 2.4])])
    out = tmp_path / "agreement.md"
    agreement.main([str(a), str(b), "--out", str(out)])
    text = out.read_text()
    assert "| NO | 0.008 |" in text  # 2 of 252 splits are as extreme
    assert "with 5 repeats each fail to overlap on 20.6 % of rows by chance alone (exact)" in text
    assert "1 of 1 rows differ at p < 0.05" in text


def _non_overlap_by_order_statistics(n: int) -> float:
    # Independent of spread()/agree(): with n = 4j + 1 the inclusive quartiles are the (j+1)-th and (3j+1)-th
    # smallest values, and two ranges fail to overlap when one's upper quartile is below the other's lower one.
    j = (n - 1) // 4
    total = misses = 0
    for picked in itertools.combinations(range(2 * n), n):
        a, b = sorted(picked), sorted(set(range(2 * n)) - set(picked))
        total += 1
        misses += a[3 * j] < b[j] or b[3 * j] < a[j]
    return misses / total


def test_the_chance_of_disagreeing_is_exact_for_quartiles_that_are_order_statistics():
    assert timing.disagreement_rate(5) == pytest.approx(_non_overlap_by_order_statistics(5)) == pytest.approx(52 / 252)
    assert timing.disagreement_rate(9) == pytest.approx(_non_overlap_by_order_statistics(9))
    assert timing.disagreement_rate(9) < 0.06 < 0.2 < timing.disagreement_rate(5)
    for n in (3, 4, 6, 7):
        with pytest.raises(ValueError, match="order statistics"):
            timing.disagreement_rate(n)


def test_rank_test_is_the_exact_two_sided_mann_whitney_test():
    assert timing.rank_test([1, 2, 3, 4, 5], [6, 7, 8, 9, 10]) == pytest.approx(2 / 252)
    assert timing.rank_test([6, 7, 8, 9, 10], [1, 2, 3, 4, 5]) == pytest.approx(2 / 252)  # two-sided
    assert timing.rank_test([1.0, 2.0], [1.0, 2.0]) == 1.0
    a, b = [2.02, 2.12, 1.98, 2.31, 2.2], [2.18, 2.08, 2.2, 2.21, 2.05]  # a tie (2.2) gets its mean rank
    assert 0.0 < timing.rank_test(a, b) == timing.rank_test(b, a) <= 1.0
    with pytest.raises(ValueError, match="at least one value"):
        timing.rank_test([], [1.0])
    stats = pytest.importorskip("scipy.stats")
    a, b = [1.01, 0.97, 1.12, 1.05, 0.99], [1.08, 1.15, 1.02, 1.2, 1.11]
    want = stats.mannwhitneyu(a, b, alternative="two-sided", method="exact").pvalue
    assert timing.rank_test(a, b) == pytest.approx(want)


def test_agreement_refuses_files_that_share_nothing(tmp_path):
    from benchmarks import agreement

    a = _results(tmp_path / "a.json", [("cnn", "1 dendrites", [2.0])])
    b = _results(tmp_path / "b.json", [("mlp", "1 dendrites", [2.0])])
    with pytest.raises(SystemExit, match="no row is shared"):
        agreement.main([str(a), str(b), "--out", str(tmp_path / "x.md")])
    assert not (tmp_path / "x.md").exists()


def test_a_variant_is_the_same_model_whichever_variants_a_process_builds():
    import torch

    from benchmarks import overhead

    _, base, *_ = overhead.workload("tokens", torch.device("cpu"))
    alone = overhead.build_variant(base, "1 dendrites + 1 candidate", "eager")
    together = overhead.variants(base, "eager")["1 dendrites + 1 candidate"]
    a, b = alone.state_dict(), together.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [n for n, p in alone.named_parameters() if p.requires_grad] == [
        n for n, p in together.named_parameters() if p.requires_grad
    ]
    with pytest.raises(ValueError, match="unknown variant"):
        overhead.build_variant(base, "4 dendrites")


def test_pair_spreads_runs_the_repeats_as_the_outer_loop_and_children_on_the_cpu(monkeypatch):
    from benchmarks import overhead

    calls = []
    monkeypatch.setattr(
        overhead, "_child_ratio", lambda spec, allocator="default": calls.append(("child", spec[1])) or 2.0
    )
    monkeypatch.setattr(overhead, "time_pair", lambda *spec: calls.append(("here", spec[1])) or 3.0)
    out = overhead.pair_spreads("cnn", ["1 dendrites", "2 dendrites"], repeats=2)
    assert calls == [("child", "1 dendrites"), ("child", "2 dendrites")] * 2
    assert out["1 dendrites"].values == (2.0, 2.0)
    calls.clear()
    overhead.pair_spreads("cnn", ["1 dendrites"], repeats=3, in_process=True)
    assert calls == [("here", "1 dendrites")] * 3


def test_the_cascade_bandwidth_table_times_the_kernel_against_its_floor():
    from benchmarks import profile_overhead as po

    assert po.cascade_bytes(2, 1024, 256) == 11 * 1024 * 256 * 4  # 4k + 3 fp32 tensors of [n, c]
    rows = po.bandwidth(ks=(1,), n=16, c=8, rounds=2, steps=1)
    assert [(r["k"], r["kernel"]) for r in rows] == [(1, "eager")]  # below AUTO_MIN_ELEMENTS: eager
    assert all(r[key] > 0 for r in rows for key in ("cascade_ms", "copy_ms", "activation_ms"))
    lines = po.bandwidth_table(rows, full_plain_ms=10.0, ideals={"1 dendrites": 2.0})
    row = lines[-1].split(" | ")
    assert row[:3] == ["| 1", "eager", "0.0 MiB"]
    share = 100 * 4 * rows[0]["cascade_ms"] / 20.0  # four layers over the 2x ideal of a 10 ms step
    assert row[-1] == f"{share:.1f} % |"


def test_the_profiles_gap_split_adds_up_to_the_gap_above_the_ideal():
    from benchmarks import profile_overhead as po

    # plain: 6 ms GEMM + 2 ms other; variant: 19 ms GEMM + 9 ms other; FLOP ideal 3x (24 ms).
    row = {"ideal": 3.0, "gemm": 19 / 6, "other": 9 / 2, "plain_other_share": 2 / 8, "total": 28 / 8}
    gemm_gap, other_gap = po.gap_split(row)
    assert gemm_gap == pytest.approx((19 - 18) / 24) and other_gap == pytest.approx((9 - 6) / 24)
    assert gemm_gap + other_gap == pytest.approx(row["total"] / row["ideal"] - 1)
    line = po.table([{**row, "model": "m", "variant": "2 dendrites", "other_share": 9 / 28, "top": ""}], 1, 1)
    assert line.rstrip().endswith("| +4.2 | +12.5 |")
