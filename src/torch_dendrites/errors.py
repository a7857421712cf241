"""The library's errors: one base class, a few specific ones.

Every error subclasses :class:`DendriteError` and a builtin (``ValueError``, ``TypeError`` or
``RuntimeError``) so callers can catch either. Messages name the problem and say what to do.
"""

from __future__ import annotations

__all__ = [
    "DendriteError",
    "ConfigError",
    "TargetError",
    "UnsupportedModuleError",
    "ScoreError",
    "StateError",
    "CheckpointError",
]


class DendriteError(Exception):
    """Base class of every error raised by torch-dendrites."""


class ConfigError(DendriteError, ValueError):
    """A configuration field has a bad value."""


class TargetError(DendriteError, ValueError):
    """Target selection failed: nothing matched, or the model is in the wrong state."""


class UnsupportedModuleError(TargetError, TypeError):
    """A module of a type with no registered layer handler was targeted explicitly."""


class ScoreError(DendriteError, ValueError):
    """A score passed to the growth controller is not a finite number."""


class StateError(DendriteError, RuntimeError):
    """An operation does not fit the current state (of a model, layer or controller)."""


class CheckpointError(DendriteError, ValueError):
    """A saved folder is unreadable, unsafe, or does not fit the model it is loaded into."""
