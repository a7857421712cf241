"""Dendrite types behind one small interface, with a registry from name to class.

A dendrite type is an ``nn.Module`` built as ``cls(base, spec, activation=..., init_scale=..., **options)``
(``options`` are ``DendriteConfig.dendrite_options``, passed as keyword arguments) that exposes
``num_dendrites``, ``num_neurons``, ``units`` (an ``nn.ModuleList``, one entry per dendrite),
``grow(generator) -> int`` (parameters added; every random draw from ``generator``), ``truncate(k)`` and
``forward(y, neuron_axis, *layer_args, **layer_kwargs) -> y'``, adds nothing to ``y`` right after ``grow``
(unless an option says otherwise, as ``gated``'s ``first_gate="full"`` does for its first gate),
and sets the class attribute ``supports_correlation`` (whether the growth controller's correlation
training can drive it).

Built-in types:

==================  ============================================================================  ===========
name                what a dendrite is                                                            module
==================  ============================================================================  ===========
``cascade``         a full copy of the layer, sigmoid/tanh, cascaded per neuron (the default)     ``cascade``
``lowrank``         the cascade with a rank-``r`` input map ``B A x`` ("dendritic LoRA")         ``lowrank``
``sparse``          dANN branches: ``K`` inputs each, LeakyReLU, summed with learned weights      ``sparse``
``sparse_linear``   the same branches without the nonlinearity (the control)                      ``sparse``
``gated``           Iyer et al.'s context segments gating each neuron through a sigmoid           ``gated``
==================  ============================================================================  ===========

Example:
    >>> from torch_dendrites.dendrites import dendrite_type_names
    >>> sorted(dendrite_type_names())
    ['cascade', 'gated', 'lowrank', 'sparse', 'sparse_linear']
"""

from __future__ import annotations

import inspect
from typing import Dict, Type

from torch import nn

from ..errors import ConfigError
from .cascade import CascadeDendrites
from .gated import GatedDendrites, dendrite_context
from .lowrank import LowRankDendrites
from .sparse import SparseDendrites, SparseLinearDendrites

__all__ = [
    "CascadeDendrites",
    "GatedDendrites",
    "LowRankDendrites",
    "SparseDendrites",
    "SparseLinearDendrites",
    "dendrite_context",
    "dendrite_type_names",
    "make_dendrites",
    "register_dendrite_type",
]

_TYPES: Dict[str, Type[nn.Module]] = {
    "cascade": CascadeDendrites,
    "lowrank": LowRankDendrites,
    "sparse": SparseDendrites,
    "sparse_linear": SparseLinearDendrites,
    "gated": GatedDendrites,
}
# Constructor arguments every type receives from the library itself (not dendrite_options).
_FIXED = ("self", "base", "spec", "activation", "init_scale")


def register_dendrite_type(name: str, cls: Type[nn.Module]) -> None:
    """Make ``DendriteConfig(dendrite_type=name)`` build ``cls`` (see the module docstring for its interface)."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"dendrite type name {name!r} must be a non-empty string.")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(f"dendrite type {cls!r} must be an nn.Module subclass.")
    _TYPES[name] = cls


def dendrite_type_names():
    return tuple(_TYPES)


def dendrite_options(name: str):
    """The option names ``dendrite_type=name`` accepts in ``dendrite_options``, or None if it takes any."""
    params = inspect.signature(_TYPES[name].__init__).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.name not in _FIXED and p.kind is not inspect.Parameter.VAR_POSITIONAL]


def make_dendrites(name: str, base: nn.Module, spec, **kwargs) -> nn.Module:
    if name not in _TYPES:
        raise ConfigError(f"dendrite_type={name!r} is unknown; choose one of {sorted(_TYPES)}.")
    accepted = dendrite_options(name)
    if accepted is not None:
        unknown = sorted(k for k in kwargs if k not in accepted and k not in _FIXED)
        if unknown:
            raise ConfigError(
                f"dendrite_options {unknown} are not options of dendrite_type={name!r}; it accepts "
                f"{accepted or 'none'}."
            )
    return _TYPES[name](base, spec, **kwargs)
