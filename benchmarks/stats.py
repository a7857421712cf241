"""The one place that decides "A beats B" for the benchmarks, and the mean / spread helpers it rests on.

The rule: A beats B when the difference of their mean scores (over seeds) is larger than two standard errors
of that difference, the standard error taken from the per-seed spreads: ``se = sqrt(sd_a^2 / n_a + sd_b^2 /
n_b)`` (sample standard deviations, ``n - 1``). With fewer than two seeds on either side there is no spread,
so nothing is declared either way. Scores are "higher is better"; pass negated losses otherwise.

Example:
    >>> from benchmarks.stats import compare
    >>> c = compare([95.1, 95.3, 94.9], [93.0, 93.4, 92.8])
    >>> c.word, round(c.diff, 2), c.beats
    ('beats', 2.03, True)
    >>> compare([1.0, 2.0, 3.0], [1.5, 2.5, 1.0]).word
    'does not significantly beat'
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Iterable, Sequence, Tuple

__all__ = ["Comparison", "compare", "beats", "mean_sd", "fmt_mean_sd", "se_of_difference"]


def _finite(values: Iterable) -> list:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def mean_sd(values: Iterable) -> Tuple[float, float]:
    """Mean and sample standard deviation (``n - 1``) of the finite values; sd 0 for one value, NaNs for none."""
    v = _finite(values)
    if not v:
        return float("nan"), float("nan")
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def fmt_mean_sd(values: Iterable, digits: int = 2) -> str:
    """``"mean ± sd"`` with ``digits`` decimals."""
    m, s = mean_sd(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def se_of_difference(a: Sequence[float], b: Sequence[float]) -> float:
    """The standard error of ``mean(a) - mean(b)`` from the two per-seed spreads."""
    (_, sa), (_, sb) = mean_sd(a), mean_sd(b)
    return math.sqrt(sa**2 / len(_finite(a)) + sb**2 / len(_finite(b)))


@dataclass(frozen=True)
class Comparison:
    """``diff`` = mean(a) - mean(b); ``two_se`` = two standard errors of it; ``word`` says the verdict."""

    diff: float
    two_se: float
    word: str
    n_a: int
    n_b: int

    @property
    def beats(self) -> bool:
        return self.word == "beats"

    @property
    def worse(self) -> bool:
        return self.word == "is worse than"

    def sentence(self, name_a: str, name_b: str, unit: str = "points") -> str:
        """E.g. ``"gated beats mlp: +2.03 points (2 s.e. = 0.41)"``."""
        return f"{name_a} {self.word} {name_b}: {self.diff:+.2f} {unit} (2 s.e. = {self.two_se:.2f})"


def compare(a: Sequence[float], b: Sequence[float]) -> Comparison:
    """Compare two lists of per-seed scores (higher is better) with the two-standard-error rule."""
    fa, fb = _finite(a), _finite(b)
    if not fa or not fb:
        return Comparison(float("nan"), float("nan"), "cannot be compared with", len(fa), len(fb))
    diff = statistics.fmean(fa) - statistics.fmean(fb)
    two_se = 2 * se_of_difference(fa, fb)
    if min(len(fa), len(fb)) < 2:
        word = "(one seed, no significance test) differs from"
    elif abs(diff) > two_se:
        word = "beats" if diff > 0 else "is worse than"
    else:
        word = "does not beat" if diff <= 0 else "does not significantly beat"
    return Comparison(diff, two_se, word, len(fa), len(fb))


def beats(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether scores ``a`` beat scores ``b`` beyond two standard errors of the difference of means."""
    return compare(a, b).beats
