"""The training-phase state machine: :class:`GrowthController`.

Call ``controller.step(val_score, test=..., train=...)`` once per epoch after validation. It keeps the best
weights, grows dendrites when the model stops improving, gives each new set a fair trial (judged at the end
of its own phase, see :mod:`torch_dendrites.growth.policy`), rolls back and retries sets that fail it, and
says when to stop. All of its state is in ``state_dict()``.

The controller only connects four parts: the :class:`~torch_dendrites.growth.policy.GrowthPolicy` decides
(scores in, decision out, no torch), the :class:`~torch_dendrites.growth.actuator.ModelActuator` acts on the
model, :mod:`~torch_dendrites.growth.sinks` record, and
:class:`~torch_dendrites.growth.checkpoints.RunCheckpoints` saves and resumes whole runs.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from .. import distributed
from ..config import GrowthConfig
from ..correlation import candidates_of, holds_candidates
from ..errors import ConfigError, ScoreError, StateError, TargetError
from ..surgery import dendritic_layers
from . import state as state_io
from .actuator import ModelActuator, Snapshot
from .checkpoints import Resumed, RunCheckpoints
from .policy import Decision, Event, GrowthPolicy, Phase, PolicyState
from .sinks import BASE_COLUMNS, BestCheckpointSink, FigureSink, HistorySink, Sink, WriterSink

__all__ = ["GrowthController", "Resumed", "StepResult"]


@dataclass(frozen=True)
class StepResult:
    """What one :meth:`GrowthController.step` decided.

    Attributes:
        improved: this epoch set a new best (smoothed) validation score.
        restructured: the model's parameters changed (dendrites added or removed, best weights restored, a
            candidate phase began or ended): rebuild the optimizer (and scheduler) before the next epoch.
        done: stop training; the model holds the final best weights.
        epoch: epochs stepped so far (1-based).
        score: the validation score passed in (the mean over ranks in a multi-process run).
        best_score: the best smoothed validation score so far.
        num_dendrites: dendrites per neuron after this step.
        parameters: model parameters after this step.
        event: ``""``, ``"grow"`` (a set was added, or installed in correlation mode), ``"retry"`` (the set on
            trial failed: rolled back, a fresh one added), ``"candidates"`` (correlation: a candidate phase
            began) or ``"done"``.
        kept: on the step that ended a dendrite set's trial, whether the set was kept; otherwise None.
    """

    improved: bool
    restructured: bool
    done: bool
    epoch: int
    score: float
    best_score: float
    num_dendrites: int
    parameters: int
    event: str = ""
    kept: Optional[bool] = None


def _as_score(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ScoreError(f"{name} is a tensor of shape {tuple(value.shape)}; pass a single number.")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ScoreError(f"{name}={value!r} is not a number; pass a float such as validation accuracy.")
    value = float(value)
    if not math.isfinite(value):
        raise ScoreError(
            f"{name}={value!r} is not finite; the controller's state was left unchanged. Check the training "
            "for divergence (lower the learning rate) before stepping again."
        )
    return value


def _dendrite_params(model: nn.Module) -> List[nn.Parameter]:
    return [p for layer in dendritic_layers(model).values() for p in layer.dendrite_parameters()]


def _has_dtensor(model: nn.Module) -> bool:
    return any(distributed.is_sharded(p) for p in model.parameters())


class GrowthController:
    """Grows dendrites when validation stops improving, and keeps the best model.

    Args:
        model: a model prepared with :func:`torch_dendrites.add_dendrites` (a plain model is accepted only
            with ``mode="never"``, the baseline arm).
        config: a :class:`~torch_dendrites.GrowthConfig`.
        out_dir: if given, ``history.csv``, ``architectures.csv``, ``growth.png`` and the best weights
            (``best/``) are written there.
        writer: optional TensorBoard ``SummaryWriter`` (anything with ``add_scalar(tag, value, step)``):
            each step logs ``dendrites/score``, ``dendrites/smoothed``, ``dendrites/best``,
            ``dendrites/count``, ``dendrites/parameters`` and every extra score, and growth events as
            text where the writer has ``add_text``. Only rank 0 writes.
        sinks: more :class:`~torch_dendrites.growth.sinks.Sink` objects to call at every step.

    Example:
        >>> import torch, torch_dendrites as td
        >>> net = td.add_dendrites(torch.nn.Sequential(torch.nn.Linear(2, 2)))
        >>> ctl = td.GrowthController(net, td.GrowthConfig(mode="plateau", patience=1, max_dendrites=1))
        >>> ctl.step(0.5).improved
        True
        >>> r = ctl.step(0.5)  # no improvement for `patience` epochs: restore best, grow
        >>> r.restructured, r.num_dendrites, r.event
        (True, 1, 'grow')
    """

    def __init__(
        self,
        model: nn.Module,
        config: Optional[GrowthConfig] = None,
        out_dir: Union[str, Path, None] = None,
        writer: Any = None,
        sinks: Sequence[Sink] = (),
    ):
        cfg = GrowthConfig() if config is None else config
        if not isinstance(cfg, GrowthConfig):
            raise ConfigError(f"config must be a torch_dendrites.GrowthConfig, got {type(cfg).__name__}.")
        if writer is not None and not callable(getattr(writer, "add_scalar", None)):
            raise ConfigError(
                f"writer={writer!r} has no add_scalar(tag, value, step); pass a "
                "torch.utils.tensorboard.SummaryWriter (or anything with that method)."
            )
        bad_sinks = [s for s in sinks if not isinstance(s, Sink)]
        if bad_sinks:
            raise ConfigError(f"sinks holds {bad_sinks[0]!r}; pass torch_dendrites.growth.sinks.Sink instances.")
        if not isinstance(model, nn.Module):
            raise TargetError(f"model must be an nn.Module, got {type(model).__name__}.")
        layers = dendritic_layers(model)
        if cfg.mode != "never" and not layers:
            raise TargetError(
                f"GrowthConfig(mode={cfg.mode!r}) needs a model with dendritic layers; call td.add_dendrites(model) "
                "first (or use mode='never' for a baseline without dendrites)."
            )
        if cfg.mode != "never" and any(distributed.is_sharded(p) for p in _dendrite_params(model)):
            raise StateError(
                "this model's dendrite parameters were sharded (fully_shard or tensor parallelism): FSDP's "
                "parameter groups are fixed, so they cannot grow or shrink. Shard with td.integrations."
                "distributed.shard_dendritic(model), which shards the base layers and keeps the dendrites "
                "replicated, or shard a model whose structure is final (mode='never')."
            )
        if cfg.dendrite_training == "correlation":
            unable = sorted({la.dendrite_type for la in layers.values() if not holds_candidates(la.dendrites)})
            if unable:
                raise ConfigError(
                    f"dendrite_training='correlation' needs dendrites that can hold candidates; dendrite_type "
                    f"{unable} cannot. Use DendriteConfig(dendrite_type='cascade') or dendrite_training='gd'."
                )
        self.config = cfg
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.writer = writer
        # In a multi-process run only rank 0 writes; every rank grows from the same seed.
        self.writes_files = distributed.rank() == 0
        self.actuator = ModelActuator(
            model,
            seed=distributed.shared_seed(cfg.seed),
            candidate_pool=cfg.candidate_pool,
            candidate_init_scale=cfg.candidate_init_scale,
            correlation_warning=cfg.correlation_warning,
            freeze_earlier=cfg.freeze_earlier and cfg.dendrite_training == "gd",
        )
        # A model may come with sets grown by hand: they count as the starting architecture.
        k = self.actuator.num_dendrites
        self.policy = GrowthPolicy(cfg, PolicyState(dendrites=k, best_dendrites=k))
        self.checkpoints = RunCheckpoints(self)
        self.sinks: List[Sink] = []
        if self.out_dir is not None and self.writes_files:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.sinks += [HistorySink(self.out_dir), FigureSink(self.out_dir)]
        if self.out_dir is not None and (self.writes_files or _has_dtensor(model)):
            # Under FSDP2 every rank takes part in gathering the shards of best/; rank 0 writes.
            self.sinks.append(BestCheckpointSink(self.out_dir))
        if writer is not None and self.writes_files:
            self.sinks.append(WriterSink(writer))
        self.sinks += list(sinks)
        self.best: Optional[Snapshot] = None
        self.best_extras: Dict[str, float] = {}
        self.history: List[Dict[str, Any]] = []
        self.architectures: Dict[int, Dict[str, Any]] = {}

    @property
    def model(self) -> nn.Module:
        """The model this controller grows (the actuator's)."""
        return self.actuator.model

    @model.setter
    def model(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TargetError(f"model must be an nn.Module, got {type(model).__name__}.")
        # A new actuator (not a changed one), so that undoing a failed load is putting the old one back.
        old = self.actuator
        self.actuator = ModelActuator(
            model, old.seed, old.candidate_pool, old.candidate_init_scale, old.correlation_warning, old.freeze_earlier
        )

    # ----------------------------------------------------------------- read-only views of the state
    @property
    def state(self):
        """The policy's state (:class:`~torch_dendrites.growth.policy.PolicyState`)."""
        return self.policy.state

    @property
    def epoch(self) -> int:
        return self.policy.state.epoch

    @property
    def done(self) -> bool:
        return self.policy.state.done

    @property
    def phase(self) -> str:
        return self.policy.state.phase.value

    @property
    def cand_start(self) -> int:
        return self.policy.state.cand_start

    @property
    def smoothed(self) -> Optional[float]:
        return self.policy.state.smoothed

    @property
    def best_score(self) -> Optional[float]:
        return self.policy.state.best

    @property
    def best_epoch(self) -> Optional[int]:
        return self.policy.state.best_epoch

    @property
    def best_counts(self) -> Dict[str, int]:
        return {} if self.best is None else dict(self.best.counts)

    @property
    def best_state(self) -> Optional[Dict[str, torch.Tensor]]:
        """The best epoch's weights (the tensors training can change; see ``Snapshot``), on the CPU."""
        return None if self.best is None else self.best.tensors

    @property
    def num_dendrites(self) -> int:
        """Dendrites per neuron in the model now (the most of any wrapped layer)."""
        return self.actuator.num_dendrites

    # ----------------------------------------------------------------- state
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue exactly where this controller stopped (best weights included)."""
        return {
            "version": state_io.STATE_VERSION,
            "config": self.config.to_dict(),
            "policy": self.policy.state.to_dict(),
            "best_counts": self.best_counts,
            "best_extras": dict(self.best_extras),
            "history": [dict(r) for r in self.history],
            "architectures": {str(k): {**v, "extras": dict(v["extras"])} for k, v in self.architectures.items()},
            "candidate_phase": self.actuator.phase.state_dict(),
            "best_state": None if self.best is None else dict(self.best.tensors),
        }

    def validate_state(self, state: Any, model: Optional[nn.Module] = None) -> Dict[str, Any]:
        """Check a :meth:`state_dict` (of this or an older version) against a model, changing nothing.

        Args:
            state: the state to check.
            model: the model it will drive (default: this controller's), already holding the saved structure.

        Returns:
            The state in the current layout.

        Raises:
            StateError: a field is missing, malformed or out of range, or the state does not fit the model.
        """
        model = self.model if model is None else model
        layers = dendritic_layers(model)
        counts = {n: layer.num_dendrites for n, layer in layers.items()}
        k_now = max(counts.values(), default=0)
        current = state_io.migrate(state, k_now)
        policy = state_io.validate(current)
        unknown = sorted(set(current["best_counts"]) - set(counts))
        if unknown:
            raise StateError(f"controller state: best_counts names layers {unknown} that this model does not wrap.")
        over = {n: k for n, k in current["best_counts"].items() if k > counts[n]}
        if over:
            raise StateError(f"controller state: best_counts {over} exceed the model's dendrites {counts}.")
        if policy.dendrites != k_now and not policy.done:
            raise StateError(
                f"controller state: {policy.dendrites} dendrite sets, but the model has {k_now}; load the model "
                "and the controller together with td.load(path, model, controller)."
            )
        phase = current["candidate_phase"]
        params = dict(model.named_parameters())
        norms = {n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._NormBase)}
        strangers = [n for n in phase["trainable_before"] if n not in params]
        strangers += [n for n in phase["norm_momenta"] if n not in norms]
        if strangers:
            raise StateError(f"controller state: candidate_phase names {strangers[:4]}, which the model does not have.")
        if policy.phase == Phase.CANDIDATE and not any(len(candidates_of(la.dendrites)) for la in layers.values()):
            raise StateError(
                "this controller state is in a candidate phase but the model has no candidates; load the model "
                "and the controller together with td.load(path, model, controller)."
            )
        best = current["best_state"]
        if best is not None:
            model_state = model.state_dict()
            for k, v in best.items():
                if not isinstance(v, torch.Tensor):
                    raise StateError(f"controller state: best_state[{k!r}] is not a tensor.")
                ref = model_state.get(k)
                if ref is None or tuple(v.shape) != tuple(ref.shape) or v.dtype != ref.dtype:
                    got = (
                        "no such entry"
                        if ref is None
                        else f"{tuple(v.shape)} {v.dtype} vs {tuple(ref.shape)} {ref.dtype}"
                    )
                    raise StateError(f"controller state: best_state[{k!r}] does not fit the model ({got}).")
        return current

    # Kept for callers of the previous version's name.
    _check_state = validate_state

    def load_state_dict(self, state: Dict[str, Any], model: Optional[nn.Module] = None) -> None:
        """Restore a :meth:`state_dict`; the model must already have the saved dendrite structure.

        Args:
            state: from :meth:`state_dict` (of this or an older version).
            model: drive this model from now on (default: the controller's own), e.g. a freshly loaded one.

        Raises:
            StateError: the state is malformed or does not fit the model (nothing is changed).
        """
        current = self.validate_state(state, model)
        if model is not None:
            self.model = model
        policy = state_io.policy_state(current["policy"])
        best = None
        if current["best_state"] is not None:
            params = dict(self.model.named_parameters(remove_duplicate=False))
            frozen = {k: p._version for k, p in params.items() if k not in current["best_state"]}
            best = Snapshot({n: int(k) for n, k in current["best_counts"].items()}, dict(current["best_state"]), frozen)
        self.policy = GrowthPolicy(self.config, policy)
        self.best = best
        self.best_extras = dict(current["best_extras"])
        self.history = [dict(r) for r in current["history"]]
        self.architectures = {int(k): {**v, "extras": dict(v["extras"])} for k, v in current["architectures"].items()}
        if policy.phase == Phase.CANDIDATE:
            self.actuator.phase.resume(current["candidate_phase"])
        self.actuator.track_frozen_units(now=False)
        for s in self.sinks:  # fresh writers rewrite their files from the restored history
            if isinstance(s, HistorySink):
                s._written_rows, s._columns = 0, []

    # ----------------------------------------------------------------- the step
    def step(self, score: Any, **extra_scores: Any) -> StepResult:
        """Record one epoch's validation score (and optional extra scores, e.g. ``test=``, ``train=``).

        Returns:
            A :class:`StepResult`. If ``restructured``, rebuild the optimizer; if ``done``, stop.

        Raises:
            ScoreError: a score is not a finite number, or an extra score takes a name of the history's
                own columns (nothing is changed).
            StateError: the controller is already done, the replicas of a multi-process run differ, or an
                optimizer moved weights the controller froze (nothing is changed).
        """
        if self.done:
            raise StateError("the controller is done (training finished); build a new controller to train again.")
        score = _as_score("score", score)
        reserved = sorted(k for k in extra_scores if k in BASE_COLUMNS or k.startswith("corr:"))
        if reserved:
            raise ScoreError(
                f"extra scores {reserved} would overwrite the history's own columns {BASE_COLUMNS}; rename them "
                "(e.g. val_loss=...)."
            )
        extras = {k: _as_score(k, v) for k, v in extra_scores.items()}
        if distributed.is_distributed():
            score, extras = self._agree_across_ranks(score, extras)
        self.actuator.check_frozen()
        if self.actuator.unchanged_new_parameters():
            warnings.warn(
                "the dendrite parameters added at the last restructured step received gradients but did not change: "
                "the optimizer does not hold them. Rebuild the optimizer (or call td.sync_optimizer(opt, model)) "
                "whenever step() returns restructured=True; otherwise the new dendrites never train.",
                stacklevel=2,
            )
        in_candidates = self.policy.state.phase == Phase.CANDIDATE
        cand_scores = self.actuator.candidate_scores() if in_candidates else None
        decision = self.policy.decide(score, cand_scores)
        # Everything that may fail happens before any state changes: the snapshot, best/ on disk, building
        # the new dendrites. Then the model changes, then the controller adopts the decision.
        best = self.actuator.snapshot() if decision.improved else self.best
        if decision.improved:
            for s in self.sinks:
                s.on_best(self)
        built = self.actuator.prepare(decision.actions, best, decision.state.growths - 1)
        k_before, params_before = self.actuator.num_dendrites, self.actuator.parameters_now()
        notes = self.actuator.apply(decision.actions, best, built)
        if in_candidates and decision.event == Event.NONE:
            self.actuator.phase.reset_epoch()
        self.policy.commit(decision)
        self.best = best
        if decision.improved:
            self.best_extras = dict(extras)
        row = self._record(decision, score, extras, cand_scores, k_before, params_before)
        for note in notes:
            warnings.warn(note, stacklevel=2)
        for s in self.sinks:
            s.on_step(self, row, decision.event.value)
        return StepResult(
            improved=decision.improved,
            restructured=decision.restructured,
            done=self.done,
            epoch=self.epoch,
            score=score,
            best_score=self.best_score,
            num_dendrites=self.num_dendrites,
            parameters=self.actuator.parameters_now(),
            event=decision.event.value,
            kept=decision.kept,
        )

    def _agree_across_ranks(self, score: float, extras: Dict[str, float]):
        # Ranks may see different local scores: decide on their mean, identically everywhere.
        keys = sorted(extras)
        reduced = distributed.all_reduce_mean([score] + [extras[k] for k in keys])
        if _has_dtensor(self.model):
            if not distributed.replicas_agree(_dendrite_params(self.model)):
                # FSDP2: the replicated dendrites drift apart if their gradients are not averaged.
                raise StateError(
                    "the dendrite weights differ between ranks; call td.integrations.distributed."
                    "sync_dendrite_grads(model) after every loss.backward() (FSDP does not average them). "
                    "The controller's state was left unchanged."
                )
        else:
            # DDP and the framework integrations: replicas that drifted apart are never trained on silently.
            distributed.check_replicas(self.model, "GrowthController.step; the controller's state was left unchanged")
        if self.policy.state.phase == Phase.CANDIDATE:
            for layer in dendritic_layers(self.model).values():
                st = layer.dendrites.correlation
                distributed.all_reduce_sum_([st.n, st.sum_s, st.sum_ss, st.sum_se, st.sum_e, st.sum_ee])
        return reduced[0], dict(zip(keys, reduced[1:]))

    def _record(self, decision: Decision, score, extras, cand_scores, k_now, params_now) -> Dict[str, Any]:
        """The history row and the per-architecture table for the step just decided."""
        st = decision.state
        in_candidates = cand_scores is not None
        arch = self.architectures.setdefault(
            k_now, {"parameters": params_now, "best_score": None, "best_epoch": None, "extras": {}, "epochs": 0}
        )
        arch["epochs"] += 1
        arch["parameters"] = params_now
        better = arch["best_score"] is None or (
            st.smoothed > arch["best_score"] if self.config.maximize else st.smoothed < arch["best_score"]
        )
        if not in_candidates and better:
            arch.update(best_score=st.smoothed, best_epoch=st.epoch, extras=dict(extras))
        row = {
            "epoch": st.epoch,
            "phase": "candidate" if in_candidates else "neuron",
            "dendrites": k_now,
            "parameters": params_now,
            "score": score,
            "smoothed": st.smoothed,
            "best": st.best,
            "improved": int(decision.improved),
            "event": decision.event.value,
            "kept": "" if decision.kept is None else int(decision.kept),
            "snapshot_bytes": 0 if self.best is None else self.best.nbytes,
            **extras,
            **({f"corr:{n}": v for n, v in cand_scores.items()} if in_candidates else {}),
        }
        self.history.append(row)
        return row

    # ----------------------------------------------------------------- checkpoints
    def save_latest(
        self,
        optimizer: Any = None,
        scheduler: Any = None,
        generators: Optional[Dict[str, torch.Generator]] = None,
        extra: Optional[Dict[str, Any]] = None,
    ) -> Path:
        """Write ``out_dir/latest`` atomically: model, controller, optimizer, scheduler and RNG states.

        Call it at the end of each epoch, after ``step`` (and after rebuilding the optimizer if ``step``
        said ``restructured``). Only ``best/`` and ``latest/`` are kept, whatever the run's length.

        Returns:
            The folder written.
        """
        return self.checkpoints.save_latest(optimizer, scheduler, generators, extra)

    def resume(
        self,
        make_optimizer: Optional[Any] = None,
        make_scheduler: Optional[Any] = None,
        generators: Optional[Dict[str, torch.Generator]] = None,
    ) -> Resumed:
        """Continue a run from ``out_dir/latest`` if there is one, else start fresh.

        Restores the model (dendrite structure and weights), this controller, the RNG states and the named
        ``generators``; then builds the optimizer with ``make_optimizer(model)`` (and the scheduler with
        ``make_scheduler(optimizer)``) and loads their saved states. The current ``GrowthConfig`` is kept.

        Example:
            >>> import tempfile, torch, torch_dendrites as td
            >>> out = tempfile.mkdtemp()
            >>> net = td.add_dendrites(torch.nn.Sequential(torch.nn.Linear(2, 2)))
            >>> ctl = td.GrowthController(net, td.GrowthConfig(patience=1), out_dir=out)
            >>> adam = lambda m: torch.optim.Adam(m.parameters())
            >>> r = ctl.resume(adam)  # nothing saved yet: a fresh start
            >>> r.resumed, r.epoch
            (False, 0)
            >>> _ = ctl.step(0.5)
            >>> ctl.step(0.4).restructured  # grew one dendrite set: rebuild the optimizer
            True
            >>> _ = ctl.save_latest(adam(net))
            >>> net2 = td.add_dendrites(torch.nn.Sequential(torch.nn.Linear(2, 2)))
            >>> ctl2 = td.GrowthController(net2, td.GrowthConfig(patience=1), out_dir=out)
            >>> r2 = ctl2.resume(adam)
            >>> r2.resumed, r2.epoch, net2[0].num_dendrites
            (True, 2, 1)
        """
        return self.checkpoints.resume(make_optimizer, make_scheduler, generators)

    def architecture_table(self) -> List[Dict[str, Any]]:
        """Per dendrite count: parameters, best validation, extra scores at that epoch, epochs trained."""
        rows = []
        for k in sorted(self.architectures):
            a = self.architectures[k]
            rows.append(
                {
                    "dendrites": k,
                    "parameters": a["parameters"],
                    "best_score": a["best_score"],
                    "best_epoch": a["best_epoch"],
                    "epochs": a["epochs"],
                    **a["extras"],
                }
            )
        return rows
