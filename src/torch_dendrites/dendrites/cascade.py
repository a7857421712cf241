"""Gradient-descent cascade dendrites (the README's "The math").

Dendrite ``i`` of a layer is a fresh copy of the layer's shape fed the same input. Per output channel
``c``: ``z_i = D_i(x) + sum_{j<i} u_ij[c] * s_j``, ``s_i = act(z_i)``, and the layer returns
``y + sum_i v_i[c] * s_i``. New ``v`` start at zero, so growth never changes the function; new ``u`` start
random (:func:`cascade_init`).
All ``D_i`` run as one batched op (the layer spec stacks their weights); the cascade itself is a cheap
per-channel loop over the (few) dendrites.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from ..correlation import CorrelationStats, candidate_tap
from ..errors import StateError
from .base import INIT_SCALE, DendriteStack, uniform
from .kernel import KERNELS, CascadeKernel, _cascade_reference, _tracing
from .options import DendriteOptions, check_choice

__all__ = ["CascadeDendrites", "CascadeOptions", "Dendrite"]


def cascade_init(
    index: int, num_neurons: int, scale: float, like: torch.Tensor, generator: Optional[torch.Generator]
) -> Optional[torch.Tensor]:
    """The cascade gains ``u`` of a new dendrite from the ``index`` dendrites before it: uniform with bound
    ``scale / sqrt(index)`` (the default initialisation of a layer with that fan-in, times ``scale``). They may
    start random because the new dendrite's output gain starts at zero (growth still changes nothing), and so
    the new dendrite reads the earlier dendrites' features from its first step, as a Cascade-Correlation unit
    reads the hidden units before it; zero cascade gains get no gradient until the output gain has grown."""
    if index == 0:
        return None
    return uniform((index, num_neurons), scale / math.sqrt(index), like, generator)


class Dendrite(nn.Module):
    """One dendrite for every neuron of a layer: its own copy of the layer's weights, an output gain ``v``
    per neuron, and cascade gains ``u`` from each earlier dendrite (absent for the first)."""

    def __init__(self, weights: dict, index: int, num_neurons: int, cascade: Optional[torch.Tensor] = None):
        super().__init__()
        like = next(iter(weights.values()))
        for name, t in weights.items():
            self.register_parameter(name, nn.Parameter(t))
        self.out_gain = nn.Parameter(torch.zeros(num_neurons, dtype=like.dtype, device=like.device))
        if index > 0:
            if cascade is None:
                cascade = torch.zeros(index, num_neurons, dtype=like.dtype, device=like.device)
            self.cascade_gain = nn.Parameter(cascade)
        else:
            self.cascade_gain = None


@dataclasses.dataclass(frozen=True)
class CascadeOptions(DendriteOptions):
    """Options of ``dendrite_type="cascade"``: ``kernel``, which implementation runs the cascade's elementwise
    passes (``"auto"``, ``"eager"`` or ``"compiled"``; see :mod:`torch_dendrites.dendrites.kernel`)."""

    type_name: ClassVar[str] = "cascade"
    kernel: str = "auto"

    def __post_init__(self) -> None:
        check_choice(self.type_name, "kernel", self.kernel, KERNELS)


class CascadeDendrites(DendriteStack):
    """The dendrite stack of one wrapped layer (``dendrite_type="cascade"``).

    ``units`` holds the installed dendrites. ``candidates`` holds correlation-trained candidates while a
    :class:`~torch_dendrites.GrowthController` runs a candidate phase: they see the layer's input and the
    installed dendrites' activations detached, add nothing to the output, and receive the gradient of
    their covariance with the layer's back-propagated error instead of the loss's (see
    :mod:`torch_dendrites.correlation`).
    """

    type_name = "cascade"
    options_class = CascadeOptions
    # Dendrites run through the layer spec's batched_forward (a new spec is tried once, see LayerSpec.trusted).
    uses_layer_spec = True

    def __init__(
        self, base: nn.Module, spec, activation: str = "sigmoid", init_scale: float = INIT_SCALE, **options: Any
    ):
        super().__init__(base, spec, activation=activation, init_scale=init_scale, **options)
        self.kernel = CascadeKernel(self.options.kernel)
        self.param_names = spec.param_names(base)
        # The correlation.CandidateHolder protocol: filled during a candidate phase, empty otherwise.
        self.candidates = nn.ModuleList()
        self.correlation: Optional[CorrelationStats] = None

    def new_unit(
        self, generator: Optional[torch.Generator] = None, index: Optional[int] = None, scale: Optional[float] = None
    ) -> Dendrite:
        """A new dendrite (not attached): the layer's default initialisation times ``scale`` (default
        ``init_scale``), zero output gain, and random cascade gains from the ``index`` dendrites before it."""
        scale = self.init_scale if scale is None else scale
        index = self.num_dendrites if index is None else index
        weights = self.spec.init_params(self._base[0], scale, generator)
        return Dendrite(
            weights, index, self.num_neurons, cascade_init(index, self.num_neurons, scale, self._like(), generator)
        )

    # ------------------------------------------------------------- correlation candidates
    def new_candidates(
        self, n: int, generator: Optional[torch.Generator] = None, index: Optional[int] = None, scale=None
    ) -> list:
        """Build (not attach) ``n`` candidates wired to the ``index`` dendrites before them."""
        return [self.new_unit(generator, index, scale) for _ in range(n)]

    def attach_candidates(self, candidates: list) -> None:
        """Make ``candidates`` this layer's candidates: their output gains stay zero and frozen."""
        for d in candidates:
            d.out_gain.requires_grad_(False)
        self.candidates = nn.ModuleList(candidates)
        device = next(self._base[0].parameters()).device
        self.correlation = CorrelationStats(len(self.candidates), self.num_neurons, device)

    def add_candidates(self, n: int, generator: Optional[torch.Generator] = None, scale=None) -> None:
        """Add ``n`` candidates (each wired to every installed dendrite); their output gains stay zero."""
        self.attach_candidates(list(self.candidates) + self.new_candidates(n, generator, scale=scale))

    def clear_candidates(self) -> None:
        self.candidates = nn.ModuleList()
        self.correlation = None

    def install_candidate(self, index: int) -> int:
        """Make candidate ``index`` a dendrite: input weights frozen, output gain trainable. Returns its size."""
        d = self.candidates[index]
        self.units.append(d)
        self.set_inputs_frozen(len(self.units) - 1, True)
        self.clear_candidates()
        return sum(p.numel() for p in d.parameters())

    def set_inputs_frozen(self, index: int, frozen: bool) -> None:
        """Freeze (or thaw) the input weights and cascade gains of dendrite ``index``; its output gain stays
        trainable. The flag (``inputs_frozen``) is saved with the model."""
        d = self.units[index]
        d.inputs_frozen = frozen
        for name, p in d.named_parameters():
            p.requires_grad_(name == "out_gain" or not frozen)

    def frozen_unit_parameters(self) -> list:
        """The frozen input weights of dendrites: correlation-trained ones, and in gd mode the sets grown before
        the newest (``GrowthConfig.freeze_earlier``)."""
        return [
            p for d in self.units if getattr(d, "inputs_frozen", False) for p in d.parameters() if not p.requires_grad
        ]

    # ------------------------------------------------------------- forward
    def forward(self, y: torch.Tensor, neuron_axis: int, *args: Any, **kwargs: Any) -> torch.Tensor:
        ds = list(self.units)
        k, c = len(ds), self.num_neurons
        p = self._check_axis(y, neuron_axis)
        if self.training and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # Frozen input weights of dendrites get zero gradients, so that loops which
            # read every parameter's .grad (p.data.add_(p.grad, ...)) work; GrowthController.step checks
            # that no optimizer moved them (weight decay, momentum).
            for w in self.frozen_unit_parameters():
                if w.grad is None:
                    w.grad = torch.zeros_like(w)
        out, s = y, None
        if k:
            params = {n: [getattr(d, n) for d in ds] for n in self.param_names}
            a = self.spec.batched_forward(self._base[0], params, *args, **kwargs)
            if a.shape[p] != k * c:
                raise StateError(f"the layer spec returned {a.shape[p]} channels for {k} dendrites of {c} neurons.")
            # One dtype for the elementwise cascade: the layer output's (bf16 under autocast, say). (Each op
            # skipped where it does nothing: a small layer's step pays for every Python-level call.)
            dt = y.dtype
            if a.dtype != dt:
                a = a.to(dt)
            v = ds[0].out_gain.unsqueeze(0) if k == 1 else torch.stack([d.out_gain for d in ds])  # [k, C]
            if v.dtype != dt:
                v = v.to(dt)
            u = [d.cascade_gain.to(dt) for d in ds[1:]]  # u[i-1]: [i, C]
            a = a.view(a.shape[:p] + (k, c) + a.shape[p + 1 :])  # splitting one axis is always a view
            if _tracing():
                # Traced code (torch.compile, torch.export, ONNX export, torch.jit.trace) gets plain ops, which
                # compilers fuse and exporters know; the hand-written backward's in-place `out=` writes into
                # slices do not trace, and a Python autograd Function has no ONNX symbolic.
                out, s = _cascade_reference(a, y, v, p, self.activation, u)
            elif len(self.candidates):
                out, s = self.kernel(a, y, v, p, self.activation, True, u)
            else:  # s only feeds candidates: not returning it saves autograd work on every step
                out = self.kernel(a, y, v, p, self.activation, False, u)
        if len(self.candidates) and self.training and torch.is_grad_enabled():
            out = candidate_tap(self, out, s, p, args, kwargs)
        return out

    def extra_repr(self) -> str:
        extra = f", candidates={len(self.candidates)}" if len(self.candidates) else ""
        return (
            f"num_dendrites={self.num_dendrites}, num_neurons={self.num_neurons}, activation={self.activation!r}{extra}"
        )
