"""The growth policy: one score in, a decision and a list of actions out. No torch, no I/O.

The run is a sequence of *phases*. Phase 0 trains the model as it was given. Every later neuron phase is the
*trial* of the dendrite set added at its start: it lasts while the model improves on the phase's own best
score, at least ``trial_warmup`` epochs and at most ``trial_max_epochs`` (``mode="plateau"``), or exactly
``switch_every`` epochs (``"fixed"``) or one epoch (``"every"``). When a trial ends, the set is **kept** if the
phase's best beat the best score from before the growth (with the usual thresholds) and **rolled back**
otherwise; a rolled-back set is retried with fresh weights up to ``max_tries`` times. In correlation mode a
candidate phase (the model frozen, candidates trained) comes before each trial.

::

    phase 0            trial of set 1                 trial of set 2 (failed)   retry of set 2
    |-- plateau --|G|-- warm-up --|-- own plateau --|G|-- warm-up --|--------|R|-- ...
                  ^ restore best, grow              ^ kept: grow    ^ not better than before: roll back

:class:`GrowthPolicy` holds a :class:`PolicyState` and turns one (smoothed) validation score into a
:class:`Decision`: whether the epoch improved, the event, the actions the model must undergo (carried out by
:class:`~torch_dendrites.growth.actuator.ModelActuator`) and the next state. :meth:`GrowthPolicy.decide` does not
change the policy; :meth:`GrowthPolicy.commit` adopts the decision once its actions succeeded, so a failure in
between leaves the policy as it was.

Example:
    >>> from torch_dendrites import GrowthConfig
    >>> from torch_dendrites.growth.policy import GrowthPolicy
    >>> policy = GrowthPolicy(GrowthConfig(patience=1, trial_warmup=1, max_dendrites=1))
    >>> [policy.step(s).event.value for s in (0.5, 0.5, 0.6, 0.6)]
    ['', 'grow', '', 'done']
    >>> policy.state.dendrites, policy.state.best
    (1, 0.6)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, Mapping, Optional, Tuple

from ..errors import StateError

__all__ = [
    "Action",
    "Decision",
    "Event",
    "GrowthPolicy",
    "Phase",
    "PolicyState",
    "Situation",
    "TRANSITIONS",
    "beats",
]


class Phase(str, Enum):
    """What trains now: the model (``neuron``) or, in correlation mode, only the candidates."""

    NEURON = "neuron"
    CANDIDATE = "candidate"


class Event(str, Enum):
    """What a step did, as reported in ``StepResult.event`` and the history."""

    NONE = ""
    GROW = "grow"  # a dendrite set was added (gd) or installed (correlation)
    RETRY = "retry"  # the set on trial was rolled back and a fresh one added (or a fresh candidate phase)
    CANDIDATES = "candidates"  # correlation: the best weights were restored and a candidate phase began
    DONE = "done"  # the run is over; the model holds the best weights


class Action(str, Enum):
    """An effect on the model, carried out in the listed order by the actuator."""

    RESTORE_BEST = "restore_best"  # the best epoch's dendrite counts and weights
    ROLL_BACK = "roll_back"  # the same restore, undoing a set that failed its trial
    GROW = "grow"  # one more dendrite per neuron in every wrapped layer
    START_CANDIDATES = "start_candidates"  # freeze the model, add correlation candidates
    INSTALL_CANDIDATES = "install_candidates"  # the best candidate per layer becomes a dendrite; unfreeze
    FINISH = "finish"  # end any candidate phase, restore the best weights


class Situation(str, Enum):
    """Where a step leaves the run: the key of :data:`TRANSITIONS`."""

    CONTINUE = "continue"  # the phase goes on
    GROW = "grow"  # the phase ended and another set may be added (phase 0, or the set on trial was kept)
    RETRY = "retry"  # the set on trial failed and tries are left
    INSTALL = "install"  # correlation: the candidate phase ended
    FINISH = "finish"  # max_epochs, max_dendrites, no tries left, or the end of a run without growth


# The one transition table: (situation, dendrite_training) -> (event, actions). "*" matches either training.
TRANSITIONS: Dict[Tuple[Situation, str], Tuple[Event, Tuple[Action, ...]]] = {
    (Situation.CONTINUE, "*"): (Event.NONE, ()),
    (Situation.GROW, "gd"): (Event.GROW, (Action.RESTORE_BEST, Action.GROW)),
    (Situation.GROW, "correlation"): (Event.CANDIDATES, (Action.RESTORE_BEST, Action.START_CANDIDATES)),
    (Situation.RETRY, "gd"): (Event.RETRY, (Action.ROLL_BACK, Action.GROW)),
    (Situation.RETRY, "correlation"): (Event.RETRY, (Action.ROLL_BACK, Action.START_CANDIDATES)),
    (Situation.INSTALL, "correlation"): (Event.GROW, (Action.INSTALL_CANDIDATES,)),
    (Situation.FINISH, "*"): (Event.DONE, (Action.FINISH,)),
}


@dataclass(frozen=True)
class PolicyState:
    """Everything the policy knows; the one list of its fields (saved in ``controller.json``).

    Attributes:
        epoch: epochs stepped so far.
        smoothed: the exponentially smoothed validation score (None before the first step).
        best: the best smoothed score of the run; ``best_epoch`` and ``best_dendrites`` (sets in the model then).
        dendrites: dendrite sets in the model now (kept ones plus the one on trial).
        phase: :class:`Phase` now; ``phase_start``: the epoch after which the current phase began.
        phase_best, phase_since_best: the current neuron phase's own best score and epochs since it.
        trial: the current neuron phase is the trial of a new set; ``pre_growth_best`` is the best before it.
        tries: failed trials of the current set; ``growths``: sets added so far (kept, rolled back or
            candidates), which also numbers the random draws; ``done``: the run is over.
        last_phase_len: length of the neuron phase before the current candidate phase.
        cand_start, cand_since, cand_best: the candidate phase's start, epochs without progress, and
            best correlation score per layer.
    """

    epoch: int = 0
    smoothed: Optional[float] = None
    best: Optional[float] = None
    best_epoch: Optional[int] = None
    best_dendrites: int = 0
    dendrites: int = 0
    phase: Phase = Phase.NEURON
    phase_start: int = 0
    phase_best: Optional[float] = None
    phase_since_best: int = 0
    trial: bool = False
    pre_growth_best: Optional[float] = None
    tries: int = 0
    growths: int = 0
    done: bool = False
    last_phase_len: int = 0
    cand_start: int = 0
    cand_since: int = 0
    cand_best: Dict[str, float] = field(default_factory=dict)

    @property
    def epochs_in_phase(self) -> int:
        return self.epoch - (self.cand_start if self.phase == Phase.CANDIDATE else self.phase_start)

    def to_dict(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        out["phase"] = self.phase.value
        return out

    @classmethod
    def field_names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


@dataclass(frozen=True)
class Decision:
    """What one score decided.

    Attributes:
        improved: the epoch set a new best (the actuator snapshots the weights).
        event: the :class:`Event` to report.
        actions: effects on the model, in order; empty iff the model is left as it is.
        state: the policy's state once the actions are done (adopted by :meth:`GrowthPolicy.commit`).
        kept: for a step that ended a trial, whether the set was kept (None otherwise).
        situation: the :class:`Situation` that selected the transition.
    """

    improved: bool
    event: Event
    actions: Tuple[Action, ...]
    state: PolicyState
    kept: Optional[bool] = None
    situation: Situation = Situation.CONTINUE

    @property
    def restructured(self) -> bool:
        return bool(self.actions)


def beats(a: float, b: Optional[float], maximize: bool, rel: float, absolute: float) -> bool:
    """Whether score ``a`` beats ``b`` by more than both thresholds (anything beats ``None``)."""
    if b is None:
        return True
    delta = a - b if maximize else b - a
    return delta > absolute and delta > rel * abs(b)


class GrowthPolicy:
    """The decision half of :class:`~torch_dendrites.GrowthController` (see the module docstring).

    Args:
        config: a :class:`~torch_dendrites.GrowthConfig` (read only).
        state: a state to continue from; default: a fresh run.
    """

    def __init__(self, config: Any, state: Optional[PolicyState] = None):
        self.config = config
        self.state = PolicyState() if state is None else state

    # ------------------------------------------------------------------ rules
    def _beats(self, a: float, b: Optional[float]) -> bool:
        c = self.config
        return beats(a, b, c.maximize, c.improvement_rel, c.improvement_abs)

    def _better(self, a: float, b: Optional[float]) -> bool:
        return b is None or (a > b if self.config.maximize else a < b)

    def _phase_over(self, s: PolicyState) -> bool:
        """Whether the neuron phase ``s`` is in has ended (after the current epoch was counted)."""
        c = self.config
        n = s.epochs_in_phase
        if c.mode == "fixed":
            return n >= c.switch_every
        if c.mode == "every":
            return n >= 1
        plateau = s.phase_since_best >= c.patience
        if not s.trial:
            return plateau  # phase 0 (and mode="never") ends on an ordinary plateau
        if c.trial_max_epochs is not None and n >= c.trial_max_epochs:
            return True
        return n >= c.trial_warmup and plateau

    def _situation(self, s: PolicyState, candidate_scores: Optional[Mapping[str, float]]):
        """The situation after the current epoch, the trial verdict, and the candidate bookkeeping."""
        c = self.config
        if s.phase == Phase.CANDIDATE:
            best = dict(s.cand_best)
            progress = False
            for name, sc in (candidate_scores or {}).items():
                old = best.get(name, 0.0)
                if sc > old * (1 + c.candidate_improvement) + 1e-9:
                    progress = True
                best[name] = max(sc, old)
            since = 0 if progress else s.cand_since + 1
            # Default cap: a plateau's length (patience), and never longer than the neuron phase before it. The
            # model is frozen meanwhile, so every candidate epoch is one the budget does not train it; weakly
            # correlated candidates can keep rising by 1 % relative for as long as they are allowed to (MNIST
            # and UNet benchmarks: phases as long as the neuron phase spent half the budget frozen).
            cap = c.candidate_max_epochs
            if cap is None:
                cap = min(c.patience, s.last_phase_len)
            cand = {"cand_best": best, "cand_since": since}
            if c.max_epochs is not None and s.epoch >= c.max_epochs:
                return Situation.FINISH, None, cand
            ended = since >= c.candidate_patience or s.epochs_in_phase >= max(cap, 1)
            return (Situation.INSTALL if ended else Situation.CONTINUE), None, cand
        if c.max_epochs is not None and s.epoch >= c.max_epochs:
            kept = self._beats(s.phase_best, s.pre_growth_best) if s.trial and s.phase_best is not None else None
            return Situation.FINISH, kept, {}
        if not self._phase_over(s):
            return Situation.CONTINUE, None, {}
        kept = None
        if s.trial:
            kept = s.phase_best is not None and self._beats(s.phase_best, s.pre_growth_best)
            if not kept:
                return (Situation.RETRY if s.tries + 1 < c.max_tries else Situation.FINISH), kept, {}
        if c.mode == "never" or s.best_dendrites >= c.max_dendrites:
            return Situation.FINISH, kept, {}
        return Situation.GROW, kept, {}

    # ------------------------------------------------------------------ the step
    def decide(self, score: float, candidate_scores: Optional[Mapping[str, float]] = None) -> Decision:
        """The decision for one epoch's validation ``score`` (and, in a candidate phase, each layer's best
        candidate correlation). Pure: ``self.state`` is not changed.

        Raises:
            StateError: the run is already done, or the score is not a finite number.
        """
        s = self.state
        if s.done:
            raise StateError("the growth policy is done (training finished); start a new run to train again.")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise StateError(f"score={score!r} must be a finite number.")
        c = self.config
        smoothed = float(score) if s.smoothed is None else c.smoothing * s.smoothed + (1 - c.smoothing) * score
        s = dataclasses.replace(s, epoch=s.epoch + 1, smoothed=smoothed)
        improved = False
        if s.phase == Phase.NEURON:
            improved = self._beats(smoothed, s.best)
            if improved:
                s = dataclasses.replace(s, best=smoothed, best_epoch=s.epoch, best_dendrites=s.dendrites)
            # Inside a trial any rise of the phase's own best is progress (a new set escaping its zero-gain
            # start improves by less than the thresholds at first); the thresholds decide what is kept. Phase 0
            # plateaus exactly like the early-stopped baseline.
            progress = self._better(smoothed, s.phase_best) if s.trial else self._beats(smoothed, s.phase_best)
            if progress:
                s = dataclasses.replace(s, phase_best=smoothed, phase_since_best=0)
            else:
                s = dataclasses.replace(s, phase_since_best=s.phase_since_best + 1)
        situation, kept, cand = self._situation(s, candidate_scores)
        s = dataclasses.replace(s, **cand)
        key = (situation, c.dendrite_training)
        event, actions = TRANSITIONS.get(key) or TRANSITIONS[(situation, "*")]
        return Decision(improved, event, actions, self._next_state(s, situation), kept, situation)

    def _next_state(self, s: PolicyState, situation: Situation) -> PolicyState:
        c = self.config
        if situation == Situation.CONTINUE:
            return s
        if situation == Situation.FINISH:
            return dataclasses.replace(s, done=True, dendrites=s.best_dendrites, phase=Phase.NEURON, trial=False)
        if situation == Situation.INSTALL:
            return self._trial(s, dendrites=s.dendrites + 1)
        tries = s.tries + 1 if situation == Situation.RETRY else 0
        s = dataclasses.replace(s, tries=tries, growths=s.growths + 1, dendrites=s.best_dendrites)
        if c.dendrite_training == "correlation":
            return dataclasses.replace(
                s,
                phase=Phase.CANDIDATE,
                last_phase_len=max(1, s.epoch - s.phase_start),
                cand_start=s.epoch,
                cand_since=0,
                cand_best={},
            )
        return self._trial(s, dendrites=s.best_dendrites + 1)

    @staticmethod
    def _trial(s: PolicyState, dendrites: int) -> PolicyState:
        """A new neuron phase that is the trial of the set just added."""
        return dataclasses.replace(
            s,
            dendrites=dendrites,
            phase=Phase.NEURON,
            phase_start=s.epoch,
            phase_best=None,
            phase_since_best=0,
            trial=True,
            pre_growth_best=s.best,
        )

    def commit(self, decision: Decision) -> None:
        """Adopt a decision's state (once its actions were carried out)."""
        self.state = decision.state

    def step(self, score: float, candidate_scores: Optional[Mapping[str, float]] = None) -> Decision:
        """:meth:`decide` and :meth:`commit` in one call (for use without a model, e.g. in tests)."""
        decision = self.decide(score, candidate_scores)
        self.commit(decision)
        return decision
