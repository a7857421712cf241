"""Dendrite types behind one small interface, with a registry from name to class.

A dendrite type is an ``nn.Module`` built as ``cls(base, spec, activation=..., init_scale=..., **options)``
that exposes ``num_dendrites``, ``num_neurons``, ``units`` (an ``nn.ModuleList``, one entry per dendrite),
``grow(generator) -> int``, ``truncate(k)`` and
``forward(y, neuron_axis, *layer_args) -> y'``, and adds nothing to ``y`` right after ``grow``.
"""

from __future__ import annotations

from typing import Dict, Type

from torch import nn

from ..errors import ConfigError
from .cascade import CascadeDendrites

__all__ = ["CascadeDendrites", "dendrite_type_names", "make_dendrites", "register_dendrite_type"]

_TYPES: Dict[str, Type[nn.Module]] = {"cascade": CascadeDendrites}


def register_dendrite_type(name: str, cls: Type[nn.Module]) -> None:
    """Make ``DendriteConfig(dendrite_type=name)`` build ``cls`` (see the module docstring for its interface)."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"dendrite type name {name!r} must be a non-empty string.")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(f"dendrite type {cls!r} must be an nn.Module subclass.")
    _TYPES[name] = cls


def dendrite_type_names():
    return tuple(_TYPES)


def make_dendrites(name: str, base: nn.Module, spec, **kwargs) -> nn.Module:
    if name not in _TYPES:
        raise ConfigError(f"dendrite_type={name!r} is unknown; choose one of {sorted(_TYPES)}.")
    return _TYPES[name](base, spec, **kwargs)
