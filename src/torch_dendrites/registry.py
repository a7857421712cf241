"""One registry convention for the library's extension points: layer types and dendrite types.

A :class:`Registry` maps a key to what the library needs to know about it. Registering a key that is already
there raises :class:`~torch_dendrites.ConfigError` unless ``override=True`` is passed, so a plug-in cannot
silently replace a built-in (as timm's and PEFT's registries refuse or warn). Registries hold type knowledge
only, never training state. This module imports nothing of the library but its errors, so that the config
module can check names against it.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Generic, Hashable, Iterator, Tuple, TypeVar

from .errors import ConfigError

__all__ = ["DENDRITE_TYPES", "LAYER_TYPES", "Registry"]

V = TypeVar("V")


class Registry(Generic[V]):
    """A named mapping with a refusal of duplicates.

    Args:
        what: what the keys are, for messages (``"dendrite type"``).
        check: ``fn(key, value)`` raising :class:`ConfigError` for an invalid entry.

    Example:
        >>> from torch_dendrites.registry import Registry
        >>> colours = Registry("colour")
        >>> colours.register("red", 1)
        1
        >>> colours.register("red", 2)
        Traceback (most recent call last):
        ...
        torch_dendrites.errors.ConfigError: colour 'red' is already registered; pass override=True to replace it.
    """

    def __init__(self, what: str, check: Callable[[Any, Any], None] = lambda key, value: None):
        self.what = what
        self._check = check
        self._entries: Dict[Hashable, V] = {}

    def register(self, key: Hashable, value: V, override: bool = False) -> V:
        if not isinstance(override, bool):
            raise ConfigError(f"override={override!r} must be True or False.")
        self._check(key, value)
        if key in self._entries and not override:
            raise ConfigError(f"{self.what} {key!r} is already registered; pass override=True to replace it.")
        self._entries[key] = value
        return value

    def get(self, key: Hashable, default: Any = None) -> Any:
        return self._entries.get(key, default)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._entries)

    def items(self) -> Iterator[Tuple[Hashable, V]]:
        return iter(self._entries.items())

    def names(self) -> Tuple[Hashable, ...]:
        return tuple(self._entries)


# Layer class (or "module.QualName" of a class in an optional library, resolved without importing it) ->
# LayerSpec; filled by torch_dendrites.specs.
LAYER_TYPES: Registry[Any] = Registry("layer type")
# Dendrite type name -> stack class; filled by torch_dendrites.dendrites.
DENDRITE_TYPES: Registry[Any] = Registry("dendrite type")
