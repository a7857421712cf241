"""The cascade type and the layer specs: sharing and tying, fast paths, grouped convolutions, the formula on
tokens, neuron axes, truncation, and the hand-written backward (gradcheck). The invariants every type shares run
in test_matrix.py."""

from __future__ import annotations

import copy

import pytest
import torch
from models import CASES

import torch_dendrites as td

TOL = 1e-6


def build(name, seed=0):
    factory, make_x, cfg = CASES[name]
    torch.manual_seed(seed)
    model = factory().eval()
    x = make_x()
    return model, x, cfg


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def max_diff(a, b):
    return (a - b).abs().max().item()


def train_a_little(model, x, steps=5):
    """A few SGD steps on a fixed random target, so dendrite gains (and weights) move off zero."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with torch.no_grad():
        target = torch.randn_like(model(x))
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), target).backward()
        opt.step()
    model.eval()


def test_shared_module_wrapped_once_and_tied_weights_stay_tied():
    model, x, _ = build("shared")
    td.add_dendrites(model)
    assert model.block is model.again
    assert type(model.block).__name__ == "DendriticLayer"
    assert len(td.dendritic_layers(model)) == 2  # block (= again) and out
    tied, _, _ = build("tied")
    td.add_dendrites(tied)
    assert tied.proj.base.weight is tied.emb.weight
    td.grow(tied)
    train_a_little(tied, torch.randint(0, 11, (3, 4)))
    assert tied.proj.base.weight is tied.emb.weight


def test_multihead_attention_out_proj_is_skipped_and_reported():
    model, x, _ = build("transformer")
    td.add_dendrites(model)
    s = td.summary(model)
    skipped = {r["name"]: r["reason"] for r in s.skipped}
    out_proj = [n for n in skipped if n.endswith("self_attn.out_proj")]
    assert len(out_proj) == 2
    assert all("reads out_proj.weight directly" in skipped[n] for n in out_proj)
    wrapped = {r["name"] for r in s.wrapped}
    assert {"0.layers.0.linear1", "0.layers.0.linear2", "1"} <= wrapped


def test_transformer_fast_paths_keep_dendrites_live():
    """Eval + no_grad would take nn.TransformerEncoder(Layer)'s fused path, which reads weights directly."""
    model, x, _ = build("transformer")
    td.add_dendrites(model, td.DendriteConfig(exclude=["1"]))
    td.grow(model)
    for layer in td.dendritic_layers(model).values():
        for unit in layer.dendrites.units:
            torch.nn.init.normal_(unit.out_gain)
    no_dend = copy.deepcopy(model)
    for layer in td.dendritic_layers(no_dend).values():
        for unit in layer.dendrites.units:
            unit.out_gain.data.zero_()
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[1, 3:] = True
    with torch.no_grad():
        assert max_diff(model(x), no_dend(x)) > 1e-3
        a, b = model[0](x, src_key_padding_mask=mask), no_dend[0](x, src_key_padding_mask=mask)
        assert max_diff(a[0], b[0]) > 1e-3
    td.remove_dendrites(model)
    assert model[0].use_nested_tensor is True


def test_grouped_conv_matches_one_conv_per_dendrite():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 9, 3, groups=3, padding=1, stride=2)
    model = td.add_dendrites(torch.nn.Sequential(conv))
    for _ in range(3):
        td.grow(model)
    layer = model[0]
    for u in layer.dendrites.units:
        torch.nn.init.normal_(u.out_gain)
        if u.cascade_gain is not None:
            torch.nn.init.normal_(u.cascade_gain)
    x = torch.randn(2, 6, 7, 7)
    # Reference: the cascade formula (README, "The math"), one ordinary convolution per dendrite.
    y = conv(x)
    s = []
    for i, u in enumerate(layer.dendrites.units):
        z = torch.nn.functional.conv2d(x, u.weight, u.bias, stride=2, padding=1, groups=3)
        for j in range(i):
            z = z + u.cascade_gain[j].view(-1, 1, 1) * s[j]
        s.append(torch.sigmoid(z))
        y = y + u.out_gain.view(-1, 1, 1) * s[i]
    assert max_diff(model(x), y) < 1e-5


def test_linear_cascade_matches_formula_on_tokens():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 5)
    model = td.add_dendrites(torch.nn.Sequential(lin), td.DendriteConfig(activation="tanh"))
    td.grow(model)
    td.grow(model)
    units = model[0].dendrites.units
    for u in units:
        torch.nn.init.normal_(u.out_gain)
    torch.nn.init.normal_(units[1].cascade_gain)
    x = torch.randn(2, 3, 4)
    s0 = torch.tanh(x @ units[0].weight.t() + units[0].bias)
    s1 = torch.tanh(x @ units[1].weight.t() + units[1].bias + units[1].cascade_gain[0] * s0)
    ref = lin(x) + units[0].out_gain * s0 + units[1].out_gain * s1
    assert max_diff(model(x), ref) < 1e-6


def test_neuron_axis_override_and_wrong_axis_error():
    # A linear layer applied to channels-first data after a transpose: neurons on axis -1 as usual,
    # but a user may declare another axis; a wrong one raises a clear error at the first forward.
    model = td.add_dendrites(torch.nn.Sequential(torch.nn.Linear(4, 3)), td.DendriteConfig(neuron_axis=-2))
    td.grow(model)
    with pytest.raises(td.StateError, match="neuron axis"):
        model(torch.randn(5, 4))


def test_unbatched_conv_input():
    torch.manual_seed(0)
    model = td.add_dendrites(torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3)))
    td.grow(model)
    torch.nn.init.normal_(model[0].dendrites.units[0].out_gain)
    x = torch.randn(2, 6, 6)
    assert max_diff(model(x), model(x[None])[0]) < 1e-6


def test_seeded_growth_is_reproducible():
    a = td.add_dendrites(torch.nn.Sequential(torch.nn.Linear(4, 3)))
    b = td.add_dendrites(torch.nn.Sequential(torch.nn.Linear(4, 3)))
    td.grow(a, torch.Generator().manual_seed(7))
    td.grow(b, torch.Generator().manual_seed(7))
    assert torch.equal(a[0].dendrites.units[0].weight, b[0].dendrites.units[0].weight)


def test_truncate_drops_newest():
    model = td.add_dendrites(torch.nn.Sequential(torch.nn.Linear(4, 3)))
    p0 = n_params(model)
    td.grow(model)
    first = model[0].dendrites.units[0]
    td.grow(model)
    model[0].truncate(1)
    assert model[0].dendrites.units[0] is first and model[0].num_dendrites == 1
    model[0].truncate(0)
    assert n_params(model) == p0
    with pytest.raises(td.StateError):
        model[0].truncate(2)


@pytest.mark.parametrize("activation", ["sigmoid", "tanh"])
@pytest.mark.parametrize("shape,p", [((4, 3, 5), 1), ((2, 4, 3, 5), 2), ((2, 3, 5, 4, 4), 1), ((1, 5), 0)])
def test_cascade_backward_passes_gradcheck(activation, shape, p):
    """The hand-written cascade backward against finite differences (float64)."""
    from torch_dendrites.dendrites.kernel import _Cascade

    torch.manual_seed(0)
    k, c = shape[p], shape[p + 1]
    a = torch.randn(*shape, dtype=torch.double, requires_grad=True)
    y = torch.randn(*shape[:p], *shape[p + 1 :], dtype=torch.double, requires_grad=True)
    v = torch.randn(k, c, dtype=torch.double, requires_grad=True)
    us = [torch.randn(i, c, dtype=torch.double, requires_grad=True) for i in range(1, k)]
    assert torch.autograd.gradcheck(
        lambda a, y, v, *u: _Cascade.apply(a, y, v, p, activation, False, *u), (a, y, v, *us)
    )
