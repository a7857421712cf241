"""The one timing harness behind every speed table (``overhead.py``, ``speed.py``, the GPU check).

A measurement is a set of step functions timed **interleaved**: every round runs each function ``steps`` times,
in an order that rotates from round to round, so slow drifts of a shared machine (another job starting, the
CPU clocking down) hit every variant alike. Each function is warmed up first, the thread count is fixed per
process (``pin_threads``), CUDA work is synchronised around every timed block, and a **repeat** builds fresh
models and times them again. Ratios to a reference function are taken per repeat (median over rounds), and a
table reports the median and interquartile range of the ratio over at least 3 repeats: ``1.80x (1.76-1.83)``.
Every CPU table uses the same sizes (``ROUNDS``, ``STEPS``, ``REPEATS``), so that two tables timing the same
variant are two runs of one measurement; two runs **agree** when their interquartile ranges overlap
(:func:`agree`, what ``benchmarks/agreement.py`` checks).

Example:
    >>> from benchmarks.timing import spread
    >>> str(spread([1.0, 1.2, 1.1, 1.3]))
    '1.15x (1.08-1.22)'
"""

from __future__ import annotations

import itertools
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Sequence, Tuple

import torch

__all__ = [
    "REPEATS",
    "ROUNDS",
    "STEPS",
    "Spread",
    "agree",
    "disagreement_rate",
    "interleaved",
    "pin_threads",
    "rank_test",
    "ratios",
    "spread",
]

# The sizes of every CPU speed table: independent repeats (one child process each), interleaved rounds per
# repeat, training steps per timed block. 9 repeats, not 5: with 5 a run's interquartile range is its 2nd to 4th
# value, and two runs of one identical measurement would fail to overlap on 21 % of rows by chance alone; with
# 9, on 5.7 % (disagreement_rate).
REPEATS, ROUNDS, STEPS = 9, 15, 5


@dataclass(frozen=True)
class Spread:
    """The median and interquartile range of a ratio over independent repeats."""

    median: float
    q1: float
    q3: float
    values: Tuple[float, ...]

    def __str__(self) -> str:
        return f"{self.median:.2f}x ({self.q1:.2f}-{self.q3:.2f})"

    def to_json(self) -> dict:
        return {"median": self.median, "q1": self.q1, "q3": self.q3, "values": list(self.values)}

    @classmethod
    def from_json(cls, d: Mapping) -> Spread:
        return spread(d["values"])


def agree(a: Spread, b: Spread) -> bool:
    """Whether two runs of one measurement agree within their spreads: their interquartile ranges overlap."""
    return a.q1 <= b.q3 and b.q1 <= a.q3


def disagreement_rate(n: int) -> float:
    """How often two runs of one and the same measurement, ``n`` repeats each, would **not** agree
    (:func:`agree`) by chance alone: the probability, when all ``2n`` values come from one continuous
    distribution, that the two interquartile ranges do not overlap. With ``n - 1`` divisible by 4 the quartiles
    are order statistics, so the answer depends only on how the ``2n`` ranks split between the runs, and this
    enumerates every split: it is exact (5 repeats: 0.206, 9: 0.057). Other ``n`` raise ``ValueError``.

    Example:
        >>> round(disagreement_rate(5), 3)
        0.206
    """
    if n < 5 or (n - 1) % 4:
        raise ValueError(f"disagreement_rate needs n = 5, 9, 13, ... (quartiles that are order statistics), got {n}")
    total = misses = 0
    for picked in itertools.combinations(range(2 * n), n):
        other = sorted(set(range(2 * n)) - set(picked))
        total += 1
        misses += not agree(spread(picked), spread(other))
    return misses / total


def rank_test(a: Sequence[float], b: Sequence[float]) -> float:
    """The exact two-sided p value of the Wilcoxon-Mann-Whitney rank test that ``a`` and ``b`` (the repeats of
    one row in two runs) come from one distribution: the share of all ways to split the pooled values into
    groups of ``len(a)`` and ``len(b)`` whose rank sum is at least as far from its mean as the observed one
    (ties get their mean rank). Two runs of 5 repeats can show p >= 2/252 = 0.008 at the least.

    Example:
        >>> round(rank_test([1.0, 1.1, 1.2], [2.0, 2.1, 2.2]), 3)
        0.1
    """
    a, b = [float(v) for v in a], [float(v) for v in b]
    if not a or not b:
        raise ValueError("rank_test needs at least one value on each side")
    pooled = sorted(a + b)
    rank = {v: (pooled.index(v) + len(pooled) - pooled[::-1].index(v) + 1) / 2 for v in pooled}  # mean rank
    ranks = [rank[v] for v in a + b]
    mean = len(a) * (len(pooled) + 1) / 2
    observed = abs(sum(ranks[: len(a)]) - mean)
    sums = [abs(sum(c) - mean) for c in itertools.combinations(ranks, len(a))]
    return sum(s >= observed - 1e-9 for s in sums) / len(sums)


def spread(values: Sequence[float]) -> Spread:
    """The median and quartiles (``statistics.quantiles``, inclusive method) of ``values``."""
    vs = sorted(float(v) for v in values)
    if not vs:
        raise ValueError("no values to summarise")
    if len(vs) == 1:
        return Spread(vs[0], vs[0], vs[0], tuple(vs))
    q1, _, q3 = statistics.quantiles(vs, n=4, method="inclusive")
    return Spread(statistics.median(vs), q1, q3, tuple(vs))


def pin_threads(default: int = 1) -> int:
    """Fix this process's intra-op thread count (``BENCH_THREADS``, else ``default``); returns it. On a loaded
    2-core machine two threads per process can be many times slower than one, so tables say what they used."""
    n = max(1, int(os.environ.get("BENCH_THREADS", default)))
    torch.set_num_threads(n)
    return n


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    fns: Mapping[str, Callable[[], None]], rounds: int, steps: int, warmup: int = 3, device="cpu"
) -> Dict[str, float]:
    """Median seconds per call of each function over ``rounds`` interleaved rounds of ``steps`` calls."""
    device = torch.device(device)
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    _sync(device)
    times: Dict[str, list] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate who goes first
        for name in order:
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                fns[name]()
            _sync(device)
            times[name].append((time.perf_counter() - t0) / steps)
    return {n: statistics.median(v) for n, v in times.items()}


def ratios(
    make: Callable[[], Mapping[str, Callable[[], None]]],
    reference: str,
    repeats: int = REPEATS,
    rounds: int = ROUNDS,
    steps: int = STEPS,
    warmup: int = 3,
    device="cpu",
) -> Dict[str, Spread]:
    """``make()`` builds fresh step functions (one of them named ``reference``) for each repeat; returns every
    other function's time over the reference's, as a :class:`Spread` over the repeats."""
    per: Dict[str, list] = {}
    for _ in range(repeats):
        med = interleaved(make(), rounds, steps, warmup, device)
        for name, t in med.items():
            if name != reference:
                per.setdefault(name, []).append(t / med[reference])
    return {name: spread(v) for name, v in per.items()}
