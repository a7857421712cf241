"""Target selection and bad input: clear errors, and a failed call leaves the model exactly as it was."""

from __future__ import annotations

import pytest
import torch
from models import CASES, CNNBN, MLP, TokenMLP, transformer
from torch import nn

import torch_dendrites as td


def snapshot(model):
    return (
        {n: type(m) for n, m in model.named_modules()},
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: id(p) for n, p in model.named_parameters()},
    )


def assert_untouched(model, snap):
    classes, state, ids = snap
    assert {n: type(m) for n, m in model.named_modules()} == classes
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())
    assert {n: id(p) for n, p in model.named_parameters()} == ids
    assert not hasattr(model, "_dendrite_record")


def wrapped_names(model):
    return sorted(td.dendritic_layers(model))


def test_targets_by_type_name_suffix_regex_filter_and_exclude():
    assert wrapped_names(td.add_dendrites(CNNBN(), td.DendriteConfig(target_types=[nn.Conv2d]))) == ["conv1", "conv2"]
    assert wrapped_names(td.add_dendrites(MLP(), td.DendriteConfig(target_names=["fc2"]))) == ["fc2"]
    assert wrapped_names(td.add_dendrites(MLP(), td.DendriteConfig(target_names=[r"fc[12]"]))) == ["fc1", "fc2"]
    tr = td.add_dendrites(transformer(), td.DendriteConfig(target_names=["linear1"]))
    assert wrapped_names(tr) == ["0.layers.0.linear1", "0.layers.1.linear1"]  # dotted suffix
    cfg = td.DendriteConfig(filter_fn=lambda m, n: isinstance(m, nn.Linear) and m.out_features == 16)
    assert wrapped_names(td.add_dendrites(MLP(), cfg)) == ["fc1", "fc2"]
    assert wrapped_names(td.add_dendrites(MLP(), td.DendriteConfig(exclude=["fc3"]))) == ["fc1", "fc2"]
    s = td.summary(td.add_dendrites(MLP(), td.DendriteConfig(exclude=["fc3"])))
    assert s.skipped == [{"name": "fc3", "type": "Linear", "reason": "excluded by 'fc3'"}]


def test_subclasses_of_supported_types_are_handled():
    class MyLinear(nn.Linear):
        pass

    model = td.add_dendrites(nn.Sequential(MyLinear(3, 2)))
    x = torch.randn(4, 3)
    ref = model(x)
    td.grow(model)
    assert torch.equal(model(x), ref)
    assert isinstance(model[0].base, MyLinear)


def test_nothing_matched_names_patterns_and_types_present():
    model = MLP()
    snap = snapshot(model)
    with pytest.raises(td.TargetError) as info:
        td.add_dendrites(model, td.DendriteConfig(target_names=["decoder"]))
    msg = str(info.value)
    assert "target_names=['decoder']" in msg and "Module types present: Linear" in msg
    assert_untouched(model, snap)


def test_nothing_matched_without_supported_layers():
    model = nn.Sequential(nn.ReLU(), nn.LayerNorm(3))
    with pytest.raises(td.TargetError, match="Module types present: LayerNorm, ReLU"):
        td.add_dendrites(model)


def test_unsupported_type_targeted_explicitly():
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    snap = snapshot(model)
    with pytest.raises(td.UnsupportedModuleError) as info:
        td.add_dendrites(model, td.DendriteConfig(target_types=[nn.LayerNorm]))
    assert "LayerNorm" in str(info.value) and "torch.nn.modules.linear.Linear" in str(info.value)
    assert "register_layer_type" in str(info.value)
    assert_untouched(model, snap)
    with pytest.raises(td.UnsupportedModuleError, match="register_layer_type"):
        td.add_dendrites(model, td.DendriteConfig(target_names=["1"]))
    assert_untouched(model, snap)


def test_container_named_explicitly_suggests_regex():
    model = TokenMLP()
    outer = nn.Sequential()
    outer.add_module("block", model)
    with pytest.raises(td.UnsupportedModuleError, match=r"block\\\\\.\.\*"):
        td.add_dendrites(outer, td.DendriteConfig(target_names=["block"]))
    assert wrapped_names(td.add_dendrites(outer, td.DendriteConfig(target_names=[r"block\..*"]))) == [
        "block.down",
        "block.up",
    ]


def test_failing_filter_fn_leaves_model_untouched():
    model = CNNBN()
    snap = snapshot(model)

    def boom(module, name):
        if name == "fc":
            raise RuntimeError("user bug")
        return True

    with pytest.raises(RuntimeError, match="user bug"):
        td.add_dendrites(model, td.DendriteConfig(filter_fn=boom))
    assert_untouched(model, snap)


def test_bad_neuron_count_leaves_model_untouched():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(2))

        def forward(self, x):
            return x * self.w

    td.register_layer_type(Odd)  # no out_features: the neuron count is unknown
    model = nn.Sequential(nn.Linear(2, 2), Odd())
    snap = snapshot(model)
    with pytest.raises(td.UnsupportedModuleError, match="num_neurons"):
        td.add_dendrites(model)
    assert_untouched(model, snap)


def test_lazy_modules_need_materializing():
    model = nn.Sequential(nn.LazyLinear(3))
    with pytest.raises(td.TargetError, match="forward pass"):
        td.add_dendrites(model)
    model(torch.randn(2, 4))
    assert wrapped_names(td.add_dendrites(model)) == ["0"]


def test_double_add_and_remove_without_dendrites():
    model = td.add_dendrites(MLP())
    snap = snapshot(model)
    with pytest.raises(td.TargetError, match="already has dendrites"):
        td.add_dendrites(model)
    assert {n: type(m) for n, m in model.named_modules()} == snap[0]
    with pytest.raises(td.TargetError, match="no dendrites"):
        td.remove_dendrites(MLP())
    with pytest.raises(td.TargetError, match="add_dendrites"):
        td.grow(MLP())


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"target_types": [int]}, "target_types"),
        ({"target_names": [""]}, "target_names"),
        ({"target_names": ["fc("]}, "target_names"),
        ({"exclude": [3]}, "exclude"),
        ({"filter_fn": 3}, "filter_fn"),
        ({"dendrite_type": "spiky"}, "dendrite_type"),
        ({"activation": "relu6"}, "activation"),
        ({"activation": ["sigmoid"]}, "activation"),  # unhashable: a ConfigError, not a raw TypeError
        ({"dendrite_type": ["cascade"]}, "dendrite_type"),
        ({"dendrite_options": [("rank", 2)]}, "dendrite_options"),
        ({"init_scale": 0}, "init_scale"),
        ({"init_scale": float("nan")}, "init_scale"),
        ({"neuron_axis": 1.5}, "neuron_axis"),
    ],
)
def test_dendrite_config_validation_names_the_field(kwargs, field):
    with pytest.raises(td.ConfigError, match=field):
        td.DendriteConfig(**kwargs)


def test_config_must_be_a_dendrite_config():
    with pytest.raises(td.ConfigError, match="DendriteConfig"):
        td.add_dendrites(MLP(), {"target_names": ["fc1"]})


def test_errors_are_builtin_subclasses():
    assert issubclass(td.ConfigError, ValueError) and issubclass(td.TargetError, ValueError)
    assert issubclass(td.UnsupportedModuleError, TypeError) and issubclass(td.StateError, RuntimeError)
    assert all(issubclass(e, td.DendriteError) for e in (td.ConfigError, td.ScoreError, td.CheckpointError))


def test_hf_style_conv1d_by_qualified_name():
    """GPT-2's Conv1D is matched by qualified name, without importing transformers."""
    Conv1D = type("Conv1D", (nn.Module,), {"__module__": "transformers.pytorch_utils"})

    def init(self, nf, nx):
        nn.Module.__init__(self)
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], self.nf)

    Conv1D.__init__, Conv1D.forward = init, forward
    model = nn.Sequential(Conv1D(6, 4))
    x = torch.randn(2, 3, 4)
    ref = model(x)
    td.add_dendrites(model)
    td.grow(model)
    assert torch.equal(model(x), ref)
    torch.nn.init.normal_(model[0].dendrites.units[0].out_gain)
    u = model[0].dendrites.units[0]
    expect = ref + u.out_gain * torch.sigmoid(x @ u.weight + u.bias)
    assert (model(x) - expect).abs().max() < 1e-6


@pytest.mark.parametrize("name", sorted(CASES))
def test_plan_is_a_dry_run_of_add_dendrites(name):
    factory, _, cfg = CASES[name]
    torch.manual_seed(0)
    model = factory()
    classes = {n: type(m) for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    p = td.plan(model, cfg)
    # nothing changed
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert not hasattr(model, "_dendrite_record")
    # add_dendrites carries out exactly this plan; summary reports it
    td.add_dendrites(model, cfg)
    assert p.wrapped == list(td.dendritic_layers(model))
    s = td.summary(model)
    assert [r["name"] for r in s.wrapped] == p.wrapped
    assert {r["name"]: r["reason"] for r in s.skipped} == p.skipped
    assert all(line.startswith(("wrap ", "skip ")) for line in str(p).splitlines())


def test_plan_refuses_what_add_dendrites_refuses():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    with pytest.raises(td.TargetError, match="no module matched"):
        td.plan(model, td.DendriteConfig(exclude=["0"]))
    td.add_dendrites(model)
    with pytest.raises(td.TargetError, match="already has dendrites"):
        td.plan(model)
