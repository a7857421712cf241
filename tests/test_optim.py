"""td.param_groups and td.sync_optimizer."""

from __future__ import annotations

import pytest
import torch

import torch_dendrites as td


def grown():
    torch.manual_seed(0)
    net = td.add_dendrites(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)))
    td.grow(net)
    return net


def test_param_groups_split_dendrites_with_their_own_learning_rate():
    net = grown()
    groups = td.param_groups(net, lr=0.01, dendrite_lr_scale=3.0)
    dend = {id(p) for layer in td.dendritic_layers(net).values() for p in layer.dendrite_parameters()}
    assert {id(p) for p in groups[1]["params"]} == dend and groups[1]["dendrites"] is True
    assert not {id(p) for p in groups[0]["params"]} & dend
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(net.parameters()))
    opt = torch.optim.SGD(groups, lr=0.01)
    assert [g["lr"] for g in opt.param_groups] == [0.01, pytest.approx(0.03)]


def test_param_groups_leave_out_frozen_parameters():
    net = grown()
    net[0].base.weight.requires_grad_(False)
    held = {id(p) for g in td.param_groups(net, lr=0.1) for p in g["params"]}
    assert id(net[0].base.weight) not in held and id(net[0].base.bias) in held


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "1", True])
def test_param_groups_validate(bad):
    with pytest.raises(td.ConfigError):
        td.param_groups(grown(), lr=bad)
    with pytest.raises(td.ConfigError):
        td.param_groups(grown(), lr=0.1, dendrite_lr_scale=bad)


def test_sync_optimizer_puts_new_dendrites_in_the_dendrite_group():
    net = grown()
    opt = torch.optim.Adam(td.param_groups(net, lr=0.01, dendrite_lr_scale=10.0))
    before = [len(g["params"]) for g in opt.param_groups]
    td.grow(net)
    added = td.sync_optimizer(opt, net)
    assert added == 2 * 4  # per layer: weight, bias, output gain, cascade gain
    assert len(opt.param_groups[0]["params"]) == before[0]
    assert len(opt.param_groups[1]["params"]) == before[1] + added
    x = torch.randn(5, 3)
    net(x).pow(2).sum().backward()
    opt.step()  # the new parameters train at the dendrite learning rate


def test_sync_optimizer_without_a_dendrite_group_uses_the_given_group():
    net = grown()
    opt = torch.optim.SGD([{"params": list(net.parameters())}, {"params": [], "lr": 0.5}], lr=0.1)
    td.grow(net)
    td.sync_optimizer(opt, net, group=1)
    assert len(opt.param_groups[1]["params"]) == 8


def test_sync_optimizer_drops_frozen_sets_so_weight_decay_never_moves_them():
    """An AdamW with weight decay over every parameter, kept in step with td.sync_optimizer through gd growth:
    the frozen input weights of the sets before the newest leave it, so the controller never refuses a step."""
    torch.manual_seed(0)
    net = td.add_dendrites(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)))
    opt = torch.optim.AdamW(net.parameters(), lr=0.01, weight_decay=0.1)
    ctl = td.GrowthController(net, td.GrowthConfig(mode="every", max_dendrites=3, seed=0))
    x, y = torch.randn(16, 3), torch.randn(16, 2)
    for epoch in range(3):
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        r = ctl.step(0.1 * (epoch + 1))
        if r.restructured:
            td.sync_optimizer(opt, net)
    frozen = {id(w) for layer in td.dendritic_layers(net).values() for w in layer.dendrites.frozen_unit_parameters()}
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert frozen and not frozen & held
    assert held == {id(p) for p in net.parameters() if p.requires_grad}
    kept = {
        id(w): w.clone()
        for layer in td.dendritic_layers(net).values()
        for w in layer.dendrites.frozen_unit_parameters()
    }
    opt.zero_grad()
    torch.nn.functional.mse_loss(net(x), y).backward()
    opt.step()
    ctl.step(0.5)  # no StateError: nothing frozen moved
    assert all(
        torch.equal(w, kept[id(w)])
        for layer in td.dendritic_layers(net).values()
        for w in layer.dendrites.frozen_unit_parameters()
    )
