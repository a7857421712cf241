"""The recipe (``recipe.json``): its schema, its migrations, and the dendrite structure it describes.

Format version 3 (written now) holds: ``format``, ``format_version``, ``library_version``, ``save_id``
(also in every other file of the folder), ``files`` (size and SHA-256 of every other file),
``dendrite_config``, ``layers`` (per wrapped layer: path, type, dendrite_type, num_dendrites,
neuron_axis, activation, init_scale, correlation_units, candidates), ``skipped``, ``aliases`` (tied
tensors stored once), ``base`` (None, or for an adapter-sized save the fingerprint of the base tensors
left out, see :mod:`.base`), ``peft`` (None, or a peft model's path and adapter configs) and ``checksum``
(SHA-256 of the recipe's canonical JSON without this field). Older folders are read through the migration
table :data:`MIGRATIONS`: version 1 (no save id, no hashes) and version 2 (no ``base``, no ``peft``).

:func:`plan` turns a checked recipe into the state dict the model will have after loading, *without
touching the model and without allocating its tensors*: each saved layer is rebuilt on the meta device
(shapes and dtypes only) around a parameter-free copy of the model's own layer.
"""

from __future__ import annotations

import inspect
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .._version import __version__
from ..config import DendriteConfig
from ..correlation import candidates_of, holds_candidates
from ..dendrites.base import ACTIVATIONS, typed_options
from ..errors import CheckpointError, DendriteError
from ..layer import DendriticLayer
from ..registry import DENDRITE_TYPES
from ..specs import spec_for
from ..surgery import _RECORD, build_layer, dendritic_layers
from .base import check_doc, check_peft_doc
from .codec import canonical, sha256

__all__ = ["FORMAT", "FORMAT_VERSION", "MIGRATIONS", "Plan", "build", "plan", "read", "type_name"]

FORMAT = "torch-dendrites"
FORMAT_VERSION = 3
RECIPE = "recipe.json"
WEIGHTS = "model.safetensors"
CONTROLLER_JSON = "controller.json"
CONTROLLER_WEIGHTS = "controller.safetensors"
TRAINING_JSON = "training.json"
TRAINING_WEIGHTS = "training.safetensors"
FILES = (WEIGHTS, CONTROLLER_WEIGHTS, CONTROLLER_JSON, TRAINING_WEIGHTS, TRAINING_JSON, RECIPE)
MAX_DENDRITES = 10_000
MAX_AXIS = 64
_MODULE_PATH = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")
_HEX = re.compile(r"^[0-9a-f]+$")
_TOP = {
    "format",
    "format_version",
    "library_version",
    "save_id",
    "files",
    "dendrite_config",
    "layers",
    "skipped",
    "aliases",
    "base",
    "peft",
    "checksum",
}
_LAYER = {
    "path",
    "type",
    "dendrite_type",
    "num_dendrites",
    "neuron_axis",
    "activation",
    "init_scale",
    "correlation_units",
    "candidates",
}
_UNITS, _CANDIDATES = "dendrites.units.", "dendrites.candidates."

Shape = Tuple[Tuple[int, ...], torch.dtype]


def type_name(module: nn.Module) -> str:
    """The module's class name, seen through the classes FSDP2's ``fully_shard`` makes (``FSDPLinear``)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - builds without distributed
        return type(module).__name__
    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule)).__name__


def _library_version() -> str:
    return __version__


# ---------------------------------------------------------------------- writing
def build(
    model: nn.Module,
    save_id: str,
    aliases: Dict[str, str],
    files: Dict[str, bytes],
    base: Optional[dict] = None,
    peft: Optional[dict] = None,
) -> dict:
    """The signed recipe of ``model`` whose other files are ``files``; ``base`` is the fingerprint of the tensors
    left out (adapter-sized saves), ``peft`` the peft adapters' configs."""
    record = getattr(model, _RECORD, None)
    layers = []
    for name, layer in dendritic_layers(model).items():
        d = layer.dendrites
        layers.append(
            {
                "path": name,
                "type": type_name(layer.base),
                "dendrite_type": layer.dendrite_type,
                "num_dendrites": layer.num_dendrites,
                "neuron_axis": layer.neuron_axis,
                "activation": getattr(d, "activation", "sigmoid"),
                "init_scale": float(d.init_scale),
                # dendrites with frozen input weights (correlation-trained, or grown before the newest in gd mode;
                # the key's name predates the latter); candidates of a phase in progress
                "correlation_units": [i for i, u in enumerate(d.units) if getattr(u, "inputs_frozen", False)],
                "candidates": len(candidates_of(d)),
            }
        )
    recipe = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": _library_version(),
        "save_id": save_id,
        "files": {n: {"bytes": len(b), "sha256": sha256(b)} for n, b in files.items()},
        "dendrite_config": None if record is None else record.config.to_dict(),
        "layers": layers,
        "skipped": {} if record is None else dict(record.skipped),
        "aliases": dict(aliases),
        "base": base,
        "peft": peft,
    }
    recipe["checksum"] = sha256(canonical(recipe))
    return recipe


# ---------------------------------------------------------------------- reading
def _from_v1(recipe: dict) -> dict:
    """Version 1 had no save id, no file hashes and no checksum; its layers may lack the optional fields."""
    out = dict(recipe, save_id=None, files=None, checksum=None)
    out["layers"] = [
        dict({"correlation_units": [], "candidates": 0}, **e) if isinstance(e, dict) else e
        for e in recipe.get("layers", [])
    ]
    out.setdefault("aliases", {})
    out.setdefault("skipped", {})
    out.setdefault("dendrite_config", None)
    return out


def _from_v2(recipe: dict) -> dict:
    """Version 2 saved every tensor (no ``base``) and recorded no peft configs."""
    return dict(recipe, base=None, peft=None)


# version -> the function lifting a recipe of that version to the next one
MIGRATIONS: Dict[int, Callable[[dict], dict]] = {1: _from_v1, 2: _from_v2}


def read(recipe: Any, where: object) -> Tuple[dict, int]:
    """Check a parsed recipe and lift it to the current schema; returns it with its version on disk."""

    def bad(what: str):
        raise CheckpointError(f"{where}: {what}; the recipe was edited or corrupted.")

    if not isinstance(recipe, dict) or recipe.get("format") != FORMAT:
        bad(f"'format' is not {FORMAT!r}")
    version = recipe.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        bad(f"'format_version'={version!r} is not a version number (an int >= 1)")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{where} has format version {version}, newer than this library reads ({FORMAT_VERSION}); "
            "upgrade torch-dendrites."
        )
    if version >= 2:
        checksum = recipe.get("checksum")
        body = {k: v for k, v in recipe.items() if k != "checksum"}
        if not isinstance(checksum, str) or checksum != sha256(canonical(body)):
            raise CheckpointError(
                f"{where}: the recipe's checksum does not match its content; it was edited or corrupted."
            )
    for v in range(version, FORMAT_VERSION):
        recipe = MIGRATIONS[v](recipe)
    check(recipe, where, integrity=version >= 2)
    return recipe, version


def _is_int(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _is_str_map(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str) for k, x in v.items())


def check(recipe: dict, where: object, integrity: bool = True) -> None:
    """Every field of a current-schema recipe has the type and range td.save writes. With ``integrity``
    (written by version 2 or later) the save id and the file hashes must be there: they cannot be
    dropped to skip the checks."""

    def bad(what: str):
        raise CheckpointError(f"{where}: {what}; the recipe was edited or corrupted.")

    unknown = sorted(set(recipe) - _TOP)
    if unknown:
        bad(f"unknown fields {unknown[:5]}")
    missing = sorted((_TOP - {"library_version"}) - set(recipe))
    if missing:
        bad(f"fields {missing} are missing")
    save_id, files = recipe["save_id"], recipe["files"]
    if (integrity or save_id is not None) and not (
        isinstance(save_id, str) and len(save_id) == 32 and _HEX.match(save_id)
    ):
        bad("'save_id' is not 32 hexadecimal digits")
    if integrity or files is not None:
        if not isinstance(files, dict) or not set(files) <= set(FILES[:-1]) or WEIGHTS not in files:
            bad(f"'files' is not a table of {list(FILES[:-1])} holding {WEIGHTS}")
        for n, f in files.items():
            ok = isinstance(f, dict) and set(f) == {"bytes", "sha256"} and _is_int(f["bytes"], 0, 2**62)
            if not ok or not (isinstance(f["sha256"], str) and len(f["sha256"]) == 64 and _HEX.match(f["sha256"])):
                bad(f"'files.{n}' is not a size and a SHA-256")
    if recipe.get("library_version") is not None and not isinstance(recipe["library_version"], str):
        bad("'library_version' is not a string")
    cfg = recipe.get("dendrite_config")
    if cfg is not None:
        if not isinstance(cfg, dict):
            bad("'dendrite_config' is not an object")
        if not isinstance(cfg.get("dendrite_type"), str) or not isinstance(cfg.get("dendrite_options", {}), dict):
            bad("'dendrite_config' lacks a dendrite_type or has malformed dendrite_options")
        axis = cfg.get("neuron_axis")
        if axis is not None and not _is_int(axis, -MAX_AXIS, MAX_AXIS):
            bad(f"dendrite_config.neuron_axis={axis!r} is not a small int")
    layers = recipe.get("layers")
    if not isinstance(layers, list):
        bad("'layers' is not a list")
    paths = set()
    for i, e in enumerate(layers):
        if not isinstance(e, dict):
            bad(f"layers[{i}] is not an object")
        if set(e) != _LAYER:
            bad(f"layers[{i}] has fields {sorted(e)}, not {sorted(_LAYER)}")
        path = e["path"]
        if not isinstance(path, str) or len(path) > 4096 or not _MODULE_PATH.match(path):
            bad(f"layers[{i}].path={path!r} is not a dotted module path")
        if path in paths:
            bad(f"layers[{i}].path={path!r} appears twice")
        paths.add(path)
        for key in ("type", "dendrite_type", "activation"):
            if not isinstance(e[key], str) or len(e[key]) > 200:
                bad(f"layers[{i}].{key} is not a str")
        if not _is_int(e["num_dendrites"], 0, MAX_DENDRITES):
            bad(f"layers[{i}].num_dendrites={e['num_dendrites']!r} is not an int in [0, {MAX_DENDRITES}]")
        if not _is_int(e["candidates"], 0, MAX_DENDRITES):
            bad(f"layers[{i}].candidates={e['candidates']!r} is not an int in [0, {MAX_DENDRITES}]")
        if not _is_int(e["neuron_axis"], -MAX_AXIS, MAX_AXIS):
            bad(f"layers[{i}].neuron_axis={e['neuron_axis']!r} is not an int in [-{MAX_AXIS}, {MAX_AXIS}]")
        scale = e["init_scale"]
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            bad(f"layers[{i}].init_scale={scale!r} is not a finite number > 0")
        units = e["correlation_units"]
        if (
            not isinstance(units, list)
            or len(set(map(repr, units))) != len(units)
            or not all(_is_int(u, 0, e["num_dendrites"] - 1) for u in units)
        ):
            bad(f"layers[{i}].correlation_units is not a list of distinct dendrite indices")
    for a in sorted(paths):
        if any(b.startswith(a + ".") for b in paths):
            bad(f"layer {a!r} holds another saved layer; wrapped layers do not nest")
    if not _is_str_map(recipe.get("skipped")):
        bad("'skipped' is not a mapping of strings")
    if not _is_str_map(recipe.get("aliases")):
        bad("'aliases' is not a mapping of strings")
    check_doc(recipe["base"], bad)
    check_peft_doc(recipe["peft"], bad)


# ---------------------------------------------------------------------- the structure
class _OnlyPaths:
    """``filter_fn`` selecting exactly the saved layers (a class, so that loaded models pickle)."""

    def __init__(self, paths):
        self.paths = frozenset(paths)

    def __call__(self, module: nn.Module, name: str) -> bool:
        return name in self.paths


def _clone(module: nn.Module, meta: bool) -> nn.Module:
    """A copy of ``module`` for building dendrites around: its parameters and buffers live on the meta
    device (no memory), or (``meta=False``) are the module's own tensors, shared. Every other attribute
    is shared, not copied, so it works for any module (FSDP2's included)."""

    def tensor(t: torch.Tensor) -> torch.Tensor:
        return torch.empty(t.shape, dtype=t.dtype, device="meta") if meta else t

    clone = object.__new__(type(module))
    clone.__dict__ = dict(module.__dict__)
    clone._parameters = {
        k: None if p is None else nn.Parameter(tensor(p), p.requires_grad) for k, p in module._parameters.items()
    }
    clone._buffers = {k: None if b is None else tensor(b) for k, b in module._buffers.items()}
    clone._modules = {k: None if m is None else _clone(m, meta) for k, m in module._modules.items()}
    return clone


def effective_options(dendrite_type: str, options: dict) -> dict:
    """``options`` with every default of the dendrite type filled in (so that equal settings compare equal)."""
    out = {}
    cls = DENDRITE_TYPES.get(dendrite_type)
    opts_cls = typed_options(cls)
    if opts_cls is not None:
        out.update(opts_cls.defaults())
    elif cls is not None:  # a registered type that takes its options as constructor arguments
        for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
            if p.default is not inspect.Parameter.empty and p.name not in ("activation", "init_scale"):
                out[p.name] = p.default
    out.update(options)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def _physical_memory() -> Optional[int]:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # pragma: no cover
        return None


def _nbytes(state: Dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


@dataclass
class LayerPlan:
    entry: dict
    base: nn.Module
    spec: Any
    paths: List[str]
    probe: Optional[DendriticLayer] = None


@dataclass
class Plan:
    """What loading the recipe into a model will do, worked out without changing the model."""

    layers: Dict[str, LayerPlan]
    wrapped: bool  # the model already holds the saved dendritic layers
    config: Optional[DendriteConfig]  # how to wrap a fresh base model
    outside: Dict[str, Shape]  # the model's own tensors outside the saved layers
    expected: Dict[str, Shape] = field(default_factory=dict)

    def expected_at(self, counts: Dict[str, int]) -> Dict[str, Shape]:
        """The state dict's keys, shapes and dtypes at ``counts`` dendrites per layer, without candidates
        (what a controller's best-weight snapshot holds). Cuts the probes down: call it last."""
        out = dict(self.outside)
        for name, lp in self.layers.items():
            if holds_candidates(lp.probe.dendrites):
                lp.probe.dendrites.clear_candidates()
            lp.probe.truncate(counts.get(name, 0))
            out.update(_layer_shapes(lp))
        return out


def _layer_shapes(lp: LayerPlan) -> Dict[str, Shape]:
    local = {k: (tuple(t.shape), t.dtype) for k, t in lp.probe.state_dict().items()}
    return {f"{p}.{k}": v for p in lp.paths for k, v in local.items()}


def _all_paths(model: nn.Module) -> Dict[int, List[str]]:
    paths: Dict[int, List[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if name:
            paths.setdefault(id(m), []).append(name)
    return paths


def plan(model: nn.Module, recipe: dict, stored_keys, where: object) -> Plan:
    """Check that ``recipe`` fits ``model`` and work out the model's state dict after loading.

    ``stored_keys`` are the weights file's keys (prefixes stripped, aliases expanded): each layer's
    dendrite and candidate counts must match them before anything is built, so that a recipe cannot ask
    for more than the file holds.
    """
    layers = recipe["layers"]
    existing = dendritic_layers(model)
    state = model.state_dict()
    if any(isinstance(t, nn.parameter.UninitializedTensorMixin) for t in state.values()):
        raise CheckpointError("the model has uninitialized lazy parameters; run one forward pass before td.load.")
    if not layers:
        if existing:
            raise CheckpointError(f"{where} holds a model without dendrites, but the model passed in has some.")
        outside = {k: (tuple(t.shape), t.dtype) for k, t in state.items()}
        return Plan({}, False, None, outside, dict(outside))
    wanted = {e["path"]: e for e in layers}
    if existing and set(existing) != set(wanted):
        raise CheckpointError(
            f"the model's dendritic layers {sorted(existing)} differ from the saved ones {sorted(wanted)}; "
            "pass a freshly built base model."
        )
    first = layers[0]
    if any(e["dendrite_type"] != first["dendrite_type"] for e in layers):
        raise CheckpointError(f"{where}: layers disagree on dendrite_type; this recipe was not written by td.save.")
    saved_cfg = recipe.get("dendrite_config") or {}
    cfg_axis = saved_cfg.get("neuron_axis")
    options = saved_cfg.get("dendrite_options") or {}
    try:
        opts_cls = typed_options(DENDRITE_TYPES.get(first["dendrite_type"]))
        version = saved_cfg.get("dendrite_options_version")
        if opts_cls is not None and version is not None and version != opts_cls.version:
            # written with another options version: an older one is migrated to this one's form, a newer refused
            options = opts_cls.from_dict(options, version, first["dendrite_type"]).to_dict()
        config = DendriteConfig(
            filter_fn=_OnlyPaths(wanted),
            dendrite_type=first["dendrite_type"],
            dendrite_options=dict(options),
            activation=saved_cfg.get("activation", first["activation"]),
            init_scale=saved_cfg.get("init_scale", first["init_scale"]),
            neuron_axis=cfg_axis,
        )
        for e in layers:
            if e["activation"] not in ACTIVATIONS:
                raise CheckpointError(f"activation={e['activation']!r} is not one of {list(ACTIVATIONS)}")
    except DendriteError as exc:
        raise CheckpointError(f"{where} holds an invalid dendrite setting: {exc}") from None
    modules = dict(model.named_modules())
    all_paths = _all_paths(model)
    record = getattr(model, _RECORD, None)
    plans: Dict[str, LayerPlan] = {}
    for name, e in wanted.items():
        m = existing.get(name) if existing else modules.get(name)
        if m is None:
            raise CheckpointError(
                f"saved layer '{name}' does not exist in the model passed in; build the same architecture "
                "that was saved (td.load takes the freshly built base model)."
            )
        base, spec = (m.base, m.spec) if existing else (m, spec_for(m))
        if spec is None or type_name(base) != e["type"]:
            raise CheckpointError(
                f"saved layer '{name}' was a {e['type']}, the model has a {type_name(base)} there; "
                "build the same architecture that was saved."
            )
        axis = cfg_axis if cfg_axis is not None else spec.neuron_axis
        if e["neuron_axis"] != axis:
            raise CheckpointError(
                f"{where}: layer '{name}' has neuron_axis={e['neuron_axis']}, but its dendrite config says {axis}; "
                "the recipe was edited or corrupted."
            )
        if existing:
            _check_settings(name, m, e, record, options, where)
        plans[name] = LayerPlan(e, base, spec, all_paths[id(m)])
    _check_counts(plans, stored_keys, where)
    wrapped_paths = tuple(p + "." for lp in plans.values() for p in lp.paths)
    outside = {k: (tuple(t.shape), t.dtype) for k, t in state.items() if not k.startswith(wrapped_paths)}
    result = Plan(plans, bool(existing), config, outside)
    per_set = 0
    for name, lp in plans.items():
        lp.probe, one = _probe(name, lp, config, where)
        per_set += one
        result.expected.update(_layer_shapes(lp))
    result.expected.update(outside)
    memory = _physical_memory()
    if memory is not None and per_set > memory:
        raise CheckpointError(
            f"{where}: with dendrite_options {options} one more dendrite set would need {per_set / 2**30:.1f} GiB, "
            f"more than this machine's {memory / 2**30:.1f} GiB; the recipe was edited or corrupted."
        )
    return result


def _check_settings(name: str, layer: DendriticLayer, e: dict, record, options: dict, where) -> None:
    """An already wrapped layer must have the saved settings: loading must not silently change outputs."""
    have = {
        "dendrite_type": layer.dendrite_type,
        "activation": getattr(layer.dendrites, "activation", "sigmoid"),
        "neuron_axis": layer.neuron_axis,
    }
    for key, value in have.items():
        if value != e[key]:
            raise CheckpointError(
                f"layer '{name}' of the model has {key}={value!r}, the checkpoint {where} has {e[key]!r}; wrap "
                "the model with the saved settings, or pass a freshly built base model."
            )
    if record is not None:
        mine = effective_options(layer.dendrite_type, record.config.dendrite_options)
        theirs = effective_options(e["dendrite_type"], options)
        if mine != theirs:
            raise CheckpointError(
                f"the model's dendrite_options {mine} differ from the checkpoint's {theirs} ({where}); wrap the "
                "model with the saved settings, or pass a freshly built base model."
            )


def _check_counts(plans: Dict[str, LayerPlan], stored_keys, where) -> None:
    found: Dict[Tuple[str, str], set] = {}
    for key in stored_keys:
        for name, lp in plans.items():
            for p in lp.paths:
                for kind in (_UNITS, _CANDIDATES):
                    lead = f"{p}.{kind}"
                    if key.startswith(lead):
                        found.setdefault((name, kind), set()).add(key[len(lead) :].split(".", 1)[0])
    for name, lp in plans.items():
        for kind, field_name in ((_UNITS, "num_dendrites"), (_CANDIDATES, "candidates")):
            have = len(found.get((name, kind), ()))
            if have != lp.entry[field_name]:
                raise CheckpointError(
                    f"{where}: layer '{name}' has {field_name}={lp.entry[field_name]} in the recipe but {have} in "
                    "the weights file; the recipe was edited or corrupted."
                )


def _probe(name: str, lp: LayerPlan, config: DendriteConfig, where) -> Tuple[DendriticLayer, int]:
    """The saved layer rebuilt on the meta device, and the bytes one more dendrite set would take."""
    try:
        try:
            with torch.device("meta"):
                return _build(lp, config, meta=True)
        except DendriteError:
            raise
        except Exception:  # noqa: BLE001 - a custom dendrite type that cannot be built on the meta device
            # Built for real instead: the recipe's counts already match the weights file's, so this takes
            # what the file holds (its options alone are not bounded for such types).
            return _build(lp, config, meta=False)
    except DendriteError as exc:
        raise CheckpointError(f"{where}: saved layer '{name}' cannot be rebuilt: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a custom dendrite type failing in its own code
        raise CheckpointError(f"{where}: saved layer '{name}' cannot be rebuilt: {type(exc).__name__}: {exc}") from None


def _build(lp: LayerPlan, config: DendriteConfig, meta: bool) -> Tuple[DendriticLayer, int]:
    e = lp.entry
    # Real builds draw from a private generator: planning leaves the global random state alone.
    gen = None if meta else torch.Generator().manual_seed(0)
    probe = build_layer(
        _clone(lp.base, meta),
        lp.spec,
        dendrite_type=e["dendrite_type"],
        activation=e["activation"],
        init_scale=float(e["init_scale"]),
        neuron_axis=e["neuron_axis"],
        options=config.dendrite_options,
    )
    for _ in range(e["num_dendrites"]):
        probe.grow(gen)
    one = 0
    if meta:
        before = _nbytes(probe.dendrites.state_dict())
        probe.grow(None)
        one = _nbytes(probe.dendrites.state_dict()) - before
        probe.truncate(e["num_dendrites"])
    if e["candidates"]:
        if not holds_candidates(probe.dendrites):
            raise CheckpointError(
                f"saved layer '{e['path']}' claims {e['candidates']} correlation candidates, but dendrite_type "
                f"{e['dendrite_type']!r} cannot hold candidates; the recipe was edited or corrupted."
            )
        probe.dendrites.add_candidates(e["candidates"], gen)
    return probe, one
