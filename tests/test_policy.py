"""The growth policy on its own: score tables in, events out; no model, no torch (like Lightning's
early-stopping tests). Plus hypothesis properties over random configs and score sequences."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import torch_dendrites as td
from torch_dendrites.growth.policy import TRANSITIONS, Action, Event, GrowthPolicy, Phase, Situation, beats


def events(cfg, scores, candidate_scores=None):
    """Run the policy over ``scores``; one event string per step, stopping at ``done``."""
    policy = GrowthPolicy(cfg)
    out = []
    for i, s in enumerate(scores):
        cand = None
        if policy.state.phase == Phase.CANDIDATE:
            cand = candidate_scores(i) if candidate_scores else {"l": 0.5}
        out.append(policy.step(s, cand).event.value)
        if policy.state.done:
            break
    return out, policy


G, R, D, C = "grow", "retry", "done", "candidates"

# (config, scores, expected events): each row is one story of the trial rule.
TABLE = [
    pytest.param(
        dict(patience=3),
        [0.1, 0.2, 0.3, 0.3, 0.3, 0.3],
        ["", "", "", "", "", G],
        id="phase-0-plateau-after-patience",
    ),
    pytest.param(
        # The new set starts below the old best (0.6) and climbs past it; its trial is judged against its own
        # best, so it survives. (The old rule rolled it back at epoch 6: two epochs without a global best.)
        dict(patience=2, trial_warmup=3, max_dendrites=3),
        [0.5, 0.6, 0.6, 0.6] + [0.55, 0.58, 0.59, 0.61, 0.63, 0.63, 0.63],
        ["", "", "", G] + ["", "", "", "", "", "", G],
        id="climbing-set-survives",
    ),
    pytest.param(
        # Inside a trial any rise of its own best is progress, even below the thresholds (a new set's first
        # gains are tiny); the set is kept only if it beats the old best by the thresholds.
        dict(patience=2, trial_warmup=1, improvement_rel=0.01, max_dendrites=1),
        [0.5, 0.5, 0.5] + [0.40, 0.401, 0.402, 0.403, 0.45, 0.52, 0.52, 0.52],
        ["", "", G] + ["", "", "", "", "", "", "", D],
        id="tiny-rises-keep-a-trial-going",
    ),
    pytest.param(
        dict(patience=2, trial_warmup=2, max_tries=2),
        [0.8, 0.7, 0.7] + [0.7, 0.7, 0.7] + [0.75, 0.7, 0.7],
        ["", "", G] + ["", "", R] + ["", "", D],
        id="failing-set-retried-then-done",
    ),
    pytest.param(
        # Warm-up: a set that plateaus at once still gets trial_warmup epochs.
        dict(patience=1, trial_warmup=4, max_tries=1),
        [0.5, 0.5] + [0.4, 0.4, 0.4, 0.4],
        ["", G] + ["", "", "", D],
        id="warmup-holds-the-trial-open",
    ),
    pytest.param(
        # The cap ends a trial that keeps creeping up but never reaches the old best.
        dict(patience=1, trial_warmup=1, trial_max_epochs=3, max_tries=2),
        [0.5, 0.5] + [0.40, 0.42, 0.44] + [0.3, 0.3],
        ["", G] + ["", "", R] + ["", D],
        id="cap-ends-a-creeping-trial",
    ),
    pytest.param(
        dict(patience=1, trial_warmup=1, trial_max_epochs=3, max_dendrites=1),
        [0.5, 0.5] + [0.6, 0.7, 0.8],
        ["", G] + ["", "", D],
        id="cap-keeps-a-set-that-beat-the-best-and-max-dendrites-ends",
    ),
    pytest.param(
        dict(mode="fixed", switch_every=3, max_dendrites=5),
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
        ["", "", G, "", "", G, "", "", G],
        id="fixed-phases",
    ),
    pytest.param(
        dict(mode="fixed", switch_every=2, max_tries=2),
        [0.5, 0.6] + [0.55, 0.6] + [0.61, 0.5],
        ["", G] + ["", R] + ["", G],
        id="fixed-phase-judged-at-its-end",
    ),
    pytest.param(
        dict(mode="every", max_dendrites=3),
        [0.1, 0.2, 0.3, 0.4],
        [G, G, G, D],
        id="every-epoch",
    ),
    pytest.param(
        dict(mode="never", patience=2),
        [0.1, 0.5, 0.4, 0.45],
        ["", "", "", D],
        id="never-is-early-stopping",
    ),
    pytest.param(
        dict(patience=10, max_epochs=3),
        [0.1, 0.2, 0.3, 0.4],
        ["", "", D],
        id="max-epochs",
    ),
    pytest.param(
        dict(maximize=False, patience=2, improvement_abs=0.05, improvement_rel=0.0),
        [1.0, 0.9, 0.87, 0.86, 0.7],
        ["", "", "", G, ""],
        id="minimize-with-an-absolute-threshold",
    ),
    pytest.param(
        dict(max_dendrites=0, patience=1),
        [0.5, 0.5],
        ["", D],
        id="no-growth-allowed",
    ),
]


@pytest.mark.parametrize("cfg,scores,expected", TABLE)
def test_score_tables(cfg, scores, expected):
    got, _ = events(td.GrowthConfig(**cfg), scores)
    assert got == expected


def test_kept_flag_and_dendrite_counts_follow_the_trial():
    policy = GrowthPolicy(td.GrowthConfig(patience=1, trial_warmup=1, max_dendrites=3, max_tries=3))
    seq = [(0.5, None), (0.5, None), (0.6, None), (0.6, True), (0.55, None), (0.55, False)]
    for score, kept in seq:
        d = policy.step(score)
        assert d.kept is kept
    assert d.event == Event.RETRY and policy.state.dendrites == 2 and policy.state.best_dendrites == 1


def test_correlation_candidate_phase_then_trial():
    cfg = td.GrowthConfig(
        patience=1, trial_warmup=1, dendrite_training="correlation", candidate_patience=2, max_tries=1,
        candidate_max_epochs=10,
    )  # fmt: skip
    corr = iter([0.1, 0.2, 0.2, 0.2])  # rises once, then no progress for candidate_patience epochs
    got, policy = events(cfg, [0.5, 0.5] + [0.5] * 4 + [0.4, 0.4], lambda i: {"layer": next(corr)})
    assert got == ["", C, "", "", "", G, "", D]
    assert policy.state.dendrites == 0  # the installed set failed its trial and no tries are left


def test_candidate_phase_length_defaults_to_patience():
    # phase 0 lasts 4 epochs, patience is 2: the frozen candidate phase gets 2 epochs of the budget, not 4
    cfg = td.GrowthConfig(patience=2, dendrite_training="correlation", candidate_patience=50)
    got, policy = events(cfg, [0.1, 0.2, 0.2, 0.2] + [0.2] * 2, lambda i: {"l": 0.1 * i})
    assert got == ["", "", "", C, "", G]


def test_candidate_phase_is_never_longer_than_the_neuron_phase_before_it():
    # mode="fixed": 2-epoch neuron phases, patience 5: the candidate phase ends after 2 epochs
    cfg = td.GrowthConfig(
        mode="fixed", switch_every=2, patience=5, dendrite_training="correlation", candidate_patience=50
    )
    got, policy = events(cfg, [0.1, 0.2] + [0.2] * 2, lambda i: {"l": 0.1 * i})
    assert got == ["", C, "", G]


def test_an_explicit_candidate_cap_overrides_the_default():
    cfg = td.GrowthConfig(patience=1, dendrite_training="correlation", candidate_patience=50, candidate_max_epochs=4)
    got, policy = events(cfg, [0.1, 0.1] + [0.1] * 4, lambda i: {"l": 0.1 * i})
    assert got == ["", C, "", "", "", G]


def test_retry_in_correlation_mode_starts_a_fresh_candidate_phase():
    cfg = td.GrowthConfig(
        patience=1, trial_warmup=1, dendrite_training="correlation", candidate_max_epochs=1, max_tries=2
    )
    got, policy = events(cfg, [0.5, 0.5, 0.5, 0.4, 0.4, 0.5, 0.4, 0.4])
    assert got == ["", C, G, "", R, G, "", D]


def test_decide_changes_nothing_until_commit():
    policy = GrowthPolicy(td.GrowthConfig(patience=1))
    policy.step(0.5)
    before = policy.state
    d = policy.decide(0.4)
    assert d.event == Event.GROW and policy.state == before
    policy.commit(d)
    assert policy.state.dendrites == 1


def test_done_policy_refuses_more_steps_and_bad_scores_are_refused():
    policy = GrowthPolicy(td.GrowthConfig(mode="never", patience=1))
    policy.step(0.5)
    assert policy.step(0.4).event == Event.DONE
    with pytest.raises(td.StateError, match="done"):
        policy.decide(0.9)
    with pytest.raises(td.StateError, match="finite"):
        GrowthPolicy(td.GrowthConfig()).decide(float("nan"))


def test_the_transition_table_covers_every_situation():
    for situation in Situation:
        for training in ("gd", "correlation"):
            if situation == Situation.INSTALL and training == "gd":
                continue  # gd has no candidate phase
            assert (situation, training) in TRANSITIONS or (situation, "*") in TRANSITIONS
    for (situation, _), (event, actions) in TRANSITIONS.items():
        assert (event == Event.NONE) == (not actions) == (situation == Situation.CONTINUE)


def test_policy_module_imports_no_torch():
    src = Path(td.__file__).parent / "growth" / "policy.py"
    imported = set()
    for node in ast.walk(ast.parse(src.read_text())):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert not imported & {"torch", "numpy", "os", "pathlib", "io", "shutil"}, imported


# ---------------------------------------------------------------------------------------- properties
configs = st.builds(
    lambda mode, patience, warmup, cap, max_d, tries, training, every, maximize, rel: td.GrowthConfig(
        mode=mode,
        patience=patience,
        trial_warmup=warmup,
        trial_max_epochs=None if cap is None else warmup + cap,
        max_dendrites=max_d,
        max_tries=tries,
        dendrite_training=training,
        switch_every=every,
        maximize=maximize,
        improvement_rel=rel,
        candidate_patience=2,
    ),
    st.sampled_from(["plateau", "fixed", "every", "never"]),
    st.integers(1, 4),
    st.integers(1, 4),
    st.one_of(st.none(), st.integers(0, 5)),
    st.integers(0, 4),
    st.integers(1, 3),
    st.sampled_from(["gd", "correlation"]),
    st.integers(1, 4),
    st.booleans(),
    st.sampled_from([0.0, 1e-4, 0.05]),
)
score_lists = st.lists(st.floats(-1.0, 1.0, allow_nan=False), min_size=1, max_size=80)


@settings(max_examples=300, deadline=None)
@given(configs, score_lists, st.lists(st.floats(0.0, 1.0), min_size=80, max_size=80))
def test_policy_invariants(cfg, scores, corr):
    policy = GrowthPolicy(cfg)
    done_events = 0
    for i, s in enumerate(scores + [0.0] * 400):  # long enough for every run to end (max_epochs unset)
        if policy.state.done:
            break
        before = policy.state
        cand = {"a": corr[i % len(corr)]} if before.phase == Phase.CANDIDATE else None
        d = policy.step(s, cand)
        st_ = d.state
        # restructured iff the decision has actions iff something was reported
        assert d.restructured == bool(d.actions) == (d.event != Event.NONE)
        done_events += d.event == Event.DONE
        assert (d.event == Event.DONE) == st_.done
        # never more sets than max_dendrites, and the best never has more than the model
        assert 0 <= st_.best_dendrites <= st_.dendrites <= cfg.max_dendrites or st_.done
        assert st_.dendrites <= cfg.max_dendrites
        # a kept set beat the best from before its growth; a rolled-back one did not
        if d.kept is not None:
            assert before.trial or st_.trial
            phase_best = st_.phase_best if not d.actions else None
            trial_best = phase_best if phase_best is not None else _phase_best_at_end(before, cfg, s)
            assert d.kept == beats(trial_best, before.pre_growth_best, cfg.maximize, cfg.improvement_rel, 0.0)
        if d.kept:
            assert st_.best is not None and beats(
                st_.best, before.pre_growth_best, cfg.maximize, cfg.improvement_rel, 0.0
            )
        if d.event == Event.RETRY:
            assert Action.ROLL_BACK in d.actions and st_.tries == before.tries + 1
        if d.event == Event.DONE:
            assert st_.dendrites == st_.best_dendrites  # ends on the best model
    assert policy.state.done and done_events == 1
    with pytest.raises(td.StateError):
        policy.decide(0.0)


def _phase_best_at_end(before, cfg, score):
    """The trial's best including the step that ended it (the decided state has moved on to a new phase)."""
    smoothed = score if before.smoothed is None else cfg.smoothing * before.smoothed + (1 - cfg.smoothing) * score
    # inside a trial any rise of the phase's own best counts (the thresholds judge only the verdict)
    if before.phase_best is None or (smoothed > before.phase_best if cfg.maximize else smoothed < before.phase_best):
        return smoothed
    return before.phase_best
