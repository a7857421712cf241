"""Structured-sparse dendrites (``dendrite_type="sparse"``) after Chavlis & Poirazi's dANN (Nature
Communications, 2025), and their linear control (``dendrite_type="sparse_linear"``).

In a dANN a neuron's dendritic branches each receive a small subset of the inputs (random, or a local
receptive field), apply a nonlinearity, and the soma sums the branch outputs with learned weights. Here each
growth step adds one branch to every neuron ``c`` of a wrapped layer::

    z_i[c] = sum_{j in S_i[c]} w_i[c, j] x_j + b_i[c]        (|S_i[c]| = K inputs)
    y'[c]  = y[c] + sum_i v_i[c] * f(z_i[c])

with ``f`` = LeakyReLU for ``sparse`` and the identity for ``sparse_linear``. The linear variant keeps the same
connectivity, parameter count and training, but its branches add only a (sparse) linear term, so comparing the
two isolates what the branch nonlinearity buys. Branches do not feed each other (no cascade), as in dANN.
The output gains ``v`` start at zero: growth never changes the function.

Connectivity. ``S_i[c]`` is stored as a persistent integer buffer ``index`` (``[C, K]``, in the state dict,
so :func:`torch_dendrites.save`/:func:`~torch_dendrites.load` keep it) and the weights as ``[C, K]``: only
the ``K`` connected weights exist as parameters. A weight outside the mask is therefore not a parameter at
all; no gradient, weight decay, momentum or optimizer state can ever touch it, and ``summary`` and ``grow``
count exactly the ``C * K + 2 * C`` trainable numbers per branch set. ``mask`` and ``dense_weight()`` on a
unit give the dense view. The forward scatters the ``K`` weights into a dense ``[k * C, fan_in]`` matrix and
runs all ``k`` branch sets as one matmul (or one grouped convolution): the compute of a dense dendrite, the
storage of a sparse one.

Inputs per branch. A neuron's inputs are its fan-in: ``in_features`` for linear layers, and
``in_channels / groups x kernel`` for convolutions (a branch then sees ``K`` of the weights of one filter).
``receptive="random"`` draws ``K`` distinct inputs uniformly; ``receptive="local"`` draws a random centre in
the grid ``input_shape`` (default: the fan-in's own shape, ``(in_features,)`` or ``(in/groups, *kernel)``)
and takes the ``K`` grid points nearest to it (Euclidean, random tie-breaking), e.g. a disc of pixels for
``input_shape=(28, 28)`` on a flattened MNIST input. Every draw uses the generator passed to ``grow``.

Supported layers: ``nn.Linear``, ``nn.Conv1d/2d/3d`` and Hugging Face's GPT-2 ``Conv1D``. The
``DendriteConfig.activation`` field is not used by these types (their branch function is fixed above).

Options (``DendriteConfig(dendrite_options={...})``):
    branch_inputs: ``K``, an int >= 1 (default 16); capped at a layer's fan-in (a branch of a layer with
        fewer inputs sees them all).
    receptive: ``"random"`` (default) or ``"local"``.
    input_shape: ``"local"`` only; the grid the fan-in is laid out on, whose product must equal the fan-in
        of every wrapped layer (wrap only the layers that read that input).
    negative_slope: ``sparse`` only; the LeakyReLU slope for negative inputs (default 0.1).

Example:
    >>> import torch, torch_dendrites as td
    >>> net = torch.nn.Sequential(torch.nn.Linear(64, 10))
    >>> cfg = td.DendriteConfig(dendrite_type="sparse", dendrite_options={"branch_inputs": 8})
    >>> net = td.add_dendrites(net, cfg)
    >>> td.grow(net)  # 10 neurons x (8 weights + 1 bias + 1 output gain)
    100
    >>> int(net[0].dendrites.units[0].mask.sum())
    80
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, StateError
from .base import INIT_SCALE, DendriteStack, uniform
from .options import DendriteOptions, check_choice, check_int, check_number

__all__ = ["SparseDendrite", "SparseDendrites", "SparseLinearDendrites", "SparseLinearOptions", "SparseOptions"]

RECEPTIVE = ("random", "local")


class SparseDendrite(nn.Module):
    """One branch for every neuron: ``weight`` ``[C, K]`` on the inputs listed in the buffer ``index``
    ``[C, K]``, a ``bias`` and an output gain ``out_gain`` per neuron."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, index: torch.Tensor, fan_in: int):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)
        self.out_gain = nn.Parameter(torch.zeros_like(bias))
        self.register_buffer("index", index)  # persistent: saved and loaded with the weights
        self.fan_in = fan_in

    @property
    def mask(self) -> torch.Tensor:
        """Bool ``[C, fan_in]``: which inputs each neuron's branch reads."""
        m = torch.zeros(self.index.shape[0], self.fan_in, dtype=torch.bool, device=self.index.device)
        return m.scatter_(1, self.index, True)

    def dense_weight(self) -> torch.Tensor:
        """The branch weights as a dense ``[C, fan_in]`` matrix (zero outside ``mask``)."""
        w = self.weight
        return w.new_zeros(w.shape[0], self.fan_in).scatter(1, self.index, w)


@dataclasses.dataclass(frozen=True)
class SparseLinearOptions(DendriteOptions):
    """Options of ``dendrite_type="sparse_linear"`` (see the module docstring): ``branch_inputs``,
    ``receptive``, ``input_shape``."""

    type_name: ClassVar[str] = "sparse_linear"
    branch_inputs: int = 16
    receptive: str = "random"
    input_shape: Optional[Tuple[int, ...]] = None

    def __post_init__(self) -> None:
        check_int(self.type_name, "branch_inputs", self.branch_inputs, 1)
        check_choice(self.type_name, "receptive", self.receptive, RECEPTIVE)
        if self.input_shape is None:
            return
        if self.receptive != "local":
            raise ConfigError(
                f"dendrite_options input_shape={self.input_shape!r} only applies to receptive='local'; drop it or "
                "set receptive='local'."
            )
        value = self.input_shape
        if (
            not isinstance(value, (list, tuple))
            or not value
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in value)
        ):
            raise ConfigError(
                f"dendrite_options input_shape={value!r} for dendrite_type={self.type_name!r} must be a non-empty "
                "list of ints >= 1, e.g. [28, 28] for flattened MNIST images."
            )
        object.__setattr__(self, "input_shape", tuple(value))  # frozen: lists (from JSON) become a tuple once


@dataclasses.dataclass(frozen=True)
class SparseOptions(SparseLinearOptions):
    """Options of ``dendrite_type="sparse"``: those of ``sparse_linear`` and ``negative_slope``."""

    type_name: ClassVar[str] = "sparse"
    negative_slope: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self.type_name, "negative_slope", self.negative_slope, 0.0, 1.0)


class SparseDendrites(DendriteStack):
    """The structured-sparse (dANN) dendrite stack of one wrapped layer (see the module docstring)."""

    type_name = "sparse"
    options_class = SparseOptions
    nonlinear = True

    def __init__(self, base: nn.Module, spec, activation: str = "sigmoid", init_scale: float = INIT_SCALE, **options):
        super().__init__(base, spec, activation=activation, init_scale=init_scale, **options)
        self.fan_in_shape, self.groups = self._layer_algebra()  # refuses layers without the algebra
        self.fan_in = math.prod(self.fan_in_shape)
        opts = self.options
        self.branch_inputs = min(opts.branch_inputs, self.fan_in)
        self.receptive = opts.receptive
        if opts.input_shape is not None and math.prod(opts.input_shape) != self.fan_in:
            raise ConfigError(
                f"dendrite_options input_shape={list(opts.input_shape)} has {math.prod(opts.input_shape)} entries, "
                f"but a wrapped {type(base).__name__} has a fan-in of {self.fan_in}; wrap only the layers that read "
                "that input (DendriteConfig(target_names=[...])), or drop input_shape."
            )
        self.grid = opts.input_shape if opts.input_shape is not None else self.fan_in_shape
        self.negative_slope = getattr(opts, "negative_slope", 0.0)  # sparse_linear's branches have no slope

    # ------------------------------------------------------------- connectivity
    def _draw_index(self, generator: Optional[torch.Generator]) -> torch.Tensor:
        c, n, k = self.num_neurons, self.fan_in, self.branch_inputs
        if self.receptive == "random":
            order = torch.rand(c, n, generator=generator).argsort(dim=1)
            return order[:, :k].sort(dim=1).values
        # Local: the K grid points nearest a random centre; a small random jitter breaks distance ties
        # (which a regular grid has many of) without favouring any direction.
        coords = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in self.grid], indexing="ij"))
        coords = coords.flatten(1).t()  # [n, dims]
        centre = coords[torch.randint(n, (c,), generator=generator)]  # [c, dims]
        dist = torch.cdist(centre, coords) + 1e-3 * torch.rand(c, n, generator=generator)
        return dist.topk(k, dim=1, largest=False).indices.sort(dim=1).values

    def new_unit(self, generator: Optional[torch.Generator] = None, index: Optional[int] = None) -> nn.Module:
        like = self._like()
        c, k = self.num_neurons, self.branch_inputs
        bound = self.init_scale / math.sqrt(k)
        index = self._draw_index(generator).to(like.device)  # connectivity (the unit's position is irrelevant)
        weight = uniform((c, k), bound, like, generator)
        bias = uniform((c,), bound, like, generator)
        return SparseDendrite(weight, bias, index, self.fan_in)

    # ------------------------------------------------------------- forward
    def _pre_activations(self, x: torch.Tensor, units) -> torch.Tensor:
        k, c = len(units), self.num_neurons
        weight = torch.cat([u.weight for u in units])
        # Each branch's K weights scattered into a map of the layer's shape: one matmul / grouped conv for all.
        dense = weight.new_zeros(k * c, self.fan_in).scatter(1, torch.cat([u.index for u in units]), weight)
        bias = torch.stack([u.bias for u in units])
        return self.spec.linear_maps(self._base[0], dense.view(k, c, *self.fan_in_shape), bias, x)

    def forward(self, y: torch.Tensor, neuron_axis: int, *args: Any, **kwargs: Any) -> torch.Tensor:
        p = self._check_axis(y, neuron_axis)
        units = list(self.units)
        if not units:
            return y
        k, c = len(units), self.num_neurons
        a = self._pre_activations(self._single_input(args, kwargs), units)
        if a.shape[p] != k * c:
            raise StateError(
                f"the sparse dendrites produced {a.shape[p]} channels on axis {p} for {k} branches of {c} neurons; "
                "the layer's neuron axis does not match its input layout."
            )
        s = a.to(y.dtype).unflatten(p, (k, c))
        if self.nonlinear:
            s = F.leaky_relu(s, self.negative_slope)
        v = torch.stack([u.out_gain for u in units]).to(y.dtype).view(k, c, *(1,) * (y.dim() - p - 1))
        return y + (s * v).sum(p)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, branch_inputs={self.branch_inputs}, receptive={self.receptive!r}"


class SparseLinearDendrites(SparseDendrites):
    """``dendrite_type="sparse_linear"``: the dANN structure with linear branches (the control)."""

    type_name = "sparse_linear"
    options_class = SparseLinearOptions
    nonlinear = False
