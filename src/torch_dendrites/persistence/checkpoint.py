"""``save``, ``load`` and ``load_training_state``: reading and writing whole checkpoint folders.

A load reads in this order, and changes nothing until the end: the recipe (checksum, migration, schema);
every safetensors header (no data); the structure the recipe describes, rebuilt on the meta device and
compared key by key, shape by shape with the headers; the controller and training documents against the
objects they go into; then the data (bounded by the checked headers), whose SHA-256 must match the
recipe's. Only then is anything applied, in a transaction that undoes every step if a later one fails.
"""

from __future__ import annotations

import copy
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import torch
from torch import nn

from ..dendrites.sparse import SparseDendrite
from ..distributed import full_state_dict, is_sharded, rank, shard_like
from ..errors import CheckpointError, ConfigError, StateError, TargetError
from ..surgery import _RECORD, add_dendrites, dendritic_layers, remove_dendrites, set_dendrite_counts
from . import io
from .codec import Entry, Header, dumps, loads, pack_state, read_data, read_header, safetensors_bytes, sha256, unpack
from .recipe import (
    CONTROLLER_JSON,
    CONTROLLER_WEIGHTS,
    FILES,
    FORMAT,
    RECIPE,
    TRAINING_JSON,
    TRAINING_WEIGHTS,
    WEIGHTS,
    Plan,
    _physical_memory,
    build,
    plan,
    read,
)
from .training import Training, check_best, encode_controller, encode_training, read_controller, read_training

__all__ = ["load", "load_training_state", "save"]

PathLike = Union[str, "os.PathLike[str]"]


# ---------------------------------------------------------------------- arguments
def _check_common(optimizer, scheduler, rng, generators) -> None:
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}.")
    if scheduler is not None and not (
        callable(getattr(scheduler, "state_dict", None)) and callable(getattr(scheduler, "load_state_dict", None))
    ):
        raise ConfigError(f"scheduler must have state_dict() and load_state_dict(), got {type(scheduler).__name__}.")
    if not isinstance(rng, bool):
        raise ConfigError(f"rng must be True or False, got {rng!r}.")
    if generators is not None:
        if not isinstance(generators, dict):
            raise ConfigError(f"generators must be a dict of name -> torch.Generator, got {type(generators).__name__}.")
        for name, gen in generators.items():
            if not isinstance(name, str) or not name:
                raise ConfigError(f"generators has the name {name!r}; use non-empty strings.")
            if not isinstance(gen, torch.Generator):
                raise ConfigError(f"generators[{name!r}] is a {type(gen).__name__}, not a torch.Generator.")


def _check_model(model: Any, controller: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TargetError(f"model must be an nn.Module, got {type(model).__name__}.")
    if controller is not None and not (
        callable(getattr(controller, "state_dict", None)) and callable(getattr(controller, "load_state_dict", None))
    ):
        raise ConfigError(f"controller must be a torch_dendrites.GrowthController, got {type(controller).__name__}.")


def _on_meta(tensors) -> bool:
    return any(isinstance(t, torch.Tensor) and t.is_meta for t in tensors)


# ---------------------------------------------------------------------- save
def _recognize(fs: io.FileSystem, fd: int) -> Optional[str]:
    """None if the folder open at ``fd`` is one td.save wrote (or is empty), else why it is not."""
    entries = io.names_in(fs, fd)
    odd = sorted(n for n in entries if n not in FILES)
    if odd:
        return f"it holds {odd[:5]}"
    if any(not stat.S_ISREG(st.st_mode) for st in entries.values()):
        return "it holds links or folders"
    if not entries:
        return None
    if RECIPE not in entries:
        return f"it has no {RECIPE}"
    folder = io.Folder(fs, os.dup(fd), Path("."), (RECIPE,))
    with folder:
        try:
            recipe = loads(folder.read(RECIPE, 64 * 1024 * 1024), RECIPE)
        except CheckpointError:
            return f"its {RECIPE} is unreadable"
    if not isinstance(recipe, dict) or recipe.get("format") != FORMAT:
        return f"its {RECIPE} is not a torch-dendrites recipe"
    return None


def save(
    path: PathLike,
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
    Saves to one folder from several processes are serialised by a lock file. Only a folder written by
    td.save (or an empty one) is ever replaced.

    Args:
        path: the folder to write (created; replaced if it holds an earlier checkpoint).
        model: the model, with or without dendrites.
        controller: a :class:`~torch_dendrites.GrowthController` whose state (history, best weights) to keep.
        optimizer: an optimizer whose state to keep (for an exact resume).
        scheduler: a learning-rate scheduler whose (JSON-able) state to keep.
        rng: also keep the global torch, CUDA, Python and NumPy random states.
        generators: named ``torch.Generator`` objects (e.g. a data shuffler) whose states to keep.
        extra: a JSON-able dict of anything else (e.g. the epoch of an outer loop).

    Returns:
        The folder's path.

    Raises:
        CheckpointError: ``path`` is unusable (empty, ``.``, too long, a file, a link, a folder td.save did
            not write), a value cannot be saved, or the disk refused the write (full, read-only); the
            previous copy is untouched and nothing is left behind.
        TargetError: ``model`` is not an ``nn.Module``.
        ConfigError: another argument has the wrong type.
        StateError: the model has tensors on the meta device (nothing to save).

    Example:
        >>> import tempfile, torch, torch_dendrites as td
        >>> net = td.add_dendrites(torch.nn.Sequential(torch.nn.Linear(4, 3)))
        >>> _ = td.grow(net)
        >>> folder = td.save(tempfile.mkdtemp() + "/ckpt", net)
        >>> fresh = td.load(folder, torch.nn.Sequential(torch.nn.Linear(4, 3)))
        >>> fresh[0].num_dendrites
        1
    """
    path = io.check_name(path)
    _check_model(model, controller)
    _check_common(optimizer, scheduler, rng, generators)
    if extra is not None and not isinstance(extra, dict):
        raise ConfigError(f"extra must be a JSON-able dict, got {type(extra).__name__}.")
    model_state = model.state_dict()
    if _on_meta(model_state.values()):
        raise StateError(
            "the model has tensors on the meta device (not materialized): there are no weights to save. Call "
            "model.to_empty(device=...) and load its weights first."
        )
    ctl_state = controller.state_dict() if controller is not None else None
    best = ctl_state.get("best_state") if ctl_state is not None else None
    # FSDP2: sharded tensors are gathered whole on every rank (a collective, hence save runs on every
    # rank), then rank 0 alone writes.
    sharded = any(is_sharded(v) for v in model_state.values())
    if sharded:
        model_state = full_state_dict(model_state)
        if best:
            ctl_state["best_state"] = full_state_dict(best)
    save_id = secrets.token_hex(16)
    meta = {"format": FORMAT, "save_id": save_id}
    training = None
    if optimizer is not None or scheduler is not None or rng or generators or extra is not None:
        training = encode_training(optimizer, scheduler, rng, generators, extra, save_id)
    if sharded and rank() != 0:
        return path
    files: Dict[str, bytes] = {}
    tensors, aliases = pack_state(model_state)
    files[WEIGHTS] = safetensors_bytes(tensors, meta)
    if ctl_state is not None:
        doc, ctl_tensors = encode_controller(ctl_state, save_id)
        files[CONTROLLER_WEIGHTS] = safetensors_bytes(ctl_tensors, meta)
        files[CONTROLLER_JSON] = dumps(doc)
    if training is not None:
        doc, train_tensors = training
        files[TRAINING_WEIGHTS] = safetensors_bytes(train_tensors, meta)
        files[TRAINING_JSON] = dumps(doc)
    # The recipe comes last: it holds every other file's hash, and a folder without one is incomplete.
    files[RECIPE] = dumps(build(model, save_id, aliases, files))
    return io.write_folder(path, list(files.items()), _recognize)


# ---------------------------------------------------------------------- reading
@dataclass
class _Tensors:
    """One safetensors file of the folder: its header now, its data after every check passed."""

    name: str
    fd: int
    header: Header
    data: Optional[Dict[str, torch.Tensor]] = None


@dataclass
class _Read:
    path: Path
    recipe: dict
    version: int
    files: Dict[str, _Tensors] = field(default_factory=dict)
    plan: Optional[Plan] = None
    weights: Optional[Dict[str, str]] = None  # model key -> stored key
    controller: Optional[dict] = None
    training: Optional[Training] = None
    index_bounds: Dict[str, int] = field(default_factory=dict)


def _open_tensors(folder: io.Folder, name: str, read: _Read) -> _Tensors:
    where = folder.path / name
    fd = folder.open(name)
    try:
        header = read_header(folder.fs, fd, where)
    except OSError as exc:
        raise CheckpointError(f"reading {where} failed: {exc}") from None
    save_id = read.recipe["save_id"]
    if save_id is not None and header.metadata.get("save_id") != save_id:
        raise CheckpointError(
            f"{where} belongs to another save than the recipe beside it (save ids differ); the folder mixes "
            "two copies. Load it again, or restore it from a backup."
        )
    if read.recipe["files"] is not None and name not in read.recipe["files"]:
        raise CheckpointError(f"{where} is not listed in the recipe; the folder was edited.")
    t = _Tensors(name, fd, header)
    read.files[name] = t
    return t


def _read_json(folder: io.Folder, name: str, read: _Read) -> Any:
    data = folder.read(name, 64 * 1024 * 1024)
    _check_hash(read, name, data)
    return loads(data, folder.path / name)


def _check_hash(read: _Read, name: str, data: Optional[bytes], digest: Optional[str] = None, size: int = 0) -> None:
    files = read.recipe["files"]
    if files is None:  # format version 1: no hashes
        return
    if name not in files:
        raise CheckpointError(f"{read.path / name} is not listed in the recipe; the folder was edited.")
    if data is not None:
        digest, size = sha256(data), len(data)
    if files[name]["sha256"] != digest or files[name]["bytes"] != size:
        raise CheckpointError(
            f"{read.path / name} does not match the hash in the recipe: its content changed after it was saved "
            "(bit rot, an edit, or a copy mixed from two saves). Restore it from a backup."
        )


def _prefix_chain(keys) -> List[str]:
    """The wrapper prefixes (``module.``, ``_orig_mod.``) that every key starts with, outermost first."""
    chain: List[str] = []
    lead = ""
    while keys:
        nxt = next((p for p in ("module.", "_orig_mod.") if all(k.startswith(lead + p) for k in keys)), None)
        if nxt is None or len(chain) >= 8:
            return chain
        chain.append(nxt)
        lead += nxt
    return chain


def _strip_prefixes(keys: List[str], aliases: Dict[str, str], model_keys: List[str]) -> Dict[str, str]:
    """Saved key -> model key for every stored and aliased key. Keys saved from DDP (``module.``) or
    torch.compile (``_orig_mod.``) wrappers lose the prefixes the model does not carry itself: a model
    whose only child is named ``module`` (an EMA or task wrapper) keeps its own."""
    saved = [*keys, *aliases]
    extra = len(_prefix_chain(saved)) - len(_prefix_chain(list(model_keys)))
    n = len("".join(_prefix_chain(saved)[: max(extra, 0)]))
    return {k: k[n:] for k in saved}


def _plan_model(folder: io.Folder, read: _Read, model: nn.Module) -> None:
    recipe, where = read.recipe, folder.path
    weights = _open_tensors(folder, WEIGHTS, read)
    entries = weights.header.entries
    aliases = recipe["aliases"]
    for a, src in aliases.items():
        if a in entries or src not in entries:
            raise CheckpointError(f"{where}: alias {a!r} points to {src!r}, which is not a stored tensor.")
    mapping = _strip_prefixes(list(entries), aliases, list(model.state_dict()))
    if len(set(mapping.values())) != len(mapping):
        raise CheckpointError(f"{where}: two saved keys name the same tensor once prefixes are removed.")
    read.plan = plan(model, recipe, set(mapping.values()), where / RECIPE)
    expected = read.plan.expected
    got = {mapping[k]: entries[aliases.get(k, k)] for k in mapping}
    problem = _compare(expected, got)
    if problem:
        raise CheckpointError(f"{where} does not fit this model: {problem}.")
    read.weights = {mapping[k]: aliases.get(k, k) for k in mapping}
    read.index_bounds = _index_bounds(read.plan)


def _compare(expected: Dict[str, tuple], got: Dict[str, Entry]) -> Optional[str]:
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = [
        f"{k}: saved {list(got[k].shape)} vs model {list(expected[k][0])}"
        for k in expected
        if k in got and got[k].shape != expected[k][0]
    ]
    dtypes = [
        f"{k} was saved as {got[k].dtype}, the model has {expected[k][1]}"
        for k in expected
        if k in got and got[k].shape == expected[k][0] and got[k].dtype != expected[k][1]
    ]
    parts = []
    if missing:
        parts.append(f"missing keys {missing[:6]}{' ...' if len(missing) > 6 else ''}")
    if unexpected:
        parts.append(f"unexpected keys {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
    if shapes:
        parts.append(f"shape mismatches {shapes[:6]}")
    if dtypes:
        parts.append(f"dtype mismatches {dtypes[:6]}")
    return "; ".join(parts) or None


def _index_bounds(p: Plan) -> Dict[str, int]:
    """State-dict key -> fan-in, for every sparse connectivity buffer (its entries must lie below it)."""
    out = {}
    for lp in p.layers.values():
        for mname, m in lp.probe.named_modules():
            if isinstance(m, SparseDendrite):
                for path in lp.paths:
                    out[f"{path}.{mname}.index"] = m.fan_in
    return out


def _check_indices(state: Dict[str, torch.Tensor], bounds: Dict[str, int], where: object) -> None:
    for key, fan_in in bounds.items():
        t = state.get(key)
        if t is None or not t.numel():
            continue
        rows_ok = t.dim() == 2 and (t.shape[1] < 2 or bool((t[:, 1:] > t[:, :-1]).all()))
        if t.dtype != torch.int64 or int(t.min()) < 0 or int(t.max()) >= fan_in or not rows_ok:
            raise CheckpointError(
                f"{where}: the connectivity buffer {key} must hold increasing input indices in [0, {fan_in}); "
                "the file was edited or corrupted."
            )


def _plan_controller(folder: io.Folder, read: _Read) -> None:
    if CONTROLLER_JSON not in folder.names:
        raise CheckpointError(
            f"{folder.path} holds no controller state; save one with td.save(path, model, controller)."
        )
    doc = _read_json(folder, CONTROLLER_JSON, read)
    where = folder.path / CONTROLLER_JSON
    state = read_controller(doc, read.version, read.recipe["save_id"], where)
    tensors = _open_tensors(folder, CONTROLLER_WEIGHTS, read)
    entries = tensors.header.entries
    refs = []
    unpack(state, lambda k: refs.append(k), "")
    unused = sorted(set(entries) - set(refs))
    if unused:
        raise CheckpointError(f"{folder.path / CONTROLLER_WEIGHTS} holds unreferenced tensors {unused[:4]}.")
    bound = {e["path"]: e["num_dendrites"] for e in read.recipe["layers"]}
    check_best(state, entries, bound, read.plan.expected_at, where)
    read.controller = state


def _plan_training(folder: io.Folder, read: _Read, optimizer, scheduler, rng, generators) -> None:
    if TRAINING_JSON not in folder.names:
        raise CheckpointError(
            f"{folder.path} holds no training state; save it with td.save(..., optimizer=..., scheduler=..., rng=True)."
        )
    doc = _read_json(folder, TRAINING_JSON, read)
    where = folder.path / TRAINING_JSON
    doc = read_training(doc, read.version, read.recipe["save_id"], where)
    entries = _open_tensors(folder, TRAINING_WEIGHTS, read).header.entries
    read.training = Training(
        doc, entries, where, optimizer=optimizer, scheduler=scheduler, rng=rng, generators=generators
    )


def _read_data(folder: io.Folder, read: _Read) -> None:
    total = sum(t.header.data_size for t in read.files.values())
    memory = _physical_memory()
    if memory is not None and total > memory:
        raise CheckpointError(
            f"{folder.path} holds {total / 2**30:.1f} GiB of tensors, more than this machine's memory "
            f"({memory / 2**30:.1f} GiB)."
        )
    for t in read.files.values():
        where = folder.path / t.name
        try:
            t.data, digest = read_data(folder.fs, t.fd, t.header, where)
        except OSError as exc:
            raise CheckpointError(f"reading {where} failed: {exc}") from None
        _check_hash(read, t.name, None, digest, len(t.header.raw) + t.header.data_size)


def _read_folder(path: PathLike, model, controller, training_args) -> _Read:
    with io.open_folder(path, FILES) as folder:
        raw = folder.read(RECIPE, 64 * 1024 * 1024)
        recipe, version = read(loads(raw, folder.path / RECIPE), folder.path / RECIPE)
        r = _Read(folder.path, recipe, version)
        if model is not None:
            _plan_model(folder, r, model)
        if controller is not None:
            _plan_controller(folder, r)
        if training_args is not None:
            _plan_training(folder, r, *training_args)
        _read_data(folder, r)
    if model is not None:
        state = {k: r.files[WEIGHTS].data[src] for k, src in r.weights.items()}
        _check_indices(state, r.index_bounds, r.path / WEIGHTS)
        r.weights = state
    if controller is not None:
        data = r.files[CONTROLLER_WEIGHTS].data
        r.controller = unpack(r.controller, data.__getitem__, "controller")
        _check_indices(r.controller.get("best_state") or {}, r.index_bounds, r.path / CONTROLLER_WEIGHTS)
    return r


# ---------------------------------------------------------------------- applying
class _Transaction:
    """Changes applied one by one, each with its undo; on failure every undo runs, newest first."""

    def __init__(self, modules: List[nn.Module]):
        self.undos: List[Callable[[], None]] = []
        # requires_grad flags and normalisation momenta: the controller's candidate phase changes both.
        self.flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
        self.momenta = [
            (m, m.momentum) for root in modules for m in root.modules() if isinstance(m, nn.modules.batchnorm._NormBase)
        ]

    def add(self, undo: Callable[[], None]) -> None:
        self.undos.append(undo)

    def rollback(self) -> None:
        for undo in reversed(self.undos):
            try:
                undo()
            except Exception:  # noqa: BLE001 - undo as much as possible
                pass
        for p, flag in self.flags:
            p.requires_grad_(flag)
        for m, momentum in self.momenta:
            m.momentum = momentum


def _apply_structure(model: nn.Module, read: _Read, tx: _Transaction) -> None:
    p = read.plan
    if not p.layers:
        return
    if not p.wrapped:
        add_dendrites(model, p.config)
        tx.add(lambda: remove_dendrites(model))
    layers = dendritic_layers(model)
    if not p.wrapped:
        for name, lp in p.layers.items():
            e, layer = lp.entry, layers[name]
            layer.neuron_axis = e["neuron_axis"]
            layer.dendrites.activation = e["activation"]
            layer.dendrites.init_scale = float(e["init_scale"])
    # Every undo is registered before its step runs, so a step failing half-way (out of memory) is undone.
    before = {
        name: (layer.dendrites, list(layer.dendrites.units), layer.dendrites.candidates, layer.dendrites.correlation)
        for name, layer in layers.items()
    }

    def undo_units():
        for d, units, candidates, correlation in before.values():
            d.units = nn.ModuleList(units)
            d.candidates, d.correlation = candidates, correlation

    tx.add(undo_units)
    # The placeholder dendrites are overwritten by the saved weights: drawn from a private generator so
    # that loading leaves the global random state alone.
    scratch = torch.Generator().manual_seed(0)
    set_dendrite_counts(model, {name: lp.entry["num_dendrites"] for name, lp in p.layers.items()}, scratch)
    for name, layer in layers.items():
        layer.dendrites.clear_candidates()
        if p.layers[name].entry["candidates"]:
            layer.dendrites.add_candidates(p.layers[name].entry["candidates"], scratch)
    # What was built must be what was planned (a custom dendrite type that builds differently on the
    # meta device would show here).
    built = {k: (tuple(t.shape), t.dtype) for k, t in model.state_dict().items()}
    if built != p.expected:
        problem = _compare(p.expected, {k: Entry(dt, sh, 0, 0) for k, (sh, dt) in built.items()}) or "dtype mismatch"
        raise CheckpointError(f"{read.path}: the rebuilt model differs from the planned structure: {problem}.")
    flagged = []  # correlation-trained units: input weights frozen (requires_grad comes back with the rollback)

    def undo_flags():
        for unit, old in flagged:
            if old is None:
                unit.__dict__.pop("correlation_trained", None)
            else:
                unit.correlation_trained = old

    tx.add(undo_flags)
    for name, lp in p.layers.items():
        for i in lp.entry["correlation_units"]:
            unit = layers[name].dendrites.units[i]
            flagged.append((unit, getattr(unit, "correlation_trained", None)))
            unit.correlation_trained = True
            for pname, param in unit.named_parameters():
                param.requires_grad_(pname == "out_gain")
    record = getattr(model, _RECORD, None)
    if record is not None and read.recipe["skipped"]:
        old_skipped = record.skipped
        record.skipped = dict(read.recipe["skipped"])
        tx.add(lambda: setattr(record, "skipped", old_skipped))


def _apply_controller(controller, state: dict, read: _Read, tx: _Transaction, model: nn.Module) -> None:
    where = read.path / CONTROLLER_JSON
    validate = getattr(controller, "validate_state", None)
    try:
        if validate is not None:
            validate(state, model)  # against the model it will drive, which now holds the saved structure
        else:
            controller._check_state(state)
    except StateError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    # Undone by putting its attributes back (containers copied one level, in case they are changed in
    # place), not through load_state_dict, whose own checks could refuse the state it had.
    before = {k: copy.copy(v) if type(v) in (dict, list) else v for k, v in vars(controller).items()}

    def undo():
        vars(controller).clear()
        vars(controller).update(before)

    tx.add(undo)
    if validate is not None:
        controller.load_state_dict(state, model)  # the controller drives the loaded model from now on
    else:
        controller.load_state_dict(state)


def _failed(read_path: Path, exc: BaseException) -> CheckpointError:
    if isinstance(exc, CheckpointError):
        return exc
    return CheckpointError(
        f"loading {read_path} failed ({type(exc).__name__}: {exc}); the model, controller and training state were "
        "left as they were."
    )


def load(
    path: PathLike,
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
    from DDP (``module.``) or ``torch.compile`` (``_orig_mod.``) models are accepted. Everything is checked
    before anything is built or changed (sizes from the safetensors headers, every file's hash, the
    controller and training state against the objects they go into); on any mismatch a
    :class:`~torch_dendrites.CheckpointError` names what differs, and the model, controller, optimizer,
    scheduler, random states and generators are left exactly as they were.

    Args:
        path: a folder written by :func:`save`.
        model: the freshly built base model (or one already holding the saved structure and settings).
        controller: a :class:`~torch_dendrites.GrowthController` to restore too.
        optimizer, scheduler, rng, generators: training state to restore as well; the optimizer must
            already be built over ``model``'s parameters *with* the saved structure (for a fresh base
            model, call ``load`` first, build the optimizer, then :func:`load_training_state`).

    Returns:
        ``model``, now holding the saved dendrites and weights.

    Raises:
        CheckpointError: the folder is missing, unreadable, corrupted, edited, or does not fit the model.
        TargetError: ``model`` is not an ``nn.Module``.
        ConfigError: another argument has the wrong type.

    Example:
        >>> import tempfile, torch, torch_dendrites as td
        >>> net = td.add_dendrites(torch.nn.Sequential(torch.nn.Linear(2, 2)))
        >>> folder = td.save(tempfile.mkdtemp() + "/c", net)
        >>> td.load(folder, torch.nn.Sequential(torch.nn.Linear(2, 2)))[0].num_dendrites
        0
    """
    _check_model(model, controller)
    _check_common(optimizer, scheduler, rng, generators)
    if _on_meta(model.state_dict().values()):
        raise CheckpointError("the model has tensors on the meta device; materialize it (model.to_empty) first.")
    wanted = optimizer is not None or scheduler is not None or rng or bool(generators)
    targs = (optimizer, scheduler, rng, generators) if wanted else None
    r = io.retrying(lambda: _read_folder(path, model, controller, targs))
    tx = _Transaction(
        [model] + ([controller.model] if isinstance(getattr(controller, "model", None), nn.Module) else [])
    )
    try:
        _apply_structure(model, r, tx)
        if controller is not None:
            _apply_controller(controller, r.controller, r, tx, model)
        if r.training is not None:
            r.training.apply(r.files[TRAINING_WEIGHTS].data, tx.add)
        # The weights go last: once copied into the model's own parameters there is no going back.
        model.load_state_dict(shard_like(r.weights, model.state_dict()), strict=True)
    except BaseException as exc:
        tx.rollback()
        if isinstance(exc, Exception):
            raise _failed(r.path, exc) from (None if isinstance(exc, CheckpointError) else exc)
        raise
    return model


def load_training_state(
    path: PathLike,
    *,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Any = None,
    rng: bool = False,
    generators: Optional[Dict[str, torch.Generator]] = None,
) -> Dict[str, Any]:
    """Restore the optimizer, scheduler, RNG and generator states saved by :func:`save`.

    Everything is checked first; on any error nothing is changed.

    Returns:
        The ``extra`` dict saved with them (empty if none).

    Raises:
        CheckpointError: the folder holds no training state, or it does not fit the objects passed in.
    """
    _check_common(optimizer, scheduler, rng, generators)
    r = io.retrying(lambda: _read_folder(path, None, None, (optimizer, scheduler, rng, generators)))
    tx = _Transaction([])
    try:
        extra = r.training.apply(r.files[TRAINING_WEIGHTS].data, tx.add)
    except BaseException as exc:
        tx.rollback()
        if isinstance(exc, Exception):
            raise _failed(r.path, exc) from None
        raise
    return extra if isinstance(extra, dict) else {}
