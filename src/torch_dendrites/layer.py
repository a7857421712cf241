"""One dendritic wrapper, :class:`DendriticLayer`: a layer plus the dendrite stack it is handed.

What a layer type is (its neuron axis, its algebra) is in :mod:`torch_dendrites.specs`; what a dendrite is, in
:mod:`torch_dendrites.dendrites`. This module knows neither in detail: :func:`torch_dendrites.add_dendrites`
builds the stack and hands it over.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .errors import StateError, UnsupportedModuleError
from .specs import LayerSpec

__all__ = ["DendriticLayer"]


class DendriticLayer(nn.Module):
    """A layer plus its dendrites: ``y = base(x) + dendrites(x)``, per neuron.

    The original module is kept as ``self.base`` and runs unchanged, so its parameters keep their
    identity (optimizers and tied weights keep working). ``self.dendrites`` holds the dendrite stack of
    the configured type. Built by :func:`torch_dendrites.add_dendrites`; rarely constructed by hand.

    Example:
        >>> import torch, torch_dendrites as td
        >>> net = td.add_dendrites(torch.nn.Sequential(torch.nn.Linear(4, 3)))
        >>> type(net[0]).__name__, net[0].num_dendrites
        ('DendriticLayer', 0)
    """

    def __init__(self, base: nn.Module, spec: LayerSpec, dendrites: nn.Module, neuron_axis: Optional[int] = None):
        super().__init__()
        self.base = base
        self.spec = spec
        self.neuron_axis = spec.neuron_axis if neuron_axis is None else neuron_axis
        self.dendrites = dendrites
        # The layer's path in its model (set by add_dendrites), for error messages.
        self.path = ""
        # A spec the library does not ship is tried once, at the first call (see LayerSpec.trusted).
        self._spec_checked = spec.trusted or not getattr(self.dendrites, "uses_layer_spec", False)

    @property
    def dendrite_type(self) -> str:
        """The dendrite type's registered name (``"cascade"``, ...)."""
        return self.dendrites.type_name

    @property
    def num_dendrites(self) -> int:
        """Dendrites per neuron."""
        return self.dendrites.num_dendrites

    @property
    def num_neurons(self) -> int:
        return self.dendrites.num_neurons

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.base(*args, **kwargs)
        if not self._spec_checked:
            self._try_spec(y, args, kwargs)
        d = self.dendrites
        if d.num_dendrites == 0 and not len(getattr(d, "candidates", ())):
            return y
        return self.dendrites(y, self.neuron_axis, *args, **kwargs)

    def _try_spec(self, y: Any, args: tuple, kwargs: dict) -> None:
        """Run the spec's batched forward once with one throw-away dendrite on this call's input."""
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return  # traced code is checked by the eager call that comes first, or not at all
        base = self.base
        name = type(base).__name__
        where = f"layer '{self.path}' ({name})" if self.path else f"a {name} layer"
        if not isinstance(y, torch.Tensor):
            raise UnsupportedModuleError(
                f"{where} returns a {type(y).__name__}, not a tensor: dendrites add to a layer's one output tensor. "
                "Wrap the part of the block that computes that tensor, or leave these layers out with "
                "DendriteConfig(exclude=[...])."
            )
        fix = (
            f"register the type with a LayerSpec subclass whose batched_forward runs k dendrites in one op: "
            f"td.register_layer_type({name}, spec=MySpec()) (see the LayerSpec docstring), or leave these layers "
            "out with DendriteConfig(exclude=[...])"
        )
        buffers = {k: b.clone() for k, b in base.named_buffers()}
        try:
            with torch.no_grad():
                weights = self.spec.init_params(base, 0.01, torch.Generator().manual_seed(0))
                out = self.spec.batched_forward(base, {n: [w] for n, w in weights.items()}, *args, **kwargs)
        except Exception as exc:
            raise UnsupportedModuleError(
                f"{where}: dendrites cannot run on this layer type: its LayerSpec's batched_forward (by default "
                f"the layer's own forward under torch.func.vmap over the stacked dendrite weights) failed with "
                f"{type(exc).__name__}: {exc}. Fix: {fix}."
            ) from exc
        finally:
            # The trial must leave running statistics and other buffers as they were. Written through .data:
            # the base forward of this very call may have saved them for its backward (batch norm does).
            for k, b in base.named_buffers():
                if k in buffers and b.shape == buffers[k].shape and not torch.equal(b, buffers[k]):
                    b.data.copy_(buffers[k])
        axis_ok = -y.dim() <= self.neuron_axis < y.dim() and y.shape[self.neuron_axis] == self.num_neurons
        if not isinstance(out, torch.Tensor) or out.shape != y.shape or not axis_ok:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise UnsupportedModuleError(
                f"{where}: one dendrite's output should have the layer's output shape {tuple(y.shape)} with its "
                f"{self.num_neurons} neurons on axis {self.neuron_axis}; the LayerSpec's batched_forward returned "
                f"{got} (a wrong neuron_axis or num_neurons does this). Fix: {fix}."
            )
        self._spec_checked = True

    def grow(self, generator: Optional[torch.Generator] = None) -> int:
        """Add one dendrite to every neuron; the output is unchanged. Returns the parameters added."""
        return self.dendrites.grow(generator)

    def truncate(self, num_dendrites: int) -> None:
        """Drop the newest dendrites until ``num_dendrites`` remain."""
        if isinstance(num_dendrites, bool) or not isinstance(num_dendrites, int) or num_dendrites < 0:
            raise StateError(f"num_dendrites={num_dendrites!r} must be an int >= 0.")
        if num_dendrites > self.num_dendrites:
            raise StateError(f"cannot truncate to {num_dendrites} dendrites: the layer has only {self.num_dendrites}.")
        self.dendrites.truncate(num_dendrites)

    def dendrite_parameters(self):
        """The parameters added by dendrites (not the base layer's)."""
        return self.dendrites.parameters()

    def extra_repr(self) -> str:
        return (
            f"dendrite_type={self.dendrite_type!r}, num_dendrites={self.num_dendrites}, neuron_axis={self.neuron_axis}"
        )
