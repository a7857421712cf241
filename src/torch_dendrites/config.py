"""What the user asks for: :class:`DendriteConfig` (what to wrap, and how) and :class:`GrowthConfig`
(when to grow).

Both are plain dataclasses validated in ``__post_init__``; an invalid field raises
:class:`~torch_dendrites.errors.ConfigError` naming the field, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Tuple, Type, Union

from torch import nn

from .dendrites.base import ACTIVATIONS, INIT_SCALE, typed_options
from .dendrites.options import DendriteOptions
from .errors import ConfigError
from .registry import DENDRITE_TYPES

__all__ = ["DendriteConfig", "GrowthConfig"]

GROWTH_MODES = ("plateau", "fixed", "every", "never")
DENDRITE_TRAINING = ("gd", "correlation")
SEED_LIMIT = 2**32  # GrowthConfig.seed: every derived generator seed then fits torch's 64-bit range


def _as_tuple(value: Any, field_name: str, kind: str) -> Optional[tuple]:
    if value is None:
        return None
    if isinstance(value, (str, type)):
        return (value,)
    try:
        return tuple(value)
    except TypeError:
        raise ConfigError(f"{field_name}={value!r} is not a {kind} or a sequence of them.") from None


def _check_patterns(patterns: Optional[tuple], field_name: str) -> None:
    for p in patterns or ():
        if not isinstance(p, str) or not p:
            raise ConfigError(f"{field_name} holds {p!r}; give non-empty module-name strings.")
        try:
            re.compile(p)
        except re.error as exc:
            raise ConfigError(
                f"{field_name} holds {p!r}, which is neither a plain name nor a valid regular expression "
                f"({exc}); escape special characters with re.escape()."
            ) from None


def name_matches(name: str, patterns: Sequence[str]) -> bool:
    """True if a dotted module path matches any pattern exactly, as a dotted suffix, or as a regex."""
    for p in patterns:
        if name == p or name.endswith("." + p) or re.fullmatch(p, name):
            return True
    return False


@dataclass
class DendriteConfig:
    """Which modules of a model get dendrites, and what kind.

    A module is wrapped when it passes every selector that is set (``target_types``, ``target_names``,
    ``filter_fn``) and matches no ``exclude`` pattern. With no selector set, every module of a supported
    type is a target (``nn.Linear``, ``nn.Conv1d/2d/3d``, Hugging Face ``Conv1D``, and whatever was added
    with :func:`torch_dendrites.register_layer_type`).

    Args:
        target_types: module classes to wrap (subclasses included). Default: every supported type.
        target_names: module paths to wrap; each entry matches a path exactly, as a dotted suffix
            (``"fc1"`` matches ``"encoder.fc1"``) or as a regular expression over the whole path.
        filter_fn: ``filter_fn(module, name) -> bool``, the escape hatch for any other rule.
        exclude: module paths never to wrap (same matching rules as ``target_names``).
        dendrite_type: the dendrite kind: ``"cascade"`` (the gradient-descent cascade of the README's "The math"),
            ``"lowrank"``, ``"sparse"``, ``"sparse_linear"``, ``"gated"``, or one registered with
            :func:`~torch_dendrites.register_dendrite_type`.
        dendrite_options: the dendrite type's options, as a dict (``{"rank": 2}``) or as the type's options
            object (``td.dendrites.LowRankOptions(rank=2)``); checked here (see each type's module docstring
            and :mod:`torch_dendrites.dendrites.options`); kept as a dict.
        activation: the dendrite nonlinearity, ``"sigmoid"`` or ``"tanh"``.
        init_scale: new dendrite weights are the layer type's default initialisation times this.
        neuron_axis: override of the output axis that holds the neurons (``-1`` for Linear,
            the channel axis for convolutions); ``None`` detects it per layer type.

    Example:
        >>> import torch_dendrites as td
        >>> cfg = td.DendriteConfig(target_names=["fc1", "fc2"], exclude=["head"])
        >>> cfg.dendrite_type
        'cascade'
    """

    target_types: Optional[Tuple[Type[nn.Module], ...]] = None
    target_names: Optional[Tuple[str, ...]] = None
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None
    exclude: Tuple[str, ...] = ()
    dendrite_type: str = "cascade"
    dendrite_options: dict = field(default_factory=dict)
    activation: str = "sigmoid"
    init_scale: float = INIT_SCALE
    neuron_axis: Optional[int] = None

    def __post_init__(self) -> None:
        self.target_types = _as_tuple(self.target_types, "target_types", "module class")
        for t in self.target_types or ():
            if not (isinstance(t, type) and issubclass(t, nn.Module)):
                raise ConfigError(f"target_types holds {t!r}; give nn.Module subclasses such as nn.Linear.")
        self.target_names = _as_tuple(self.target_names, "target_names", "module name")
        _check_patterns(self.target_names, "target_names")
        self.exclude = _as_tuple(self.exclude, "exclude", "module name") or ()
        _check_patterns(self.exclude, "exclude")
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise ConfigError(f"filter_fn={self.filter_fn!r} is not callable; pass fn(module, name) -> bool.")
        if not isinstance(self.dendrite_type, str) or self.dendrite_type not in DENDRITE_TYPES:
            raise ConfigError(
                f"dendrite_type={self.dendrite_type!r} is unknown; choose one of {sorted(DENDRITE_TYPES.names())}."
            )
        self.dendrite_options = _options_dict(self.dendrite_type, self.dendrite_options)
        if not isinstance(self.activation, str) or self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation={self.activation!r} is unknown; choose one of {list(ACTIVATIONS)}.")
        if (
            isinstance(self.init_scale, bool)
            or not isinstance(self.init_scale, (int, float))
            or not math.isfinite(self.init_scale)
            or self.init_scale <= 0
        ):
            raise ConfigError(f"init_scale={self.init_scale!r} must be a finite number > 0, e.g. {INIT_SCALE}.")
        if self.neuron_axis is not None and (
            isinstance(self.neuron_axis, bool) or not isinstance(self.neuron_axis, int)
        ):
            raise ConfigError(f"neuron_axis={self.neuron_axis!r} must be an int (e.g. -1 or 1) or None.")

    def to_dict(self) -> dict:
        """The JSON-safe part of the config (types by qualified name; ``filter_fn`` by presence only)."""
        return {
            "target_types": None
            if self.target_types is None
            else [f"{t.__module__}.{t.__qualname__}" for t in self.target_types],
            "target_names": None if self.target_names is None else list(self.target_names),
            "filter_fn": None if self.filter_fn is None else getattr(self.filter_fn, "__qualname__", "callable"),
            "exclude": list(self.exclude),
            "dendrite_type": self.dendrite_type,
            "dendrite_options": dict(self.dendrite_options),
            # the options' version, so that a later library can migrate them (none for untyped options)
            "dendrite_options_version": getattr(typed_options(DENDRITE_TYPES.get(self.dendrite_type)), "version", None),
            "activation": self.activation,
            "init_scale": float(self.init_scale),
            "neuron_axis": self.neuron_axis,
        }


def _options_dict(dendrite_type: str, options: Any) -> dict:
    """``dendrite_options`` as the dict the config keeps, checked by the type's options class (if it has one)
    now rather than when a layer is wrapped. A typed options object becomes its full dict."""
    opts_cls = typed_options(DENDRITE_TYPES.get(dendrite_type))
    if isinstance(options, DendriteOptions):
        if opts_cls is None or type(options) is not opts_cls:
            want = "a dict" if opts_cls is None else opts_cls.__name__
            raise ConfigError(
                f"dendrite_options={options!r} are not options of dendrite_type={dendrite_type!r}; pass {want}."
            )
        return options.to_dict()
    if not isinstance(options, dict):
        raise ConfigError(f"dendrite_options={options!r} must be a dict (or the dendrite type's options object).")
    if opts_cls is not None:
        opts_cls.from_dict(options, type_name=dendrite_type)
    return options


def _check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        extra = " or None" if allow_none else ""
        raise ConfigError(f"{name}={value!r} must be an int >= {minimum}{extra}.")


def _check_float(name: str, value: Any, lo: float, hi: float, hi_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and lo <= value and (value < hi if hi_open else value <= hi)
    if not ok:
        bracket = ")" if hi_open else "]"
        raise ConfigError(f"{name}={value!r} must be a number in [{lo}, {hi}{bracket}.")


@dataclass
class GrowthConfig:
    """When the :class:`~torch_dendrites.GrowthController` adds dendrites, and when it stops.

    Args:
        mode: ``"plateau"`` grows after ``patience`` epochs without a new best; ``"fixed"`` every
            ``switch_every`` epochs; ``"every"`` after every epoch (a quick capacity test); ``"never"``
            only early-stops (the baseline arm: same stopping rule and best-weight restore, no growth).
        patience: epochs without a new best before a switch (plateau) or before stopping (never). Inside the
            trial of a new dendrite set the plateau is measured against the trial's own best.
        switch_every: phase length in epochs for ``mode="fixed"``.
        trial_warmup: ``mode="plateau"``: a new dendrite set trains at least this many epochs before its
            trial can end (new output gains start at zero and the optimizer starts cold).
        trial_max_epochs: ``mode="plateau"``: the longest a trial may last (None: until its own plateau or
            ``max_epochs``). At the end of its trial a set is kept only if the trial's best beat the best
            from before the growth (with the improvement thresholds); otherwise it is rolled back.
        maximize: ``True`` for accuracy-like scores, ``False`` for losses.
        improvement_rel: a new best must beat the old by more than ``improvement_rel * |best|`` ...
        improvement_abs: ... and by more than ``improvement_abs``.
        smoothing: exponential smoothing factor of the validation score in [0, 1); 0 means none.
        max_dendrites: the most dendrites per neuron; a kept set that reaches it ends the run.
        max_tries: attempts (fresh initialisations) of a dendrite set whose trial fails, before ``done``.
        max_epochs: optional hard cap on controller steps; reaching it ends the run on the best weights.
        dendrite_training: ``"gd"`` (dendrites trained by backprop with everything else) or
            ``"correlation"`` (Perforated Backpropagation: at each switch the model is frozen and candidate
            dendrites are trained to correlate with each neuron's back-propagated error, then installed
            with frozen input weights; see :mod:`torch_dendrites.correlation`).
        candidate_patience: correlation mode: end a candidate phase after this many epochs in which no
            layer's correlation score rose by ``candidate_improvement`` (relative).
        candidate_improvement: relative rise of a layer's correlation score that counts as progress.
        candidate_max_epochs: cap on a candidate phase's length; default (None): ``patience`` epochs, and no
            longer than the neuron phase before it (the model is frozen meanwhile, so the cap bounds the
            budget a phase can spend without training it).
        candidate_pool: candidates per layer; the best-correlated one is installed.
        candidate_init_scale: initialisation scale of correlation candidates (None: the layer's
            ``DendriteConfig.init_scale``); larger values start their sigmoids outside the linear range. The
            default, 1.0, won the sweep in benchmarks/results/defaults_sweep.md (smaller scales left some
            candidates too weakly correlated to be kept).
        correlation_warning: warn about layers whose best candidate's mean |correlation| stays below this.
        freeze_earlier: ``dendrite_training="gd"``: when the controller grows a dendrite set, the sets before it
            stop training their input weights and cascade gains (their output gains keep training), as
            Cascade-Correlation freezes its hidden units and correlation mode its installed dendrites. Only
            the newest set learns new features, so the optimizer restarted after a growth cannot scramble the
            cascade built so far (two spirals: 10 of 10 seeds solved, against 8 of 10 with every set training;
            benchmarks/results/spirals.md). A rolled-back set thaws the one before it (the rule is structural:
            under gd growth the newest set of a layer trains its inputs, whichever mode installed it). Cascade
            dendrites only (other types have no frozen state). False: every set trains for the whole run.
        seed: if set (an int in [0, 2**32)), dendrite initialisation draws from a generator seeded from it
            and the growth count, so reruns (and every rank of a distributed run) grow identical dendrites.

    Example:
        >>> import torch_dendrites as td
        >>> td.GrowthConfig(mode="plateau", patience=3, maximize=True).max_dendrites
        3
    """

    mode: str = "plateau"
    patience: int = 5
    switch_every: int = 10
    trial_warmup: int = 3
    trial_max_epochs: Optional[int] = 30
    maximize: bool = True
    improvement_rel: float = 1e-4
    improvement_abs: float = 0.0
    smoothing: float = 0.0
    max_dendrites: int = 3
    max_tries: int = 2
    max_epochs: Optional[int] = None
    dendrite_training: str = "gd"
    seed: Optional[int] = None
    candidate_patience: int = 2
    candidate_improvement: float = 0.01
    candidate_max_epochs: Optional[int] = None
    candidate_pool: int = 1
    candidate_init_scale: Optional[float] = 1.0
    correlation_warning: float = 0.01
    freeze_earlier: bool = True

    def __post_init__(self) -> None:
        if self.mode not in GROWTH_MODES:
            raise ConfigError(f"mode={self.mode!r} is unknown; choose one of {list(GROWTH_MODES)}.")
        _check_int("patience", self.patience, 1)
        _check_int("switch_every", self.switch_every, 1)
        _check_int("trial_warmup", self.trial_warmup, 1)
        _check_int("trial_max_epochs", self.trial_max_epochs, 1, allow_none=True)
        if self.trial_max_epochs is not None and self.trial_max_epochs < self.trial_warmup:
            raise ConfigError(
                f"trial_max_epochs={self.trial_max_epochs} is shorter than trial_warmup={self.trial_warmup}; a "
                "trial cannot end before its warm-up. Raise trial_max_epochs or lower trial_warmup."
            )
        if not isinstance(self.maximize, bool):
            raise ConfigError(f"maximize={self.maximize!r} must be True (accuracy) or False (loss).")
        _check_float("improvement_rel", self.improvement_rel, 0.0, 1.0)
        _check_float("improvement_abs", self.improvement_abs, 0.0, math.inf, hi_open=True)
        _check_float("smoothing", self.smoothing, 0.0, 1.0, hi_open=True)
        _check_int("max_dendrites", self.max_dendrites, 0)
        _check_int("max_tries", self.max_tries, 1)
        _check_int("max_epochs", self.max_epochs, 1, allow_none=True)
        _check_int("seed", self.seed, 0, allow_none=True)
        if self.seed is not None and self.seed >= SEED_LIMIT:
            raise ConfigError(f"seed={self.seed!r} must be below 2**32; pass a smaller int (e.g. seed % 2**32).")
        if self.dendrite_training not in DENDRITE_TRAINING:
            raise ConfigError(
                f"dendrite_training={self.dendrite_training!r} is unknown; choose one of {list(DENDRITE_TRAINING)}."
            )
        _check_int("candidate_patience", self.candidate_patience, 1)
        _check_float("candidate_improvement", self.candidate_improvement, 0.0, math.inf, hi_open=True)
        _check_int("candidate_max_epochs", self.candidate_max_epochs, 1, allow_none=True)
        _check_int("candidate_pool", self.candidate_pool, 1)
        if self.candidate_init_scale is not None:
            _check_float("candidate_init_scale", self.candidate_init_scale, 0.0, math.inf, hi_open=True)
            if self.candidate_init_scale <= 0:
                raise ConfigError(f"candidate_init_scale={self.candidate_init_scale!r} must be > 0 or None.")
        _check_float("correlation_warning", self.correlation_warning, 0.0, 1.0)
        if not isinstance(self.freeze_earlier, bool):
            raise ConfigError(f"freeze_earlier={self.freeze_earlier!r} must be True or False.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


ConfigLike = Union[DendriteConfig, GrowthConfig]
