"""Low-rank cascade dendrites (``dendrite_type="lowrank"``): a "dendritic LoRA".

Same cascade as the default type (:mod:`.cascade`), but each dendrite's input map is a rank-``r`` product
instead of a full copy of the layer. For a linear layer with ``in`` inputs and ``out`` neurons, dendrite ``i``
computes, per neuron ``c``::

    z_i = B_i A_i x + b_i + sum_{j<i} u_ij[c] * s_j,     s_i = act(z_i),     y' = y + sum_i v_i[c] * s_i

with ``A_i`` of shape ``[r, in]``, ``B_i`` ``[out, r]``. One dendrite costs ``r * (in + out)`` weights plus
per-neuron terms (bias ``b_i``, output gain ``v_i``, and one cascade gain ``u_ij`` per earlier dendrite),
instead of ``in * out`` for a full copy.

For ``nn.Conv1d/2d/3d``, ``A_i`` is the layer's own convolution (kernel, stride, padding, dilation, groups)
with ``r`` output channels per group and ``B_i`` a 1x1 convolution from those ``r`` channels to the group's
neurons, so every dendrite still reads only its neuron's input group (the rank is per group); the cost is
``r * (in_channels * prod(kernel) + out_channels)`` plus the per-neuron terms.
Hugging Face's GPT-2 ``Conv1D`` is handled as the linear layer it is. Other layer types are refused.

Initialisation: ``A`` takes PyTorch's default bound ``1/sqrt(fan_in)`` (so ``A x`` is of order one), and
``B`` and ``b`` are scaled by ``init_scale``, so ``z`` starts as small as a cascade dendrite's. ``v`` starts
at zero: growth never changes the function; ``u`` starts random, as in the cascade type. The ``k`` dendrites
of a layer run as one matmul (or one grouped convolution) for all ``A`` and one batched contraction for all
``B``; the nonlinearity,
cascade and gains reuse the cascade type's fused op.

Options (``DendriteConfig(dendrite_options={...})``):
    rank: ``r``, an int >= 1 (default 4). A rank at or above ``min(fan_in, out)`` is allowed but buys nothing
        over the full cascade.

Example:
    >>> import torch, torch_dendrites as td
    >>> net = torch.nn.Sequential(torch.nn.Linear(20, 10))
    >>> cfg = td.DendriteConfig(dendrite_type="lowrank", dendrite_options={"rank": 2})
    >>> net = td.add_dendrites(net, cfg)
    >>> td.grow(net)  # 2 * (20 + 10) weights + 10 biases + 10 output gains
    80
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from ..errors import StateError
from .base import INIT_SCALE, DendriteStack, uniform
from .cascade import cascade_init
from .kernel import KERNELS, CascadeKernel, _Cascade, _cascade_reference
from .options import DendriteOptions, check_choice, check_int

__all__ = ["LowRankDendrite", "LowRankDendrites", "LowRankOptions", "apply_cascade"]


def apply_cascade(
    a: torch.Tensor, y: torch.Tensor, units, p: int, activation: str, kernel: Optional[CascadeKernel] = None
) -> torch.Tensor:
    """Run the cascade of :mod:`.cascade` on pre-activations ``a`` (``[..., k, C, ...]``, dendrite axis
    ``p``) with the units' ``out_gain`` and ``cascade_gain`` parameters and ``kernel`` (default: the eager
    one); returns the layer output."""
    dt = y.dtype
    a = a.to(dt)
    v = torch.stack([d.out_gain for d in units]).to(dt)  # [k, C]
    u = [d.cascade_gain.to(dt) for d in units[1:]]  # u[i-1]: [i, C]
    if torch.compiler.is_compiling():
        # As in the cascade type: traced code gets plain ops (the fused backward's out= writes do not trace).
        return _cascade_reference(a, y, v, p, activation, u)[0]
    if kernel is None:
        return _Cascade.apply(a, y, v, p, activation, False, *u)
    return kernel(a, y, v, p, activation, False, u)


class LowRankDendrite(nn.Module):
    """One low-rank dendrite for every neuron of a layer: ``in_proj`` (``A``), ``out_proj`` (``B``), ``bias``,
    the output gain ``out_gain`` (``v``) and cascade gains ``cascade_gain`` (``u``, absent for the first)."""

    def __init__(self, in_proj, out_proj, bias, index: int, cascade: Optional[torch.Tensor] = None):
        super().__init__()
        self.in_proj = nn.Parameter(in_proj)
        self.out_proj = nn.Parameter(out_proj)
        self.bias = nn.Parameter(bias)
        c = bias.shape[0]
        self.out_gain = nn.Parameter(torch.zeros(c, dtype=bias.dtype, device=bias.device))
        if index > 0:
            self.cascade_gain = nn.Parameter(
                torch.zeros(index, c, dtype=bias.dtype, device=bias.device) if cascade is None else cascade
            )
        else:
            self.cascade_gain = None


@dataclasses.dataclass(frozen=True)
class LowRankOptions(DendriteOptions):
    """Options of ``dendrite_type="lowrank"``: ``rank``, the rank ``r`` of each dendrite's input map ``B A``;
    ``kernel``, as the cascade type's (see :mod:`torch_dendrites.dendrites.kernel`)."""

    type_name: ClassVar[str] = "lowrank"
    rank: int = 4
    kernel: str = "auto"

    def __post_init__(self) -> None:
        check_int(self.type_name, "rank", self.rank, 1)
        check_choice(self.type_name, "kernel", self.kernel, KERNELS)


class LowRankDendrites(DendriteStack):
    """The low-rank dendrite stack of one wrapped layer (see the module docstring)."""

    type_name = "lowrank"
    options_class = LowRankOptions

    def __init__(self, base: nn.Module, spec, activation: str = "sigmoid", init_scale: float = INIT_SCALE, **options):
        super().__init__(base, spec, activation=activation, init_scale=init_scale, **options)
        self.fan_in_shape, self.groups = self._layer_algebra()  # refuses layers without the algebra
        self.rank = self.options.rank
        self.kernel = CascadeKernel(self.options.kernel)

    def new_unit(self, generator: Optional[torch.Generator] = None, index: Optional[int] = None) -> nn.Module:
        like = self._like()
        r, g, c = self.rank, self.groups, self.num_neurons
        fan_in = math.prod(self.fan_in_shape)
        # A: r channels per input group (group-major), each reading that group's fan-in.
        in_proj = uniform((g * r, *self.fan_in_shape), 1.0 / math.sqrt(fan_in), like, generator)
        out_proj = uniform((c, r), self.init_scale / math.sqrt(r), like, generator)
        bias = uniform((c,), self.init_scale / math.sqrt(fan_in), like, generator)
        index = self.num_dendrites if index is None else index
        cascade = cascade_init(index, c, self.init_scale, like, generator)  # as the cascade type's (see there)
        return LowRankDendrite(in_proj, out_proj, bias, index, cascade)

    def _pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """All dendrites' ``B A x + b``, shaped like the layer output with ``k * C`` neurons (dendrite-major)."""
        units = list(self.units)
        k, r, c, g = len(units), self.rank, self.num_neurons, self.groups
        base, spec = self._base[0], self.spec
        # Every dendrite's A as one map of the layer's shape ([k, g*r, *fan_in]: r channels per input group).
        h = spec.linear_maps(base, torch.stack([d.in_proj for d in units]), None, x)
        p = spec.neuron_axis % h.dim()
        h = h.movedim(p, -1).unflatten(-1, (k, g, r))
        # B: per dendrite and group, r channels -> that group's C/g neurons (a 1x1 map), then the bias.
        out_proj = torch.stack([d.out_proj for d in units]).unflatten(1, (g, c // g))  # [k, g, C/g, r]
        a = torch.einsum("...kgr,kgcr->...kgc", h, out_proj).flatten(-3) + torch.cat([d.bias for d in units])
        return a.movedim(-1, p)

    def forward(self, y: torch.Tensor, neuron_axis: int, *args: Any, **kwargs: Any) -> torch.Tensor:
        p = self._check_axis(y, neuron_axis)
        units = list(self.units)
        if not units:
            return y
        a = self._pre_activations(self._single_input(args, kwargs))
        k, c = len(units), self.num_neurons
        if a.shape[p] != k * c:
            raise StateError(
                f"the low-rank dendrites produced {a.shape[p]} channels on axis {p} for {k} dendrites of {c} "
                "neurons; the layer's neuron axis does not match its input layout."
            )
        return apply_cascade(a.unflatten(p, (k, c)), y, units, p, self.activation, self.kernel)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, activation={self.activation!r}"
