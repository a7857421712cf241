"""Properties of surgery and save/load over randomly shaped models (hypothesis): wrapping and growing keep the
model's function, the dry run names exactly what gets wrapped, removing restores the original modules and
weights, and a save/load round trip is bitwise."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import torch_dendrites as td
from torch_dendrites.dendrites import dendrite_type_names

# The dendrite types that need no context (gated reads td.dendrite_context) and serve Linear and Conv layers.
TYPES = [t for t in ("cascade", "lowrank", "sparse") if t in dendrite_type_names()]


@st.composite
def models(draw):
    """``(build, x, seed)``: a builder of a random stack of Linear or Conv2d layers (random widths, kernel sizes,
    activations, biases; each call draws fresh weights) and an input for it."""
    kind = draw(st.sampled_from(["linear", "conv"]))
    depth = draw(st.integers(1, 3))
    widths = [draw(st.integers(1, 6)) for _ in range(depth + 1)]
    kernels = [draw(st.sampled_from([1, 3])) for _ in range(depth)]
    acts = [draw(st.sampled_from([nn.ReLU, nn.Tanh, nn.Identity])) for _ in range(depth - 1)]
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))

    def build() -> nn.Module:
        layers = []
        for i in range(depth):
            if kind == "linear":
                layers.append(nn.Linear(widths[i], widths[i + 1], bias=bias))
            else:
                layers.append(nn.Conv2d(widths[i], widths[i + 1], kernels[i], padding=1, bias=bias))
            if i < depth - 1:
                layers.append(acts[i]())
        return nn.Sequential(*layers)

    x = torch.randn(2, widths[0]) if kind == "linear" else torch.randn(2, widths[0], 5, 5)
    return build, x, seed


SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(models(), st.sampled_from(TYPES), st.integers(0, 3))
def test_wrap_and_grow_keep_the_function_and_remove_restores_the_original(case, dendrite_type, sets):
    build, x, seed = case
    torch.manual_seed(seed)
    model = build()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    modules = list(model)
    with torch.no_grad():
        ref = model(x)
    cfg = td.DendriteConfig(dendrite_type=dendrite_type)
    planned = [t.name for t in td.plan(model, cfg).targets]
    td.add_dendrites(model, cfg)
    assert sorted(td.dendritic_layers(model)) == sorted(planned)
    for i in range(sets):
        td.grow(model, torch.Generator().manual_seed(seed + i))
    assert all(layer.num_dendrites == sets for layer in td.dendritic_layers(model).values())
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    td.remove_dendrites(model)
    assert list(model) == modules and all(a is b for a, b in zip(model, modules))
    state = model.state_dict()
    assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in state)


@SETTINGS
@given(models(), st.sampled_from(TYPES), st.integers(1, 2), st.integers(0, 2**16))
def test_save_load_round_trip_is_bitwise(tmp_path_factory, case, dendrite_type, sets, perturb):
    build, x, seed = case
    torch.manual_seed(seed)
    model = build()
    td.add_dendrites(model, td.DendriteConfig(dendrite_type=dendrite_type))
    for i in range(sets):
        td.grow(model, torch.Generator().manual_seed(seed + i))
    g = torch.Generator().manual_seed(perturb)
    with torch.no_grad():  # trained-looking weights: every output gain away from zero
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
        ref = model(x)
    path = tmp_path_factory.mktemp("ck") / "grown"
    td.save(path, model)
    fresh = build()  # other weights: load must overwrite every one
    td.load(path, fresh)
    with torch.no_grad():
        assert torch.equal(fresh(x), ref)
    a, b = model.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
