"""The dendrite structure (and the growth controller's state) inside a framework's own model checkpoint.

Hugging Face ``save_pretrained`` / Trainer checkpoints, Lightning ``.ckpt`` files and accelerate ``save_state``
folders all store the model's state dict. The integrations add to it one entry per file of a
:func:`torch_dendrites.save` folder, under keys ``torch_dendrites/<file>`` holding the file's bytes as a ``uint8``
tensor, so the structure and the controller travel wherever the framework copies the weights. A load_state_dict
pre-hook (:func:`install_load_hook`) takes those entries out again before the framework loads the weights: it
re-applies the structure with :func:`torch_dendrites.load` (which validates everything and never unpickles), and
restores the controller.

Entries carry whole files: the folder format stays :mod:`torch_dendrites.persistence`'s business. The folder is
adapter-sized (``td.save(..., base_weights=False)``): the framework's own state dict already holds every weight, so
the frozen base weights are not repeated (a LoRA run's entries hold the adapters and dendrites only), and the
hook loads it with ``check_base=False`` because the framework loads the base weights right afterwards.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointError
from ..layer import DendriticLayer
from ..persistence import load, save
from ..persistence.base import in_candidate_phase
from ..persistence.recipe import RECIPE
from ..surgery import dendritic_layers

__all__ = ["PREFIX", "MARKER", "pack", "unpack", "has_entries", "install_load_hook", "strip"]

PREFIX = "torch_dendrites/"
# An entry whose name tells anyone who lists the checkpoint's keys (Hugging Face's load report does) how to load it.
MARKER = PREFIX + "load with torch_dendrites.integrations (see the README: Hugging Face, Lightning and accelerate)"
_MAX_FILE = 1 << 40
# Where a peft adapter folder keeps the entries (peft's own file holds adapter keys only).
PEFT_FILE = "torch_dendrites.safetensors"


def pack(model: nn.Module, controller: Any = None) -> Dict[str, torch.Tensor]:
    """The files of ``td.save(folder, model, controller, base_weights=False)`` as ``uint8`` tensors keyed
    ``torch_dendrites/<file>``."""

    out: Dict[str, torch.Tensor] = {}
    # In a candidate phase only the controller knows what was frozen before it: without one, keep everything.
    base_weights = controller is None and in_candidate_phase(model)
    with tempfile.TemporaryDirectory(prefix="td-pack-") as tmp:
        folder = save(Path(tmp) / "td", model, controller, base_weights=base_weights)
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                data = f.read_bytes()
                t = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
                out[PREFIX + f.relative_to(folder).as_posix()] = t.clone()
    out[MARKER] = torch.zeros(1, dtype=torch.uint8)
    return out


def add_to_file(path: Path, model: nn.Module, controller: Any = None) -> None:
    """Add the entries to a framework's safetensors weights file that lacks them (rewritten atomically)."""
    with safe_open(str(path), framework="pt") as f:
        if any(k.startswith(PREFIX) for k in f.keys()):
            return
        metadata = f.metadata()
    tensors = load_file(str(path))
    tensors.update(pack(model, controller))
    tmp = path.with_name(path.name + ".td-tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def has_entries(state_dict: Dict[str, Any]) -> bool:
    return any(isinstance(k, str) and k.startswith(PREFIX) for k in state_dict)


def strip(state_dict: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """Remove (in place) and return the embedded entries of ``state_dict``."""
    keys = [k for k in state_dict if isinstance(k, str) and k.startswith(PREFIX)]
    return {k: state_dict.pop(k) for k in keys}


def unpack(entries: Dict[str, torch.Tensor], folder: Path) -> Path:
    """Write embedded entries back as a folder that :func:`torch_dendrites.load` reads."""
    folder.mkdir(parents=True, exist_ok=True)
    root = folder.resolve()
    for key, t in entries.items():
        if key == MARKER:
            continue
        rel = key[len(PREFIX) :]
        target = (folder / rel).resolve()
        if not rel or root not in target.parents or not isinstance(t, torch.Tensor) or t.dtype != torch.uint8:
            raise CheckpointError(f"the checkpoint holds a malformed torch_dendrites entry {key!r}.")
        if t.numel() > _MAX_FILE:
            raise CheckpointError(f"the checkpoint's torch_dendrites entry {key!r} is implausibly large.")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(t.detach().cpu().contiguous().numpy().tobytes())
    return folder


def sentinels(model: nn.Module) -> Dict[str, torch.Tensor]:
    """One-element tensors at the pre-wrapping names of every wrapped layer's weights (``fc1.weight`` for
    ``fc1.base.weight``): a stock loader that builds the model *without* dendrites finds them with the wrong shape
    and refuses (Hugging Face's ``from_pretrained`` raises on size mismatches), instead of silently
    re-initialising the layers. A model with dendrites has no such keys; :func:`install_load_hook` drops them."""
    out = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, DendriticLayer) and name:
            for key in module.base.state_dict():
                out[f"{name}.{key}"] = torch.zeros(1)
    return out


def load_entries(
    model: nn.Module,
    entries: Dict[str, torch.Tensor],
    controller: Any = None,
    restructure: bool = True,
    check_base: bool = False,
) -> List[str]:
    """Re-apply the structure (and controller state) carried by ``entries`` to ``model`` with ``td.load``.

    ``check_base``: compare the model's base weights with the saved fingerprint (only where nothing loads them
    afterwards, e.g. a peft adapter folder loaded onto a pretrained base model). Returns the keys of the base
    tensors the entries leave out (the caller loads them, or the model already holds them)."""

    if not restructure:
        with tempfile.TemporaryDirectory(prefix="td-unpack-") as tmp:
            folder = unpack(entries, Path(tmp) / "td")
            recipe = _counts(folder)
        have = {n: layer.num_dendrites for n, layer in dendritic_layers(model).items()}
        if recipe is not None and recipe != have:
            raise CheckpointError(
                f"this checkpoint holds dendrites {recipe}, the model has {have}: its optimizer was built over other "
                "parameters. Re-apply the saved structure before building the optimizer (see the README: "
                "Hugging Face, Lightning and accelerate)."
            )
    # A checkpoint written before any controller existed carries no controller files: nothing to restore then.
    if not any(Path(k).name.startswith("controller") for k in entries):
        controller = None
    with tempfile.TemporaryDirectory(prefix="td-unpack-") as tmp:
        folder = unpack(entries, Path(tmp) / "td")
        load(folder, model, controller, check_base=check_base)
        return _base_keys(folder)


def _recipe(folder: Path) -> Optional[dict]:
    try:
        doc = json.loads((folder / RECIPE).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _counts(folder: Path) -> Optional[Dict[str, int]]:
    doc = _recipe(folder)
    if doc is None or not isinstance(doc.get("layers"), list):
        return None
    return {e["path"]: e["num_dendrites"] for e in doc["layers"] if isinstance(e, dict) and "path" in e}


def _base_keys(folder: Path) -> List[str]:
    """The base tensors an adapter-sized folder leaves out (read after td.load validated the recipe)."""
    base = (_recipe(folder) or {}).get("base")  # None in a full folder, and in folders of format version 2
    return sorted(base["tensors"]) if isinstance(base, dict) else []


def install_load_hook(model: nn.Module, controller: Callable[[], Any] = lambda: None, restructure: bool = True) -> Any:
    """Make ``model.load_state_dict`` consume embedded entries: the structure (and ``controller()``'s state) is
    restored with ``td.load`` before the framework loads the weights; the sentinels are dropped.

    Args:
        model: the model the framework will load into (the root of the state dict's keys).
        controller: ``controller(module)`` returns the controller to restore (or None); ``module`` is the model being
            loaded (a deep copy of ``model`` carries the hook too, and then loads into itself).
        restructure: whether the hook may add dendrites (False where the optimizer was already built over the
            model's parameters: then a structure that differs raises a CheckpointError with the fix).

    Returns:
        The hook's removable handle.
    """
    busy = []

    def hook(module, state_dict, prefix, *args):
        # prefix: the model's path inside a wrapper that loads it (DDP's "module.", for one).
        mine = prefix + PREFIX
        if busy or not any(isinstance(k, str) and k.startswith(mine) for k in state_dict):
            return
        entries = {k[len(prefix) :]: state_dict.pop(k) for k in list(state_dict) if k.startswith(mine)}
        busy.append(True)
        try:
            load_entries(module, entries, controller(module), restructure)
        finally:
            busy.pop()
        # The sentinels of a Hugging Face folder: keys the wrapped model does not have.
        present = set(module.state_dict())
        for key in list(sentinels(module)):
            if key not in present:
                state_dict.pop(prefix + key, None)

    return model.register_load_state_dict_pre_hook(hook)
