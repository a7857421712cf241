"""Codecs of the training state: controller, optimizer, scheduler, RNG and generator states.

Each is written through the one codec (:mod:`.codec`): a JSON document (``controller.json``,
``training.json``) whose tensors are references into the sibling safetensors file. Reading happens in two
passes: :meth:`Training.check` validates the document against the objects it will be loaded into using
only the safetensors header (shapes and dtypes), before any data is read; :meth:`Training.apply`
applies it and returns an undo. Nothing here changes anything before everything has been checked.
"""

from __future__ import annotations

import math
import random
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..distributed import is_sharded, shard_like
from ..errors import CheckpointError
from .codec import Entry, Packer, unpack

__all__ = [
    "CONTROLLER_FORMAT",
    "TRAINING_FORMAT",
    "Training",
    "encode_controller",
    "encode_training",
    "read_controller",
    "read_training",
    "references",
]

CONTROLLER_FORMAT = "torch-dendrites/controller"
TRAINING_FORMAT = "torch-dendrites/training"
_MAX_CUDA = 1024
Undo = Callable[[], None]


def references(doc: Any) -> List[str]:
    """Every tensor key referenced by a JSON document."""
    keys: List[str] = []
    unpack(doc, lambda k: keys.append(k), "")
    return keys


def _strip_refs(doc: Any, entries: Dict[str, Entry], where: str) -> Any:
    """``doc`` with tensor references replaced by their header entries (shapes and dtypes, no data)."""

    def lookup(key: str) -> Entry:
        if key not in entries:
            raise CheckpointError(f"{where} refers to the tensor {key!r}, which is not in its weights file.")
        return entries[key]

    return unpack(doc, lookup, where)


def _check_envelope(doc: Any, fmt: str, save_id: Optional[str], allowed: set, where: object) -> dict:
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise CheckpointError(f"{where} is not a {fmt} document; the file is corrupted or was replaced.")
    unknown = sorted(set(doc) - allowed - {"format", "save_id"})
    if unknown:
        raise CheckpointError(f"{where} has unknown fields {unknown[:5]}; the file was edited or is newer.")
    if doc.get("save_id") != save_id:
        raise CheckpointError(
            f"{where} belongs to another save than the recipe beside it (save ids differ); the folder mixes two "
            "copies. Load it again, or restore it from a backup."
        )
    return doc


# ---------------------------------------------------------------------- controller
def encode_controller(state: Dict[str, Any], save_id: str) -> Tuple[dict, Dict[str, torch.Tensor]]:
    packer = Packer()
    doc = {"format": CONTROLLER_FORMAT, "save_id": save_id, "state": packer.encode(state, "controller")}
    return doc, packer.tensors


def _controller_from_v1(doc: Any, where: object) -> dict:
    """Version 1 kept the best weights' keys and aliases beside the state, the tensors under the keys."""
    if not isinstance(doc, dict):
        raise CheckpointError(f"{where} is not a controller state object.")
    state = dict(doc)
    keys, aliases = state.pop("best_state_keys", []), state.pop("best_state_aliases", {})
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or not isinstance(aliases, dict):
        raise CheckpointError(f"{where} has malformed best_state entries.")
    if not all(isinstance(v, str) for v in aliases.values()):
        raise CheckpointError(f"{where} has malformed best_state aliases.")
    state["best_state"] = {k: {"__tensor__": aliases.get(k, k)} for k in keys} if keys else None
    return {"format": CONTROLLER_FORMAT, "save_id": None, "state": state}


def read_controller(doc: Any, version: int, save_id: Optional[str], where: object) -> dict:
    """The controller state document (tensor references unresolved), lifted to the current schema."""
    if version == 1:
        doc = _controller_from_v1(doc, where)
    doc = _check_envelope(doc, CONTROLLER_FORMAT, save_id, {"state"}, where)
    if not isinstance(doc.get("state"), dict):
        raise CheckpointError(f"{where} holds no controller state object.")
    return doc["state"]


def check_best(state: dict, entries: Dict[str, Entry], counts_bound: Dict[str, int], expected_at, where) -> None:
    """``best_counts`` names saved layers with counts in range, and ``best_state`` fits the model rebuilt
    at those counts: every key exists there with the same shape and dtype (a subset: frozen parameters may
    be left out). Checked from the header alone."""
    best = state.get("best_state")
    counts = state.get("best_counts", {})
    if not isinstance(counts, dict):
        raise CheckpointError(f"{where}: best_counts is not a mapping of layer paths to dendrite counts.")
    for name, k in counts.items():
        if name not in counts_bound:
            raise CheckpointError(f"{where}: best_counts names {name!r}, which is not a saved dendritic layer.")
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= counts_bound[name]:
            raise CheckpointError(
                f"{where}: best_counts[{name!r}]={k!r} is not an int in [0, {counts_bound[name]}] (the layer's saved "
                "dendrite count)."
            )
    if best is None:
        return
    if not isinstance(best, dict):
        raise CheckpointError(f"{where}: best_state is not a mapping of state-dict keys to tensors.")
    best = _strip_refs(best, entries, f"{where}: best_state")
    expected = expected_at(counts)
    unexpected = sorted(k for k in best if k not in expected)
    if unexpected:
        raise CheckpointError(
            f"{where}: best_state holds {unexpected[:4]}, which the model at best_counts {counts} does not have."
        )
    for k, e in best.items():
        if not isinstance(e, Entry):
            raise CheckpointError(f"{where}: best_state[{k!r}] is not a tensor.")
        shape, dtype = expected[k]
        if e.shape != shape or e.dtype != dtype:
            raise CheckpointError(
                f"{where}: best_state[{k!r}] is {list(e.shape)} {e.dtype}, the model at best_counts has "
                f"{list(shape)} {dtype}."
            )


# ---------------------------------------------------------------------- training: writing
def encode_training(optimizer, scheduler, rng: bool, generators, extra, save_id: str):
    """The training document and its tensors (FSDP2 optimizer states gathered whole: every rank takes part)."""
    packer = Packer()
    doc: Dict[str, Any] = {"format": TRAINING_FORMAT, "save_id": save_id}
    if optimizer is not None:
        sd = optimizer.state_dict()
        state = {
            idx: {n: (v.full_tensor() if isinstance(v, torch.Tensor) and is_sharded(v) else v) for n, v in e.items()}
            for idx, e in sd["state"].items()
        }
        doc["optimizer"] = packer.encode(
            {"class": type(optimizer).__name__, "state": state, "param_groups": sd["param_groups"]}, "optimizer"
        )
    if scheduler is not None:
        doc["scheduler"] = packer.encode(
            {"class": type(scheduler).__name__, "state": scheduler.state_dict()}, "scheduler"
        )
    if rng:
        np_state = np.random.get_state()
        doc["rng"] = packer.encode(
            {
                "torch": torch.get_rng_state(),
                "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
                "python": random.getstate(),
                "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
            },
            "rng",
        )
    if generators:
        doc["generators"] = packer.encode({name: g.get_state() for name, g in generators.items()}, "generator")
    if extra is not None:
        doc["extra"] = packer.encode(extra, "extra")
    return doc, packer.tensors


# ---------------------------------------------------------------------- training: reading
def _training_from_v1(doc: Any, where: object) -> dict:
    """Version 1 named the RNG and generator tensors implicitly (``rng.torch``, ``generator.<name>``)."""
    if not isinstance(doc, dict):
        raise CheckpointError(f"{where} is not a training-state object.")
    out = {"format": TRAINING_FORMAT, "save_id": None}
    for key in ("optimizer", "scheduler", "extra"):
        if key in doc:
            out[key] = doc[key]
    if "rng" in doc:
        r = doc["rng"]
        if not isinstance(r, dict):
            raise CheckpointError(f"{where}: rng is not an object.")
        n = r.get("cuda_devices", 0)
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= _MAX_CUDA:
            raise CheckpointError(f"{where}: rng.cuda_devices={n!r} is not a device count.")
        out["rng"] = {
            "torch": {"__tensor__": "rng.torch"},
            "cuda": [{"__tensor__": f"rng.cuda.{i}"} for i in range(n)],
            "python": r.get("python"),
            "numpy": r.get("numpy"),
        }
    if "generators" in doc:
        names = doc["generators"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise CheckpointError(f"{where}: generators is not a list of names.")
        out["generators"] = {n: {"__tensor__": f"generator.{n}"} for n in names}
    return out


def read_training(doc: Any, version: int, save_id: Optional[str], where: object) -> dict:
    if version == 1:
        doc = _training_from_v1(doc, where)
    return _check_envelope(
        doc, TRAINING_FORMAT, save_id, {"optimizer", "scheduler", "rng", "generators", "extra"}, where
    )


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def _conform(saved: Any, current: Any, where: str) -> Any:
    """``saved`` shaped like ``current`` (same kinds, same list lengths, tuples and int keys restored), or a
    CheckpointError naming the first difference."""

    def bad(what: str):
        raise CheckpointError(f"{where}: {what}; it does not fit the object it is loaded into.")

    if isinstance(current, torch.Tensor):
        if (
            not isinstance(saved, (Entry, torch.Tensor))
            or tuple(saved.shape) != tuple(current.shape)
            or saved.dtype != current.dtype
        ):
            bad(f"the saved value is not a {list(current.shape)} {current.dtype} tensor")
        return saved
    if current is None:
        if not (_scalar(saved) or (isinstance(saved, list) and all(_scalar(x) for x in saved))):
            bad("the saved value is not a plain value")
        return saved
    if isinstance(current, bool):
        if not isinstance(saved, bool):
            bad(f"{saved!r} is not a bool")
        return saved
    if isinstance(current, (int, float)):
        if isinstance(saved, bool) or not isinstance(saved, (int, float)):
            bad(f"{saved!r} is not a number")
        return saved
    if isinstance(current, str):
        if not isinstance(saved, str):
            bad(f"{saved!r} is not a string")
        return saved
    if isinstance(current, (list, tuple)):
        if not isinstance(saved, list) or len(saved) != len(current):
            bad(f"the saved value is not a list of {len(current)} entries")
        out = [_conform(s, c, f"{where}[{i}]") for i, (s, c) in enumerate(zip(saved, current))]
        return tuple(out) if isinstance(current, tuple) else out
    if isinstance(current, dict):
        if not isinstance(saved, dict):
            bad("the saved value is not a mapping")
        int_keys = bool(current) and all(isinstance(k, int) and not isinstance(k, bool) for k in current)
        out = {}
        for k, v in saved.items():
            key: Any = k
            if int_keys:
                try:
                    key = int(k)
                except ValueError:
                    bad(f"the key {k!r} is not an int")
            if key in current:
                out[key] = _conform(v, current[key], f"{where}.{k}")
            elif _scalar(v) or (isinstance(v, list) and all(_scalar(x) for x in v)):
                out[key] = v
            else:
                bad(f"the new key {k!r} holds a nested value")
        try:
            return type(current)(out)
        except TypeError:  # pragma: no cover - a mapping type without a dict constructor
            return out
    bad(f"the current value is a {type(current).__name__}, which td.save does not write")
    return None  # pragma: no cover


def _is_int(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


class Training:
    """The parts of a training document asked for, checked against the objects they go into."""

    def __init__(
        self,
        doc: dict,
        entries: Dict[str, Entry],
        where: object,
        *,
        optimizer=None,
        scheduler=None,
        rng: bool = False,
        generators=None,
    ):
        self.doc, self.where = doc, where
        self.optimizer, self.scheduler, self.rng, self.generators = optimizer, scheduler, rng, generators or {}
        refs = references(doc)
        missing = sorted(set(refs) - set(entries))
        if missing:
            raise CheckpointError(f"{where} refers to tensors {missing[:4]} that its weights file lacks.")
        extra_tensors = sorted(set(entries) - set(refs))
        if extra_tensors:
            raise CheckpointError(f"{where}: the weights file holds unreferenced tensors {extra_tensors[:4]}.")
        if optimizer is not None:
            self._check_optimizer(_strip_refs(doc.get("optimizer"), entries, f"{where}: optimizer"))
        if scheduler is not None:
            self._check_scheduler(_strip_refs(doc.get("scheduler"), entries, f"{where}: scheduler"))
        if rng:
            self._check_rng_layout(_strip_refs(doc.get("rng"), entries, f"{where}: rng"))
        saved_gens = doc.get("generators", {})
        if not isinstance(saved_gens, dict):
            raise CheckpointError(f"{where}: generators is not a mapping.")
        for name in self.generators:
            if name not in saved_gens:
                raise CheckpointError(f"{where} holds no generator {name!r}; it has {sorted(saved_gens)}.")
            e = _strip_refs(saved_gens[name], entries, f"{where}: generators.{name}")
            if not isinstance(e, Entry) or e.dtype != torch.uint8 or len(e.shape) != 1:
                raise CheckpointError(f"{where}: generators.{name} is not a generator state (a 1-D uint8 tensor).")
        extra = doc.get("extra", {})
        if not isinstance(extra, dict):
            raise CheckpointError(f"{where}: extra is not an object.")

    # ------------------------------------------------------------------ checks from the header
    def _check_optimizer(self, opt: Any) -> None:
        where, optimizer = f"{self.where}: optimizer", self.optimizer
        if not isinstance(opt, dict):
            raise CheckpointError(f"{self.where} holds no optimizer state; save with td.save(..., optimizer=opt).")
        if set(opt) != {"class", "state", "param_groups"}:
            raise CheckpointError(f"{where} has fields {sorted(opt)}, not class, state and param_groups.")
        if opt["class"] != type(optimizer).__name__:
            raise CheckpointError(
                f"{where}: the saved optimizer is a {opt['class']}, not a {type(optimizer).__name__}."
            )
        groups = self._optimizer_groups(opt)
        by_id = dict(
            zip((i for g in groups for i in g["params"]), (p for g in optimizer.param_groups for p in g["params"]))
        )
        state = opt["state"]
        if not isinstance(state, dict):
            raise CheckpointError(f"{where}.state is not a mapping.")
        for idx, entry in state.items():
            if not idx.isdigit() or len(idx) > 10 or int(idx) not in by_id:
                raise CheckpointError(
                    f"{where}.state has the entry {idx[:20]!r}, which is no parameter of the optimizer."
                )
            if not isinstance(entry, dict):
                raise CheckpointError(f"{where}.state[{idx}] is not a mapping.")
            shape = tuple(by_id[int(idx)].shape)
            for name, v in entry.items():
                if isinstance(v, Entry):
                    # the parameter's shape, a scalar (a step count), or a factored statistic (Adafactor)
                    ok = (
                        v.shape == shape
                        or math.prod(v.shape) <= 1
                        or (len(v.shape) == len(shape) and all(a in (1, b) for a, b in zip(v.shape, shape)))
                    )
                    if not ok:
                        raise CheckpointError(
                            f"{where}.state[{idx}].{name} has shape {list(v.shape)}; the parameter has {list(shape)}."
                        )
                elif not _scalar(v) and not (isinstance(v, list) and all(_scalar(x) for x in v)):
                    raise CheckpointError(f"{where}.state[{idx}].{name} is neither a tensor nor a plain value.")

    def _optimizer_groups(self, opt: dict) -> List[dict]:
        """The saved parameter groups shaped like the optimizer's (keys the saved ones lack keep their
        current values: a file written by an older torch)."""
        where, now = f"{self.where}: optimizer", self.optimizer.param_groups
        groups = opt["param_groups"]
        if not isinstance(groups, list) or len(groups) != len(now):
            n = len(groups) if isinstance(groups, list) else "no"
            raise CheckpointError(f"{where} has {n} parameter groups, the optimizer {len(now)}.")
        out, ids = [], []
        for i, (g, cur) in enumerate(zip(groups, now)):
            if not isinstance(g, dict) or not isinstance(g.get("params"), list):
                raise CheckpointError(f"{where}.param_groups[{i}] is not a parameter group.")
            params = g["params"]
            if len(params) != len(cur["params"]) or not all(_is_int(p, 0, 2**31) for p in params):
                raise CheckpointError(
                    f"{where}.param_groups[{i}] holds {len(params)} parameters, the optimizer's group "
                    f"{len(cur['params'])}; build the optimizer over the model after td.load (same structure), then "
                    "call load_training_state."
                )
            ids.extend(params)
            group = {k: v for k, v in cur.items() if k != "params"}
            for k, v in g.items():
                if k == "params":
                    continue
                if k not in cur:
                    raise CheckpointError(f"{where}.param_groups[{i}] has the key {k!r}, which the optimizer lacks.")
                group[k] = _conform(v, cur[k], f"{where}.param_groups[{i}].{k}")
            group["params"] = list(params)
            out.append(group)
        if len(set(ids)) != len(ids):
            raise CheckpointError(f"{where} lists a parameter in two places.")
        return out

    def _check_scheduler(self, sch: Any) -> None:
        where, scheduler = f"{self.where}: scheduler", self.scheduler
        if not isinstance(sch, dict) or set(sch) != {"class", "state"} or sch["class"] != type(scheduler).__name__:
            raise CheckpointError(f"{self.where} holds no {type(scheduler).__name__} state.")
        if not isinstance(sch["state"], dict):
            raise CheckpointError(f"{where}.state is not a mapping.")
        current = scheduler.state_dict()
        unknown = sorted(k for k in sch["state"] if k not in current)
        if unknown:
            raise CheckpointError(
                f"{where} sets {unknown[:5]}, which {type(scheduler).__name__}.state_dict() does not have; the file "
                "was edited or comes from another scheduler."
            )
        for k, v in sch["state"].items():
            _conform(v, current[k], f"{where}.{k}")

    def _check_rng_layout(self, r: Any) -> None:
        where = f"{self.where}: rng"
        if not isinstance(r, dict) or set(r) != {"torch", "cuda", "python", "numpy"}:
            raise CheckpointError(f"{self.where} holds no RNG state; save with td.save(..., rng=True).")
        t = r["torch"]
        if not isinstance(t, Entry) or t.dtype != torch.uint8 or len(t.shape) != 1:
            raise CheckpointError(f"{where}.torch is not a generator state (a 1-D uint8 tensor).")
        cuda = r["cuda"]
        if (
            not isinstance(cuda, list)
            or len(cuda) > _MAX_CUDA
            or not all(isinstance(c, Entry) and c.dtype == torch.uint8 and len(c.shape) == 1 for c in cuda)
        ):
            raise CheckpointError(f"{where}.cuda is not a list of generator states.")
        py, npst = r["python"], r["numpy"]
        try:
            random.Random().setstate((py[0], tuple(py[1]), py[2]))
        except (TypeError, ValueError, IndexError, KeyError, OverflowError):
            raise CheckpointError(f"{where}.python is not a random.getstate() value.") from None
        try:
            if not (isinstance(npst, list) and len(npst) == 5 and isinstance(npst[1], list)):
                raise ValueError
            np.random.RandomState().set_state((npst[0], np.asarray(npst[1], dtype=np.uint32), *npst[2:]))
        except (TypeError, ValueError, OverflowError):
            raise CheckpointError(f"{where}.numpy is not a numpy.random.get_state() value.") from None

    # ------------------------------------------------------------------ with the data
    def apply(self, tensors: Dict[str, torch.Tensor], add_undo: Callable[[Undo], None]) -> Dict[str, Any]:
        """Apply the checked state, handing each step's undo to ``add_undo``; returns the saved ``extra``."""
        doc = self.doc

        def value(part: str) -> Any:
            return unpack(doc.get(part), tensors.__getitem__, f"{self.where}: {part}")

        if self.rng:
            self._check_generator_state("rng.torch", value("rng")["torch"], torch.device("cpu"))
        gens = value("generators") if self.generators else {}
        for name, gen in self.generators.items():
            self._check_generator_state(f"generators.{name}", gens[name], gen.device)
        # Each undo is registered before its step runs: a step that fails half-way is undone too.
        if self.optimizer is not None:
            self._apply_optimizer(value("optimizer"), add_undo)
        if self.scheduler is not None:
            current = self.scheduler.state_dict()
            state = {k: _conform(v, current[k], k) for k, v in value("scheduler")["state"].items()}
            _set_scheduler(self.scheduler, state, add_undo)
        if self.rng:
            _set_rng(value("rng"), add_undo)
        for name, gen in self.generators.items():
            _set_generator(gen, gens[name], add_undo)
        return value("extra") if "extra" in doc else {}

    def _check_generator_state(self, what: str, state: torch.Tensor, device: torch.device) -> None:
        try:
            torch.Generator(device=device).set_state(state)
        except (RuntimeError, TypeError, ValueError):
            raise CheckpointError(f"{self.where}: {what} is not a state of a {device.type} generator.") from None

    def _apply_optimizer(self, opt: dict, add_undo: Callable[[Undo], None]) -> None:
        optimizer = self.optimizer
        groups = self._optimizer_groups(opt)
        params = dict(
            zip((i for g in groups for i in g["params"]), (p for g in optimizer.param_groups for p in g["params"]))
        )
        state = {}
        for idx, entry in opt["state"].items():
            p = params[int(idx)]
            state[int(idx)] = {
                n: (
                    shard_like({"v": v}, {"v": p})["v"]
                    if isinstance(v, torch.Tensor) and is_sharded(p) and v.shape == p.shape
                    else v
                )
                for n, v in entry.items()
            }
        old_state, old_groups = optimizer.state, optimizer.param_groups

        def undo():
            optimizer.state, optimizer.param_groups = old_state, old_groups

        add_undo(undo)
        try:
            optimizer.load_state_dict({"state": state, "param_groups": groups})
        except (ValueError, KeyError, RuntimeError, TypeError, IndexError) as exc:
            raise CheckpointError(f"{self.where}: the optimizer state does not fit this optimizer ({exc}).") from None


def _set_scheduler(scheduler, state: dict, add_undo: Callable[[Undo], None]) -> None:
    before = dict(scheduler.__dict__)

    def undo():
        scheduler.__dict__.clear()
        scheduler.__dict__.update(before)

    add_undo(undo)
    scheduler.load_state_dict(state)


def _set_rng(r: dict, add_undo: Callable[[Undo], None]) -> None:
    before = (
        torch.get_rng_state(),
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        random.getstate(),
        np.random.get_state(),
    )

    def undo():
        torch.set_rng_state(before[0])
        if before[1]:
            torch.cuda.set_rng_state_all(before[1])
        random.setstate(before[2])
        np.random.set_state(before[3])

    add_undo(undo)
    torch.set_rng_state(r["torch"])
    if torch.cuda.is_available():
        for i, st in enumerate(r["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(st, i)
    py, npst = r["python"], r["numpy"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state((npst[0], np.asarray(npst[1], dtype=np.uint32), *npst[2:]))


def _set_generator(gen: torch.Generator, state: torch.Tensor, add_undo: Callable[[Undo], None]) -> None:
    before = gen.get_state()
    add_undo(lambda: gen.set_state(before))
    gen.set_state(state)
