"""Typed dendrite options: one frozen dataclass per dendrite type, validated when it is built.

``DendriteConfig(dendrite_options=...)`` takes either a plain dict (``{"rank": 2}``) or the type's options
object (``LowRankOptions(rank=2)``); either way the options are checked when the config is built, against the
fields of the type's options class, so a misspelt or out-of-range option fails before any layer is touched.
Each options class carries a ``version``; a recipe records it beside the options, and a newer version than
this library knows is refused on load (:meth:`DendriteOptions.migrate` turns older versions into the current
one).

A registered dendrite type declares its options by setting ``options_class`` on its
:class:`~torch_dendrites.dendrites.DendriteStack` subclass (and reads them from ``self.options``); a type
without one receives its options as constructor keyword arguments, checked against its signature.

Example:
    >>> import torch_dendrites as td
    >>> from torch_dendrites.dendrites import LowRankOptions
    >>> LowRankOptions(rank=2).to_dict()
    {'rank': 2, 'kernel': 'auto'}
    >>> td.DendriteConfig(dendrite_type="lowrank", dendrite_options=LowRankOptions(rank=2)).dendrite_options
    {'rank': 2, 'kernel': 'auto'}
    >>> td.DendriteConfig(dendrite_type="lowrank", dendrite_options={"rank": 0})
    Traceback (most recent call last):
    ...
    torch_dendrites.errors.ConfigError: dendrite_options rank=0 for dendrite_type='lowrank' must be an int >= 1.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Dict, Mapping, Optional, Sequence

from ..errors import ConfigError

__all__ = ["DendriteOptions", "check_choice", "check_int", "check_number"]


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


@dataclasses.dataclass(frozen=True)
class DendriteOptions:
    """Base class of the dendrite types' options (a type with no options uses it as it is).

    Subclasses are frozen dataclasses whose fields are the options, with defaults, checked in
    ``__post_init__``; they set ``type_name`` (for messages) and raise ``version`` when a field's meaning
    changes (with :meth:`migrate` turning the older form into the new one).
    """

    type_name: ClassVar[str] = ""
    version: ClassVar[int] = 1

    @classmethod
    def names(cls) -> list:
        """The option names, in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def defaults(cls) -> Dict[str, Any]:
        """Every option that has a default, with it."""
        return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}

    @classmethod
    def from_dict(
        cls, options: Mapping[str, Any], version: Optional[int] = None, type_name: Optional[str] = None
    ) -> DendriteOptions:
        """Build (and so check) the options from a dict, as ``DendriteConfig.dendrite_options`` and recipes
        hold them; ``version``: the options version they were written with (default: this one);
        ``type_name``: the dendrite type named in errors (default: the class's)."""
        type_name = type_name or cls.type_name
        if not isinstance(options, Mapping):
            raise ConfigError(f"dendrite_options={options!r} must be a dict (or a {cls.__name__}).")
        version = cls.version if version is None else version
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ConfigError(f"dendrite options version {version!r} is not an int >= 1.")
        if version > cls.version:
            raise ConfigError(
                f"dendrite_options for dendrite_type={type_name!r} were written with options version {version}; "
                f"this version of torch-dendrites knows up to {cls.version}. Upgrade torch-dendrites."
            )
        options = cls.migrate(dict(options), version)
        unknown = sorted(str(k) for k in options if k not in cls.names())
        if unknown:
            raise ConfigError(
                f"dendrite_options {unknown} are not options of dendrite_type={type_name!r}; it accepts "
                f"{cls.names() or 'none'}."
            )
        return cls(**options)

    @classmethod
    def migrate(cls, options: Dict[str, Any], version: int) -> Dict[str, Any]:
        """Turn options written with an older ``version`` into this version's form (version 1: as they are)."""
        return options

    def to_dict(self) -> Dict[str, Any]:
        """The options as JSON-safe values (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
