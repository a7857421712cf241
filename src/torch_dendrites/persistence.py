"""Save and load dendritic models: a folder holding a JSON recipe and safetensors weights.

``save`` writes ``recipe.json`` (format version, library version, the dendrite config and, per wrapped
layer, its path, type, dendrite count and neuron axis) and ``model.safetensors``; with a controller also
``controller.json`` and ``controller.safetensors`` (its best weights). ``load`` takes a freshly built base
model, re-applies the structure from the recipe and loads strictly. Nothing here ever unpickles.
"""

from __future__ import annotations

import json
import os
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
from .surgery import _RECORD, add_dendrites, dendritic_layers, remove_dendrites

__all__ = ["save", "load", "save_checkpoint"]

FORMAT = "torch-dendrites"
FORMAT_VERSION = 1
RECIPE = "recipe.json"
WEIGHTS = "model.safetensors"
CONTROLLER_JSON = "controller.json"
CONTROLLER_WEIGHTS = "controller.safetensors"
_MAX_JSON_BYTES = 64 * 1024 * 1024


def _library_version() -> str:
    from . import __version__

    return __version__


def _recipe(model: nn.Module) -> Dict[str, Any]:
    record = getattr(model, _RECORD, None)
    layers = []
    for name, layer in dendritic_layers(model).items():
        d = layer.dendrites
        layers.append(
            {
                "path": name,
                "type": type(layer.base).__name__,
                "dendrite_type": layer.dendrite_type,
                "num_dendrites": layer.num_dendrites,
                "neuron_axis": layer.neuron_axis,
                "activation": getattr(d, "activation", "sigmoid"),
                "init_scale": getattr(d, "init_scale", 0.01),
            }
        )
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": _library_version(),
        "dendrite_config": None if record is None else record.config.to_dict(),
        "layers": layers,
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


def _write_folder(folder: Path, model: nn.Module, controller=None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    recipe = _recipe(model)
    tensors, aliases = _dedup_tensors(model.state_dict())
    recipe["aliases"] = aliases
    _write_tensors(folder / WEIGHTS, tensors, {"format": FORMAT})
    if controller is not None:
        state = controller.state_dict()
        best = state.pop("best_state") or {}
        best_tensors, best_aliases = _dedup_tensors(best)
        state["best_state_keys"] = sorted(best)
        state["best_state_aliases"] = best_aliases
        _write_tensors(folder / CONTROLLER_WEIGHTS, best_tensors, {"format": FORMAT})
        _write_json(folder / CONTROLLER_JSON, state)
    # The recipe is written last: a folder without one is recognisably incomplete.
    _write_json(folder / RECIPE, recipe)
    _fsync_dir(folder)


def save(path: Union[str, Path], model: nn.Module, controller=None) -> Path:
    """Save ``model`` (and optionally its :class:`~torch_dendrites.GrowthController`) into folder ``path``.

    The folder is written next to its final place and swapped in, so an interrupted save never leaves a
    half-written folder at ``path``.

    Example:
        >>> import tempfile, torch, torch_dendrites as td
        >>> net = td.add_dendrites(torch.nn.Sequential(torch.nn.Linear(4, 3)))
        >>> _ = td.grow(net)
        >>> folder = td.save(tempfile.mkdtemp() + "/ckpt", net)
        >>> fresh = td.load(folder, torch.nn.Sequential(torch.nn.Linear(4, 3)))
        >>> fresh[0].num_dendrites
        1
    """
    return save_checkpoint(path, model, controller)


def save_checkpoint(path: Union[str, Path], model: nn.Module, controller=None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    _write_folder(tmp, model, controller)
    # Swap: a crash between the two renames leaves the previous copy at `old`, which load() falls back to.
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
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
        for key, typ in (("path", str), ("dendrite_type", str), ("activation", str), ("type", str)):
            if not isinstance(layer.get(key), typ):
                bad(f"layers[{i}].{key} is not a {typ.__name__}")
        for key in ("num_dendrites", "neuron_axis"):
            val = layer.get(key)
            if isinstance(val, bool) or not isinstance(val, int):
                bad(f"layers[{i}].{key} is not an int")
        if layer["num_dendrites"] < 0 or layer["num_dendrites"] > 10_000:
            bad(f"layers[{i}].num_dendrites={layer['num_dendrites']} is out of range")
        if not isinstance(layer.get("init_scale"), (int, float)) or isinstance(layer.get("init_scale"), bool):
            bad(f"layers[{i}].init_scale is not a number")
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
        if spec_for(m) is None or type(m).__name__ != entry["type"]:
            raise CheckpointError(
                f"saved layer '{name}' was a {entry['type']}, the model has a {type(m).__name__} there; "
                "build the same architecture that was saved."
            )
    first = layers[0]
    if any(entry["dendrite_type"] != first["dendrite_type"] for entry in layers):
        raise CheckpointError(f"{path}: layers disagree on dendrite_type; this recipe was not written by td.save.")
    try:
        cfg = DendriteConfig(filter_fn=lambda m, n: n in wanted, dendrite_type=first["dendrite_type"])
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


def _set_counts(model: nn.Module, counts: Dict[str, int]) -> None:
    for name, layer in dendritic_layers(model).items():
        want = counts.get(name, 0)
        while layer.num_dendrites < want:
            layer.grow()
        if layer.num_dendrites > want:
            layer.truncate(want)


def load(path: Union[str, Path], model: nn.Module, controller=None) -> nn.Module:
    """Load a folder written by :func:`save` into ``model``, a freshly built base model.

    The dendrite structure is re-applied from the recipe, then the weights are loaded strictly. On any
    mismatch (other architecture, missing or unexpected keys, shapes, newer format, corrupted files) a
    :class:`~torch_dendrites.CheckpointError` names what differs and the model is left as it was.

    Returns:
        ``model``, now holding the saved dendrites and weights.
    """
    path = Path(path)
    if not path.is_dir():
        old = sorted(path.parent.glob(f".{path.name}.old-*")) if path.parent.is_dir() else []
        if old:
            path = old[-1]  # an interrupted checkpoint swap left the previous copy here
        else:
            raise CheckpointError(f"{path} is not a folder written by td.save.")
    recipe = _read_json(path / RECIPE)
    _check_recipe(recipe, path)
    tensors, aliases = _strip_prefixes(_read_tensors(path / WEIGHTS), recipe.get("aliases", {}))
    tensors = _expand_aliases(tensors, aliases, path)
    ctl_state = None
    if controller is not None:
        ctl_state = _read_json(path / CONTROLLER_JSON)
        if not isinstance(ctl_state, dict):
            raise CheckpointError(f"{path / CONTROLLER_JSON} is not a controller state object.")
        best = _read_tensors(path / CONTROLLER_WEIGHTS)
        aliases = ctl_state.pop("best_state_aliases", {})
        keys = ctl_state.pop("best_state_keys", [])
        if not isinstance(aliases, dict) or not isinstance(keys, list):
            raise CheckpointError(f"{path / CONTROLLER_JSON} has malformed best_state entries.")
        best = _expand_aliases(best, aliases, path)
        ctl_state["best_state"] = {k: best[k] for k in keys if k in best} if keys else None

    counts_before = {n: layer.num_dendrites for n, layer in dendritic_layers(model).items()}
    added = _apply_structure(model, recipe, path)
    try:
        _set_counts(model, {entry["path"]: entry["num_dendrites"] for entry in recipe["layers"]})
        expected = model.state_dict()
        problem = _compare(expected, tensors)
        if problem:
            raise CheckpointError(f"{path} does not fit this model: {problem}.")
        for k, t in tensors.items():
            if t.dtype != expected[k].dtype:
                raise CheckpointError(f"{path}: {k} was saved as {t.dtype}, the model has {expected[k].dtype}.")
        if controller is not None:
            controller.load_state_dict(ctl_state)
        model.load_state_dict(tensors, strict=True)
    except Exception:
        # Nothing was loaded yet: undoing the structure restores the model exactly.
        if added:
            remove_dendrites(model)
        else:
            _set_counts(model, counts_before)
        raise
    return model
