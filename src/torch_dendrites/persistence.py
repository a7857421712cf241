"""Save and load dendritic models: a folder holding a JSON recipe and safetensors weights.

``save`` writes ``recipe.json`` (format version, library version, the dendrite config and, per wrapped
layer, its path, type, dendrite count and neuron axis) and ``model.safetensors``; with a controller also
``controller.json`` and ``controller.safetensors`` (its best weights); with an optimizer, scheduler, RNG
or generator states also ``training.json`` and ``training.safetensors``. ``load`` takes a freshly built
base model, re-applies the structure from the recipe and loads strictly. Nothing here ever unpickles:
JSON is parsed by ``json`` and tensors by safetensors.

Every folder is written beside its final place and swapped in with renames, so a crash at any moment
leaves either the previous copy or the new one readable.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import DendriteConfig
from .errors import CheckpointError, DendriteError
from .layer import spec_for
from .surgery import _RECORD, add_dendrites, dendritic_layers, remove_dendrites, set_dendrite_counts

__all__ = ["save", "load", "load_training_state"]

FORMAT = "torch-dendrites"
FORMAT_VERSION = 1
RECIPE = "recipe.json"
WEIGHTS = "model.safetensors"
CONTROLLER_JSON = "controller.json"
CONTROLLER_WEIGHTS = "controller.safetensors"
TRAINING_JSON = "training.json"
TRAINING_WEIGHTS = "training.safetensors"
_MODULE_PATH = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")
_MAX_JSON_BYTES = 64 * 1024 * 1024


def _library_version() -> str:
    from . import __version__

    return __version__


def _type_name(module: nn.Module) -> str:
    """The module's class name, seen through the classes FSDP2's ``fully_shard`` makes (``FSDPLinear``)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - builds without distributed
        return type(module).__name__
    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule)).__name__


def _recipe(model: nn.Module) -> Dict[str, Any]:
    record = getattr(model, _RECORD, None)
    layers = []
    for name, layer in dendritic_layers(model).items():
        d = layer.dendrites
        layers.append(
            {
                "path": name,
                "type": _type_name(layer.base),
                "dendrite_type": layer.dendrite_type,
                "num_dendrites": layer.num_dendrites,
                "neuron_axis": layer.neuron_axis,
                "activation": getattr(d, "activation", "sigmoid"),
                "init_scale": getattr(d, "init_scale", 0.01),
                # correlation-trained dendrites keep frozen input weights; candidates of a phase in progress
                "correlation_units": [i for i, u in enumerate(d.units) if getattr(u, "correlation_trained", False)],
                "candidates": len(getattr(d, "candidates", ())),
            }
        )
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": _library_version(),
        "dendrite_config": None if record is None else record.config.to_dict(),
        "layers": layers,
        "skipped": {} if record is None else dict(record.skipped),
    }


def _dedup_tensors(state: Dict[str, torch.Tensor]):
    """safetensors refuses shared storage: keep one copy of each tied tensor and record the aliases."""
    out: Dict[str, torch.Tensor] = {}
    aliases: Dict[str, str] = {}
    seen: Dict[tuple, str] = {}
    for k, t in state.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            aliases[k] = seen[key]
            continue
        seen[key] = k
        out[k] = t.detach().contiguous().cpu()
    # Distinct views of one storage (e.g. slices) must still be stored separately: clone them.
    ptrs: Dict[int, int] = {}
    for k, t in out.items():
        p = t.untyped_storage().data_ptr()
        if t.numel() and p in ptrs:
            out[k] = t.clone()
        ptrs[p] = 1
    return out, aliases


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())


def _write_tensors(path: Path, tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> None:
    save_file(tensors, str(path), metadata=metadata)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _json_safe(obj: Any, where: str) -> Any:
    """Tuples to lists; anything JSON cannot hold exactly is refused with its location."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        if obj != obj or obj in (float("inf"), float("-inf")):
            return {"__float__": repr(obj)}
        return obj
    raise CheckpointError(f"{where} holds a {type(obj).__name__}, which cannot be saved as JSON.")


def _json_restore(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__float__"} and obj["__float__"] in ("nan", "inf", "-inf"):
            return float(obj["__float__"])
        return {k: _json_restore(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_restore(v) for v in obj]
    return obj


def _training_state(optimizer, scheduler, rng: bool, generators, extra):
    """Split optimizer/scheduler/RNG states into a JSON part and a tensor part."""
    from .integrations.distributed import is_sharded

    doc: Dict[str, Any] = {}
    tensors: Dict[str, torch.Tensor] = {}
    if optimizer is not None:
        sd = optimizer.state_dict()
        state_json: Dict[str, Dict[str, Any]] = {}
        for idx, entry in sd["state"].items():
            state_json[str(idx)] = {}
            for name, val in entry.items():
                if isinstance(val, torch.Tensor):
                    if is_sharded(val):  # FSDP2 optimizer state: gathered whole (every rank takes part)
                        val = val.full_tensor()
                    tensors[f"optimizer.{idx}.{name}"] = val.detach().contiguous().cpu()
                    state_json[str(idx)][name] = {"__tensor__": f"optimizer.{idx}.{name}"}
                else:
                    state_json[str(idx)][name] = _json_safe(val, f"optimizer.state[{idx}].{name}")
        doc["optimizer"] = {
            "class": type(optimizer).__name__,
            "state": state_json,
            "param_groups": _json_safe(sd["param_groups"], "optimizer.param_groups"),
        }
    if scheduler is not None:
        doc["scheduler"] = {"class": type(scheduler).__name__, "state": _json_safe(scheduler.state_dict(), "scheduler")}
    if rng:
        import numpy as np

        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for i, st in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = st
        np_state = np.random.get_state()
        doc["rng"] = {
            "python": _json_safe(random.getstate(), "random.getstate()"),
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        }
    for name, gen in (generators or {}).items():
        if not isinstance(gen, torch.Generator):
            raise CheckpointError(f"generators[{name!r}] is a {type(gen).__name__}, not a torch.Generator.")
        tensors[f"generator.{name}"] = gen.get_state()
    if generators:
        doc["generators"] = sorted(generators)
    if extra is not None:
        doc["extra"] = _json_safe(extra, "extra")
    return doc, tensors


def _write_folder(folder: Path, model: nn.Module, model_state, controller=None, best=None, training=None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    recipe = _recipe(model)
    tensors, aliases = _dedup_tensors(model_state)
    recipe["aliases"] = aliases
    _write_tensors(folder / WEIGHTS, tensors, {"format": FORMAT})
    if controller is not None:
        state = controller.state_dict()
        state.pop("best_state")
        best = best or {}
        best_tensors, best_aliases = _dedup_tensors(best)
        state["best_state_keys"] = sorted(best)
        state["best_state_aliases"] = best_aliases
        _write_tensors(folder / CONTROLLER_WEIGHTS, best_tensors, {"format": FORMAT})
        _write_json(folder / CONTROLLER_JSON, _json_safe(state, "controller"))
    if training is not None:
        doc, tensors = training
        _write_tensors(folder / TRAINING_WEIGHTS, tensors, {"format": FORMAT})
        _write_json(folder / TRAINING_JSON, doc)
    # The recipe is written last: a folder without one is recognisably incomplete.
    _write_json(folder / RECIPE, recipe)
    _fsync_dir(folder)


def save(
    path: Union[str, Path],
    model: nn.Module,
    controller=None,
    *,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Any = None,
    rng: bool = False,
    generators: Optional[Dict[str, torch.Generator]] = None,
    extra: Optional[Dict[str, Any]] = None,
) -> Path:
    """Save ``model`` (and optionally its controller and training state) into the folder ``path``.

    The folder is written beside its final place and swapped in, so an interrupted save never leaves a
    half-written folder at ``path``; the previous copy is replaced only once the new one is complete.

    Args:
        path: the folder to write (created; replaced if it exists).
        model: the model, with or without dendrites.
        controller: a :class:`~torch_dendrites.GrowthController` whose state (history, best weights) to keep.
        optimizer: an optimizer whose state to keep (for an exact resume).
        scheduler: a learning-rate scheduler whose (JSON-able) state to keep.
        rng: also keep the global torch, CUDA, Python and NumPy random states.
        generators: named ``torch.Generator`` objects (e.g. a data shuffler) whose states to keep.
        extra: a JSON-able dict of anything else (e.g. the epoch of an outer loop).

    Returns:
        The folder's path.

    Example:
        >>> import tempfile, torch, torch_dendrites as td
        >>> net = td.add_dendrites(torch.nn.Sequential(torch.nn.Linear(4, 3)))
        >>> _ = td.grow(net)
        >>> folder = td.save(tempfile.mkdtemp() + "/ckpt", net)
        >>> fresh = td.load(folder, torch.nn.Sequential(torch.nn.Linear(4, 3)))
        >>> fresh[0].num_dendrites
        1
    """
    from .integrations.distributed import full_state_dict, is_sharded, rank

    model_state = model.state_dict()
    best = controller.best_state if controller is not None else None
    # FSDP2: sharded tensors are gathered whole on every rank (a collective, hence save runs on every
    # rank), then rank 0 alone writes.
    sharded = any(is_sharded(v) for v in model_state.values())
    if sharded:
        model_state = full_state_dict(model_state)
        best = full_state_dict(best) if best else best
    training = None
    if optimizer is not None or scheduler is not None or rng or generators or extra is not None:
        training = _training_state(optimizer, scheduler, rng, generators, extra)
    if sharded and rank() != 0:
        return Path(path)
    return _atomic_folder(
        Path(path), lambda folder: _write_folder(folder, model, model_state, controller, best, training)
    )


def _atomic_folder(path: Path, write) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    write(tmp)
    # Swap: a crash between the two renames leaves the previous copy at `old`, which load() falls back to.
    if path.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    # Leftovers of this and of earlier (killed) processes: disk use stays bounded.
    for stale in [*path.parent.glob(f".{path.name}.old-*"), *path.parent.glob(f".{path.name}.tmp-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    return path


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; is this a folder written by td.save?")
    if path.stat().st_size > _MAX_JSON_BYTES:
        raise CheckpointError(f"{path} is larger than {_MAX_JSON_BYTES} bytes; refusing to read it.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); the file is corrupted or was replaced.") from None


def _read_tensors(path: Path) -> Dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; is this a folder written by td.save?")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({exc}); the file is truncated, corrupted or was replaced."
        ) from None


def _check_recipe(recipe: Any, path: Path) -> None:
    def bad(what: str):
        raise CheckpointError(f"{path / RECIPE}: {what}; the recipe was edited or corrupted.")

    if not isinstance(recipe, dict) or recipe.get("format") != FORMAT:
        bad(f"'format' is not {FORMAT!r}")
    v = recipe.get("format_version")
    if isinstance(v, bool) or not isinstance(v, int):
        bad("'format_version' is not an int")
    if v > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {v}, newer than this library reads ({FORMAT_VERSION}); upgrade torch-dendrites."
        )
    layers = recipe.get("layers")
    if not isinstance(layers, list):
        bad("'layers' is not a list")
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict):
            bad(f"layers[{i}] is not an object")
        if not isinstance(layer.get("path"), str) or not _MODULE_PATH.match(layer["path"]):
            bad(f"layers[{i}].path={layer.get('path')!r} is not a dotted module path")
        for key, typ in (("path", str), ("dendrite_type", str), ("activation", str), ("type", str)):
            if not isinstance(layer.get(key), typ):
                bad(f"layers[{i}].{key} is not a {typ.__name__}")
        for key in ("num_dendrites", "neuron_axis"):
            val = layer.get(key)
            if isinstance(val, bool) or not isinstance(val, int):
                bad(f"layers[{i}].{key} is not an int")
        if layer["num_dendrites"] < 0 or layer["num_dendrites"] > 10_000:
            bad(f"layers[{i}].num_dendrites={layer['num_dendrites']} is out of range")
        cand = layer.get("candidates", 0)
        if isinstance(cand, bool) or not isinstance(cand, int) or not 0 <= cand <= 10_000:
            bad(f"layers[{i}].candidates is not a count")
        units = layer.get("correlation_units", [])
        if not isinstance(units, list) or not all(
            isinstance(u, int) and not isinstance(u, bool) and 0 <= u < layer["num_dendrites"] for u in units
        ):
            bad(f"layers[{i}].correlation_units is not a list of dendrite indices")
        if not isinstance(layer.get("init_scale"), (int, float)) or isinstance(layer.get("init_scale"), bool):
            bad(f"layers[{i}].init_scale is not a number")
    skipped = recipe.get("skipped", {})
    if not isinstance(skipped, dict) or not all(isinstance(v, str) for v in skipped.values()):
        bad("'skipped' is not a mapping of strings")
    aliases = recipe.get("aliases", {})
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        bad("'aliases' is not a mapping of strings")


def _strip_prefixes(tensors: Dict[str, torch.Tensor], aliases: Dict[str, str]):
    """Accept keys saved from DDP (``module.``) or torch.compile (``_orig_mod.``) wrappers."""
    changed = True
    while changed and tensors:
        changed = False
        for prefix in ("module.", "_orig_mod."):
            if all(k.startswith(prefix) for k in (*tensors, *aliases, *aliases.values())):
                n = len(prefix)
                tensors = {k[n:]: v for k, v in tensors.items()}
                aliases = {k[n:]: v[n:] for k, v in aliases.items()}
                changed = True
    return tensors, aliases


def _expand_aliases(tensors: Dict[str, torch.Tensor], aliases: Dict[str, str], where: Path):
    out = dict(tensors)
    for k, src in aliases.items():
        if src not in tensors:
            raise CheckpointError(f"{where}: alias {k!r} points to {src!r}, which is not in the weights file.")
        out[k] = tensors[src]
    return out


def _compare(expected: Dict[str, torch.Tensor], got: Dict[str, torch.Tensor]) -> Optional[str]:
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = [
        f"{k}: saved {tuple(got[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in got and tuple(got[k].shape) != tuple(expected[k].shape)
    ]
    parts = []
    if missing:
        parts.append(f"missing keys {missing[:6]}{' ...' if len(missing) > 6 else ''}")
    if unexpected:
        parts.append(f"unexpected keys {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
    if shapes:
        parts.append(f"shape mismatches {shapes[:6]}")
    return "; ".join(parts) or None


def _apply_structure(model: nn.Module, recipe: Dict[str, Any], path: Path) -> bool:
    """Wrap and grow ``model`` as the recipe says. Returns True if it added the wrapping itself."""
    layers = recipe["layers"]
    existing = dendritic_layers(model)
    if not layers:
        if existing:
            raise CheckpointError(f"{path} holds a model without dendrites, but the model passed in has some.")
        return False
    wanted = {entry["path"]: entry for entry in layers}
    modules = dict(model.named_modules())
    if existing:
        if set(existing) != set(wanted):
            raise CheckpointError(
                f"the model's dendritic layers {sorted(existing)} differ from the saved ones {sorted(wanted)}; "
                "pass a freshly built base model."
            )
        return False
    for name, entry in wanted.items():
        m = modules.get(name)
        if m is None:
            raise CheckpointError(
                f"saved layer '{name}' does not exist in the model passed in; build the same architecture "
                "that was saved (td.load takes the freshly built base model)."
            )
        if spec_for(m) is None or _type_name(m) != entry["type"]:
            raise CheckpointError(
                f"saved layer '{name}' was a {entry['type']}, the model has a {_type_name(m)} there; "
                "build the same architecture that was saved."
            )
    first = layers[0]
    if any(entry["dendrite_type"] != first["dendrite_type"] for entry in layers):
        raise CheckpointError(f"{path}: layers disagree on dendrite_type; this recipe was not written by td.save.")
    try:
        # The type's options (a low-rank dendrite's rank, a gate's context size) fix parameter shapes.
        saved = recipe.get("dendrite_config")
        options = (saved.get("dendrite_options") or {}) if isinstance(saved, dict) else {}
        cfg = DendriteConfig(
            filter_fn=lambda m, n: n in wanted, dendrite_type=first["dendrite_type"], dendrite_options=options
        )
        for entry in layers:  # validates each layer's settings before anything is changed
            DendriteConfig(activation=entry["activation"], init_scale=float(entry["init_scale"]))
    except DendriteError as exc:
        raise CheckpointError(f"{path / RECIPE} holds an invalid layer setting: {exc}") from None
    add_dendrites(model, cfg)
    for name, layer in dendritic_layers(model).items():
        entry = wanted[name]
        layer.neuron_axis = entry["neuron_axis"]
        layer.dendrites.activation = entry["activation"]
        layer.dendrites.init_scale = float(entry["init_scale"])
    return True


def _set_candidates(model: nn.Module, counts: Dict[str, int]):
    """Give each layer ``counts[path]`` fresh candidates; returns a function restoring the previous ones."""
    before = {}
    for name, layer in dendritic_layers(model).items():
        before[name] = (layer.dendrites, layer.dendrites.candidates, layer.dendrites.correlation)
        layer.dendrites.clear_candidates()
        if counts.get(name, 0):
            layer.dendrites.add_candidates(counts[name], torch.Generator().manual_seed(0))

    def undo():
        for dendrites, candidates, correlation in before.values():
            dendrites.candidates, dendrites.correlation = candidates, correlation

    return undo


def _resolve(path: Union[str, Path]) -> Path:
    path = Path(path)
    if path.is_dir():
        return path
    old = sorted(path.parent.glob(f".{path.name}.old-*")) if path.parent.is_dir() else []
    if old:
        return old[-1]  # a save was interrupted between its two renames: the previous copy is here
    raise CheckpointError(f"{path} is not a folder written by td.save.")


def _read_controller(path: Path) -> Dict[str, Any]:
    state = _read_json(path / CONTROLLER_JSON)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path / CONTROLLER_JSON} is not a controller state object.")
    state = _json_restore(state)
    best = _read_tensors(path / CONTROLLER_WEIGHTS)
    aliases = state.pop("best_state_aliases", {})
    keys = state.pop("best_state_keys", [])
    if not isinstance(aliases, dict) or not isinstance(keys, list):
        raise CheckpointError(f"{path / CONTROLLER_JSON} has malformed best_state entries.")
    best = _expand_aliases(best, aliases, path)
    missing = [k for k in keys if k not in best]
    if missing:
        raise CheckpointError(f"{path / CONTROLLER_WEIGHTS} lacks best-state tensors {missing[:4]}.")
    state["best_state"] = {k: best[k] for k in keys} if keys else None
    return state


def load(
    path: Union[str, Path],
    model: nn.Module,
    controller=None,
    *,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Any = None,
    rng: bool = False,
    generators: Optional[Dict[str, torch.Generator]] = None,
) -> nn.Module:
    """Load a folder written by :func:`save` into ``model``, a freshly built base model.

    The dendrite structure is re-applied from the recipe, then the weights are loaded strictly. Keys saved
    from DDP (``module.``) or ``torch.compile`` (``_orig_mod.``) models are accepted. On any mismatch (other
    architecture, missing or unexpected keys, shapes, dtypes, a newer format, corrupted files) a
    :class:`~torch_dendrites.CheckpointError` names what differs and the model is left as it was.

    Args:
        path: a folder written by :func:`save`.
        model: the freshly built base model (or one already holding the saved structure).
        controller: a :class:`~torch_dendrites.GrowthController` to restore too.
        optimizer, scheduler, rng, generators: training state to restore as well; the optimizer must
            already be built over ``model``'s parameters *with* the saved structure (for a fresh base
            model, call ``load`` first, build the optimizer, then :func:`load_training_state`).

    Returns:
        ``model``, now holding the saved dendrites and weights.
    """
    from .integrations.distributed import shard_like

    path = _resolve(path)
    recipe = _read_json(path / RECIPE)
    _check_recipe(recipe, path)
    tensors, aliases = _strip_prefixes(_read_tensors(path / WEIGHTS), recipe.get("aliases", {}))
    tensors = _expand_aliases(tensors, aliases, path)
    ctl_state = _read_controller(path) if controller is not None else None
    training = _read_training(path) if (optimizer or scheduler or rng or generators) else None

    added = _apply_structure(model, recipe, path)
    undo = undo_candidates = None
    try:
        # The placeholder dendrites are overwritten by the saved weights: drawn from a private generator so
        # that loading leaves the global random state alone.
        scratch = torch.Generator().manual_seed(0)
        counts = {entry["path"]: entry["num_dendrites"] for entry in recipe["layers"]}
        undo = set_dendrite_counts(model, counts, scratch)
        undo_candidates = _set_candidates(
            model, {entry["path"]: entry.get("candidates", 0) for entry in recipe["layers"]}
        )
        expected = model.state_dict()
        problem = _compare(expected, tensors)
        if problem:
            raise CheckpointError(f"{path} does not fit this model: {problem}.")
        for k, t in tensors.items():
            if t.dtype != expected[k].dtype:
                raise CheckpointError(f"{path}: {k} was saved as {t.dtype}, the model has {expected[k].dtype}.")
        if controller is not None:
            controller.validate_state(ctl_state, model)
        # FSDP2: each rank keeps its shard of the whole saved tensors.
        model.load_state_dict(shard_like(tensors, expected), strict=True)
    except Exception:
        # Nothing was loaded yet: undoing the structure restores the model exactly.
        if added:
            remove_dendrites(model)
        else:
            if undo_candidates is not None:
                undo_candidates()
            if undo is not None:
                undo()
        raise
    for entry in recipe["layers"]:
        layer = dendritic_layers(model)[entry["path"]]
        for i in entry.get("correlation_units", []):
            unit = layer.dendrites.units[i]
            unit.correlation_trained = True
            for name, p in unit.named_parameters():
                p.requires_grad_(name == "out_gain")
    record = getattr(model, _RECORD, None)
    if record is not None and recipe.get("skipped"):
        record.skipped = dict(recipe["skipped"])
    if controller is not None:
        controller.load_state_dict(ctl_state, model)
    if training is not None:
        _apply_training(path, training, optimizer, scheduler, rng, generators)
    return model


def _read_training(path: Path):
    doc = _json_restore(_read_json(path / TRAINING_JSON))
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path / TRAINING_JSON} is not a training-state object.")
    return doc, _read_tensors(path / TRAINING_WEIGHTS)


def load_training_state(
    path: Union[str, Path],
    *,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Any = None,
    rng: bool = False,
    generators: Optional[Dict[str, torch.Generator]] = None,
) -> Dict[str, Any]:
    """Restore the optimizer, scheduler, RNG and generator states saved by :func:`save`.

    Returns:
        The ``extra`` dict saved with them (empty if none).
    """
    path = _resolve(path)
    training = _read_training(path)
    return _apply_training(path, training, optimizer, scheduler, rng, generators)


def _apply_training(path: Path, training, optimizer, scheduler, rng, generators) -> Dict[str, Any]:
    doc, tensors = training
    where = path / TRAINING_JSON
    if optimizer is not None:
        opt = doc.get("optimizer")
        if not isinstance(opt, dict):
            raise CheckpointError(f"{where} holds no optimizer state; save with td.save(..., optimizer=opt).")
        if opt.get("class") != type(optimizer).__name__:
            raise CheckpointError(f"{where}: saved optimizer is {opt.get('class')}, not {type(optimizer).__name__}.")
        from .integrations.distributed import is_sharded, shard_like

        params = [p for g in optimizer.param_groups for p in g["params"]]
        state = {}
        for idx, entry in opt["state"].items():
            state[int(idx)] = {}
            for name, val in entry.items():
                if isinstance(val, dict) and set(val) == {"__tensor__"}:
                    if val["__tensor__"] not in tensors:
                        raise CheckpointError(f"{path / TRAINING_WEIGHTS} lacks {val['__tensor__']!r}.")
                    val = tensors[val["__tensor__"]]
                    p = params[int(idx)] if int(idx) < len(params) else None
                    if p is not None and is_sharded(p) and val.shape == p.shape:
                        val = shard_like({"v": val}, {"v": p})["v"]  # FSDP2: this rank's shard
                state[int(idx)][name] = val
        try:
            optimizer.load_state_dict({"state": state, "param_groups": opt["param_groups"]})
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"{where}: the optimizer state does not fit this optimizer ({exc}).") from None
    if scheduler is not None:
        sch = doc.get("scheduler")
        if not isinstance(sch, dict) or sch.get("class") != type(scheduler).__name__:
            raise CheckpointError(f"{where} holds no {type(scheduler).__name__} state.")
        scheduler.load_state_dict(sch["state"])
    if rng:
        import numpy as np

        r = doc.get("rng")
        if not isinstance(r, dict) or "rng.torch" not in tensors:
            raise CheckpointError(f"{where} holds no RNG state; save with td.save(..., rng=True).")
        torch.set_rng_state(tensors["rng.torch"])
        if torch.cuda.is_available():
            for i in range(min(torch.cuda.device_count(), r.get("cuda_devices", 0))):
                torch.cuda.set_rng_state(tensors[f"rng.cuda.{i}"], i)
        py = r["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        npst = r["numpy"]
        np.random.set_state((npst[0], np.asarray(npst[1], dtype=np.uint32), npst[2], npst[3], npst[4]))
    for name, gen in (generators or {}).items():
        key = f"generator.{name}"
        if key not in tensors:
            raise CheckpointError(f"{path / TRAINING_WEIGHTS} holds no generator {name!r}.")
        gen.set_state(tensors[key])
    extra = doc.get("extra", {})
    return extra if isinstance(extra, dict) else {}
