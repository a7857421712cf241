"""k-winners-take-all (``td.KWTA``): keep the ``k`` largest activations of every sample, zero the rest.

The activation of Ahmad & Scheinkman (2019, "How can we be so dense? The benefits of using highly sparse
representations") that Iyer et al. (2022) put after their gated neurons: per sample (and per position, for
outputs with more axes) only the ``k`` largest of the ``n`` features along ``dim`` pass, unchanged; the others
become zero, so gradient reaches the winners only. Exactly ``k`` features win even when values tie.

Boosting (optional, ``boost_strength > 0``). Features that rarely win get a chance: the winners are chosen on
the boosted values ``a_i * b_i`` with ``b_i = exp(boost_strength * (k / n - duty_i))``, where ``duty_i`` is the
running fraction of samples in which feature ``i`` won; the output still carries the unboosted ``a_i``. Duty
cycles are updated in training mode only (a running mean over the last ``duty_cycle_period`` samples, counted
from the first, so early batches are not diluted by the zero start); in eval mode the current boost factors
are applied and nothing changes, so evaluation never alters the module. ``decay_boost()`` multiplies
``boost_strength`` by ``boost_decay`` (Ahmad & Scheinkman decay it once per epoch). Duty cycles, the sample
count and the current strength are buffers: they are in the state dict and saved by ``td.save``.

Works after any layer, wrapped or not: ``dim`` names the feature axis (``-1`` for ``[batch, features]`` and
token outputs ``[batch, tokens, features]``, ``1`` for convolution outputs ``[batch, channels, H, W]``, where
the channels compete at every pixel).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .errors import ConfigError, StateError

__all__ = ["KWTA"]


def _number(name: str, value, lo: float, hi: float, lo_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (lo < value if lo_open else lo <= value) and value <= hi
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise ConfigError(f"KWTA {name}={value!r} must be a number in {interval}.")
    return float(value)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"KWTA {name}={value!r} must be an int >= 1.")
    return value


class KWTA(nn.Module):
    """k-winners-take-all along one axis, with optional boosting (see the module docstring).

    Args:
        num_features: ``n``, the size of the feature axis ``dim``.
        k: winners per sample (``1 <= k <= n``). Give ``k`` or ``fraction``, not both.
        fraction: the fraction of features that win, e.g. ``0.05`` (Iyer et al.); ``k = max(1, round(fraction * n))``.
        boost_strength: ``0`` (default) for plain k-WTA; ``> 0`` boosts features that win less than ``k / n``
            of the time.
        boost_decay: factor ``decay_boost()`` multiplies ``boost_strength`` by (in ``[0, 1]``, default 1).
        duty_cycle_period: the number of recent samples the duty cycles average over (default 1000).
        dim: the feature axis (default ``-1``; ``1`` for convolution outputs).

    Raises:
        ConfigError: a bad argument (the message names it).

    Example:
        >>> import torch, torch_dendrites as td
        >>> kwta = td.KWTA(8, k=2)
        >>> y = kwta(torch.arange(16.0).view(2, 8))
        >>> (y != 0).sum(1).tolist(), y[0].tolist()
        ([2, 2], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 6.0, 7.0])
        >>> net = torch.nn.Sequential(torch.nn.Linear(784, 512), td.KWTA(512, fraction=0.05), torch.nn.Linear(512, 10))
        >>> net[1].k
        26
    """

    def __init__(
        self,
        num_features: int,
        k: Optional[int] = None,
        fraction: Optional[float] = None,
        boost_strength: float = 0.0,
        boost_decay: float = 1.0,
        duty_cycle_period: int = 1000,
        dim: int = -1,
    ):
        super().__init__()
        self.num_features = _positive_int("num_features", num_features)
        if (k is None) == (fraction is None):
            raise ConfigError(f"KWTA needs exactly one of k and fraction, got k={k!r}, fraction={fraction!r}.")
        if k is not None:
            k = _positive_int("k", k)
            if k > num_features:
                raise ConfigError(f"KWTA k={k} must be at most num_features={num_features}.")
        else:
            fraction = _number("fraction", fraction, 0.0, 1.0, lo_open=True)
            k = max(1, round(fraction * num_features))
        self.k = k
        self.boost_decay = _number("boost_decay", boost_decay, 0.0, 1.0)
        self.duty_cycle_period = _positive_int("duty_cycle_period", duty_cycle_period)
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise ConfigError(f"KWTA dim={dim!r} must be an int (the feature axis).")
        self.dim = dim
        strength = _number("boost_strength", boost_strength, 0.0, float("inf"))
        # Buffers, so a saved model resumes with the same winners (state dict, td.save).
        self.register_buffer("boost_strength", torch.tensor(strength))
        self.register_buffer("duty_cycle", torch.zeros(num_features))
        self.register_buffer("samples_seen", torch.zeros((), dtype=torch.long))

    @property
    def density(self) -> float:
        """``k / n``, the fraction of features that win."""
        return self.k / self.num_features

    def boost_factors(self) -> torch.Tensor:
        """``b = exp(boost_strength * (k / n - duty))``, one per feature (all ones without boosting)."""
        return torch.exp(self.boost_strength * (self.density - self.duty_cycle))

    def decay_boost(self) -> float:
        """Multiply ``boost_strength`` by ``boost_decay`` (e.g. once per epoch); returns the new strength."""
        self.boost_strength.mul_(self.boost_decay)
        return float(self.boost_strength)

    def winners(self, x: torch.Tensor) -> torch.Tensor:
        """The bool mask of the winners for ``x`` (the same shape), without updating any duty cycle."""
        p = self._axis(x)
        # Without boosting the factors are exactly one, so the winners are the plain top k.
        a = x.detach().movedim(p, -1) * self.boost_factors().to(x.dtype)
        idx = a.topk(self.k, dim=-1).indices
        mask = torch.zeros(a.shape, dtype=torch.bool, device=a.device).scatter_(-1, idx, True)
        return mask.movedim(-1, p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.winners(x)
        if self.training:
            self._update_duty_cycle(mask)
        return x * mask.to(x.dtype)

    @torch.no_grad()
    def _update_duty_cycle(self, mask: torch.Tensor) -> None:
        rows = mask.movedim(self._axis(mask), -1).reshape(-1, self.num_features)
        n = rows.shape[0]
        self.samples_seen += n
        # A running mean over all samples seen until the period is full, then an exponential average over it
        # (tensor ops only: no device sync).
        period = self.samples_seen.clamp(max=self.duty_cycle_period).clamp(min=n).to(self.duty_cycle.dtype)
        self.duty_cycle.add_((rows.to(self.duty_cycle.dtype).mean(0) - self.duty_cycle) * (n / period))

    def _axis(self, x: torch.Tensor) -> int:
        if x.dim() == 0 or not -x.dim() <= self.dim < x.dim() or x.shape[self.dim] != self.num_features:
            raise StateError(
                f"KWTA(num_features={self.num_features}, dim={self.dim}) got an input of shape {tuple(x.shape)}, whose "
                f"axis {self.dim} does not hold {self.num_features} features; set dim= to the feature axis."
            )
        return self.dim % x.dim()

    def extra_repr(self) -> str:
        s = f"{self.num_features}, k={self.k}, dim={self.dim}"
        if float(self.boost_strength) > 0:
            s += f", boost_strength={float(self.boost_strength):g}, duty_cycle_period={self.duty_cycle_period}"
        return s
