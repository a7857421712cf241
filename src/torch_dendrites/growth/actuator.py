"""The model actuator: carries out the growth policy's actions on a model.

:class:`ModelActuator` owns everything the controller does to a model: the best-weight snapshot, restoring
it, growing a dendrite set, and the correlation candidate phase. Each action builds whatever it needs
(new dendrites, candidates) before it changes anything, so a failure (out of memory, say) leaves the model
as it was; the policy adopts its decision only after the actions succeeded.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .. import distributed
from ..correlation import FROZEN_FIX, CandidatePhase, candidates_of, checksum
from ..errors import StateError
from ..surgery import dendritic_layers
from .policy import Action

__all__ = ["ModelActuator", "Snapshot", "generator_for"]


def generator_for(seed: Optional[int], growth: int) -> Optional[torch.Generator]:
    """The generator of the ``growth``-th random draw (None: the global RNG)."""
    if seed is None:
        return None
    return torch.Generator().manual_seed((seed * 1_000_003 + growth) % 2**63)


@dataclass
class Snapshot:
    """The best epoch's structure and weights.

    Attributes:
        counts: dendrites per wrapped layer.
        tensors: copies (on the CPU) of every state-dict entry that training can change: trainable
            parameters, buffers and all dendrite parameters. Parameters frozen at snapshot time (a LoRA
            model's base, say) are not copied; their version counters are kept in ``frozen_versions``.
        frozen_versions: state-dict key -> version counter of the frozen parameters left out.
    """

    counts: Dict[str, int]
    tensors: Dict[str, torch.Tensor]
    frozen_versions: Dict[str, int] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        seen, total = set(), 0
        for t in self.tensors.values():
            if distributed.is_sharded(t):
                total += t.to_local().numel() * t.element_size()  # this rank's shard
                continue
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
        return total


def _copy_off_device(t: torch.Tensor) -> torch.Tensor:
    if distributed.is_sharded(t):  # an FSDP2 shard stays a shard (1/world of the tensor) on its device
        return t.detach().clone()
    return t.detach().to("cpu", copy=True)


class ModelActuator:
    """Carries out :class:`~torch_dendrites.growth.policy.Action` s on one model.

    Args:
        model: a model with dendritic layers (or a plain model for ``mode="never"``).
        seed: the run's seed (every growth draws from a generator derived from it and the growth count);
            None draws from the global RNG.
        candidate_pool, candidate_init_scale, correlation_warning: the correlation settings of the config.
        freeze_earlier: after every change of structure, only the newest dendrite set of each layer trains its
            input weights (``GrowthConfig.freeze_earlier`` in gd mode).
    """

    def __init__(
        self,
        model: nn.Module,
        seed: Optional[int] = None,
        candidate_pool: int = 1,
        candidate_init_scale: Optional[float] = None,
        correlation_warning: float = 0.01,
        freeze_earlier: bool = False,
    ):
        self.model = model
        self.freeze_earlier = freeze_earlier
        self.seed = seed
        self.candidate_pool = candidate_pool
        self.candidate_init_scale = candidate_init_scale
        self.correlation_warning = correlation_warning
        self.phase = CandidatePhase(self, self.layers)
        self._unit_sums: Tuple[List[torch.Tensor], List[float]] = ([], [])
        self._new: Tuple[List[torch.Tensor], List[float]] = ([], [])  # parameters added by the last growth
        self.track_frozen_units()

    # ------------------------------------------------------------------ queries
    def layers(self) -> Dict[str, nn.Module]:
        return dendritic_layers(self.model)

    def counts(self) -> Dict[str, int]:
        return {n: layer.num_dendrites for n, layer in self.layers().items()}

    @property
    def num_dendrites(self) -> int:
        return max(self.counts().values(), default=0)

    def parameters_now(self) -> int:
        """The model's parameters, without correlation candidates (scaffolding, not part of any architecture)."""
        cand = {
            id(p) for layer in self.layers().values() for c in candidates_of(layer.dendrites) for p in c.parameters()
        }
        return sum(p.numel() for p in self.model.parameters() if id(p) not in cand)

    def candidate_scores(self) -> Dict[str, float]:
        return self.phase.scores()

    # ------------------------------------------------------------------ snapshot
    def snapshot(self) -> Snapshot:
        """Copy what training can change (see :class:`Snapshot`); nothing else is copied."""
        dendrite_ids = {id(p) for layer in self.layers().values() for p in layer.dendrite_parameters()}
        frozen = {
            name: p
            for name, p in self.model.named_parameters(remove_duplicate=False)
            if not p.requires_grad and id(p) not in dendrite_ids
        }
        tensors: Dict[str, torch.Tensor] = {}
        copies: Dict[Tuple, torch.Tensor] = {}
        for k, v in self.model.state_dict().items():
            if k in frozen:
                continue
            if distributed.is_sharded(v):  # a DTensor has no storage of its own to recognise ties by
                tensors[k] = _copy_off_device(v)
                continue
            key = (v.device, v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype)
            if v.numel() and key in copies:  # a tied tensor: one copy for every name
                tensors[k] = copies[key]
                continue
            tensors[k] = copies[key] = _copy_off_device(v)
        return Snapshot(self.counts(), tensors, {k: p._version for k, p in frozen.items()})

    def restore(self, best: Snapshot) -> None:
        """The best epoch's dendrite counts and weights (the model only ever shrinks back to them)."""
        if self.phase.active:
            self.phase.end()
        layers = self.layers()
        for name, layer in layers.items():
            want = best.counts.get(name, 0)
            if want > layer.num_dendrites:
                raise StateError(
                    f"the best weights hold {want} dendrites in layer '{name}', which has only {layer.num_dendrites}; "
                    "the model does not belong to this controller's run."
                )
        for name, layer in layers.items():
            layer.truncate(best.counts.get(name, 0))
        current = self.model.state_dict()
        # A best state read from a checkpoint is whole; an FSDP2 model takes its own shards of it.
        state = distributed.shard_like(best.tensors, {k: current[k] for k in best.tensors})
        result = self.model.load_state_dict(state, strict=False)
        missing = set(result.missing_keys) - set(best.frozen_versions)
        if result.unexpected_keys or missing:
            raise StateError(
                f"the best weights do not fit the model (missing {sorted(missing)[:4]}, unexpected "
                f"{sorted(result.unexpected_keys)[:4]})."
            )
        params = dict(self.model.named_parameters(remove_duplicate=False))
        moved = [k for k, v in best.frozen_versions.items() if k in params and params[k]._version != v]
        if moved:
            warnings.warn(
                f"parameters {moved[:4]}{' ...' if len(moved) > 4 else ''} were frozen when the best weights were "
                "kept (so they were not copied) and have changed since; they keep their current values.",
                stacklevel=4,
            )
        self.track_frozen_units()

    # ------------------------------------------------------------------ actions
    def prepare(self, actions: Sequence[Action], best: Optional[Snapshot], growth: int):
        """Build what the actions add (new dendrites, candidates) without touching the model.

        Args:
            actions: the decision's actions.
            best: the snapshot a restore action returns to.
            growth: the decision's growth index (numbers its random draws).
        """
        restores = Action.RESTORE_BEST in actions or Action.ROLL_BACK in actions
        if (restores or Action.FINISH in actions) and best is None:
            raise StateError("the controller has no best weights to restore; step at least once before a switch.")
        counts = best.counts if restores else self.counts()
        gen = generator_for(self.seed, growth)
        built = {}
        if Action.GROW in actions:
            built["units"] = {
                name: layer.dendrites.new_unit(gen, index=counts.get(name, 0)) for name, layer in self.layers().items()
            }
        if Action.START_CANDIDATES in actions:
            built["candidates"] = self.phase.build(
                self.candidate_pool, gen, self.candidate_init_scale, {n: counts.get(n, 0) for n in self.layers()}
            )
        return built

    def apply(self, actions: Sequence[Action], best: Optional[Snapshot], built) -> List[str]:
        """Carry out the actions in order with what :meth:`prepare` built. Returns warnings to show."""
        notes: List[str] = []
        for action in actions:
            if action in (Action.RESTORE_BEST, Action.ROLL_BACK, Action.FINISH):
                self.restore(best)
            elif action == Action.GROW:
                for name, layer in self.layers().items():
                    layer.dendrites.units.append(built["units"][name])
                self.watch([p for u in built["units"].values() for p in u.parameters()])
            elif action == Action.START_CANDIDATES:
                self.phase.start(built["candidates"])
            elif action == Action.INSTALL_CANDIDATES:
                # The frozen model is exactly the best epoch's (check_frozen ran before the decision).
                weak = self.phase.install(self.correlation_warning)
                self.track_frozen_units()
                self.watch([layer.dendrites.units[-1].out_gain for layer in self.layers().values()])
                if weak:
                    notes.append(
                        "correlation dendrites: the candidates of these layers barely correlate with their neurons' "
                        f"error (mean |corr| below {self.correlation_warning}): {', '.join(weak)}. Their error may "
                        "already be tiny, or the candidate phase too short; consider candidate_max_epochs or a larger "
                        "candidate_pool."
                    )
            else:  # pragma: no cover - the transition table names no other action
                raise StateError(f"unknown action {action!r}")
        if self.freeze_earlier and actions:
            self.freeze_all_but_newest()
        return notes

    def freeze_all_but_newest(self) -> None:
        """Every dendrite set but the newest of each layer keeps its input weights frozen; the newest trains them."""
        for layer in self.layers().values():
            d = layer.dendrites
            if not hasattr(d, "set_inputs_frozen"):
                continue  # a type without frozen state: every set trains
            n = len(d.units)
            for i, unit in enumerate(d.units):
                if bool(getattr(unit, "inputs_frozen", False)) != (i < n - 1):
                    d.set_inputs_frozen(i, i < n - 1)
        self.track_frozen_units()

    # ------------------------------------------------------------------ optimizer traps
    def watch(self, params: List[torch.Tensor]) -> None:
        """Remember the trainable parameters just added, to tell whether an optimizer updates them."""
        params = [p for p in params if p.requires_grad]
        self._new = (params, checksum(params))

    def unchanged_new_parameters(self) -> bool:
        """True if the parameters added by the last growth received gradients but did not change at all (the
        optimizer was not rebuilt or synced). Checked once per growth."""
        params, sums = self._new
        self._new = ([], [])
        if not params or not any(p.grad is not None and bool(p.grad.any()) for p in params):
            return False  # no gradient seen (no training since, or gradients cleared): nothing to tell
        return checksum(params) == sums

    # ------------------------------------------------------------------ frozen weights
    def track_frozen_units(self, now: bool = True) -> None:
        """Remember the frozen input weights of dendrites (they must never move); with
        ``now=False`` their values are read at the next :meth:`check_frozen` (a loader copies them in later)."""
        ws = [w for layer in self.layers().values() for w in getattr(layer.dendrites, "frozen_unit_parameters", list)()]
        self._unit_sums = (ws, checksum(ws) if now else None)

    def check_frozen(self) -> None:
        """Raise :class:`StateError` if an optimizer moved weights that the controller froze."""
        self.phase.check_frozen()
        ws, sums = self._unit_sums
        if sums is None:
            self._unit_sums = (ws, checksum(ws))
        elif ws and checksum(ws) != sums:
            raise StateError(f"an optimizer changed the frozen input weights of dendrites; {FROZEN_FIX}.")
