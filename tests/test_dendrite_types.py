"""What each dendrite type promises on its own: low-rank parameter counts and formulas, sparse connectivity
that no optimizer can leak into, the linear control's linearity, the gated type's context handling, option
checks. The invariants every type shares run in test_matrix.py."""

from __future__ import annotations

import pytest
import torch
from ckpt_tools import edit_recipe, read_recipe
from test_matrix import CONTEXT_DIM, OWN_WEIGHTS, build, config, context_for, max_diff, train_a_little

import torch_dendrites as td
from torch_dendrites.dendrites import dendrite_type_names

BAD_OPTIONS = [
    ("lowrank", {"rank": 0}, "rank=0"),
    ("lowrank", {"rank": 2.0}, "rank=2.0"),
    ("lowrank", {"ranks": 2}, r"\['ranks'\] are not options"),
    ("lowrank", {"kernel": "fast"}, "kernel='fast'.*auto"),
    ("cascade", {"kernel": "fast"}, "kernel='fast'.*auto"),
    ("cascade", {"rank": 2}, r"\['rank'\] are not options"),
    ("sparse", {"branch_inputs": 0}, "branch_inputs=0"),
    ("sparse", {"receptive": "grid"}, "receptive='grid'"),
    ("sparse", {"input_shape": [2, 3]}, "only applies to receptive='local'"),
    ("sparse", {"receptive": "local", "input_shape": [2, 2]}, "fan-in"),
    ("sparse", {"receptive": "local", "input_shape": [0, 6]}, "input_shape"),
    ("sparse", {"negative_slope": -1}, "negative_slope"),
    ("sparse_linear", {"negative_slope": 0.1}, "not options"),
    ("gated", {}, "context_dim"),
    ("gated", {"context_dim": 3, "segments": 0}, "segments=0"),
    ("gated", {"context_dim": 3, "select": "min"}, "select='min'"),
]


@pytest.mark.parametrize("dtype,options,match", BAD_OPTIONS)
def test_bad_options_raise_and_leave_the_model_untouched(dtype, options, match):
    model, _ = build("mlp")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    with pytest.raises(td.ConfigError, match=match):
        td.add_dendrites(model, td.DendriteConfig(dendrite_type=dtype, dendrite_options=options))
    assert [type(m) for m in model.modules()] == classes and not hasattr(model, "_dendrite_record")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    if match != "fan-in":  # only the fan-in check needs the layer: the rest fail when the config is built
        with pytest.raises(td.ConfigError, match=match):
            td.DendriteConfig(dendrite_type=dtype, dendrite_options=options)


TYPED = [
    ("lowrank", td.dendrites.LowRankOptions(rank=2)),
    ("sparse", td.dendrites.SparseOptions(branch_inputs=3, receptive="local", input_shape=(2, 3))),
    ("sparse_linear", td.dendrites.SparseLinearOptions(branch_inputs=2)),
    ("gated", td.dendrites.GatedOptions(context_dim=CONTEXT_DIM, segments=2)),
]


@pytest.mark.parametrize("dtype,options", TYPED)
def test_typed_options_build_the_same_model_as_the_dict(dtype, options):
    """A type's options object and the dict of its fields are one setting: equal configs, equal dendrites,
    and the recipe keeps the dict with the options version."""
    cfg_typed = td.DendriteConfig(dendrite_type=dtype, dendrite_options=options, target_names=["0"])
    cfg_dict = td.DendriteConfig(dendrite_type=dtype, dendrite_options=options.to_dict(), target_names=["0"])
    assert cfg_typed.dendrite_options == cfg_dict.dendrite_options == options.to_dict()
    nets = []
    for cfg in (cfg_typed, cfg_dict):
        torch.manual_seed(0)
        net = td.add_dendrites(torch.nn.Sequential(torch.nn.Linear(6, 4)), cfg)
        td.grow(net, generator=torch.Generator().manual_seed(1))
        assert net[0].dendrites.options == options
        nets.append(net)
    assert all(torch.equal(a, b) for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values()))
    with pytest.raises(td.ConfigError, match="are not options of dendrite_type='cascade'"):
        td.DendriteConfig(dendrite_options=options)  # another type's options object


def test_options_of_a_newer_version_are_refused_and_older_ones_migrated(tmp_path, monkeypatch):
    opts = td.dendrites.LowRankOptions
    with pytest.raises(td.ConfigError, match="options version 2; this version of torch-dendrites knows up to 1"):
        opts.from_dict({"rank": 2}, version=2)
    # A version bump with a migration: version 1's "rank" read under a new name.
    net = td.add_dendrites(torch.nn.Sequential(torch.nn.Linear(6, 4)), td.DendriteConfig(dendrite_type="lowrank"))
    td.grow(net)
    folder = td.save(tmp_path / "v1", net)
    recipe = read_recipe(folder)
    assert recipe["dendrite_config"]["dendrite_options_version"] == 1
    # A recipe from a newer library: refused, naming the upgrade; the model is untouched.
    edit_recipe(folder, lambda r: r["dendrite_config"].update(dendrite_options_version=2))
    fresh = torch.nn.Sequential(torch.nn.Linear(6, 4))
    with pytest.raises(td.CheckpointError, match="Upgrade torch-dendrites"):
        td.load(folder, fresh)
    assert isinstance(fresh[0], torch.nn.Linear)
    # A version bump with a migration: version 1's "rank" read under a new name, in memory and from a recipe.
    monkeypatch.setattr(opts, "version", 2)
    monkeypatch.setattr(opts, "migrate", classmethod(lambda cls, o, v: {"rank": o.pop("r")} if v == 1 else o))
    assert opts.from_dict({"r": 3}, version=1) == opts(rank=3)
    edit_recipe(folder, lambda r: r["dendrite_config"].update(dendrite_options_version=1, dendrite_options={"r": 4}))
    assert td.load(folder, torch.nn.Sequential(torch.nn.Linear(6, 4)))[0].dendrites.rank == 4


@pytest.mark.parametrize("dtype", OWN_WEIGHTS)
def test_unsupported_layer_types_are_refused_by_name(dtype):
    model, _ = build("custom")
    with pytest.raises(td.UnsupportedModuleError, match="layer algebra"):
        td.add_dendrites(model, config(dtype, "custom"))
    assert not td.dendritic_layers(model)


class PlainAffine(torch.nn.Module):
    """A user layer computing x @ W^T + b with its own parameters (not an nn.Linear subclass)."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)
        self.bias = torch.nn.Parameter(torch.zeros(n_out))
        self.out_features = n_out

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias)


class AffineSpec(td.LayerSpec):
    """The layer algebra for PlainAffine: all that lowrank and sparse dendrites need."""

    def fan_in_shape(self, module):
        return (module.weight.shape[1],)

    def linear_maps(self, module, weight, bias, x):
        return torch.nn.functional.linear(x, weight.flatten(0, 1), None if bias is None else bias.flatten())


td.register_layer_type(PlainAffine, spec=AffineSpec())


@pytest.mark.parametrize("dtype", OWN_WEIGHTS)
def test_types_that_build_their_own_weights_serve_any_layer_whose_spec_gives_the_algebra(dtype):
    """The same dendrites on a registered custom layer and on an nn.Linear with the same weights compute the same."""
    torch.manual_seed(0)
    custom = torch.nn.Sequential(PlainAffine(12, 5))
    linear = torch.nn.Sequential(torch.nn.Linear(12, 5))
    with torch.no_grad():
        linear[0].weight.copy_(custom[0].weight)
        linear[0].bias.copy_(custom[0].bias)
    x = torch.randn(7, 12)
    for model in (custom, linear):
        td.add_dendrites(model, config(dtype))
        before = model(x)
        for seed in (0, 1):
            td.grow(model, torch.Generator().manual_seed(seed))
        assert torch.equal(model(x), before)  # growth preserves the function on either layer
        with torch.no_grad():
            for unit in model[0].dendrites.units:
                unit.out_gain.fill_(0.5)
    assert torch.allclose(custom(x), linear(x), atol=1e-6)
    assert not torch.allclose(custom(x), before)


def test_only_cascade_supports_correlation_training():
    from torch_dendrites.correlation import holds_candidates

    stacks = {}
    for dtype in ("cascade", "lowrank", "sparse", "sparse_linear", "gated"):
        model, _ = build("mlp")
        td.add_dendrites(model, config(dtype) if dtype != "cascade" else None)
        stacks[dtype] = model.fc1.dendrites
    assert [d for d, s in stacks.items() if holds_candidates(s)] == ["cascade"]
    # Python 3.12's isinstance against a runtime-checkable protocol reads attributes statically, which misses
    # nn.Module submodules such as `candidates`: the check must not depend on that (correlation mode trained
    # no candidates at all on 3.12, found on the GPU machine's Python).
    import inspect

    assert inspect.getattr_static(stacks["cascade"], "candidates", None) is None
    assert holds_candidates(stacks["cascade"])
    model, _ = build("mlp")
    td.add_dendrites(model, config("lowrank"))
    with pytest.raises(td.ConfigError, match="lowrank"):
        td.GrowthController(model, td.GrowthConfig(dendrite_training="correlation"))


# ------------------------------------------------------------------------- lowrank
@pytest.mark.parametrize(
    "make,rank,fan",
    [
        (lambda: torch.nn.Linear(20, 10), 3, 20),
        (lambda: torch.nn.Conv2d(6, 8, 3, groups=2), 2, 6 * 9),  # in_channels * prod(kernel)
        (lambda: torch.nn.Conv1d(4, 5, 3), 1, 4 * 3),
    ],
)
def test_lowrank_growth_adds_rank_times_in_plus_out_plus_per_channel_terms(make, rank, fan):
    layer = make()
    out = layer.weight.shape[0]
    model = td.add_dendrites(torch.nn.Sequential(layer), config("lowrank", rank=rank))
    for i in range(3):
        # A (r x in) and B (out x r), then per channel: bias, output gain, one cascade gain per earlier dendrite
        assert td.grow(model) == rank * (fan + out) + out * (2 + i)


def test_lowrank_matches_its_formula_on_a_grouped_conv():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 4, 3, groups=2, padding=1, stride=2)
    model = td.add_dendrites(torch.nn.Sequential(conv), config("lowrank", rank=3, **{}))
    td.grow(model)
    td.grow(model)
    units = model[0].dendrites.units
    for u in units:
        torch.nn.init.normal_(u.out_gain)
    torch.nn.init.normal_(units[1].cascade_gain)
    x = torch.randn(2, 6, 7, 7)
    y, s = conv(x), []
    for i, u in enumerate(units):
        # A: the layer's own grouped conv with r channels per group; B: per group, r -> that group's neurons.
        h = torch.nn.functional.conv2d(x, u.in_proj, None, stride=2, padding=1, groups=2)  # [N, 2*3, ...]
        z = torch.cat(
            [torch.einsum("nrhw,cr->nchw", h[:, 3 * j : 3 * j + 3], u.out_proj[2 * j : 2 * j + 2]) for j in range(2)], 1
        ) + u.bias.view(-1, 1, 1)
        for j in range(i):
            z = z + u.cascade_gain[j].view(-1, 1, 1) * s[j]
        s.append(torch.sigmoid(z))
        y = y + u.out_gain.view(-1, 1, 1) * s[i]
    assert max_diff(model(x), y) < 1e-5


def test_lowrank_matches_its_formula_on_tokens():
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 4)
    model = td.add_dendrites(torch.nn.Sequential(lin), td.DendriteConfig(
        dendrite_type="lowrank", dendrite_options={"rank": 2}, activation="tanh"))  # fmt: skip
    td.grow(model)
    td.grow(model)
    u0, u1 = model[0].dendrites.units
    for u in (u0, u1):
        torch.nn.init.normal_(u.out_gain)
    torch.nn.init.normal_(u1.cascade_gain)
    x = torch.randn(2, 3, 5)
    s0 = torch.tanh(x @ (u0.out_proj @ u0.in_proj).t() + u0.bias)
    s1 = torch.tanh(x @ (u1.out_proj @ u1.in_proj).t() + u1.bias + u1.cascade_gain[0] * s0)
    assert max_diff(model(x), lin(x) + u0.out_gain * s0 + u1.out_gain * s1) < 1e-6


# ------------------------------------------------------------------------- sparse
@pytest.mark.parametrize("dtype", ["sparse", "sparse_linear"])
def test_sparse_masked_weights_get_no_gradient_and_stay_zero_under_adamw(dtype):
    torch.manual_seed(0)
    lin = torch.nn.Linear(12, 3)
    model = td.add_dendrites(torch.nn.Sequential(lin), config(dtype, branch_inputs=4))
    td.grow(model)
    td.grow(model)
    units = model[0].dendrites.units
    masks = [u.mask.clone() for u in units]
    assert all(int(m.sum()) == 3 * 4 and (m.sum(1) == 4).all() for m in masks)
    # Only the connected weights are parameters: weight decay, momentum and Adam state cannot reach the rest.
    assert all(u.weight.shape == (3, 4) for u in units)
    x = torch.randn(8, 12)
    train_a_little(model, x, steps=10, weight_decay=0.1)
    for u, m in zip(units, masks):
        assert torch.equal(u.mask, m)  # connectivity is a buffer: training never changes it
        dense = u.dense_weight()
        assert (dense[~m] == 0).all() and (dense[m] != 0).all()
    # The dendrites' contribution has exactly zero gradient with respect to every unconnected input.
    x1 = x[:1].clone().requires_grad_(True)
    jac = torch.autograd.functional.jacobian(lambda t: model(t) - lin(t), x1)[0, :, 0]  # [C, in]
    reads = masks[0] | masks[1]
    assert (jac[~reads] == 0).all() and (jac[reads] != 0).any()
    # And the output matches the dense masked formula.
    s = [u.dense_weight() @ x.t() + u.bias[:, None] for u in units]
    if dtype == "sparse":
        s = [torch.nn.functional.leaky_relu(t, 0.1) for t in s]
    ref = lin(x) + sum(u.out_gain[:, None] * t for u, t in zip(units, s)).t()
    assert max_diff(model(x), ref) < 1e-6


def test_sparse_linear_branches_keep_a_linear_layer_linear():
    torch.manual_seed(0)
    model = td.add_dendrites(torch.nn.Sequential(torch.nn.Linear(10, 4)), config("sparse_linear"))
    td.grow(model)
    for u in model[0].dendrites.units:
        torch.nn.init.normal_(u.out_gain)
    a, b, zero = torch.randn(3, 10), torch.randn(3, 10), torch.zeros(3, 10)
    assert max_diff(model(a + b) - model(zero), (model(a) - model(zero)) + (model(b) - model(zero))) < 1e-5
    nonlinear = td.add_dendrites(torch.nn.Sequential(torch.nn.Linear(10, 4)), config("sparse"))
    td.grow(nonlinear)
    for u in nonlinear[0].dendrites.units:
        torch.nn.init.normal_(u.out_gain)
        torch.nn.init.normal_(u.weight)
    f = nonlinear
    assert max_diff(f(a + b) - f(zero), (f(a) - f(zero)) + (f(b) - f(zero))) > 1e-3


def test_sparse_local_receptive_fields_are_compact_and_random_ones_are_not():
    lin = torch.nn.Linear(64, 20)
    local = td.add_dendrites(
        torch.nn.Sequential(lin), config("sparse", branch_inputs=9, receptive="local", input_shape=[8, 8])
    )
    td.grow(local, torch.Generator().manual_seed(0))
    idx = local[0].dendrites.units[0].index
    rows, cols = idx // 8, idx % 8
    extent = torch.maximum(rows.amax(1) - rows.amin(1), cols.amax(1) - cols.amin(1))
    assert (extent <= 4).all()  # the 9 grid points nearest a centre lie within 2 steps of it
    rand = td.add_dendrites(torch.nn.Sequential(torch.nn.Linear(64, 20)), config("sparse", branch_inputs=9))
    td.grow(rand, torch.Generator().manual_seed(0))
    ridx = rand[0].dendrites.units[0].index
    assert (ridx.sort(1).values[:, 1:] > ridx.sort(1).values[:, :-1]).all()  # distinct inputs per branch
    assert ((ridx // 8).amax(1) - (ridx // 8).amin(1)).float().mean() > 4


def test_sparse_branch_inputs_are_capped_at_the_fan_in():
    model = td.add_dendrites(torch.nn.Sequential(torch.nn.Linear(3, 2)), config("sparse", branch_inputs=16))
    assert td.grow(model) == 2 * (3 + 2)


# ------------------------------------------------------------------------- gated
def gated_linear(d_in=6, c=4, segments=3, select="absmax"):
    torch.manual_seed(0)
    lin = torch.nn.Linear(d_in, c)
    cfg = td.DendriteConfig(
        dendrite_type="gated", dendrite_options={"context_dim": CONTEXT_DIM, "segments": segments, "select": select}
    )
    return lin, td.add_dendrites(torch.nn.Sequential(lin), cfg)


@pytest.mark.parametrize("select", ["absmax", "max"])
def test_gated_with_full_mixing_is_iyer_et_al_gate(select):
    lin, model = gated_linear(select=select)
    td.grow(model)
    unit = model[0].dendrites.units[0]
    unit.out_gain.data.fill_(1.0)
    x = torch.randn(5, 6)
    ctx = torch.randn(5, CONTEXT_DIM)
    d = torch.einsum("bd,csd->bcs", ctx, unit.segments)  # every segment's response
    pick = (d.abs() if select == "absmax" else d).argmax(-1, keepdim=True)
    ref = lin(x) * torch.sigmoid(d.gather(-1, pick).squeeze(-1))
    with td.dendrite_context(model, ctx):
        assert max_diff(model(x), ref) < 1e-6


def test_gated_gates_multiply_and_partial_mixing_interpolates():
    lin, model = gated_linear()
    td.grow(model)
    td.grow(model)
    u0, u1 = model[0].dendrites.units
    u0.out_gain.data.fill_(1.0)
    u1.out_gain.data.fill_(0.25)
    x, ctx = torch.randn(4, 6), context_for(torch.zeros(4))
    gates = model[0].dendrites.gate(ctx)
    g = []
    for u in (u0, u1):
        d = torch.einsum("bd,csd->bcs", ctx, u.segments)
        win = torch.sigmoid(d.gather(-1, d.abs().argmax(-1, keepdim=True)).squeeze(-1))
        g.append(1 - u.out_gain + u.out_gain * win)
    assert max_diff(gates, g[0] * g[1]) < 1e-6
    with td.dendrite_context(model, ctx):
        assert max_diff(model(x), lin(x) * g[0] * g[1]) < 1e-6


def test_gated_context_is_required_scoped_and_checked():
    lin, model = gated_linear()
    x = torch.randn(4, 6)
    assert torch.equal(model(x), lin(x))  # no dendrites yet: no context needed
    td.grow(model)
    with pytest.raises(td.StateError, match="dendrite_context"):
        model(x)
    a, b = context_for(x), torch.ones(4, CONTEXT_DIM)
    with td.dendrite_context(model, a):
        assert model[0].dendrites.context is a
        with td.dendrite_context(model, b):
            assert model[0].dendrites.context is b
        assert model[0].dendrites.context is a
    assert model[0].dendrites.context is None
    with pytest.raises(td.ConfigError, match="context_dim=3"):
        with td.dendrite_context(model, torch.ones(4, 5)):
            pass
    with pytest.raises(td.StateError, match="does not fit"):
        with td.dendrite_context(model, torch.ones(7, CONTEXT_DIM)):
            model(x)
    with pytest.raises(td.TargetError, match="no gated dendrites"):
        with td.dendrite_context(td.add_dendrites(torch.nn.Sequential(torch.nn.Linear(2, 2))), a):
            pass


def test_gated_context_broadcasts_over_tokens_and_pixels():
    torch.manual_seed(0)
    cfg = td.DendriteConfig(dendrite_type="gated", dendrite_options={"context_dim": CONTEXT_DIM})
    conv = td.add_dendrites(torch.nn.Sequential(torch.nn.Conv2d(2, 5, 3)), cfg)
    tok = td.add_dendrites(torch.nn.Sequential(torch.nn.Linear(4, 5)), cfg)
    for m in (conv, tok):
        td.grow(m)
        torch.nn.init.normal_(m[0].dendrites.units[0].out_gain)
    x = torch.randn(2, 2, 6, 6)
    ctx = torch.randn(2, CONTEXT_DIM)
    with td.dendrite_context(conv, ctx):
        y = conv(x)
    gate = conv[0].dendrites.gate(ctx)  # [batch, channels], the same for every pixel
    assert max_diff(y, conv[0].base(x) * gate[:, :, None, None]) < 1e-6
    t = torch.randn(2, 7, 4)
    with td.dendrite_context(tok, ctx):  # one context per sequence
        per_seq = tok(t)
    with td.dendrite_context(tok, ctx[:, None].expand(2, 7, CONTEXT_DIM)):  # one per token
        per_tok = tok(t)
    assert max_diff(per_seq, per_tok) < 1e-6


def test_gated_dendrites_are_independent_between_models():
    _, a = gated_linear()
    _, b = gated_linear()
    td.grow(a)
    td.grow(b)
    with td.dendrite_context(a, torch.ones(1, CONTEXT_DIM)):
        assert b[0].dendrites.context is None
        with pytest.raises(td.StateError):
            b(torch.randn(1, 6))


def test_number_of_types():
    assert set(dendrite_type_names()) == {"cascade", "lowrank", "sparse", "sparse_linear", "gated"}


@pytest.mark.parametrize("dtype", OWN_WEIGHTS)
def test_own_weight_types_read_the_input_given_by_keyword_and_refuse_extra_arguments(dtype):
    model = td.add_dendrites(torch.nn.Sequential(torch.nn.Linear(5, 3)), config(dtype))
    td.grow(model)
    torch.nn.init.normal_(model[0].dendrites.units[0].out_gain)
    x = torch.randn(2, 5)
    assert torch.equal(model[0](input=x), model[0](x))
    with pytest.raises(td.StateError, match="single input tensor"):
        model[0].dendrites(model[0].base(x), -1, x, x)
