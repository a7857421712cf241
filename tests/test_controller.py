"""GrowthController on scripted score sequences."""

from __future__ import annotations

import copy
import csv
import math
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torch_dendrites as td
import torch_dendrites.growth.sinks


def tiny(seed=0):
    torch.manual_seed(seed)
    return td.add_dendrites(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)))


def perturb(model, seed):
    """Stand-in for an epoch of training: every trainable parameter moves."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            step = torch.randn(p.shape, generator=g) * 0.1
            if p.requires_grad:
                p.add_(step)


def run(model, ctl, scores, **extras):
    results = []
    for i, s in enumerate(scores):
        perturb(model, i)
        results.append(ctl.step(s, **{k: v[i] for k, v in extras.items()}))
        if results[-1].done:
            break
    return results


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_growth_exactly_after_patience():
    model = tiny()
    ctl = td.GrowthController(model, td.GrowthConfig(mode="plateau", patience=3, max_dendrites=2))
    res = run(model, ctl, [0.1, 0.2, 0.3, 0.3, 0.3, 0.3])
    assert [r.improved for r in res] == [True, True, True, False, False, False]
    assert [r.event for r in res] == ["", "", "", "", "", "grow"]
    assert res[-1].restructured and res[-1].num_dendrites == 1
    assert not any(r.restructured for r in res[:-1])


def test_growth_restores_best_before_growing():
    model = tiny()
    ctl = td.GrowthController(model, td.GrowthConfig(mode="plateau", patience=2, max_dendrites=2))
    perturb(model, 100)
    ctl.step(0.9)
    best = state(model)
    perturb(model, 101)
    ctl.step(0.5)
    perturb(model, 102)
    r = ctl.step(0.5)
    assert r.event == "grow"
    now = model.state_dict()
    for k, v in best.items():
        assert torch.equal(now[k], v), k
    # the new dendrite's gains are zero: the function equals the best epoch's
    assert all(
        torch.count_nonzero(u.out_gain) == 0
        for layer in td.dendritic_layers(model).values()
        for u in layer.dendrites.units
    )


def test_useless_set_is_retried_then_done_on_best_weights():
    model = tiny()
    cfg = td.GrowthConfig(mode="plateau", patience=2, max_dendrites=3, max_tries=2)
    ctl = td.GrowthController(model, cfg)
    perturb(model, 1)
    assert ctl.step(0.8).improved
    best = state(model)
    events = []
    for i in range(20):
        perturb(model, 10 + i)
        r = ctl.step(0.7)  # nothing ever beats 0.8 again
        events.append(r.event)
        if r.done:
            break
    # the set's trial lasts trial_warmup (3) epochs, then its own plateau of `patience`; it never beats 0.8
    assert events == ["", "grow", "", "", "retry", "", "", "done"]
    assert r.done and r.restructured and r.num_dendrites == 0
    now = model.state_dict()
    assert now.keys() == best.keys()
    assert all(torch.equal(now[k], v) for k, v in best.items())
    with pytest.raises(td.StateError, match="done"):
        ctl.step(0.9)


def test_retry_uses_fresh_dendrite_weights():
    model = tiny()
    ctl = td.GrowthController(model, td.GrowthConfig(patience=1, trial_warmup=1, max_tries=3, seed=5))
    ctl.step(0.5)
    ctl.step(0.4)  # grow
    w1 = td.dendritic_layers(model)["0"].dendrites.units[0].weight.clone()
    ctl.step(0.4)  # the trial's own best
    r = ctl.step(0.4)  # its plateau: not better than 0.5, retry
    assert r.event == "retry"
    w2 = td.dendritic_layers(model)["0"].dendrites.units[0].weight
    assert not torch.equal(w1, w2)


def test_successful_growth_then_max_dendrites_ends():
    model = tiny()
    ctl = td.GrowthController(model, td.GrowthConfig(patience=1, trial_warmup=1, max_dendrites=2))
    scores = [0.1, 0.1, 0.2, 0.2, 0.3, 0.3, 0.3]
    res = run(model, ctl, scores)
    assert [r.event for r in res] == ["", "grow", "", "grow", "", "done"]
    assert res[-1].num_dendrites == 2  # the best (0.3) was set with 2 dendrites
    assert ctl.architecture_table()[2]["best_score"] == 0.3


def test_fixed_mode_switches_every_n_epochs():
    model = tiny()
    ctl = td.GrowthController(model, td.GrowthConfig(mode="fixed", switch_every=3, max_dendrites=5))
    res = run(model, ctl, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    assert [i + 1 for i, r in enumerate(res) if r.event == "grow"] == [3, 6, 9]
    assert res[-1].num_dendrites == 3


def test_every_mode_grows_each_improving_epoch():
    model = tiny()
    ctl = td.GrowthController(model, td.GrowthConfig(mode="every", max_dendrites=3))
    res = run(model, ctl, [0.1, 0.2, 0.3, 0.4])
    assert [r.event for r in res] == ["grow", "grow", "grow", "done"]
    assert res[-1].num_dendrites == 3


def test_never_mode_is_early_stopping_with_restore():
    plain = torch.nn.Sequential(torch.nn.Linear(3, 2))  # no dendrites needed for the baseline arm
    ctl = td.GrowthController(plain, td.GrowthConfig(mode="never", patience=2))
    perturb(plain, 0)
    ctl.step(0.1)
    perturb(plain, 1)
    ctl.step(0.5)
    best = state(plain)
    res = run(plain, ctl, [0.4, 0.45])
    assert res[-1].done and res[-1].event == "done"
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in best.items())


def test_minimize_mode_and_thresholds():
    model = tiny()
    cfg = td.GrowthConfig(maximize=False, patience=2, improvement_abs=0.05, improvement_rel=0.0)
    ctl = td.GrowthController(model, cfg)
    res = run(model, ctl, [1.0, 0.9, 0.87, 0.86, 0.7])
    # 0.87 and 0.86 are better than 0.9, but not by more than 0.05: no improvement, so growth at epoch 4
    assert [r.improved for r in res] == [True, True, False, False, True]
    assert res[3].event == "grow"


def test_relative_threshold():
    model = tiny()
    ctl = td.GrowthController(model, td.GrowthConfig(improvement_rel=0.1, patience=10))
    res = run(model, ctl, [1.0, 1.05, 1.11])
    assert [r.improved for r in res] == [True, False, True]


def test_smoothing():
    model = tiny()
    ctl = td.GrowthController(model, td.GrowthConfig(smoothing=0.5, patience=10))
    ctl.step(1.0)
    ctl.step(0.0)
    assert ctl.smoothed == 0.5
    ctl.step(1.0)
    assert ctl.smoothed == 0.75


def test_max_epochs_ends_run():
    model = tiny()
    ctl = td.GrowthController(model, td.GrowthConfig(max_epochs=3, patience=10))
    res = run(model, ctl, [0.1, 0.2, 0.3, 0.4])
    assert len(res) == 3 and res[-1].done


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -math.inf, "0.5", None, True, torch.ones(2)])
def test_bad_scores_raise_and_change_nothing(bad):
    model = tiny()
    ctl = td.GrowthController(model, td.GrowthConfig(patience=1))
    ctl.step(0.5)
    before = ctl.state_dict()
    params = state(model)
    with pytest.raises(td.ScoreError):
        ctl.step(bad)
    with pytest.raises(td.ScoreError):
        ctl.step(0.6, test=bad)
    after = ctl.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        if k != "best_state":
            assert after[k] == before[k], k
    assert all(torch.equal(model.state_dict()[k], v) for k, v in params.items())


def test_tensor_scores_accepted():
    model = tiny()
    ctl = td.GrowthController(model)
    assert ctl.step(torch.tensor(0.5), test=torch.tensor([0.4])).score == 0.5


def test_two_models_two_controllers_do_not_interfere():
    m1, m2 = tiny(1), tiny(2)
    c1 = td.GrowthController(m1, td.GrowthConfig(patience=1, max_dendrites=3))
    c2 = td.GrowthController(m2, td.GrowthConfig(patience=5, maximize=False))
    p2 = state(m2)
    c1.step(0.5)
    c2.step(1.0)
    r1 = c1.step(0.4)
    assert r1.event == "grow" and c1.num_dendrites == 1
    assert c2.num_dendrites == 0 and c2.epoch == 1 and c2.best_score == 1.0
    assert all(torch.equal(m2.state_dict()[k], v) for k, v in p2.items())
    assert c1.config.patience == 1 and c2.config.patience == 5


def test_state_dict_round_trip_continues_identically():
    scores = [0.1, 0.2, 0.2, 0.3, 0.3, 0.3, 0.35, 0.3, 0.3, 0.3]
    cfg = td.GrowthConfig(patience=2, max_dendrites=3, seed=1)

    def drive(split):
        model = tiny()
        ctl = td.GrowthController(model, cfg)
        out = []
        for i, s in enumerate(scores):
            if i == split:
                sd_model, sd_ctl = state(model), ctl.state_dict()
                counts = {n: lay.num_dendrites for n, lay in td.dendritic_layers(model).items()}
                model = tiny()
                for n, layer in td.dendritic_layers(model).items():
                    while layer.num_dendrites < counts[n]:
                        layer.grow()
                model.load_state_dict(sd_model)
                ctl = td.GrowthController(model, cfg)
                ctl.load_state_dict(sd_ctl)
            perturb(model, i)
            r = ctl.step(s)
            out.append((r.event, r.num_dendrites, r.improved))
            if r.done:
                break
        return out, state(model)

    full, w_full = drive(split=-1)
    resumed, w_res = drive(split=5)
    assert full == resumed
    assert all(torch.equal(w_full[k], w_res[k]) for k in w_full)


def test_out_dir_records(tmp_path):
    model = tiny()
    ctl = td.GrowthController(model, td.GrowthConfig(patience=1, trial_warmup=1, max_dendrites=1), out_dir=tmp_path)
    for i, s in enumerate([0.1, 0.2, 0.2, 0.3, 0.3]):
        perturb(model, i)
        r = ctl.step(s, test=s - 0.05, train=s + 0.1 if i > 1 else None) if i > 1 else ctl.step(s, test=s - 0.05)
        if r.done:
            break
    rows = list(csv.DictReader(open(tmp_path / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5]
    assert rows[2]["event"] == "grow" and rows[1]["train"] == "" and rows[3]["train"] != ""
    arch = list(csv.DictReader(open(tmp_path / "architectures.csv")))
    assert [int(a["dendrites"]) for a in arch] == [0, 1]
    assert float(arch[1]["best_validation"]) == 0.3 and abs(float(arch[1]["test_at_best"]) - 0.25) < 1e-9
    assert int(arch[1]["parameters"]) > int(arch[0]["parameters"])
    assert (tmp_path / "growth.png").stat().st_size > 1000
    assert (tmp_path / "best" / "model.safetensors").exists()
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    td.load(tmp_path / "best", fresh)
    x = torch.randn(5, 3)
    assert torch.equal(fresh(x), model(x))


def test_controller_rejects_bad_setup():
    with pytest.raises(td.TargetError, match="add_dendrites"):
        td.GrowthController(torch.nn.Linear(2, 2), td.GrowthConfig(mode="plateau"))
    with pytest.raises(td.ConfigError):
        td.GrowthController(tiny(), config={"mode": "plateau"})


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"mode": "sometimes"}, "mode"),
        ({"patience": 0}, "patience"),
        ({"maximize": "yes"}, "maximize"),
        ({"smoothing": 1.0}, "smoothing"),
        ({"max_tries": 0}, "max_tries"),
        ({"improvement_rel": -1}, "improvement_rel"),
        ({"dendrite_training": "hebbian"}, "dendrite_training"),
        ({"candidate_pool": 0}, "candidate_pool"),
        ({"candidate_max_epochs": 0}, "candidate_max_epochs"),
        ({"freeze_earlier": 1}, "freeze_earlier"),
    ],
)
def test_growth_config_validation_names_the_field(kwargs, field):
    with pytest.raises(td.ConfigError, match=field):
        td.GrowthConfig(**kwargs)


def test_figure_is_drawn_only_at_growth_and_done(tmp_path, monkeypatch):
    from torch_dendrites.growth import sinks

    calls = []
    real = sinks.FigureSink.plot
    monkeypatch.setattr(sinks.FigureSink, "plot", lambda self, h: calls.append(h[-1]["event"]) or real(self, h))
    model = tiny()
    ctl = td.GrowthController(model, td.GrowthConfig(patience=2, max_dendrites=1), out_dir=tmp_path)
    res = run(model, ctl, [0.1, 0.2, 0.3, 0.3, 0.3, 0.4, 0.4, 0.4])
    assert [r.event for r in res] == ["", "", "", "", "grow", "", "", "done"]
    assert calls == ["grow", "done"]


def test_correlation_training_refuses_types_without_candidates():
    net = td.add_dendrites(
        torch.nn.Sequential(torch.nn.Linear(4, 3)),
        td.DendriteConfig(dendrite_type="lowrank", dendrite_options={"rank": 2}),
    )
    with pytest.raises(td.ConfigError, match="lowrank"):
        td.GrowthController(net, td.GrowthConfig(dendrite_training="correlation"))
    td.GrowthController(net, td.GrowthConfig(dendrite_training="gd"))  # fine


class _Writer:
    def __init__(self):
        self.scalars, self.texts = [], []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def add_text(self, tag, text, step):
        self.texts.append((tag, text, step))


def test_writer_gets_scores_structure_and_events():
    net = td.add_dendrites(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    w = _Writer()
    ctl = td.GrowthController(net, td.GrowthConfig(patience=1, max_dendrites=1), writer=w)
    ctl.step(0.5, test=0.4)
    ctl.step(0.5, test=0.4)  # no improvement: grows
    tags = {(t, s) for t, _, s in w.scalars}
    for tag in ("score", "smoothed", "best", "count", "parameters", "test"):
        assert (f"dendrites/{tag}", 1) in tags and (f"dendrites/{tag}", 2) in tags
    counts = [v for t, v, _ in w.scalars if t == "dendrites/count"]
    params = [v for t, v, _ in w.scalars if t == "dendrites/parameters"]
    assert counts == [0, 0] and params == [6, 6]  # logged as the epoch was scored, before the growth
    assert w.texts == [("dendrites/event", "epoch 2: grow", 2)]
    with pytest.raises(td.ConfigError, match="add_scalar"):
        td.GrowthController(net, td.GrowthConfig(), writer=object())


# ---------------------------------------------------------------------------------------- the fair trial
def test_a_set_below_the_old_best_at_first_survives_its_trial():
    """The trial is judged at the end of the set's own phase: scores first below the old best, then above."""
    model = tiny()
    ctl = td.GrowthController(model, td.GrowthConfig(patience=2, trial_warmup=3, max_dendrites=3))
    scores = [0.5, 0.6, 0.6, 0.6, 0.55, 0.58, 0.59, 0.61, 0.63, 0.63, 0.63]
    res = run(model, ctl, scores)
    assert [r.event for r in res] == ["", "", "", "grow", "", "", "", "", "", "", "grow"]
    assert res[-1].kept is True and res[-1].num_dendrites == 2 and ctl.best_counts == {"0": 1, "2": 1}
    assert [r["kept"] for r in ctl.history] == [""] * 10 + [1]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.sampled_from([0.1, 0.2, 0.3, 0.4, 0.5]), min_size=1, max_size=40),
    st.sampled_from(["plateau", "fixed", "every"]),
    st.integers(1, 3),
)
def test_controller_carries_out_its_decisions(scores, mode, max_dendrites):
    """restructured iff the parameters changed during the step; growth never passes max_dendrites; the
    run ends on the best weights and structure."""
    model = tiny()
    cfg = td.GrowthConfig(mode=mode, patience=1, trial_warmup=1, switch_every=2, max_dendrites=max_dendrites, seed=0)
    ctl = td.GrowthController(model, cfg)
    best = None
    for i, s in enumerate(scores + [0.0] * 60):
        perturb(model, i)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        r = ctl.step(s)
        after = model.state_dict()
        changed = before.keys() != after.keys() or any(not torch.equal(before[k], after[k]) for k in before)
        if r.improved:
            best = before
        assert r.restructured == changed or (r.restructured and r.event == "done" and not changed)
        assert r.num_dendrites <= max_dendrites
        if r.done:
            break
    assert ctl.done
    assert model.state_dict().keys() == best.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in best.items())


# ---------------------------------------------------------------------------------------- failures change nothing
class _FailingSink(td.growth.sinks.Sink):
    def on_best(self, controller):
        raise OSError(28, "No space left on device")


def test_failing_best_checkpoint_leaves_controller_and_model_unchanged():
    model = tiny()
    ctl = td.GrowthController(model, td.GrowthConfig(patience=1), sinks=[_FailingSink()])
    before_model, before_ctl = state(model), ctl.state_dict()
    with pytest.raises(OSError):
        ctl.step(0.5)  # improves: the sink writes best/ before anything is committed
    after = ctl.state_dict()
    assert {k: v for k, v in after.items() if k != "best_state"} == {
        k: v for k, v in before_ctl.items() if k != "best_state"
    }
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before_model.items())
    assert ctl.epoch == 0 and ctl.history == []


def test_out_of_memory_while_growing_leaves_every_layer_as_it_was(monkeypatch):
    model = tiny()
    ctl = td.GrowthController(model, td.GrowthConfig(patience=1, seed=0))
    ctl.step(0.5)
    before_model, before_ctl = state(model), ctl.state_dict()
    second = td.dendritic_layers(model)["2"].dendrites

    def boom(*a, **k):
        raise MemoryError("out of memory (simulated)")

    monkeypatch.setattr(second, "new_unit", boom)
    with pytest.raises(MemoryError):
        ctl.step(0.4)  # a switch: restore best + grow; the second layer fails to build its dendrite
    assert {n: la.num_dendrites for n, la in td.dendritic_layers(model).items()} == {"0": 0, "2": 0}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before_model.items())
    assert ctl.epoch == before_ctl["policy"]["epoch"] == 1
    monkeypatch.undo()
    assert ctl.step(0.4).event == "grow"  # and the run goes on from where it was


@pytest.mark.parametrize("name", ["epoch", "best", "dendrites", "event", "kept", "corr:0"])
def test_extra_scores_may_not_overwrite_history_columns(name):
    ctl = td.GrowthController(tiny(), td.GrowthConfig())
    with pytest.raises(td.ScoreError, match=name):
        ctl.step(0.5, **{name: 0.1})
    assert ctl.epoch == 0


def test_seed_is_bounded_and_the_largest_seed_grows():
    with pytest.raises(td.ConfigError, match="seed"):
        td.GrowthConfig(seed=2**64)
    model = tiny()
    ctl = td.GrowthController(model, td.GrowthConfig(patience=1, seed=2**32 - 1))
    ctl.step(0.5)
    assert ctl.step(0.5).event == "grow"


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"trial_warmup": 0}, "trial_warmup"),
        ({"trial_max_epochs": 0}, "trial_max_epochs"),
        ({"trial_warmup": 5, "trial_max_epochs": 3}, "trial_max_epochs"),
        ({"candidate_init_scale": 0.0}, "candidate_init_scale"),
        ({"seed": -1}, "seed"),
    ],
)
def test_new_growth_config_fields_are_validated(kwargs, field):
    with pytest.raises(td.ConfigError, match=field):
        td.GrowthConfig(**kwargs)


# ---------------------------------------------------------------------------------------- the best-weight snapshot
def test_snapshot_is_on_the_cpu_and_skips_frozen_base_weights():
    model = tiny()
    frozen = td.dendritic_layers(model)["0"].base.weight
    frozen.requires_grad_(False)  # like a LoRA model's base
    ctl = td.GrowthController(model, td.GrowthConfig(patience=1, trial_warmup=1, seed=0))
    ctl.step(0.5)
    assert "0.base.weight" not in ctl.best_state and "2.base.weight" in ctl.best_state
    assert all(t.device.type == "cpu" for t in ctl.best_state.values())
    ctl.step(0.4)  # grow
    ctl.step(0.6)  # the set's best: its dendrite weights are in the snapshot, the frozen weight still is not
    assert any(".dendrites.units.0." in k for k in ctl.best_state) and "0.base.weight" not in ctl.best_state
    nbytes = sum(t.numel() * t.element_size() for t in ctl.best_state.values())
    assert ctl.history[-1]["snapshot_bytes"] == nbytes
    with torch.no_grad():
        frozen.add_(1.0)  # someone changed a frozen weight: it cannot be restored, and we say so
    with pytest.warns(UserWarning, match="0.base.weight"):
        r = ctl.step(0.5)
    assert r.event == "grow" and ctl.best_counts == {"0": 1, "2": 1}


# ---------------------------------------------------------------------------------------- older saved states
FIXTURES = Path(__file__).with_name("fixtures") / "v1_controller"


def test_version_1_controller_state_loads_and_continues():
    """A gd run saved by torch-dendrites 0.1.0 right after a retry (tests/fixtures/make_v1_controller_fixtures.py)."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    ctl = td.GrowthController(td.add_dendrites(copy.deepcopy(model)), td.GrowthConfig(patience=1, seed=0))
    td.load(FIXTURES / "gd_trial", model, ctl)
    assert ctl.model is model and ctl.epoch == 4 and ctl.num_dendrites == 1 and ctl.best_score == 0.6
    st_ = ctl.state
    assert st_.trial and st_.phase_start == 4 and st_.pre_growth_best == 0.6 and st_.phase_best is None
    assert st_.tries == 1 and st_.growths == 2 and ctl.best_counts == {"0": 0, "2": 0}
    # the retried set's trial goes on under the new rule: warm-up 3 epochs, then not better than 0.6: done
    assert [ctl.step(s).event for s in (0.55, 0.55, 0.55)] == ["", "", "done"]
    assert ctl.num_dendrites == 0


def test_version_1_candidate_phase_loads_and_continues():
    model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    cfg = td.GrowthConfig(patience=1, seed=0, dendrite_training="correlation")
    ctl = td.GrowthController(td.add_dendrites(copy.deepcopy(model)), cfg)
    td.load(FIXTURES / "correlation_candidates", model, ctl)
    assert ctl.phase == "candidate" and ctl.epoch == 3 and ctl.cand_start == 2
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".candidates." in n for n in trainable)
    assert ctl.step(0.5).event == "grow"  # the candidate phase's cap (as long as phase 0: 2 epochs)


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda s: s.update(version=99), "newer"),
        (lambda s: s.update(shiny=1), "unknown"),
        (lambda s: s["policy"].update(shiny=1), "unknown"),
        (lambda s: s["policy"].update(epoch=-1), "epoch"),
        (lambda s: s["policy"].update(phase="dreaming"), "phase"),
        (lambda s: s["policy"].update(best="0.5"), "best"),
        (lambda s: s["policy"].update(best=float("nan")), "best"),
        (lambda s: s["policy"].update(tries=True), "tries"),
        (lambda s: s.update(history=[]), "history"),
        (lambda s: s["best_counts"].update({"0": 7}), "best_counts"),
        (lambda s: s["best_counts"].update({"nope": 0}), "best_counts"),
        (lambda s: s.update(best_state={"0.base.weight": torch.zeros(3)}), "best_state"),
        (lambda s: s.update(best_state={"nope": torch.zeros(3)}), "best_state"),
    ],
)
def test_malformed_controller_state_is_refused_and_changes_nothing(edit, match):
    model = tiny()
    ctl = td.GrowthController(model, td.GrowthConfig(patience=1, trial_warmup=1, max_dendrites=3))
    for s in (0.1, 0.2, 0.2, 0.3):
        ctl.step(s)
    good = ctl.state_dict()
    bad = copy.deepcopy(good)
    edit(bad)
    fresh_ctl = td.GrowthController(model, td.GrowthConfig(patience=1, trial_warmup=1, max_dendrites=3))
    with pytest.raises(td.StateError, match=match):
        fresh_ctl.load_state_dict(bad)
    assert fresh_ctl.epoch == 0 and fresh_ctl.history == [] and fresh_ctl.best_state is None


def test_warns_when_the_optimizer_was_not_rebuilt_after_growth():
    model = tiny()
    ctl = td.GrowthController(model, td.GrowthConfig(patience=1, trial_warmup=1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 3)

    def epoch():
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()

    epoch()
    ctl.step(0.5)
    epoch()
    assert ctl.step(0.4).restructured  # grew: the old optimizer does not hold the new dendrites
    epoch()
    with pytest.warns(UserWarning, match="sync_optimizer"):
        ctl.step(0.45)
    # rebuilt: no warning
    assert ctl.step(0.4).event == "retry"
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    epoch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ctl.step(0.46)


def _frozen_flags(model):
    """Per layer: whether each dendrite set's input weights are frozen (flag and requires_grad agree)."""
    out = {}
    for name, layer in td.dendritic_layers(model).items():
        flags = []
        for u in layer.dendrites.units:
            frozen = bool(getattr(u, "inputs_frozen", False))
            assert u.out_gain.requires_grad
            assert all(p.requires_grad != frozen for n, p in u.named_parameters() if n != "out_gain")
            flags.append(frozen)
        out[name] = flags
    return out


def test_gd_growth_freezes_the_sets_before_the_newest_and_a_rollback_thaws():
    model = tiny()
    ctl = td.GrowthController(model, td.GrowthConfig(patience=1, trial_warmup=1, max_dendrites=3, seed=1))
    x = torch.randn(5, 3)
    assert [r.event for r in run(model, ctl, [0.1, 0.1])] == ["", "grow"]
    assert set(map(tuple, _frozen_flags(model).values())) == {(False,)}
    with torch.no_grad():
        before = model(x)
    r = ctl.step(0.2)  # the trial's best beats 0.1 ...
    assert r.event == ""
    r = ctl.step(0.2)  # ... and its plateau keeps the set and grows the next
    assert r.event == "grow" and r.num_dendrites == 2
    assert set(map(tuple, _frozen_flags(model).values())) == {(True, False)}
    with torch.no_grad():
        assert torch.equal(model(x), before)  # growth and freezing change nothing the model computes
    # a hand-written loop over every parameter: the frozen weights get zero gradients and do not move
    frozen = [p for layer in td.dendritic_layers(model).values() for p in layer.dendrites.frozen_unit_parameters()]
    kept = [p.clone() for p in frozen]
    model(x).square().mean().backward()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(p.grad, alpha=-0.1)
    assert all(torch.equal(p, k) for p, k in zip(frozen, kept))
    assert frozen
    ctl.step(0.2)  # the second set's trial never beats 0.2: rolled back ...
    r = ctl.step(0.2)
    assert r.event == "retry" and r.num_dendrites == 2
    assert set(map(tuple, _frozen_flags(model).values())) == {(True, False)}
    ctl.step(0.2)
    r = ctl.step(0.2)
    assert r.done and r.num_dendrites == 1  # ... for good: the one set left trains its input weights again
    assert set(map(tuple, _frozen_flags(model).values())) == {(False,)}


def test_freeze_earlier_off_and_correlation_mode_leave_gd_sets_trainable():
    model = tiny()
    ctl = td.GrowthController(model, td.GrowthConfig(patience=1, trial_warmup=1, freeze_earlier=False))
    assert [r.event for r in run(model, ctl, [0.1, 0.1, 0.2, 0.2])] == ["", "grow", "", "grow"]
    assert set(map(tuple, _frozen_flags(model).values())) == {(False, False)}


def test_an_optimizer_that_moves_frozen_sets_is_refused():
    model = tiny()
    ctl = td.GrowthController(model, td.GrowthConfig(patience=1, trial_warmup=1, seed=2))
    run(model, ctl, [0.1, 0.1, 0.2, 0.2])  # two sets: the first frozen
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)  # decays every parameter it holds
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    before = state(model)
    with pytest.raises(td.StateError, match="frozen input weights"):
        ctl.step(0.3)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_frozen_sets_survive_save_and_load(tmp_path):
    model = tiny()
    ctl = td.GrowthController(model, td.GrowthConfig(patience=1, trial_warmup=1, seed=3))
    run(model, ctl, [0.1, 0.1, 0.2, 0.2])
    folder = td.save(tmp_path / "m", model, ctl)
    fresh = td.add_dendrites(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)))
    ctl2 = td.GrowthController(fresh, td.GrowthConfig(patience=1, trial_warmup=1, seed=3))
    td.load(folder, fresh, ctl2)
    assert _frozen_flags(fresh) == _frozen_flags(model) == {n: [True, False] for n in _frozen_flags(model)}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in fresh.state_dict().items())
