"""What the dendrite types share: the bookkeeping of the dendrite-type interface.

:class:`DendriteStack` holds the wrapped layer (without adopting it as a child), the installed dendrites
(``units``) and what every type needs around them. Correlation training is an optional capability: a type
takes part by implementing :class:`torch_dendrites.correlation.CandidateHolder` (as the cascade
does). Subclasses implement ``new_unit`` and ``forward``.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from .._tensors import uniform  # U(-bound, bound) drawn on the CPU: the same dendrites on every rank
from ..errors import ConfigError, StateError, UnsupportedModuleError

# The default scale of new dendrite weights (times the layer type's own initialisation), chosen by the sweep in
# benchmarks/results/defaults_sweep.md: large enough that new sigmoids leave their linear range.
INIT_SCALE = 0.3

# The activations a dendrite may apply to its pre-activation, by the name configs and recipes use.
ACTIVATIONS = {"sigmoid": torch.sigmoid, "tanh": torch.tanh}

__all__ = ["DendriteStack", "check_choice", "check_int", "check_number", "uniform"]


def check_int(type_name: str, option: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(
            f"dendrite_options {option}={value!r} for dendrite_type={type_name!r} must be an int >= {minimum}."
        )
    return value


def check_number(type_name: str, option: str, value: Any, lo: float, hi: float) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value <= hi
    if not ok:
        raise ConfigError(
            f"dendrite_options {option}={value!r} for dendrite_type={type_name!r} must be a number in [{lo}, {hi}]."
        )
    return float(value)


def check_choice(type_name: str, option: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ConfigError(
            f"dendrite_options {option}={value!r} for dendrite_type={type_name!r} is unknown; "
            f"choose one of {list(choices)}."
        )
    return value


class DendriteStack(nn.Module):
    """Base class of the dendrite stacks.

    Subclasses set ``type_name`` and implement ``new_unit(generator, index) -> nn.Module`` (one new dendrite,
    not yet attached, that adds nothing to the output) and ``forward(y, neuron_axis, *layer_args, **layer_kwargs)``.
    """

    type_name = "?"

    def __init__(self, base: nn.Module, spec, activation: str = "sigmoid", init_scale: float = INIT_SCALE):
        super().__init__()
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
