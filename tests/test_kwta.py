"""k-winners-take-all (td.KWTA): exactly k winners, gradient to winners only, boosting that moves the winners
in training and never in eval, any feature axis, state saved with the model."""

from __future__ import annotations

import pytest
import torch

import torch_dendrites as td


def test_exactly_k_winners_per_sample_even_with_ties():
    kwta = td.KWTA(10, k=3)
    x = torch.randn(7, 10)
    x[0] = 1.0  # all tied: still exactly k winners
    y = kwta(x)
    mask = kwta.winners(x)
    assert mask.sum(1).tolist() == [3] * 7
    assert torch.equal(y, x * mask)
    # the winners are the 3 largest values of each (untied) sample, passed unchanged
    top = x[1:].topk(3, dim=1)
    assert torch.equal(y[1:].gather(1, top.indices), top.values)
    assert (y[1:] != 0).sum(1).tolist() == [3] * 6


def test_fraction_gives_k_and_feature_axis_is_chosen():
    assert td.KWTA(512, fraction=0.05).k == 26
    assert td.KWTA(10, fraction=0.01).k == 1
    conv = td.KWTA(6, k=2, dim=1)  # channels compete at every pixel
    x = torch.randn(2, 6, 4, 5)
    mask = conv.winners(x)
    assert (mask.sum(1) == 2).all()
    assert torch.equal(conv(x), x * mask)
    tok = td.KWTA(8, k=1)
    assert ((tok(torch.randn(2, 3, 8)) != 0).sum(-1) == 1).all()


def test_gradient_reaches_the_winners_only():
    kwta = td.KWTA(6, k=2)
    x = torch.randn(4, 6, requires_grad=True)
    kwta(x).sum().backward()
    assert torch.equal(x.grad, kwta.winners(x.detach()).float())


def test_boosting_changes_the_winners_in_training_and_not_in_eval():
    torch.manual_seed(0)
    x = torch.randn(1, 8)
    first = set(x[0].topk(2).indices.tolist())
    kwta = td.KWTA(8, k=2, boost_strength=10.0, duty_cycle_period=20)
    kwta.eval()
    for _ in range(10):  # eval: same winners, no duty-cycle update
        assert set(kwta(x)[0].nonzero().flatten().tolist()) == first
    assert kwta.duty_cycle.abs().sum() == 0 and int(kwta.samples_seen) == 0
    kwta.train()
    seen = []
    for _ in range(10):
        seen.append(set(kwta(x)[0].nonzero().flatten().tolist()))
    assert seen[0] == first
    assert any(s != first for s in seen)  # frequent winners were boosted down, others up
    duty = kwta.duty_cycle.clone()
    kwta.eval()
    frozen = [set(kwta(x)[0].nonzero().flatten().tolist()) for _ in range(5)]
    assert all(s == frozen[0] for s in frozen)
    assert torch.equal(kwta.duty_cycle, duty)


def test_without_boosting_training_never_moves_the_winners():
    x = torch.randn(3, 8)
    kwta = td.KWTA(8, k=2).train()
    masks = [kwta.winners(x) for _ in range(3)] + [kwta(x) != 0 for _ in range(3)]
    assert all(torch.equal(m, masks[0]) for m in masks)
    assert kwta.duty_cycle.sum() > 0  # tracked anyway (cheap), used only when boosting


def test_duty_cycle_is_a_running_mean_then_a_windowed_average():
    kwta = td.KWTA(4, k=1, duty_cycle_period=4)
    a, b = torch.tensor([[1.0, 0, 0, 0]] * 2), torch.tensor([[0, 1.0, 0, 0]] * 2)
    kwta(a)
    assert kwta.duty_cycle.tolist() == [1, 0, 0, 0]
    kwta(b)  # 4 samples seen: the exact mean of all of them
    assert kwta.duty_cycle.tolist() == [0.5, 0.5, 0, 0]
    kwta(b)  # the window is full: weight 2/4 on the new batch
    assert kwta.duty_cycle.tolist() == [0.25, 0.75, 0, 0]


def test_decay_boost_and_state_round_trip(tmp_path):
    kwta = td.KWTA(8, k=2, boost_strength=2.0, boost_decay=0.5)
    assert kwta.decay_boost() == 1.0
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), kwta, torch.nn.Linear(8, 2))
    net = td.add_dendrites(net)
    net(torch.randn(16, 4))
    td.save(tmp_path / "m", net)
    fresh = td.load(tmp_path / "m", torch.nn.Sequential(torch.nn.Linear(4, 8), td.KWTA(8, k=2), torch.nn.Linear(8, 2)))
    assert float(fresh[1].boost_strength) == 1.0
    assert torch.equal(fresh[1].duty_cycle, kwta.duty_cycle) and int(fresh[1].samples_seen) == 16


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "exactly one of k and fraction"),
        ({"k": 2, "fraction": 0.5}, "exactly one of k and fraction"),
        ({"k": 0}, "k=0"),
        ({"k": 9}, "at most num_features=8"),
        ({"fraction": 0.0}, "fraction=0.0"),
        ({"fraction": 1.5}, "fraction=1.5"),
        ({"k": 1, "boost_strength": -1.0}, "boost_strength=-1.0"),
        ({"k": 1, "boost_decay": 2.0}, "boost_decay=2.0"),
        ({"k": 1, "duty_cycle_period": 0}, "duty_cycle_period=0"),
        ({"k": 1, "dim": 1.5}, "dim=1.5"),
    ],
)
def test_bad_arguments_are_config_errors(kwargs, match):
    with pytest.raises(td.ConfigError, match=match):
        td.KWTA(8, **kwargs)


def test_wrong_feature_axis_is_a_state_error():
    with pytest.raises(td.StateError, match="set dim="):
        td.KWTA(8, k=2)(torch.randn(8, 3))
