"""What a new user runs into first: custom layer types that cannot run dendrites, layers the library cannot
wrap, optimizers that cannot follow growth, checkpoints from before wrapping, and what td.summary reports."""

from __future__ import annotations

import pytest
import torch
from models import ConvBN, ConvBNNet
from torch import nn

import torch_dendrites as td


class DataDependent(nn.Module):
    """A layer whose forward branches on its data: fine eagerly, impossible under torch.func.vmap."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4))
        self.out_features = 3

    def forward(self, x):
        y = x @ self.weight.t()
        return y if y.sum() > -1e9 else -y


class TwoOutputs(nn.Module):
    """A layer returning a tuple (output, auxiliary), as many recurrent and attention blocks do."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.out_features = 3

    def forward(self, x):
        return self.lin(x), x.mean()


class PlainBN(ConvBN):
    """The Conv+BN unit registered with the default (vmap) spec: batch norm cannot run that way."""


td.register_layer_type(DataDependent)
td.register_layer_type(TwoOutputs)
td.register_layer_type(PlainBN, neuron_axis=-3, num_neurons=lambda m: m[0].out_channels)


@pytest.mark.parametrize("layer,match", [(DataDependent, "vmap"), (TwoOutputs, "returns a tuple, not a tensor")])
def test_registered_type_that_cannot_run_dendrites_fails_at_first_call_with_the_fix(layer, match):
    model = td.add_dendrites(nn.Sequential(layer()), td.DendriteConfig(target_types=[layer]))
    with pytest.raises(td.UnsupportedModuleError, match=match) as info:
        model(torch.randn(2, 4))
    msg = str(info.value)
    assert "layer '0'" in msg and layer.__name__ in msg
    assert ("batched_forward" in msg and "register_layer_type" in msg) or "exclude" in msg
    assert model[0].num_dendrites == 0  # nothing was grown by the trial


def test_conv_bn_unit_needs_its_own_spec():
    torch.manual_seed(0)
    model = td.add_dendrites(nn.Sequential(PlainBN(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))))
    model.train()
    with pytest.raises(td.UnsupportedModuleError, match="vmap") as info:
        model(torch.randn(2, 3, 6, 6))
    assert "PlainBN" in str(info.value)
    # with its own spec (tests/models.py: ConvBNSpec, the README's recipe) the same unit runs, trains and grows
    net = td.add_dendrites(ConvBNNet(), td.DendriteConfig(target_types=[ConvBN]))
    td.grow(net)
    net.train()
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    assert all(p.grad is not None for layer in td.dendritic_layers(net).values() for p in layer.dendrite_parameters())


def test_trial_runs_once_and_leaves_buffers_and_rng_alone():
    x = torch.randn(2, 3, 8, 8)
    torch.manual_seed(0)
    net = td.add_dendrites(ConvBNNet(), td.DendriteConfig(target_types=[ConvBN]))
    torch.manual_seed(0)
    ref = ConvBNNet()
    net.train()
    ref.train()
    state = torch.get_rng_state()
    with torch.no_grad():
        assert torch.equal(net(x), ref(x))
    assert torch.equal(torch.get_rng_state(), state)
    assert all(layer._spec_checked for layer in td.dendritic_layers(net).values())
    # running statistics moved exactly as one plain forward moves them
    for a, b in ((net.block1.base[1], ref.block1[1]), (net.block2.base[1], ref.block2[1])):
        assert torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_var, b.running_var)
        assert int(a.num_batches_tracked) == int(b.num_batches_tracked) == 1


def test_summary_names_recurrent_layers_it_cannot_wrap():
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.lstm = nn.LSTM(4, 5, batch_first=True)
            self.gru = nn.GRU(5, 5)
            self.cell = nn.LSTMCell(5, 5)
            self.bag = nn.EmbeddingBag(10, 4)
            self.head = nn.Linear(5, 2)

    s = td.summary(td.add_dendrites(Seq()))
    reasons = {r["name"]: r["reason"] for r in s.skipped}
    assert [r["name"] for r in s.wrapped] == ["head"]
    for name, cls in (("lstm", "nn.LSTM"), ("gru", "nn.GRU"), ("cell", "nn.LSTMCell")):
        assert reasons[name].startswith("not supported") and cls in reasons[name] and "fused" in reasons[name]
    assert "nn.EmbeddingBag" in reasons["bag"]
    assert "only when named" in reasons["emb"]  # supported, but never wrapped by default
    text = str(s)
    assert "lstm" in text and "fused recurrent kernel" in text


def test_nothing_wrappable_error_lists_the_reasons():
    with pytest.raises(td.TargetError, match="nn.LSTM"):
        td.add_dendrites(nn.Sequential(nn.LSTM(3, 3)))


def test_summary_trainable_and_frozen_split():
    net = td.add_dendrites(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
    td.grow(net)
    net[0].base.weight.requires_grad_(False)  # 12 frozen
    s = td.summary(net)
    assert s.total_parameters == 15 + 8 + (15 + 3) + (8 + 2)
    assert s.frozen_parameters == 12
    assert s.trainable_base_parameters == 23 - 12 and s.trainable_dendrite_parameters == 28
    assert s.trainable_parameters == s.total_parameters - 12
    text = str(s)
    assert f"trainable: {s.trainable_parameters:,} (" in text and "frozen: 12 (" in text
    assert s.to_dict()["frozen_parameters"] == 12


def test_sync_optimizer_refuses_lbfgs():
    net = td.add_dendrites(nn.Sequential(nn.Linear(3, 2)))
    opt = torch.optim.LBFGS(net.parameters())
    td.grow(net)
    with pytest.raises(td.StateError, match="LBFGS.*new optimizer"):
        td.sync_optimizer(opt, net)
    assert len(opt.param_groups[0]["params"]) == 2  # untouched


def test_sync_optimizer_keeps_a_decay_no_decay_split():
    net = td.add_dendrites(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
    decay = [p for p in net.parameters() if p.dim() >= 2]
    no_decay = [p for p in net.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}])
    td.grow(net)
    td.grow(net)
    td.sync_optimizer(opt, net)
    units = [u for layer in td.dendritic_layers(net).values() for u in layer.dendrites.units]
    held0 = {id(p) for p in opt.param_groups[0]["params"]}
    held1 = {id(p) for p in opt.param_groups[1]["params"]}
    for u in units:
        assert id(u.weight) in held0
        assert id(u.bias) in held1 and id(u.out_gain) in held1
        if u.cascade_gain is not None:
            assert id(u.cascade_gain) in held1  # a gain, though 2-D
    # with the library's dendrite group, everything new still goes there
    net2 = td.add_dendrites(nn.Sequential(nn.Linear(3, 4)))
    opt2 = torch.optim.SGD(td.param_groups(net2, lr=0.1), lr=0.1)
    td.grow(net2)
    assert td.sync_optimizer(opt2, net2) == 3 and len(opt2.param_groups[1]["params"]) == 3


def test_plain_state_dict_from_before_wrapping_loads_into_a_wrapped_model():
    from models import Shared

    torch.manual_seed(0)
    trained = Shared()
    saved = trained.state_dict()  # keys "block.weight", "again.weight", "out.weight", ...
    torch.manual_seed(1)
    model = td.add_dendrites(Shared())
    td.grow(model)
    dendrites = {k: v.clone() for k, v in model.state_dict().items() if ".dendrites." in k}
    with pytest.raises(RuntimeError):
        model.load_state_dict(saved)  # what users hit without the helper
    td.load_base_state_dict(model, saved)
    assert torch.equal(model.block.base.weight, saved["block.weight"])
    assert torch.equal(model.out.base.bias, saved["out.bias"])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in dendrites.items())  # dendrites untouched
    x = torch.randn(3, 5)
    with torch.no_grad():
        assert torch.allclose(model(x), trained(x))  # gains are zero: the trained model's function


def test_plain_state_dict_mismatch_is_refused_and_changes_nothing():
    model = td.add_dendrites(nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = nn.Sequential(nn.Linear(3, 2)).state_dict()
    with pytest.raises(td.CheckpointError, match=r"missing keys \['1.base.bias', '1.base.weight'\]"):
        td.load_base_state_dict(model, bad)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    td.load_base_state_dict(model, bad, strict=False)  # what fits
    assert torch.equal(model[0].base.weight, bad["0.weight"])
    wrong = {"0.weight": torch.zeros(5, 5)}
    with pytest.raises(td.CheckpointError, match="shape"):
        td.load_base_state_dict(model, wrong, strict=False)


def test_spec_with_a_wrong_neuron_count_fails_at_first_call():
    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 4))

        def forward(self, x):
            return x @ self.weight.t()

    td.register_layer_type(Wide, num_neurons=lambda m: 5)  # the layer has 3 output features, not 5
    model = td.add_dendrites(nn.Sequential(Wide()), td.DendriteConfig(target_types=[Wide]))
    with pytest.raises(td.UnsupportedModuleError, match=r"output shape \(2, 3\)"):
        model(torch.randn(2, 4))
