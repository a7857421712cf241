"""GrowthController on scripted score sequences."""

from __future__ import annotations

import csv
import math

import pytest
import torch

import torch_dendrites as td


def tiny(seed=0):
    torch.manual_seed(seed)
    return td.add_dendrites(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)))


def perturb(model, seed):
    """Stand-in for an epoch of training: every parameter moves."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


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
    assert events == ["", "grow", "", "retry", "", "done"]
    assert r.done and r.restructured and r.num_dendrites == 0
    now = model.state_dict()
    assert now.keys() == best.keys()
    assert all(torch.equal(now[k], v) for k, v in best.items())
    with pytest.raises(td.StateError, match="done"):
        ctl.step(0.9)


def test_retry_uses_fresh_dendrite_weights():
    model = tiny()
    ctl = td.GrowthController(model, td.GrowthConfig(patience=1, max_tries=3, seed=5))
    ctl.step(0.5)
    ctl.step(0.4)  # grow
    w1 = td.dendritic_layers(model)["0"].dendrites.units[0].weight.clone()
    r = ctl.step(0.4)  # retry
    assert r.event == "retry"
    w2 = td.dendritic_layers(model)["0"].dendrites.units[0].weight
    assert not torch.equal(w1, w2)


def test_successful_growth_then_max_dendrites_ends():
    model = tiny()
    ctl = td.GrowthController(model, td.GrowthConfig(patience=1, max_dendrites=2))
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
    ctl = td.GrowthController(model, td.GrowthConfig(patience=1, max_dendrites=1), out_dir=tmp_path)
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
    ],
)
def test_growth_config_validation_names_the_field(kwargs, field):
    with pytest.raises(td.ConfigError, match=field):
        td.GrowthConfig(**kwargs)


def test_figure_is_drawn_only_at_growth_and_done(tmp_path, monkeypatch):
    from torch_dendrites import reporting

    calls = []
    real = reporting.Reporter.plot
    monkeypatch.setattr(reporting.Reporter, "plot", lambda self, h: calls.append(h[-1]["event"]) or real(self, h))
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
