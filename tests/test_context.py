"""Task-prototype contexts (td.TaskPrototypes) and the paper's configuration of gated dendrites
(first_gate="full"): running means, nearest-prototype inference, a fixed projection that td.save/td.load keep,
Iyer et al.'s formula, and growth from there that still keeps the function."""

from __future__ import annotations

import pytest
import torch

import torch_dendrites as td
from torch_dendrites.dendrites import GatedDendrites


# ------------------------------------------------------------------------------ prototypes
def test_running_means_over_batches_are_exact():
    protos = td.TaskPrototypes(num_tasks=3, input_dim=6)
    x = torch.randn(30, 2, 3)  # flattened to 6 values per sample
    tasks = torch.arange(30) % 3
    for i in range(0, 30, 7):  # uneven batches, mixed tasks
        protos.update(x[i : i + 7], tasks[i : i + 7])
    protos.update(torch.ones(4, 6), task=2)  # one task for a whole batch
    flat = x.flatten(1)
    want = [flat[tasks == t].mean(0) for t in (0, 1)]
    want.append(torch.cat([flat[tasks == 2], torch.ones(4, 6)]).mean(0))
    assert torch.allclose(protos.prototypes(), torch.stack(want), atol=1e-6)
    assert protos.counts.tolist() == [10, 10, 14]


def test_nearest_prototype_picks_the_closest_seen_task():
    protos = td.TaskPrototypes(num_tasks=4, input_dim=2)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    for t, c in enumerate(centres):  # task 3 never shown: it never wins
        protos.update(c + torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), task=t)
    queries = torch.tensor([[0.5, 0.2], [9.0, 1.0], [1.0, 8.0], [100.0, 100.0]])
    assert protos.nearest(queries).tolist() == [0, 1, 2, 1]
    ctx = protos.context(x=queries)
    assert torch.equal(ctx, protos.contexts()[[0, 1, 2, 1]])
    assert torch.equal(protos(queries), ctx)
    # known tasks: one per sample, or one for the whole batch (a [context_dim] vector)
    assert torch.equal(protos.context(task=torch.tensor([2, 0])), centres[[2, 0]])
    assert torch.equal(protos.context(task=1), centres[1])


def test_projection_is_fixed_seeded_and_linear():
    a = td.TaskPrototypes(num_tasks=2, input_dim=50, context_dim=8, seed=3)
    b = td.TaskPrototypes(num_tasks=2, input_dim=50, context_dim=8, seed=3)
    c = td.TaskPrototypes(num_tasks=2, input_dim=50, context_dim=8, seed=4)
    assert torch.equal(a.projection, b.projection) and not torch.equal(a.projection, c.projection)
    assert not a.projection.requires_grad and "projection" in dict(a.named_buffers())
    before = a.projection.clone()
    x = torch.randn(20, 50)
    a.update(x[:10], 0)
    a.update(x[10:], 1)
    assert torch.equal(a.projection, before)  # updates never touch it
    assert torch.allclose(a.context(task=0), x[:10].mean(0) @ before, atol=1e-5)
    assert a.context(x=x).shape == (20, 8)


def test_projection_and_prototypes_survive_save_and_load(tmp_path):
    class Net(torch.nn.Module):
        def __init__(self, seed):
            super().__init__()
            torch.manual_seed(seed)
            self.body = torch.nn.Sequential(torch.nn.Linear(12, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
            self.prototypes = td.TaskPrototypes(num_tasks=3, input_dim=12, context_dim=4, seed=seed)

        def forward(self, x):
            return self.body(x)

    build = Net
    cfg = td.DendriteConfig(
        dendrite_type="gated", target_names=["body.0"], dendrite_options={"context_dim": 4, "segments": 3}
    )
    net = td.add_dendrites(build(0), cfg)
    td.grow(net)
    x = torch.randn(9, 12)
    net.prototypes.update(x, torch.arange(9) % 3)
    td.save(tmp_path / "m", net)
    fresh = td.load(tmp_path / "m", build(1))  # another seed draws another projection: the saved one comes back
    assert torch.equal(fresh.prototypes.projection, net.prototypes.projection)
    assert torch.equal(fresh.prototypes.contexts(), net.prototypes.contexts())
    with td.dendrite_context(net, net.prototypes(x)), td.dendrite_context(fresh, fresh.prototypes(x)):
        assert torch.equal(fresh(x), net(x))


def test_prototype_errors():
    protos = td.TaskPrototypes(num_tasks=2, input_dim=3)
    with pytest.raises(td.StateError, match="no prototype yet"):
        protos.nearest(torch.zeros(1, 3))
    protos.update(torch.zeros(2, 3), 0)
    with pytest.raises(td.StateError, match=r"task\(s\) \[1\] have no prototype"):
        protos.context(task=1)
    with pytest.raises(td.StateError, match="0..1"):
        protos.update(torch.zeros(2, 3), 2)
    with pytest.raises(td.StateError, match="3 values per sample"):
        protos.update(torch.zeros(2, 4), 0)
    with pytest.raises(td.StateError, match="2 entries for a batch of 3"):
        protos.update(torch.zeros(3, 3), torch.tensor([0, 1]))
    with pytest.raises(td.ConfigError, match="exactly one of"):
        protos.context()
    with pytest.raises(td.ConfigError, match="context_dim=0"):
        td.TaskPrototypes(2, 3, context_dim=0)
    assert protos.counts.tolist() == [2, 0]  # failed updates changed nothing


# ------------------------------------------------------------------------------ gated, the paper's configuration
def paper_layer(first_gate="full", segments=3, context_dim=4):
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 5)
    opts = {"context_dim": context_dim, "segments": segments, "first_gate": first_gate}
    cfg = td.DendriteConfig(dendrite_type="gated", dendrite_options=opts, init_scale=1.0)
    return lin, td.add_dendrites(torch.nn.Sequential(lin), cfg)


def test_full_first_gate_computes_iyer_et_al_formula():
    lin, model = paper_layer()
    added = td.grow(model)
    unit = model[0].dendrites.units[0]
    assert unit.full and unit.out_gain is None
    assert added == 5 * 3 * 4  # segments only: no mixing weight
    x, ctx = torch.randn(7, 6), torch.randn(7, 4)
    # y' = y * sigmoid(d*), d* the segment response with the largest |d| (sign kept), one segment per task
    d = torch.einsum("bd,csd->bcs", ctx, unit.segments)
    best = d.gather(-1, d.abs().argmax(-1, keepdim=True)).squeeze(-1)
    with td.dendrite_context(model, ctx):
        y = model(x)
    assert torch.allclose(y, lin(x) * torch.sigmoid(best), atol=1e-6)
    assert not torch.allclose(y, lin(x))  # the paper's start changes the function at once
    # the segments train from the first step; only each neuron's winning segment gets gradient
    y.sum().backward()
    assert unit.segments.grad is not None and unit.segments.grad.abs().sum() > 0
    one = td.add_dendrites(torch.nn.Sequential(torch.nn.Linear(6, 5)), _cfg())
    td.grow(one)
    u = one[0].dendrites.units[0]
    with td.dendrite_context(one, torch.randn(4)):  # one context for the whole batch
        one(torch.randn(3, 6)).sum().backward()
    assert ((u.segments.grad != 0).any(-1).sum(-1) <= 1).all()


def _cfg():
    return td.DendriteConfig(dendrite_type="gated", dendrite_options={"context_dim": 4, "first_gate": "full"})


def test_growth_after_the_full_gate_keeps_the_function():
    lin, model = paper_layer()
    td.grow(model)
    x, ctx = torch.randn(5, 6), torch.randn(5, 4)
    with td.dendrite_context(model, ctx):
        before = model(x)
        assert td.grow(model) == 5 * 3 * 4 + 5  # a mixed gate: segments and a zero mixing weight
        assert torch.equal(model(x), before)
        second = model[0].dendrites.units[1]
        assert not second.full and second.out_gain.abs().sum() == 0
        second.out_gain.data.fill_(1.0)  # fully mixed in: the gates multiply
        gates = model[0].dendrites.gate(ctx)
        assert torch.allclose(model(x), lin(x) * gates, atol=1e-6)
    model[0].truncate(0)
    td.grow(model)  # the first gate again: full
    assert model[0].dendrites.units[0].full
    # units built before attaching (as the growth controller does) know their position
    stack = model[0].dendrites
    assert stack.new_unit(index=0).full and not stack.new_unit(index=1).full and not stack.new_unit().full


def test_mixed_default_is_unchanged_and_full_round_trips(tmp_path):
    _, mixed = paper_layer(first_gate="mixed")
    assert mixed[0].dendrites.first_gate == "mixed"
    td.grow(mixed)
    assert not mixed[0].dendrites.units[0].full  # the default keeps the function-preserving growth
    _, model = paper_layer()
    td.grow(model)
    td.grow(model)
    td.save(tmp_path / "m", model)
    fresh = td.load(tmp_path / "m", torch.nn.Sequential(torch.nn.Linear(6, 5)))
    d = fresh[0].dendrites
    assert isinstance(d, GatedDendrites) and d.first_gate == "full"
    assert [u.full for u in d.units] == [True, False]
    x, ctx = torch.randn(3, 6), torch.randn(3, 4)
    with td.dendrite_context(model, ctx), td.dendrite_context(fresh, ctx):
        assert torch.equal(fresh(x), model(x))


def test_first_gate_option_is_checked():
    with pytest.raises(td.ConfigError, match="first_gate='half'"):
        paper_layer(first_gate="half")
