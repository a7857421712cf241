"""``save``, ``load`` and ``load_training_state``: reading and writing whole checkpoint folders.

A load reads in this order, and changes nothing until the end: the recipe (checksum, migration, schema);
every safetensors header (no data); the structure the recipe describes, rebuilt on the meta device and
compared key by key, shape by shape with the headers; the controller and training documents against the
objects they go into; then the data (bounded by the checked headers), whose SHA-256 must match the
recipe's. Only then is anything applied, in a transaction that undoes every step if a later one fails.

The model's weights are the one exception to "read, then apply": they are hashed while checking, not kept,
and read a second time, a batch of tensors at a time, straight into the model as the last step of the
transaction (the file's hash checked again at the end). So a load holds no second copy of the model: only
the values of the tensors it overwrites (none for an adapter-sized folder, whose new dendrites are simply
removed on failure), to put them back if the second read fails or differs.
"""

from __future__ import annotations

import copy
import hashlib
import os
import secrets
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import torch
from torch import nn

from ..correlation import holds_candidates
from ..dendrites.sparse import SparseDendrite
from ..distributed import full_state_dict, is_sharded, rank, shard_like
from ..errors import CheckpointError, ConfigError, StateError, TargetError
from ..surgery import _RECORD, add_dendrites, dendritic_layers, remove_dendrites, set_dendrite_counts
from . import io
from .base import base_keys, check_peft, digests, fingerprint, peft_configs
from .codec import (
    DTYPES,
    Entry,
    Header,
    dumps,
    hash_data,
    iter_data,
    loads,
    pack_state,
    raw_bytes,
    read_data,
    read_header,
    safetensors_bytes,
    sha256,
    unpack,
)
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
    base_weights: bool = True,
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

    With ``base_weights=False`` the folder is *adapter-sized*: it leaves out the base tensors, the parameters
    that do not require grad and are not dendrite parameters (a LoRA model's whole base, a frozen backbone),
    and records their fingerprint (names, shapes, dtypes and SHA-256 of their values) instead; buffers
    (BatchNorm statistics), dendrites and everything trainable are saved. :func:`load` then needs a base
    model that already holds those base weights (``from_pretrained``), and refuses any other. peft models
    also record their adapter configs. A model with nothing frozen gives the ordinary full folder.

    Args:
        path: the folder to write (created; replaced if it holds an earlier checkpoint).
        model: the model, with or without dendrites.
        controller: a :class:`~torch_dendrites.GrowthController` whose state (history, best weights) to keep.
        base_weights: False: leave out the frozen base weights (an adapter-sized folder, see above). During a
            correlation candidate phase this needs the controller, which knows what was frozen before it.
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
        StateError: the model has tensors on the meta device (nothing to save), or ``base_weights=False``
            during a candidate phase without the controller.

    Example:
        >>> import tempfile, torch, torch_dendrites as td
        >>> net = td.add_dendrites(torch.nn.Sequential(torch.nn.Linear(4, 3)))
        >>> _ = td.grow(net)
        >>> folder = td.save(tempfile.mkdtemp() + "/ckpt", net)
        >>> fresh = td.load(folder, torch.nn.Sequential(torch.nn.Linear(4, 3)))
        >>> fresh[0].num_dendrites
        1

        Adapter-sized, with a frozen pretrained layer:

        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> def pretrained():  # stands for from_pretrained: the same base weights every time
        ...     torch.manual_seed(0)
        ...     return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).requires_grad_(False)
        >>> net = td.add_dendrites(pretrained(), td.DendriteConfig(target_names=["1"]))
        >>> _ = td.grow(net)
        >>> folder = td.save(tempfile.mkdtemp() + "/adapter", net, base_weights=False)
        >>> x = torch.randn(2, 4)
        >>> torch.equal(td.load(folder, pretrained())(x), net(x))
        True
    """
    path = io.check_name(path)
    _check_model(model, controller)
    _check_common(optimizer, scheduler, rng, generators)
    if extra is not None and not isinstance(extra, dict):
        raise ConfigError(f"extra must be a JSON-able dict, got {type(extra).__name__}.")
    if not isinstance(base_weights, bool):
        raise ConfigError(f"base_weights must be True or False, got {base_weights!r}.")
    model_state = model.state_dict()
    if _on_meta(model_state.values()):
        raise StateError(
            "the model has tensors on the meta device (not materialized): there are no weights to save. Call "
            "model.to_empty(device=...) and load its weights first."
        )
    ctl_state = controller.state_dict() if controller is not None else None
    best = ctl_state.get("best_state") if ctl_state is not None else None
    left_out: List[str] = []
    if not base_weights:
        phase = (ctl_state or {}).get("candidate_phase") or {}
        left_out = base_keys(model, model_state, phase.get("trainable_before") if ctl_state is not None else None)
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
    base = fingerprint({k: model_state[k] for k in left_out}) if left_out else None
    skip = set(left_out)
    tensors, aliases = pack_state({k: v for k, v in model_state.items() if k not in skip})
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
    files[RECIPE] = dumps(build(model, save_id, aliases, files, base, peft_configs(model)))
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
    base: Dict[str, str] = field(default_factory=dict)  # model key -> SHA-256 of a base tensor left out
    controller: Optional[dict] = None
    training: Optional[Training] = None
    index_bounds: Dict[str, int] = field(default_factory=dict)
    fs: Optional[io.FileSystem] = None
    weights_fd: Optional[int] = None  # a descriptor of its own on the weights file, read again by _load_weights

    def close(self) -> None:
        if self.weights_fd is not None:
            os.close(self.weights_fd)
            self.weights_fd = None


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


def _plan_model(folder: io.Folder, read: _Read, model: nn.Module, check_base: bool) -> None:
    recipe, where = read.recipe, folder.path
    weights = _open_tensors(folder, WEIGHTS, read)
    entries = weights.header.entries
    aliases = recipe["aliases"]
    for a, src in aliases.items():
        if a in entries or src not in entries:
            raise CheckpointError(f"{where}: alias {a!r} points to {src!r}, which is not a stored tensor.")
    # An adapter-sized folder: the base tensors left out are described by the recipe alone.
    table = (recipe["base"] or {}).get("tensors", {})
    base = {k: Entry(DTYPES[e["dtype"]], tuple(e["shape"]), 0, 0) for k, e in table.items()}
    both = sorted(k for k in base if k in entries or k in aliases)
    if both:
        raise CheckpointError(f"{where}: {both[:4]} are both stored and listed as left-out base tensors.")
    state = model.state_dict()
    mapping = _strip_prefixes([*entries, *base], aliases, list(state))
    if len(set(mapping.values())) != len(mapping):
        raise CheckpointError(f"{where}: two saved keys name the same tensor once prefixes are removed.")
    check_peft(recipe["peft"], model, where / RECIPE)
    read.plan = plan(model, recipe, {v for k, v in mapping.items() if k not in base}, where / RECIPE)
    expected = read.plan.expected
    got = {mapping[k]: (base[k] if k in base else entries[aliases.get(k, k)]) for k in mapping}
    problem = _compare(expected, got)
    if problem:
        raise CheckpointError(f"{where} does not fit this model: {problem}.")
    read.weights = {mapping[k]: aliases.get(k, k) for k in mapping if k not in base}
    read.base = {mapping[k]: table[k]["sha256"] for k in base}
    if read.base:
        _check_base(read, state, check_base, where)
    read.index_bounds = _index_bounds(read.plan)


def _now_key(p: Plan, key: str) -> str:
    """The key that ``key`` of the loaded model has in the model passed in (before its layers are wrapped)."""
    if p.wrapped:
        return key
    for lp in p.layers.values():
        for path in lp.paths:
            if key.startswith(f"{path}.base."):
                return f"{path}.{key[len(path) + 6 :]}"
    return key


def _check_base(read: _Read, state: Dict[str, torch.Tensor], check_values: bool, where: Path) -> None:
    """The model's own tensors stand in for the base tensors left out: they must be base tensors of the model
    (never dendrites), and (``check_values``) their values must be those the folder was saved with."""
    dendrite_keys = tuple(f"{path}.dendrites." for lp in read.plan.layers.values() for path in lp.paths)
    wrong = sorted(k for k in read.base if k.startswith(dendrite_keys))
    if wrong:
        raise CheckpointError(f"{where}: the recipe lists dendrite weights {wrong[:4]} as base tensors left out.")
    now = {k: _now_key(read.plan, k) for k in read.base}
    absent = sorted(k for k, n in now.items() if n not in state)
    if absent:  # pragma: no cover - _compare found every expected key, and a base key is none of the dendrites'
        raise CheckpointError(f"{where}: the model has no tensors {absent[:4]} to stand for the base tensors.")
    if not check_values:
        return
    mine = digests(full_state_dict({k: state[n] for k, n in now.items()}))
    differ = sorted(now[k] for k in read.base if mine[k] != read.base[k])
    if differ:
        raise CheckpointError(
            f"{where} is adapter-sized (saved with base_weights=False): it holds only the weights training changed, "
            f"and the model's base weights must be the ones it was trained on. {len(differ)} of the model's "
            f"{len(read.base)} base tensors differ in value: {differ[:4]}{' ...' if len(differ) > 4 else ''}. Load "
            "the same pretrained weights (the same checkpoint and revision) into the base model before td.load; "
            "check_base=False skips this check where the right base weights are loaded afterwards."
        )


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
    """Read every file's tensors and check its hash; the model's weights (read.plan set) only hashed."""
    streamed = WEIGHTS if read.plan is not None else None
    total = sum(t.header.data_size for t in read.files.values() if t.name != streamed)
    memory = _physical_memory()
    if memory is not None and total > memory:
        raise CheckpointError(
            f"{folder.path} holds {total / 2**30:.1f} GiB of tensors, more than this machine's memory "
            f"({memory / 2**30:.1f} GiB)."
        )
    for t in read.files.values():
        where = folder.path / t.name
        try:
            if t.name == streamed:
                digest = hash_data(folder.fs, t.fd, t.header, where)
            else:
                t.data, digest = read_data(folder.fs, t.fd, t.header, where)
        except OSError as exc:
            raise CheckpointError(f"reading {where} failed: {exc}") from None
        _check_hash(read, t.name, None, digest, len(t.header.raw) + t.header.data_size)


def _read_folder(path: PathLike, model, controller, training_args, check_base: bool = True) -> _Read:
    with io.open_folder(path, FILES) as folder:
        raw = folder.read(RECIPE, 64 * 1024 * 1024)
        recipe, version = read(loads(raw, folder.path / RECIPE), folder.path / RECIPE)
        r = _Read(folder.path, recipe, version)
        if model is not None:
            _plan_model(folder, r, model, check_base)
        if controller is not None:
            _plan_controller(folder, r)
        if training_args is not None:
            _plan_training(folder, r, *training_args)
        _read_data(folder, r)
        if controller is not None:
            data = r.files[CONTROLLER_WEIGHTS].data
            r.controller = unpack(r.controller, data.__getitem__, "controller")
            _check_indices(r.controller.get("best_state") or {}, r.index_bounds, r.path / CONTROLLER_WEIGHTS)
        if model is not None:  # last: nothing after it can fail and leave the descriptor open
            r.fs, r.weights_fd = folder.fs, os.dup(r.files[WEIGHTS].fd)
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
        name: (
            layer.dendrites,
            list(layer.dendrites.units),
            getattr(layer.dendrites, "candidates", None),
            getattr(layer.dendrites, "correlation", None),
        )
        for name, layer in layers.items()
    }

    def undo_units():
        for d, units, candidates, correlation in before.values():
            d.units = nn.ModuleList(units)
            if holds_candidates(d):
                d.candidates, d.correlation = candidates, correlation

    tx.add(undo_units)
    # The placeholder dendrites are overwritten by the saved weights: drawn from a private generator so
    # that loading leaves the global random state alone.
    scratch = torch.Generator().manual_seed(0)
    set_dendrite_counts(model, {name: lp.entry["num_dendrites"] for name, lp in p.layers.items()}, scratch)
    for name, layer in layers.items():
        if not holds_candidates(layer.dendrites):
            continue  # the plan refused candidates for such types
        layer.dendrites.clear_candidates()
        if p.layers[name].entry["candidates"]:
            layer.dendrites.add_candidates(p.layers[name].entry["candidates"], scratch)
    # What was built must be what was planned (a custom dendrite type that builds differently on the
    # meta device would show here).
    built = {k: (tuple(t.shape), t.dtype) for k, t in model.state_dict().items()}
    if built != p.expected:
        problem = _compare(p.expected, {k: Entry(dt, sh, 0, 0) for k, (sh, dt) in built.items()}) or "dtype mismatch"
        raise CheckpointError(f"{read.path}: the rebuilt model differs from the planned structure: {problem}.")
    flagged = []  # units with frozen input weights (requires_grad comes back with the rollback)

    def undo_flags():
        for unit, old in flagged:
            if old is None:
                unit.__dict__.pop("inputs_frozen", None)
            else:
                unit.inputs_frozen = old

    tx.add(undo_flags)
    for name, lp in p.layers.items():
        for i in lp.entry["correlation_units"]:
            unit = layers[name].dendrites.units[i]
            flagged.append((unit, getattr(unit, "inputs_frozen", None)))
            layers[name].dendrites.set_inputs_frozen(i, True)
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


# The weights handed to load_state_dict at a time: the most a load holds beyond the model and the values it
# will put back on failure.
_BATCH_BYTES = 1 << 26


# The values a load overwrites are kept until it has succeeded, to put back if it fails. Up to this many bytes
# they stay in memory; beyond, they go to an unnamed temporary file (TMPDIR), a batch at a time, so that a
# load never holds a second copy of a large model's weights, at the price of writing those values once.
_JOURNAL_MEMORY_BYTES = 1 << 28


class _Journal:
    """The old values of the tensors a load overwrites: in memory, or spilled to an unnamed temporary file
    (deleted by the operating system when closed, even if the process dies)."""

    def __init__(self, spill: bool):
        self.spill = spill
        self.memory: Dict[str, torch.Tensor] = {}
        self.file: Any = None
        self.records: List[tuple] = []  # (key, offset, shape, dtype) of each spilled tensor

    def keep(self, values: Dict[str, torch.Tensor]) -> None:
        """Keep ``values`` (the model's own tensors, before they are overwritten)."""
        for k, t in values.items():
            t = t.detach()
            if not self.spill or is_sharded(t) or t.device.type == "meta":
                self.memory[k] = t.clone()
                continue
            if self.file is None:
                self.file = tempfile.TemporaryFile(prefix="torch-dendrites-load-")
            data = t.cpu().contiguous()
            offset = self.file.seek(0, os.SEEK_END)
            self.file.write(raw_bytes(data))
            self.records.append((k, offset, tuple(data.shape), data.dtype))

    def restore(self, model: nn.Module) -> None:
        """Put every kept value back into ``model``."""
        if self.memory:
            model.load_state_dict(self.memory, strict=False)
        batch: Dict[str, torch.Tensor] = {}
        size = 0
        for k, offset, shape, dtype in self.records:
            t = torch.empty(shape, dtype=dtype)
            self.file.seek(offset)
            if t.numel():
                self.file.readinto(raw_bytes(t))
            batch[k] = t
            size += t.nbytes
            if size >= _BATCH_BYTES:
                model.load_state_dict(batch, strict=False)
                batch, size = {}, 0
        if batch:
            model.load_state_dict(batch, strict=False)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _load_weights(model: nn.Module, r: _Read, tx: _Transaction, existing: set) -> None:
    """Read the weights file again, a batch of tensors at a time, into ``model``; the values of tensors that
    existed before the load are kept until the end (:class:`_Journal`), to put back (through ``tx``) if anything
    fails, the file's hash included (it must be the one checked before anything changed)."""
    t, where = r.files[WEIGHTS], r.path / WEIGHTS
    keys: Dict[str, List[str]] = {}  # stored key -> model keys (tied weights share one stored tensor)
    for k, src in r.weights.items():
        keys.setdefault(src, []).append(k)
    own = model.state_dict(keep_vars=True)
    overwritten = sum(own[k].nbytes for k in r.weights if k in own and id(own[k]) in existing)
    journal = _Journal(spill=overwritten > _JOURNAL_MEMORY_BYTES)
    tx.add(lambda: journal.restore(model))
    batch: Dict[str, torch.Tensor] = {}
    done: set = set()

    kept: set = set()  # ids of the tensors whose values are kept (tied weights once)

    def flush() -> None:
        _check_indices(batch, r.index_bounds, where)
        old: Dict[str, torch.Tensor] = {}
        for k, new in batch.items():
            t = own[k]
            if id(t) not in existing or id(t) in kept:
                continue  # created by this load (removed by a rollback), or kept already under another key
            if not is_sharded(t) and t.shape == new.shape and t.dtype == new.dtype and torch.equal(t.cpu(), new):
                continue  # the load does not change it
            old[k] = t
            kept.add(id(t))
        journal.keep(old)
        result = model.load_state_dict(shard_like(batch, own), strict=False)
        if result.unexpected_keys:  # pragma: no cover - planned
            raise CheckpointError(f"{r.path}: the model's keys changed while loading.")
        done.update(batch)
        batch.clear()

    try:
        size, h = 0, hashlib.sha256(t.header.raw)
        for src, tensor in iter_data(r.fs, r.weights_fd, t.header, where, h):
            for k in keys.get(src, ()):
                batch[k] = tensor
            size += tensor.nbytes
            if size >= _BATCH_BYTES:
                flush()
                size = 0
        flush()
        _check_hash(r, WEIGHTS, None, h.hexdigest(), len(t.header.raw) + t.header.data_size)
        if done != set(r.weights):  # pragma: no cover - planned
            raise CheckpointError(f"{r.path}: the model's keys changed while loading.")
    except BaseException:
        try:
            journal.restore(model)  # here, while the journal is open; the transaction's undo then finds it empty
        finally:
            journal.records, journal.memory = [], {}
        raise
    finally:
        journal.close()


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
    check_base: bool = True,
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
    scheduler, random states and generators are left exactly as they were. The weights are then read a second
    time, a batch at a time, into the model (their hash checked again): a load holds the model, the values of
    the tensors it overwrites (to put them back on failure: in memory up to 256 MiB, beyond that in an unnamed
    temporary file under ``TMPDIR``) and one batch, never a second copy of the file.

    An adapter-sized folder (``save(..., base_weights=False)``) holds no base weights: ``model`` must already
    hold them (``from_pretrained``), and their fingerprint must match the saved one (every base byte is hashed,
    about 0.4 s per 0.5 GB), else a CheckpointError names the tensors that differ. They keep their values;
    everything else is loaded from the folder.

    Args:
        path: a folder written by :func:`save`.
        model: the freshly built base model (or one already holding the saved structure and settings).
        controller: a :class:`~torch_dendrites.GrowthController` to restore too.
        check_base: for an adapter-sized folder, compare the model's base weights with the saved fingerprint
            (their names, shapes and dtypes are always checked). Pass False only where the right base weights
            are loaded afterwards (a framework loading its own checkpoint after the structure is re-applied).
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
    if not isinstance(check_base, bool):
        raise ConfigError(f"check_base must be True or False, got {check_base!r}.")
    if _on_meta(model.state_dict().values()):
        raise CheckpointError("the model has tensors on the meta device; materialize it (model.to_empty) first.")
    wanted = optimizer is not None or scheduler is not None or rng or bool(generators)
    targs = (optimizer, scheduler, rng, generators) if wanted else None
    r = io.retrying(lambda: _read_folder(path, model, controller, targs, check_base))
    # The tensors the model holds before the load: the only ones whose values must be kept for a rollback
    # (a tensor the load creates, a new dendrite, goes with the rollback of the structure).
    before = list(model.state_dict(keep_vars=True).values())  # held, so that no new tensor can reuse an id
    existing = {id(t) for t in before}
    tx = _Transaction(
        [model] + ([controller.model] if isinstance(getattr(controller, "model", None), nn.Module) else [])
    )
    try:
        _apply_structure(model, r, tx)
        if controller is not None:
            _apply_controller(controller, r.controller, r, tx, model)
        if r.training is not None:
            r.training.apply(r.files[TRAINING_WEIGHTS].data, tx.add)
        # The weights go last, read from the file a second time (see the module docstring). An adapter-sized
        # folder leaves out exactly the base tensors (checked while planning): they keep theirs.
        _load_weights(model, r, tx, existing)
    except BaseException as exc:
        tx.rollback()
        if isinstance(exc, Exception):
            raise _failed(r.path, exc) from (None if isinstance(exc, CheckpointError) else exc)
        raise
    finally:
        r.close()
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
