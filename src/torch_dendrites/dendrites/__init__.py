"""Dendrite types behind one small interface, with a registry from name to class.

A dendrite type is a :class:`DendriteStack` subclass built as ``cls(base, spec, activation=..., init_scale=...,
**options)`` (``options`` are ``DendriteConfig.dendrite_options``, passed as keyword arguments). The base class
keeps ``units`` (an ``nn.ModuleList``, one entry per dendrite), ``num_dendrites``, ``num_neurons``, ``grow`` and
``truncate``; a type implements ``new_unit(generator, index) -> nn.Module`` (one dendrite for every neuron, not
yet attached, adding nothing to the output unless an option says otherwise, as ``gated``'s
``first_gate="full"`` does for its first gate; every random draw from ``generator``) and
``forward(y, neuron_axis, *layer_args, **layer_kwargs) -> y'``. A type that can be correlation-trained also
implements :class:`torch_dendrites.correlation.CandidateHolder`. Register new types with
:func:`register_dendrite_type`.

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
from typing import Type

from torch import nn

from ..errors import ConfigError
from ..registry import DENDRITE_TYPES
from .base import DendriteStack, typed_options
from .cascade import CascadeDendrites
from .gated import GatedDendrites, GatedOptions, dendrite_context
from .lowrank import LowRankDendrites, LowRankOptions
from .options import DendriteOptions
from .sparse import SparseDendrites, SparseLinearDendrites, SparseLinearOptions, SparseOptions

__all__ = [
    "CascadeDendrites",
    "DendriteOptions",
    "DendriteStack",
    "GatedDendrites",
    "GatedOptions",
    "LowRankDendrites",
    "LowRankOptions",
    "SparseDendrites",
    "SparseLinearDendrites",
    "SparseLinearOptions",
    "SparseOptions",
    "dendrite_context",
    "dendrite_type_names",
    "make_dendrites",
    "register_dendrite_type",
    "typed_options",
]

for _name, _cls in (
    ("cascade", CascadeDendrites),
    ("lowrank", LowRankDendrites),
    ("sparse", SparseDendrites),
    ("sparse_linear", SparseLinearDendrites),
    ("gated", GatedDendrites),
):
    DENDRITE_TYPES.register(_name, _cls)
# Constructor arguments every type receives from the library itself (not dendrite_options).
_FIXED = ("self", "base", "spec", "activation", "init_scale")


def register_dendrite_type(name: str, cls: Type[DendriteStack], override: bool = False) -> Type[DendriteStack]:
    """Make ``DendriteConfig(dendrite_type=name)`` build ``cls``, a :class:`DendriteStack` subclass (see the
    module docstring for its interface).

    Args:
        name: the type's name in configs and saved recipes.
        cls: the stack class.
        override: replace a type registered before under ``name`` (otherwise that raises ConfigError).

    Returns:
        ``cls`` (so it can be used as a decorator's body).
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"dendrite type name {name!r} must be a non-empty string.")
    if not (isinstance(cls, type) and issubclass(cls, DendriteStack)):
        raise ConfigError(
            f"dendrite type {cls!r} must be a subclass of torch_dendrites.dendrites.DendriteStack (it provides the "
            "bookkeeping every type needs: units, truncate, grow from new_unit)."
        )
    return DENDRITE_TYPES.register(name, cls, override=override)


def dendrite_type_names():
    return DENDRITE_TYPES.names()


def dendrite_options(name: str):
    """The option names ``dendrite_type=name`` accepts in ``dendrite_options``, or None if it takes any."""
    cls = DENDRITE_TYPES.get(name)
    if typed_options(cls) is not None:
        return cls.options_class.names()
    params = inspect.signature(cls.__init__).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.name not in _FIXED and p.kind is not inspect.Parameter.VAR_POSITIONAL]


def make_dendrites(name: str, base: nn.Module, spec, **kwargs) -> nn.Module:
    if name not in DENDRITE_TYPES:
        raise ConfigError(f"dendrite_type={name!r} is unknown; choose one of {sorted(DENDRITE_TYPES.names())}.")
    accepted = dendrite_options(name)
    if accepted is not None:
        unknown = sorted(k for k in kwargs if k not in accepted and k not in _FIXED)
        if unknown:
            raise ConfigError(
                f"dendrite_options {unknown} are not options of dendrite_type={name!r}; it accepts "
                f"{accepted or 'none'}."
            )
    return DENDRITE_TYPES.get(name)(base, spec, **kwargs)
