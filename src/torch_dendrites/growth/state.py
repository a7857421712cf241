"""The controller's saved state: its layout, validation of every field, and migrations from older versions.

``GrowthController.state_dict()`` is a JSON-able dict (plus ``best_state``, the best weights, a dict of
tensors) laid out as::

    {"version": 2, "config": {...}, "policy": {PolicyState fields}, "best_counts": {layer: int},
     "best_extras": {name: float}, "history": [row, ...], "architectures": {"k": {...}},
     "candidate_phase": {"trainable_before": [...], "norm_momenta": {...}}, "best_state": {...} | None}

:func:`validate` checks every field's type and range (and the fields' agreement with each other) without
touching anything; :func:`migrate` turns a state written by an older version into the current layout. A state
from a newer version (a higher ``version`` or unknown keys) is refused.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional

from ..errors import StateError
from .policy import Phase, PolicyState, beats

__all__ = ["STATE_VERSION", "migrate", "validate"]

STATE_VERSION = 2
TOP_KEYS = (
    "version",
    "config",
    "policy",
    "best_counts",
    "best_extras",
    "history",
    "architectures",
    "candidate_phase",
    "best_state",
)
_V1_KEYS = (
    "epoch", "smoothed", "best_score", "best_epoch", "best_extras", "best_counts", "since_best", "phase_start",
    "phase_grown", "phase_improved", "tries", "growths", "done", "history", "phase", "last_phase_len", "cand_start",
    "cand_since", "cand_best", "trainable_before", "norm_momenta", "architectures", "config", "version", "best_state",
)  # fmt: skip
_MAX_INT = 2**53  # JSON integers beyond this are not exact in most readers; no count comes near it


def _bad(what: str) -> StateError:
    return StateError(f"controller state: {what}; pass a dict from GrowthController.state_dict().")


def _int(where: str, v: Any, lo: int = 0, hi: int = _MAX_INT) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _bad(f"{where}={v!r} is not an int in [{lo}, {hi}]")
    return v


def _num(where: str, v: Any, none: bool = True) -> Optional[float]:
    if v is None and none:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _bad(f"{where}={v!r} is not a finite number" + (" or None" if none else ""))
    return float(v)


def _bool(where: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise _bad(f"{where}={v!r} is not a bool")
    return v


def _dict(where: str, v: Any) -> dict:
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        raise _bad(f"{where} is not a mapping with string keys")
    return v


def policy_state(d: Any) -> PolicyState:
    """A validated :class:`PolicyState` from its dict form."""
    d = _dict("policy", d)
    names = PolicyState.field_names()
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise StateError(
            f"controller state: policy fields {unknown} are unknown to this version of torch-dendrites (written "
            "by a newer one?); upgrade torch-dendrites."
        )
    missing = sorted(set(names) - set(d))
    if missing:
        raise _bad(f"policy fields {missing} are missing")
    epoch = _int("policy.epoch", d["epoch"])
    phase = d["phase"]
    if phase not in [p.value for p in Phase]:
        raise _bad(f"policy.phase={phase!r} is not one of {[p.value for p in Phase]}")
    dendrites = _int("policy.dendrites", d["dendrites"])
    best_epoch = d["best_epoch"]
    if best_epoch is not None:
        _int("policy.best_epoch", best_epoch, 1, epoch)
    for name in ("smoothed", "best", "phase_best", "pre_growth_best"):
        _num(f"policy.{name}", d[name])
    if (d["best"] is None) != (best_epoch is None) or (epoch > 0) != (d["smoothed"] is not None):
        raise _bad("policy.best, best_epoch and smoothed disagree with policy.epoch")
    cand_best = _dict("policy.cand_best", d["cand_best"])
    for k, v in cand_best.items():
        _num(f"policy.cand_best[{k!r}]", v, none=False)
    state = PolicyState(
        epoch=epoch,
        smoothed=d["smoothed"],
        best=d["best"],
        best_epoch=best_epoch,
        best_dendrites=_int("policy.best_dendrites", d["best_dendrites"], 0, dendrites),
        dendrites=dendrites,
        phase=Phase(phase),
        phase_start=_int("policy.phase_start", d["phase_start"], 0, epoch),
        phase_best=d["phase_best"],
        phase_since_best=_int("policy.phase_since_best", d["phase_since_best"], 0, epoch),
        trial=_bool("policy.trial", d["trial"]),
        pre_growth_best=d["pre_growth_best"],
        tries=_int("policy.tries", d["tries"]),
        growths=_int("policy.growths", d["growths"]),
        done=_bool("policy.done", d["done"]),
        last_phase_len=_int("policy.last_phase_len", d["last_phase_len"], 0, epoch),
        cand_start=_int("policy.cand_start", d["cand_start"], 0, epoch),
        cand_since=_int("policy.cand_since", d["cand_since"], 0, epoch),
        cand_best={k: float(v) for k, v in cand_best.items()},
    )
    return state


def validate(state: Any) -> PolicyState:
    """Check every field of a (current-version) controller state; returns its policy state.

    Raises:
        StateError: naming the first field that is missing, of the wrong type or out of range.
    """
    state = _dict("state", state)
    version = state.get("version")
    if version != STATE_VERSION:
        raise _bad(f"version={version!r} is not {STATE_VERSION} (call migrate() first)")
    unknown = sorted(set(state) - set(TOP_KEYS))
    if unknown:
        raise StateError(
            f"controller state has fields {unknown} unknown to this version of torch-dendrites (written by a newer "
            "one?); upgrade torch-dendrites."
        )
    missing = sorted(set(TOP_KEYS) - set(state))
    if missing:
        raise _bad(f"fields {missing} are missing")
    policy = policy_state(state["policy"])
    for k, v in _dict("best_counts", state["best_counts"]).items():
        _int(f"best_counts[{k!r}]", v, 0, policy.best_dendrites)
    for k, v in _dict("best_extras", state["best_extras"]).items():
        _num(f"best_extras[{k!r}]", v, none=False)
    history = state["history"]
    if not isinstance(history, list) or len(history) != policy.epoch:
        raise _bad(f"history is not a list of {policy.epoch} rows (one per epoch)")
    for i, row in enumerate(history):
        for k, v in _dict(f"history[{i}]", row).items():
            if not (v is None or isinstance(v, (bool, int, str)) or (isinstance(v, float) and math.isfinite(v))):
                raise _bad(f"history[{i}][{k!r}]={v!r} is not a number, string or None")
    for k, a in _dict("architectures", state["architectures"]).items():
        if not k.isdigit():
            raise _bad(f"architectures key {k!r} is not a dendrite count")
        a = _dict(f"architectures[{k}]", a)
        for name in ("parameters", "epochs"):
            _int(f"architectures[{k}].{name}", a.get(name))
        _num(f"architectures[{k}].best_score", a.get("best_score"))
        if a.get("best_epoch") is not None:
            _int(f"architectures[{k}].best_epoch", a["best_epoch"], 1, policy.epoch)
        for n, v in _dict(f"architectures[{k}].extras", a.get("extras")).items():
            _num(f"architectures[{k}].extras[{n!r}]", v, none=False)
    phase = _dict("candidate_phase", state["candidate_phase"])
    before = phase.get("trainable_before")
    if not isinstance(before, list) or not all(isinstance(n, str) for n in before):
        raise _bad("candidate_phase.trainable_before is not a list of parameter names")
    for k, v in _dict("candidate_phase.norm_momenta", phase.get("norm_momenta")).items():
        _num(f"candidate_phase.norm_momenta[{k!r}]", v)
    if (policy.phase == Phase.CANDIDATE) != bool(before):
        raise _bad("candidate_phase disagrees with policy.phase")
    best_state = state["best_state"]
    if best_state is not None and not isinstance(best_state, Mapping):
        raise _bad("best_state is neither None nor a mapping of tensors")
    if (best_state is None) != (policy.best is None):
        raise _bad("best_state is missing for a run that has a best score (or present without one)")
    return policy


def _replay_phase(rows, cfg: Mapping[str, Any]):
    """The best smoothed score of ``rows`` (one neuron phase) and the epochs since it, under ``cfg``'s rule."""
    best, since = None, 0
    for row in rows:
        s = row["smoothed"]
        if beats(s, best, cfg["maximize"], cfg["improvement_rel"], cfg["improvement_abs"]):
            best, since = s, 0
        else:
            since += 1
    return best, since


def migrate(state: Any, dendrites_now: int) -> Dict[str, Any]:
    """A state of any version this library reads, in the current layout (a copy; the input is not changed).

    Args:
        state: a controller state dict (version 1 or 2).
        dendrites_now: the dendrites per neuron of the model the state is loaded into (version 1 did not
            record it).

    Raises:
        StateError: the version is unknown (newer) or the state is malformed.
    """
    state = _dict("state", state)
    version = state.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise _bad(f"version={version!r} is not a version number")
    if version > STATE_VERSION:
        raise StateError(
            f"controller state version {version} is newer than this library reads ({STATE_VERSION}); upgrade "
            "torch-dendrites."
        )
    if version == STATE_VERSION:
        return dict(state)
    # Version 1 (torch-dendrites 0.1.0): flat fields; the trial was "no new global best within patience".
    unknown = sorted(set(state) - set(_V1_KEYS))
    missing = sorted(set(_V1_KEYS) - set(state))
    if unknown or missing:
        raise _bad(f"version 1 fields unknown {unknown} / missing {missing}")
    history = state["history"]
    cfg = _dict("config", state["config"])
    if not isinstance(history, list) or not all(isinstance(r, dict) and "smoothed" in r for r in history):
        raise _bad("history is not a list of rows")
    for k in ("maximize", "improvement_rel", "improvement_abs"):
        if k not in cfg:
            raise _bad(f"config lacks {k!r}")
    epoch, start = _int("epoch", state["epoch"]), _int("phase_start", state["phase_start"])
    trial = bool(state["phase_grown"])
    in_phase = [r for r in history if r.get("epoch", 0) > start and r.get("phase") == "neuron"]
    phase_best, since = _replay_phase(in_phase, cfg)
    if not trial:
        phase_best, since = state["best_score"], _int("since_best", state["since_best"])
    pre = history[start - 1].get("best") if trial and 0 < start <= len(history) else None
    best_counts = _dict("best_counts", state["best_counts"])
    policy = PolicyState(
        epoch=epoch,
        smoothed=state["smoothed"],
        best=state["best_score"],
        best_epoch=state["best_epoch"],
        best_dendrites=max(best_counts.values(), default=0),
        dendrites=dendrites_now,
        phase=Phase(state["phase"]) if state["phase"] in ("neuron", "candidate") else state["phase"],
        phase_start=start,
        phase_best=phase_best,
        phase_since_best=since,
        trial=trial,
        pre_growth_best=pre,
        tries=state["tries"],
        growths=state["growths"],
        done=state["done"],
        last_phase_len=state["last_phase_len"],
        cand_start=state["cand_start"],
        cand_since=state["cand_since"],
        cand_best=state["cand_best"],
    )
    d = policy.to_dict() if isinstance(policy.phase, Phase) else {**policy.__dict__}
    return {
        "version": STATE_VERSION,
        "config": cfg,
        "policy": d,
        "best_counts": best_counts,
        "best_extras": state["best_extras"],
        "history": history,
        "architectures": state["architectures"],
        "candidate_phase": {"trainable_before": state["trainable_before"], "norm_momenta": state["norm_momenta"]},
        "best_state": state["best_state"],
    }
