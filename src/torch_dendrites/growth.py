"""The training-phase state machine: :class:`GrowthController`.

Call ``controller.step(val_score, test=..., train=...)`` once per epoch after validation. It keeps the best
weights, decides when to grow (plateau, fixed, every epoch, never), rolls back and retries dendrite sets
that never beat the best, and says when to stop. All of its state is in ``state_dict()``.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from torch import nn

from .config import GrowthConfig
from .errors import ConfigError, ScoreError, StateError, TargetError
from .surgery import dendritic_layers, set_dendrite_counts

__all__ = ["GrowthController", "Resumed", "StepResult"]

_STATE_VERSION = 1


@dataclass(frozen=True)
class StepResult:
    """What one :meth:`GrowthController.step` decided.

    Attributes:
        improved: this epoch set a new best (smoothed) validation score.
        restructured: the model's parameters changed (dendrites added or removed, or best weights
            restored): rebuild the optimizer (and scheduler) before the next epoch.
        done: stop training; the model holds the final best weights.
        epoch: epochs stepped so far (1-based).
        score: the raw validation score passed in.
        best_score: the best smoothed validation score so far.
        num_dendrites: dendrites per neuron after this step.
        parameters: model parameters after this step.
        event: ``""``, ``"grow"``, ``"retry"`` (rolled back, growing fresh dendrites), ``"done"``.
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


@dataclass(frozen=True)
class Resumed:
    """What :meth:`GrowthController.resume` restored.

    Attributes:
        resumed: a checkpoint was found and restored (False: a fresh start).
        optimizer: the optimizer built by ``make_optimizer`` (with its saved state, if resumed).
        scheduler: the scheduler built by ``make_scheduler`` (with its saved state, if resumed).
        epoch: epochs already stepped (0 for a fresh start).
        extra: the ``extra`` dict saved with :meth:`GrowthController.save_latest`.
    """

    resumed: bool
    optimizer: Any
    scheduler: Any
    epoch: int
    extra: Dict[str, Any]


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


def _has_dtensor(model: nn.Module) -> bool:
    from .integrations.distributed import is_sharded

    return any(is_sharded(p) for p in model.parameters())


def _count_params(model: nn.Module) -> int:
    """The model's parameters, without correlation candidates (scaffolding, not part of any architecture)."""
    cand = {
        id(p)
        for layer in dendritic_layers(model).values()
        for c in getattr(layer.dendrites, "candidates", ())
        for p in c.parameters()
    }
    return sum(p.numel() for p in model.parameters() if id(p) not in cand)


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
    ):
        cfg = GrowthConfig() if config is None else config
        if writer is not None and not callable(getattr(writer, "add_scalar", None)):
            raise ConfigError(
                f"writer={writer!r} has no add_scalar(tag, value, step); pass a "
                "torch.utils.tensorboard.SummaryWriter (or anything with that method)."
            )
        self.writer = writer
        if not isinstance(cfg, GrowthConfig):
            raise ConfigError(f"config must be a torch_dendrites.GrowthConfig, got {type(cfg).__name__}.")
        if not isinstance(model, nn.Module):
            raise TargetError(f"model must be an nn.Module, got {type(model).__name__}.")
        if cfg.mode != "never" and not dendritic_layers(model):
            raise TargetError(
                f"GrowthConfig(mode={cfg.mode!r}) needs a model with dendritic layers; call td.add_dendrites(model) "
                "first (or use mode='never' for a baseline without dendrites)."
            )
        from .integrations import distributed

        if cfg.mode != "never" and any(distributed.is_sharded(p) for p in distributed._dendrite_params(model)):
            raise StateError(
                "this model's dendrite parameters were sharded (fully_shard or tensor parallelism): FSDP's "
                "parameter groups are fixed, so they cannot grow or shrink. Shard with td.integrations."
                "distributed.shard_dendritic(model), which shards the base layers and keeps the dendrites "
                "replicated, or shard a model whose structure is final (mode='never')."
            )
        if cfg.dendrite_training == "correlation":
            unable = sorted(
                {
                    layer.dendrite_type
                    for layer in dendritic_layers(model).values()
                    if not getattr(layer.dendrites, "supports_correlation", False)
                }
            )
            if unable:
                raise ConfigError(
                    f"dendrite_training='correlation' needs dendrites that can hold candidates; dendrite_type "
                    f"{unable} cannot. Use DendriteConfig(dendrite_type='cascade') or dendrite_training='gd'."
                )
        self.model = model
        self.config = cfg
        self.out_dir = None if out_dir is None else Path(out_dir)
        # In a multi-process run only rank 0 writes; every rank grows from the same seed.
        self.writes_files = distributed.rank() == 0
        self._seed = distributed.shared_seed(cfg.seed)
        if self.out_dir is not None and self.writes_files:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self._reporter = None
        self._reset()

    # ----------------------------------------------------------------- state
    def _reset(self) -> None:
        self.epoch = 0
        self.smoothed: Optional[float] = None
        self.best_score: Optional[float] = None
        self.best_epoch: Optional[int] = None
        self.best_extras: Dict[str, float] = {}
        self.best_counts: Dict[str, int] = {}
        self.best_state: Optional[Dict[str, torch.Tensor]] = None
        self.since_best = 0
        self.phase_start = 0
        self.phase_grown = False  # the current phase began with newly grown dendrites
        self.phase_improved = False
        self.tries = 0
        self.growths = 0
        self.done = False
        self.history: List[Dict[str, Any]] = []
        self.architectures: Dict[int, Dict[str, Any]] = {}
        # Correlation mode: "neuron" (ordinary training) or "candidate" (only candidates train).
        self.phase = "neuron"
        self.last_phase_len = 0
        self.cand_start = 0
        self.cand_since = 0
        self.cand_best: Dict[str, float] = {}
        self.trainable_before: List[str] = []
        self.norm_momenta: Dict[str, Optional[float]] = {}

    _FIELDS = (
        "epoch",
        "smoothed",
        "best_score",
        "best_epoch",
        "best_extras",
        "best_counts",
        "since_best",
        "phase_start",
        "phase_grown",
        "phase_improved",
        "tries",
        "growths",
        "done",
        "history",
        "phase",
        "last_phase_len",
        "cand_start",
        "cand_since",
        "cand_best",
        "trainable_before",
        "norm_momenta",
    )

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue exactly where this controller stopped (best weights included)."""
        state = {k: _copy(getattr(self, k)) for k in self._FIELDS}
        state["architectures"] = {str(k): dict(v) for k, v in self.architectures.items()}
        state["config"] = self.config.to_dict()
        state["version"] = _STATE_VERSION
        state["best_state"] = None if self.best_state is None else dict(self.best_state)
        return state

    def _check_state(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise StateError(f"state must be a dict from GrowthController.state_dict(), got {type(state).__name__}.")
        missing = [k for k in (*self._FIELDS, "architectures", "best_state", "version") if k not in state]
        if state.get("phase") == "candidate" and not any(
            len(layer.dendrites.candidates) for layer in dendritic_layers(self.model).values()
        ):
            raise StateError(
                "this controller state is in a candidate phase but the model has no candidates; load the model "
                "and the controller together with td.load(path, model, controller)."
            )
        if missing:
            raise StateError(f"controller state is missing {missing}; pass a dict from GrowthController.state_dict().")
        version = state["version"]
        if isinstance(version, bool) or not isinstance(version, int) or version > _STATE_VERSION:
            raise StateError(
                f"controller state version {version!r} is not one this library reads ({_STATE_VERSION}); "
                "upgrade torch-dendrites."
            )
        if not isinstance(state["history"], list) or not isinstance(state["architectures"], dict):
            raise StateError("controller state has a malformed history or architectures entry.")

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the model must already have the saved dendrite structure."""
        self._check_state(state)
        for k in self._FIELDS:
            setattr(self, k, _copy(state[k]))
        self.architectures = {int(k): dict(v) for k, v in state["architectures"].items()}
        self.best_state = None if state["best_state"] is None else dict(state["best_state"])
        if self.phase == "candidate":
            self._freeze_for_candidates()
        self._reporter = None  # a fresh reporter rewrites the CSV files from the restored history

    # ----------------------------------------------------------------- queries
    @property
    def num_dendrites(self) -> int:
        """Dendrites per neuron in the model now (the most of any wrapped layer)."""
        return max((layer.num_dendrites for layer in dendritic_layers(self.model).values()), default=0)

    def _counts(self) -> Dict[str, int]:
        return {n: layer.num_dendrites for n, layer in dendritic_layers(self.model).items()}

    def _beats(self, a: float, b: float) -> bool:
        delta = a - b if self.config.maximize else b - a
        return delta > self.config.improvement_abs and delta > self.config.improvement_rel * abs(b)

    def _better(self, a: float, b: float) -> bool:
        return a > b if self.config.maximize else a < b

    # ----------------------------------------------------------------- the step
    def step(self, score: Any, **extra_scores: Any) -> StepResult:
        """Record one epoch's validation score (and optional extra scores, e.g. ``test=``, ``train=``).

        Returns:
            A :class:`StepResult`. If ``restructured``, rebuild the optimizer; if ``done``, stop.

        Raises:
            ScoreError: a score is not a finite number (nothing is changed).
            StateError: the controller is already done.
        """
        if self.done:
            raise StateError("the controller is done (training finished); build a new controller to train again.")
        score = _as_score("score", score)
        extras = {k: _as_score(k, v) for k, v in extra_scores.items()}
        cfg = self.config
        from .integrations import distributed

        if distributed.is_distributed():
            # Ranks may see different local scores: decide on their mean, identically everywhere.
            keys = sorted(extras)
            reduced = distributed.all_reduce_mean([score] + [extras[k] for k in keys])
            score, extras = reduced[0], dict(zip(keys, reduced[1:]))
            if _has_dtensor(self.model) and not distributed.replicas_agree(distributed._dendrite_params(self.model)):
                # FSDP2: the replicated dendrites drift apart if their gradients are not averaged.
                raise StateError(
                    "the dendrite weights differ between ranks; call td.integrations.distributed."
                    "sync_dendrite_grads(model) after every loss.backward() (FSDP does not average them). "
                    "The controller's state was left unchanged."
                )
            if self.phase == "candidate":
                for layer in dendritic_layers(self.model).values():
                    st = layer.dendrites.correlation
                    distributed.all_reduce_sum_([st.n, st.sum_s, st.sum_ss, st.sum_se, st.sum_e, st.sum_ee])

        self.epoch += 1
        a = cfg.smoothing
        self.smoothed = score if self.smoothed is None else a * self.smoothed + (1 - a) * score
        k_now = self.num_dendrites
        params_now = _count_params(self.model)

        in_candidates = self.phase == "candidate"
        if in_candidates:
            # The model is frozen: its scores are the best epoch's; only the candidates' correlations move.
            extras.update({f"corr:{n}": v for n, v in self._candidate_scores().items()})
        improved = not in_candidates and (self.best_score is None or self._beats(self.smoothed, self.best_score))
        if improved:
            self.best_score, self.best_epoch, self.best_extras = self.smoothed, self.epoch, dict(extras)
            self.best_counts = self._counts()
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.since_best = 0
            self.phase_improved = True
            if self.out_dir is not None and (self.writes_files or _has_dtensor(self.model)):
                from .persistence import save

                # Written before any switch below, so best/ holds the best epoch's structure. Under FSDP2
                # every rank takes part in gathering the shards; rank 0 writes.
                save(self.out_dir / "best", self.model)
        elif not in_candidates:
            self.since_best += 1
        arch = self.architectures.setdefault(
            k_now, {"parameters": params_now, "best_score": None, "best_epoch": None, "extras": {}, "epochs": 0}
        )
        arch["epochs"] += 1
        arch["parameters"] = params_now
        if not in_candidates and (arch["best_score"] is None or self._better(self.smoothed, arch["best_score"])):
            arch.update(best_score=self.smoothed, best_epoch=self.epoch, extras=dict(extras))

        event, restructured = self._decide()
        row = {
            "epoch": self.epoch,
            "phase": "candidate" if in_candidates else "neuron",
            "dendrites": k_now,
            "parameters": params_now,
            "score": score,
            "smoothed": self.smoothed,
            "best": self.best_score,
            "improved": int(improved),
            "event": event,
            **extras,
        }
        self.history.append(row)
        if self.out_dir is not None and self.writes_files:
            self._report(event)
        if self.writer is not None and self.writes_files:
            self._log_scalars(row, extras)
        return StepResult(
            improved=improved,
            restructured=restructured,
            done=self.done,
            epoch=self.epoch,
            score=score,
            best_score=self.best_score,
            num_dendrites=self.num_dendrites,
            parameters=_count_params(self.model),
            event=event,
        )

    def _switch_due(self) -> bool:
        cfg = self.config
        if cfg.mode == "plateau":
            return self.since_best >= cfg.patience
        if cfg.mode == "fixed":
            return self.epoch - self.phase_start >= cfg.switch_every
        if cfg.mode == "every":
            return self.epoch - self.phase_start >= 1
        return False

    def _decide(self):
        cfg = self.config
        if cfg.max_epochs is not None and self.epoch >= cfg.max_epochs:
            return self._finish()
        if self.phase == "candidate":
            return self._candidate_decision()
        if cfg.mode == "never":
            return self._finish() if self.since_best >= cfg.patience else ("", False)
        if not self._switch_due():
            return "", False
        if self.phase_grown and not self.phase_improved:
            # The newest dendrite set never beat the best: roll it back, retry with fresh weights.
            self.tries += 1
            if self.tries >= cfg.max_tries:
                return self._finish()
            self._restore_best()
            return self._add_set("retry")
        if self.num_dendrites >= cfg.max_dendrites:
            return self._finish()
        self._restore_best()
        self.tries = 0
        return self._add_set("grow")

    def _generator(self) -> Optional[torch.Generator]:
        if self._seed is None:
            return None
        return torch.Generator().manual_seed(self._seed * 1_000_003 + self.growths)

    def _add_set(self, event: str):
        if self.config.dendrite_training == "gd":
            self._grow()
            return event, True
        self._start_candidates()
        return ("retry" if event == "retry" else "candidates"), True

    def _grow(self) -> None:
        gen = self._generator()
        for layer in dendritic_layers(self.model).values():
            layer.grow(gen)
        self.growths += 1
        self._start_neuron_phase()

    def _start_neuron_phase(self) -> None:
        self.phase = "neuron"
        self.phase_start = self.epoch
        self.phase_grown = True
        self.phase_improved = False
        self.since_best = 0

    # ----------------------------------------------------------------- correlation candidates
    def _start_candidates(self) -> None:
        """Freeze the model (parameters and normalisation statistics) and add candidates to every layer."""
        cfg = self.config
        self.last_phase_len = max(1, self.epoch - self.phase_start)
        self.trainable_before = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.norm_momenta = {
            n: m.momentum for n, m in self.model.named_modules() if isinstance(m, nn.modules.batchnorm._NormBase)
        }
        gen = self._generator()
        for layer in dendritic_layers(self.model).values():
            layer.dendrites.add_candidates(cfg.candidate_pool, gen)
        self.growths += 1
        self.phase = "candidate"
        self.cand_start = self.epoch
        self.cand_since = 0
        self.cand_best = {}
        self._freeze_for_candidates()

    def _freeze_for_candidates(self) -> None:
        cand = {
            id(p) for layer in dendritic_layers(self.model).values() for p in layer.dendrites.candidates.parameters()
        }
        for p in self.model.parameters():
            if id(p) not in cand:
                p.requires_grad_(False)
        modules = dict(self.model.named_modules())
        for name in self.norm_momenta:
            # momentum 0: running statistics stay exactly as they were (eval outputs are unchanged).
            modules[name].momentum = 0.0

    def _unfreeze_after_candidates(self) -> None:
        params = dict(self.model.named_parameters())
        for name in self.trainable_before:
            if name in params:
                params[name].requires_grad_(True)
        modules = dict(self.model.named_modules())
        for name, momentum in self.norm_momenta.items():
            modules[name].momentum = momentum
        self.trainable_before, self.norm_momenta = [], {}

    def _candidate_scores(self) -> Dict[str, float]:
        """Each layer's best candidate score this epoch (mean |correlation| over its neurons)."""
        out = {}
        for name, layer in dendritic_layers(self.model).items():
            stats = layer.dendrites.correlation
            out[name] = float(stats.scores().max()) if stats is not None and stats.n > 0 else 0.0
        return out

    def _candidate_decision(self):
        cfg = self.config
        scores = self._candidate_scores()
        improved = False
        for name, sc in scores.items():
            if sc > self.cand_best.get(name, 0.0) * (1 + cfg.candidate_improvement) + 1e-9:
                improved = True
            self.cand_best[name] = max(sc, self.cand_best.get(name, 0.0))
        self.cand_since = 0 if improved else self.cand_since + 1
        cap = cfg.candidate_max_epochs if cfg.candidate_max_epochs is not None else self.last_phase_len
        if self.cand_since >= cfg.candidate_patience or self.epoch - self.cand_start >= cap:
            self._install_candidates()
            return "grow", True
        for layer in dendritic_layers(self.model).values():
            layer.dendrites.correlation.reset()  # a fresh epoch-long covariance
        return "", False

    def _install_candidates(self) -> None:
        weak = []
        for name, layer in dendritic_layers(self.model).items():
            stats = layer.dendrites.correlation
            scores = stats.scores() if stats.n > 0 else torch.zeros(len(layer.dendrites.candidates))
            best = int(scores.argmax())
            if float(scores[best]) < self.config.correlation_warning:
                weak.append(f"{name} ({float(scores[best]):.4f})")
            layer.dendrites.install_candidate(best)
        self._unfreeze_after_candidates()
        self._start_neuron_phase()
        if weak:
            warnings.warn(
                "correlation dendrites: the candidates of these layers barely correlate with their neurons' "
                f"error (mean |corr| below {self.config.correlation_warning}): {', '.join(weak)}. Their error may "
                "already be tiny, or the candidate phase too short; consider candidate_max_epochs or a larger "
                "candidate_pool.",
                stacklevel=3,
            )

    def _end_candidates(self) -> None:
        for layer in dendritic_layers(self.model).values():
            layer.dendrites.clear_candidates()
        self._unfreeze_after_candidates()
        self.phase = "neuron"

    def _restore_best(self) -> None:
        if self.phase == "candidate":
            self._end_candidates()
        from .integrations.distributed import shard_like

        set_dendrite_counts(self.model, self.best_counts)
        # A best state read from a checkpoint is whole; an FSDP2 model takes its own shards of it.
        self.model.load_state_dict(shard_like(self.best_state, self.model.state_dict()), strict=True)

    def _finish(self):
        self._restore_best()
        self.done = True
        return "done", True

    # ----------------------------------------------------------------- reporting
    def _log_scalars(self, row: Dict[str, Any], extras: Dict[str, float]) -> None:
        w, step = self.writer, row["epoch"]
        w.add_scalar("dendrites/score", row["score"], step)
        w.add_scalar("dendrites/smoothed", row["smoothed"], step)
        if row["best"] is not None:
            w.add_scalar("dendrites/best", row["best"], step)
        w.add_scalar("dendrites/count", row["dendrites"], step)
        w.add_scalar("dendrites/parameters", row["parameters"], step)
        for k, v in extras.items():
            w.add_scalar(f"dendrites/{k}", v, step)
        if row["event"] and callable(getattr(w, "add_text", None)):
            w.add_text("dendrites/event", f"epoch {step}: {row['event']}", step)

    def _report(self, event: str) -> None:
        from .reporting import Reporter

        if self._reporter is None:
            self._reporter = Reporter(self.out_dir)
        self._reporter.write_history(self.history)
        self._reporter.write_architectures(self.architectures)
        if event in ("grow", "retry", "done"):
            self._reporter.plot(self.history)

    # ----------------------------------------------------------------- checkpoints
    def _need_out_dir(self, what: str) -> Path:
        if self.out_dir is None:
            raise StateError(f"{what} needs the controller's out_dir; pass out_dir= to GrowthController.")
        return self.out_dir

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
        from .persistence import save

        out = self._need_out_dir("save_latest")
        if not self.writes_files and not _has_dtensor(self.model):
            return out / "latest"  # rank 0 writes for everyone (under FSDP2 every rank helps gather)
        if optimizer is not None:
            mine = {id(p) for p in self.model.parameters()}
            if any(id(p) not in mine for g in optimizer.param_groups for p in g["params"]):
                raise StateError(
                    "the optimizer holds parameters the model no longer has; rebuild it after a step that "
                    "returned restructured=True, then call save_latest."
                )
        return save(
            out / "latest",
            self.model,
            self,
            optimizer=optimizer,
            scheduler=scheduler,
            rng=True,
            generators=generators,
            extra=extra,
        )

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
        from .errors import CheckpointError
        from .persistence import _resolve, load, load_training_state

        out = self._need_out_dir("resume")
        try:
            folder = _resolve(out / "latest")
        except CheckpointError:
            folder = None
        extra: Dict[str, Any] = {}
        if folder is not None:
            load(folder, self.model, self)
        optimizer = make_optimizer(self.model) if make_optimizer is not None else None
        scheduler = make_scheduler(optimizer) if make_scheduler is not None else None
        if folder is not None:
            extra = load_training_state(
                folder, optimizer=optimizer, scheduler=scheduler, rng=True, generators=generators
            )
        return Resumed(folder is not None, optimizer, scheduler, self.epoch, extra)

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


def _copy(v):
    if isinstance(v, dict):
        return {k: _copy(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_copy(x) for x in v]
    return v
