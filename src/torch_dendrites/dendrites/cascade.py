"""Gradient-descent cascade dendrites (DESIGN.md).

Dendrite ``i`` of a layer is a fresh copy of the layer's shape fed the same input. Per output channel
``c``: ``z_i = D_i(x) + sum_{j<i} u_ij[c] * s_j``, ``s_i = act(z_i)``, and the layer returns
``y + sum_i v_i[c] * s_i``. New ``u`` and ``v`` start at zero, so growth never changes the function.
All ``D_i`` run as one batched op (the layer spec stacks their weights); the cascade itself is a cheap
per-channel loop over the (few) dendrites.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..errors import StateError

__all__ = ["CascadeDendrites", "Dendrite"]

_ACTIVATIONS = {"sigmoid": torch.sigmoid, "tanh": torch.tanh}


class Dendrite(nn.Module):
    """One dendrite for every neuron of a layer: its own copy of the layer's weights, an output gain ``v``
    per neuron, and cascade gains ``u`` from each earlier dendrite (absent for the first)."""

    def __init__(self, weights: dict, index: int, num_neurons: int):
        super().__init__()
        like = next(iter(weights.values()))
        for name, t in weights.items():
            self.register_parameter(name, nn.Parameter(t))
        self.out_gain = nn.Parameter(torch.zeros(num_neurons, dtype=like.dtype, device=like.device))
        if index > 0:
            self.cascade_gain = nn.Parameter(torch.zeros(index, num_neurons, dtype=like.dtype, device=like.device))
        else:
            self.cascade_gain = None


class CascadeDendrites(nn.Module):
    """The dendrite stack of one wrapped layer (``dendrite_type="cascade"``)."""

    def __init__(self, base: nn.Module, spec, activation: str = "sigmoid", init_scale: float = 0.01):
        super().__init__()
        # `base` is not registered here (it belongs to the DendriticLayer): kept in a tuple so that
        # nn.Module does not adopt it as a child and duplicate its parameters.
        self._base = (base,)
        self.spec = spec
        self.activation = activation
        self.init_scale = float(init_scale)
        self.num_neurons = spec.num_neurons(base)
        self.param_names = spec.param_names(base)
        self.units = nn.ModuleList()

    @property
    def num_dendrites(self) -> int:
        return len(self.units)

    def grow(self, generator: Optional[torch.Generator] = None) -> int:
        base = self._base[0]
        weights = self.spec.init_params(base, self.init_scale, generator)
        d = Dendrite(weights, self.num_dendrites, self.num_neurons)
        self.units.append(d)
        return sum(p.numel() for p in d.parameters())

    def truncate(self, k: int) -> None:
        while len(self.units) > k:
            del self.units[len(self.units) - 1]

    def forward(self, y: torch.Tensor, neuron_axis: int, *args: Any, **kwargs: Any) -> torch.Tensor:
        ds = list(self.units)
        k, c = len(ds), self.num_neurons
        params = {n: [getattr(d, n) for d in ds] for n in self.param_names}
        a = self.spec.batched_forward(self._base[0], params, *args, **kwargs)
        p = neuron_axis % y.dim()
        if y.shape[p] != c or a.shape[p] != k * c:
            raise StateError(
                f"the neuron axis {neuron_axis} of this layer's output {tuple(y.shape)} does not have its "
                f"{c} neurons; set DendriteConfig(neuron_axis=...) to the output axis that holds them."
            )
        a = a.unflatten(p, (k, c))
        gain_shape = (c,) + (1,) * (y.dim() - p - 1)
        act = _ACTIVATIONS[self.activation]
        out = y
        s = []
        for i, d in enumerate(ds):
            z = a.select(p, i)
            for j in range(i):
                z = torch.addcmul(z, d.cascade_gain[j].view(gain_shape), s[j])
            s.append(act(z))
            out = torch.addcmul(out, d.out_gain.view(gain_shape), s[i])
        return out

    def extra_repr(self) -> str:
        return f"num_dendrites={self.num_dendrites}, num_neurons={self.num_neurons}, activation={self.activation!r}"
