"""The shared invariants, driven by one matrix: every registered dendrite type x the model zoo (tests/models.py),
as timm drives its tests from its model list. Per-type formulas live in test_dendrite_types.py; the cascade's
own algebra (grouped convolutions, the hand-written backward) in test_invariants.py."""

from __future__ import annotations

import copy

import pytest
import torch
from models import CASES, CUSTOM_CASES

import torch_dendrites as td
from torch_dendrites.dendrites import GatedDendrites, dendrite_type_names
from torch_dendrites.registry import DENDRITE_TYPES

TOL = 1e-6
CONTEXT_DIM = 3
# Options a type needs in tests (every other registered type is built with its defaults).
OPTIONS = {
    "cascade": {},
    "lowrank": {"rank": 2},
    "sparse": {"branch_inputs": 4},
    "sparse_linear": {"branch_inputs": 4},
    "gated": {"context_dim": CONTEXT_DIM, "segments": 4},
}
# lowrank and sparse build their own weights from the layer's algebra: built-in layer types only.
OWN_WEIGHTS = ("lowrank", "sparse", "sparse_linear")
# The library's own types (a test may register throw-away ones).
LIBRARY_TYPES = [t for t in dendrite_type_names() if DENDRITE_TYPES.get(t).__module__.startswith("torch_dendrites.")]
TYPES = [t for t in LIBRARY_TYPES if t in OPTIONS]
PAIRS = [(t, c) for t in TYPES for c in sorted(CASES) if not (t in OWN_WEIGHTS and c in CUSTOM_CASES)]


def test_the_matrix_covers_every_registered_type():
    assert set(LIBRARY_TYPES) <= set(OPTIONS), "give a new type's test options in OPTIONS"


def config(dtype, case=None, **extra):
    base = CASES[case][2] if case else None
    fields = {} if base is None else {"target_types": base.target_types}
    return td.DendriteConfig(dendrite_type=dtype, dendrite_options={**OPTIONS.get(dtype, {}), **extra}, **fields)


def build(case, seed=0):
    factory, make_x, _ = CASES[case]
    torch.manual_seed(seed)
    model = factory().eval()
    return model, make_x()


def context_for(x):
    """One one-hot task code per sample (the gated type's context)."""
    return torch.nn.functional.one_hot(torch.arange(x.shape[0]) % CONTEXT_DIM, CONTEXT_DIM).float()


def run(model, x):
    if any(isinstance(m, GatedDendrites) for m in model.modules()):
        with td.dendrite_context(model, context_for(x)):
            return model(x)
    return model(x)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def max_diff(a, b):
    return (a - b).abs().max().item()


def train_a_little(model, x, steps=5, weight_decay=0.0):
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=weight_decay)
    with torch.no_grad():
        target = torch.randn_like(run(model, x))
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(run(model, x), target).backward()
        opt.step()
    model.eval()


def dendrite_params(model):
    return {
        f"{n}.{pn}": p
        for n, layer in td.dendritic_layers(model).items()
        for pn, p in layer.dendrites.named_parameters()
    }


# ------------------------------------------------------------------------- shared invariants
@pytest.mark.parametrize("dtype,case", PAIRS)
def test_insertion_and_growth_preserve_outputs(dtype, case):
    model, x = build(case)
    with torch.no_grad():
        ref = model(x)
    td.add_dendrites(model, config(dtype, case))
    assert td.dendritic_layers(model)
    with torch.no_grad():
        assert max_diff(run(model, x), ref) <= TOL
    for _ in range(3):
        before = n_params(model)
        added = td.grow(model)
        assert added > 0 and n_params(model) - before == added
        with torch.no_grad():
            assert max_diff(run(model, x), ref) <= TOL


@pytest.mark.parametrize("dtype,case", PAIRS)
def test_training_moves_outputs_and_gradients_reach_every_dendrite_parameter(dtype, case):
    model, x = build(case)
    td.add_dendrites(model, config(dtype, case))
    td.grow(model)
    td.grow(model)
    with torch.no_grad():
        grown = run(model, x)
    train_a_little(model, x)
    # Zeroing every out_gain (output gain, or a gate's mixing weight) must give back the model without
    # its dendrites' contribution; the trained model must differ from it.
    no_dend = copy.deepcopy(model)
    for p_name, p in dendrite_params(no_dend).items():
        if p_name.endswith("out_gain"):
            p.data.zero_()
    with torch.no_grad():
        assert max_diff(run(model, x), grown) > 1e-5
        assert max_diff(run(model, x), run(no_dend, x)) > 1e-5
    model.train()
    model.zero_grad()
    run(model, x).float().pow(2).sum().backward()
    for name, p in dendrite_params(model).items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for name, layer in td.dendritic_layers(model).items():  # the neurons train beside their dendrites
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.base.parameters()), name


@pytest.mark.parametrize("dtype,case", PAIRS)
def test_remove_restores_the_original(dtype, case):
    model, x = build(case)
    classes = {n: type(m) for n, m in model.named_modules()}
    ids = {n: id(p) for n, p in model.named_parameters()}
    td.add_dendrites(model, config(dtype, case))
    td.grow(model)
    train_a_little(model, x, steps=2)  # the base weights train too
    no_dend = copy.deepcopy(model)
    for p_name, p in dendrite_params(no_dend).items():
        if p_name.endswith("out_gain"):
            p.data.zero_()
    with torch.no_grad():
        ref = run(no_dend, x)
    td.remove_dendrites(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert {n: id(p) for n, p in model.named_parameters()} == ids
    assert not any(isinstance(m, td.DendriticLayer) for m in model.modules())
    assert not hasattr(model, "_dendrite_record")
    with torch.no_grad():
        assert max_diff(model(x), ref) == 0.0


@pytest.mark.parametrize("dtype,case", PAIRS)
def test_save_load_round_trip_is_bitwise(dtype, case, tmp_path):
    model, x = build(case)
    td.add_dendrites(model, config(dtype, case))
    td.grow(model, torch.Generator().manual_seed(1))
    td.grow(model, torch.Generator().manual_seed(2))
    train_a_little(model, x, steps=2)
    td.save(tmp_path / "ckpt", model)
    fresh, _ = build(case, seed=123)
    td.load(tmp_path / "ckpt", fresh)
    a, b = model.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    with torch.no_grad():
        assert torch.equal(run(model, x), run(fresh, x))


@pytest.mark.parametrize("dtype,case", PAIRS)
def test_summary_counts_dendrite_parameters(dtype, case):
    model, _ = build(case)
    base = n_params(model)
    td.add_dendrites(model, config(dtype, case))
    added = td.grow(model) + td.grow(model)
    s = td.summary(model)
    assert s.base_parameters == base and s.dendrite_parameters == added
    assert all(r["dendrites"] == 2 for r in s.wrapped)


@pytest.mark.parametrize("dtype", TYPES)
def test_seeded_growth_is_reproducible(dtype):
    models = []
    for _ in range(2):
        model, _ = build("mlp")
        td.add_dendrites(model, config(dtype))
        td.grow(model, torch.Generator().manual_seed(7))
        td.grow(model, torch.Generator().manual_seed(8))
        models.append(model.state_dict())
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])


@pytest.mark.parametrize("dtype", TYPES)
def test_growth_controller_drives_every_type(dtype):
    model, x = build("mlp")
    td.add_dendrites(model, config(dtype))
    ctl = td.GrowthController(model, td.GrowthConfig(mode="every", max_dendrites=2, seed=0))
    for score in (0.1, 0.2, 0.3):
        ctl.step(score)
    assert all(layer.num_dendrites >= 1 for layer in td.dendritic_layers(model).values())
    with torch.no_grad():
        assert torch.isfinite(run(model, x)).all()
