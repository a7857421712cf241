"""Context-gated dendrites (``dendrite_type="gated"``) after Iyer et al. (2022), "Avoiding catastrophe:
active dendrites enable multi-task learning in dynamic environments" (Frontiers in Neurorobotics).

In an active-dendrites neuron, ``S`` dendritic segments each compute a dot product with a context vector
``g`` (e.g. a task code); the segment with the largest response (by absolute value, sign kept) modulates the
neuron multiplicatively through a sigmoid: ``y'[c] = y[c] * sigmoid(d*[c])`` with
``d*[c] = d[c, argmax_s |d[c, s]|]`` and ``d[c, s] = u[c, s] . g``. Gradient reaches only the winning segment.

Growth. Pure gating is not function-preserving: ``sigmoid(0) = 0.5`` halves a neuron at once, and a new
segment joining an existing max can win it. Here each growth step adds a *gate* (``S`` segments per neuron)
with a per-neuron mixing weight ``m`` that starts at zero, and the gates multiply::

    y'[c] = y[c] * prod_i (1 - m_i[c] + m_i[c] * sigmoid(d*_i[c]))

With ``m_i = 0`` a gate's factor is exactly one, so growth never changes the function; at ``m_i = 1`` it is
Iyer et al.'s gate. ``m`` is learned freely (not clamped): the factor is the line through 1 (``m = 0``) and
the sigmoid (``m = 1``). ``m`` is the unit's ``out_gain``, as for the other types. Segments have no bias
(``d = u . g``) and start at PyTorch's default bound ``1/sqrt(D)`` times ``init_scale``; they get gradient
once ``m`` moves off zero.

The paper's configuration (``first_gate="full"``). The first gate of each layer has no mixing weight: it is
Iyer et al.'s gate ``y'[c] = y[c] * sigmoid(d*[c])`` from the start, its segments train from the first step,
and the unit's ``out_gain`` is ``None``. So ``td.grow`` on a layer without gates *does* change the function
then (that is the starting point of the paper's network: ``add_dendrites``, one ``grow``, train); every later
gate is a mixed one with ``m = 0`` as above, so growth from there on keeps the function. With
``segments`` = the number of tasks and ``init_scale=1.0`` this is the paper's layer (one segment per task,
segments at PyTorch's default initialisation). The k-winners-take-all activation that Iyer et al. put after
the gated neurons belongs to the model, not to its dendrites: put :class:`torch_dendrites.KWTA` after the
wrapped layer.

The context. A wrapped layer only receives its own inputs, so the context travels beside the model: run the
forward inside ``with td.dendrite_context(model, context):`` (see :func:`dendrite_context`). ``context`` is
``[..., D]`` whose leading axes match (or broadcast to) the layer output's leading axes before the neuron
axis: ``[batch, D]`` for ``[batch, features]`` or ``[batch, channels, H, W]`` outputs and for token outputs
``[batch, tokens, features]`` (one context per sequence), ``[batch, tokens, D]`` for one per token, ``[D]``
for all. A gated layer with dendrites that runs without a context raises :class:`~torch_dendrites.StateError`.
Works on every layer type with a neuron axis, custom registered ones included (it only reads the output).
Correlation training is not supported.

Options (``DendriteConfig(dendrite_options={...})``):
    context_dim: ``D``, the context vector's length (required).
    segments: ``S``, segments per neuron in each gate (default 10; Iyer et al. use one per task).
    select: ``"absmax"`` (default, the paper's: largest ``|d|``, sign kept) or ``"max"`` (largest ``d``).
    first_gate: ``"mixed"`` (default: every gate enters through a mixing weight that starts at zero) or
        ``"full"`` (the first gate is the paper's full gate, later ones mixed; see above).

Example:
    >>> import torch, torch_dendrites as td
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 4))
    >>> cfg = td.DendriteConfig(dendrite_type="gated", dendrite_options={"context_dim": 3, "segments": 2})
    >>> net = td.add_dendrites(net, cfg)
    >>> td.grow(net)  # 4 neurons x 2 segments x 3 context weights + 4 mixing weights
    28
    >>> x, task = torch.randn(5, 8), torch.nn.functional.one_hot(torch.arange(5) % 3, 3).float()
    >>> with td.dendrite_context(net, task):
    ...     y = net(x)
    >>> y.shape
    torch.Size([5, 4])
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, ClassVar, Iterator, Optional

import torch
from torch import nn

from ..errors import ConfigError, StateError, TargetError
from .base import INIT_SCALE, DendriteStack, uniform
from .options import DendriteOptions, check_choice, check_int

__all__ = ["GatedDendrite", "GatedDendrites", "GatedOptions", "dendrite_context"]

SELECT = ("absmax", "max")
FIRST_GATE = ("mixed", "full")


class GatedDendrite(nn.Module):
    """One gate for every neuron: ``segments`` ``[C, S, D]`` and the mixing weight ``out_gain`` ``[C]``
    (``None`` for a full gate, whose factor is the sigmoid itself)."""

    def __init__(self, segments: torch.Tensor, full: bool = False):
        super().__init__()
        self.segments = nn.Parameter(segments)
        if full:
            self.register_parameter("out_gain", None)
        else:
            self.out_gain = nn.Parameter(segments.new_zeros(segments.shape[0]))

    @property
    def full(self) -> bool:
        return self.out_gain is None


@dataclasses.dataclass(frozen=True)
class GatedOptions(DendriteOptions):
    """Options of ``dendrite_type="gated"`` (see the module docstring): ``context_dim`` (required),
    ``segments``, ``select``, ``first_gate``."""

    type_name: ClassVar[str] = "gated"
    context_dim: Optional[int] = None
    segments: int = 10
    select: str = "absmax"
    first_gate: str = "mixed"

    def __post_init__(self) -> None:
        if self.context_dim is None:
            raise ConfigError(
                "dendrite_type='gated' needs the context's length: DendriteConfig(dendrite_options="
                "{'context_dim': D}), e.g. the number of tasks for one-hot task contexts."
            )
        check_int(self.type_name, "context_dim", self.context_dim, 1)
        check_int(self.type_name, "segments", self.segments, 1)
        check_choice(self.type_name, "select", self.select, SELECT)
        check_choice(self.type_name, "first_gate", self.first_gate, FIRST_GATE)


class GatedDendrites(DendriteStack):
    """The context-gated dendrite stack of one wrapped layer (see the module docstring)."""

    type_name = "gated"
    options_class = GatedOptions

    def __init__(self, base: nn.Module, spec, activation: str = "sigmoid", init_scale: float = INIT_SCALE, **options):
        super().__init__(base, spec, activation=activation, init_scale=init_scale, **options)
        opts = self.options
        self.context_dim, self.segments, self.select, self.first_gate = (
            opts.context_dim,
            opts.segments,
            opts.select,
            opts.first_gate,
        )
        # The context of the forward in progress; set only inside `dendrite_context`, never saved.
        self.context: Optional[torch.Tensor] = None

    def new_unit(self, generator: Optional[torch.Generator] = None, index: Optional[int] = None) -> nn.Module:
        like = self._like()
        shape = (self.num_neurons, self.segments, self.context_dim)
        position = len(self.units) if index is None else index
        full = self.first_gate == "full" and position == 0
        return GatedDendrite(uniform(shape, self.init_scale / math.sqrt(self.context_dim), like, generator), full)

    def gate(self, context: torch.Tensor) -> torch.Tensor:
        """The multiplicative gate ``[..., C]`` for a context ``[..., D]``."""
        c, s = self.num_neurons, self.segments
        ctx = context.to(self.units[0].segments.dtype)
        # Each gate's factor on its own, then their product: one matrix product or sigmoid over all gates at once
        # would round a gate's values by where they fall in the batched tensor (the BLAS kernel chosen by width,
        # the vectorised loop's tail), so growing would move the earlier gates by an ulp on some CPUs. This way an
        # earlier gate is computed the same whatever follows it, and a new gate's factor is exactly 1.
        g = None
        for u in self.units:
            d = torch.nn.functional.linear(ctx, u.segments.flatten(0, 1)).unflatten(-1, (c, s))  # [..., C, S]
            score = d.abs() if self.select == "absmax" else d
            win = d.gather(-1, score.argmax(-1, keepdim=True)).squeeze(-1)  # [..., C]: only winners get gradient
            # A full gate's factor is the sigmoid itself; a mixed one's 1 - m + m * sigmoid (exactly 1 at m = 0).
            f = torch.sigmoid(win) if u.full else 1 - u.out_gain + u.out_gain * torch.sigmoid(win)
            g = f if g is None else g * f
        return g

    def forward(self, y: torch.Tensor, neuron_axis: int, *args: Any, **kwargs: Any) -> torch.Tensor:
        p = self._check_axis(y, neuron_axis)
        if not len(self.units):
            return y
        ctx = self.context
        if ctx is None:
            raise StateError(
                "a layer with gated dendrites ran without a context; run the forward inside "
                "`with td.dendrite_context(model, context): ...` with context of shape [batch, "
                f"{self.context_dim}]."
            )
        lead = tuple(ctx.shape[:-1])
        ok = ctx.shape[-1] == self.context_dim and len(lead) <= p
        ok = ok and all(a == b or a == 1 for a, b in zip(lead, y.shape[: len(lead)]))
        if not ok:
            raise StateError(
                f"the dendrite context has shape {tuple(ctx.shape)}, which does not fit this layer's output "
                f"{tuple(y.shape)} (neurons on axis {p}): give [..., {self.context_dim}] whose leading axes match "
                f"the output's leading axes, e.g. [{y.shape[0] if p else ''}, {self.context_dim}]."
            )
        g = self.gate(ctx).to(y.dtype)  # [*lead, C]
        g = g.view(*lead, *(1,) * (p - len(lead)), self.num_neurons, *(1,) * (y.dim() - p - 1))
        return y * g

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, context_dim={self.context_dim}, segments={self.segments}, "
            f"select={self.select!r}, first_gate={self.first_gate!r}"
        )


@contextlib.contextmanager
def dendrite_context(model: nn.Module, context: torch.Tensor) -> Iterator[nn.Module]:
    """Hand ``context`` to every gated dendrite of ``model`` for the forward passes inside the block.

    The context reaches the layers beside the model's own inputs, so any model works unchanged; the
    backward pass may run inside or after the block. Blocks nest: the previous context comes back on
    exit. The context is kept on the model's gated dendrite modules only (no global state), so two models
    in one process have independent contexts.

    Args:
        model: a model prepared with ``td.add_dendrites(model, DendriteConfig(dendrite_type="gated", ...))``.
        context: ``[batch, context_dim]`` (or ``[..., context_dim]`` matching the outputs' leading axes, or
            ``[context_dim]`` for the whole batch), e.g. a one-hot task code.

    Yields:
        ``model``.

    Raises:
        TargetError: the model has no gated dendrites.
        ConfigError: ``context`` is not a tensor whose last axis has ``context_dim`` entries.

    Example:
        >>> import torch, torch_dendrites as td
        >>> cfg = td.DendriteConfig(dendrite_type="gated", dendrite_options={"context_dim": 2})
        >>> net = td.add_dendrites(torch.nn.Sequential(torch.nn.Linear(3, 3)), cfg)
        >>> _ = td.grow(net)
        >>> with td.dendrite_context(net, torch.tensor([[1.0, 0.0]])):
        ...     out = net(torch.randn(1, 3))
    """
    gated = [m for m in model.modules() if isinstance(m, GatedDendrites)]
    if not gated:
        raise TargetError(
            "td.dendrite_context found no gated dendrites in this model; add them with "
            "td.add_dendrites(model, td.DendriteConfig(dendrite_type='gated', dendrite_options={'context_dim': D}))."
        )
    if not isinstance(context, torch.Tensor) or context.dim() < 1:
        raise ConfigError(f"context must be a tensor of shape [batch, context_dim], got {type(context).__name__}.")
    dims = sorted({m.context_dim for m in gated})
    if context.shape[-1] not in dims or len(dims) > 1:
        raise ConfigError(
            f"context has {context.shape[-1]} entries on its last axis, but the gated dendrites expect "
            f"context_dim={dims[0] if len(dims) == 1 else dims}."
        )
    previous = [m.context for m in gated]
    for m in gated:
        m.context = context
    try:
        yield model
    finally:
        for m, old in zip(gated, previous):
            m.context = old
