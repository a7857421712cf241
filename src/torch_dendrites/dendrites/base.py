"""What the dendrite types share: the bookkeeping of the dendrite-type interface.

:class:`DendriteStack` holds the wrapped layer (without adopting it as a child), the installed dendrites
(``units``) and what every type needs around them. Correlation training is an optional capability: a type
takes part by implementing :class:`torch_dendrites.correlation.CandidateHolder` (as the cascade
does). Subclasses implement ``new_unit`` and ``forward``.
"""

from __future__ import annotations

from typing import Any, Optional, Type

import torch
from torch import nn

from .._tensors import uniform  # U(-bound, bound) drawn on the CPU: the same dendrites on every rank
from ..errors import ConfigError, StateError, UnsupportedModuleError
from .options import DendriteOptions

# The default scale of new dendrite weights (times the layer type's own initialisation), chosen by the sweep in
# benchmarks/results/defaults_sweep.md: large enough that new sigmoids leave their linear range.
INIT_SCALE = 0.3

# The activations a dendrite may apply to its pre-activation, by the name configs and recipes use.
ACTIVATIONS = {"sigmoid": torch.sigmoid, "tanh": torch.tanh}

__all__ = ["DendriteStack", "uniform"]


class DendriteStack(nn.Module):
    """Base class of the dendrite stacks.

    Subclasses set ``type_name`` and implement ``new_unit(generator, index) -> nn.Module`` (one new dendrite,
    not yet attached, that adds nothing to the output) and ``forward(y, neuron_axis, *layer_args, **layer_kwargs)``.
    A type with options sets ``options_class`` (a :class:`~torch_dendrites.dendrites.options.DendriteOptions`
    subclass); the keyword options given to the constructor are checked by it and kept as ``self.options``.
    """

    type_name = "?"
    options_class: Optional[Type[DendriteOptions]] = DendriteOptions

    def __init__(
        self, base: nn.Module, spec, activation: str = "sigmoid", init_scale: float = INIT_SCALE, **options: Any
    ):
        super().__init__()
        if self.options_class is None:
            if options:
                raise ConfigError(f"dendrite_type={self.type_name!r} takes no options {sorted(options)}.")
            self.options = None
        else:
            self.options = self.options_class.from_dict(options, type_name=self.type_name)
        # A tuple, so nn.Module does not adopt the wrapped layer (it belongs to the DendriticLayer).
        self._base = (base,)
        self.spec = spec
        self.activation = activation
        self.init_scale = float(init_scale)
        self.num_neurons = spec.num_neurons(base)
        self.units = nn.ModuleList()

    @property
    def num_dendrites(self) -> int:
        return len(self.units)

    def _like(self) -> torch.Tensor:
        """A tensor with the wrapped layer's dtype and device (new dendrites take both)."""
        for p in self._base[0].parameters():
            if p.is_floating_point():
                return p
        return torch.empty(0)

    def new_unit(self, generator: Optional[torch.Generator] = None, index: Optional[int] = None) -> nn.Module:
        """Build (not attach) one more dendrite for every neuron; every random draw from ``generator``.

        ``index`` is the position the unit will take (default: after the installed ones). Building and
        attaching are apart so that growing a whole model can build every new unit before changing any layer.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement new_unit(generator, index)")

    def grow(self, generator: Optional[torch.Generator] = None) -> int:
        """Add one dendrite to every neuron (the output is unchanged). Returns the parameters added."""
        unit = self.new_unit(generator)
        self.units.append(unit)
        return sum(p.numel() for p in unit.parameters())

    def truncate(self, k: int) -> None:
        while len(self.units) > k:
            del self.units[len(self.units) - 1]

    def _check_axis(self, y: torch.Tensor, neuron_axis: int) -> int:
        p = neuron_axis % y.dim()
        if y.shape[p] != self.num_neurons:
            raise StateError(
                f"the neuron axis {neuron_axis} of this layer's output {tuple(y.shape)} does not have its "
                f"{self.num_neurons} neurons; set DendriteConfig(neuron_axis=...) to the output axis that holds them."
            )
        return p

    def _single_input(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """The layer's input tensor (types that build their own weights run the layer's algebra on it)."""
        if len(args) == 1 and not kwargs:
            return args[0]
        if not args and set(kwargs) == {"input"}:  # nn.Linear / nn.Conv called as layer(input=x)
            return kwargs["input"]
        raise StateError(
            f"dendrite_type={self.type_name!r} dendrites read the layer's single input tensor, but the layer was "
            f"called with {len(args)} positional and {len(kwargs)} keyword arguments."
        )

    def _layer_algebra(self) -> tuple:
        """The wrapped layer's fan-in shape and input groups, for types that build their own weights; refuses
        (naming this type) layers whose spec gives no algebra."""
        base = self._base[0]
        try:
            return tuple(self.spec.fan_in_shape(base)), int(self.spec.groups(base))
        except UnsupportedModuleError as exc:
            raise UnsupportedModuleError(
                f"dendrite_type={self.type_name!r} cannot wrap {type(base).__name__}: {exc} Leave that layer out "
                "(DendriteConfig(exclude=[...]) or target_types)."
            ) from None

    def extra_repr(self) -> str:
        return f"num_dendrites={self.num_dendrites}, num_neurons={self.num_neurons}"


def typed_options(cls: type) -> Optional[Type[DendriteOptions]]:
    """The options class of the dendrite type ``cls``, or None for a type that takes its options as constructor
    arguments (a registered type with a constructor of its own and no ``options_class`` of its own)."""
    opts = getattr(cls, "options_class", None)
    if opts is None or (opts is DendriteOptions and cls.__init__ is not DendriteStack.__init__):
        return None
    return opts
