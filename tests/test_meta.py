"""Models built on the ``meta`` device: planning, wrapping and growing allocate none of their weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torch_dendrites as td


@pytest.mark.parametrize("dendrite_type", ["cascade", "lowrank"])
def test_plan_wrap_and_grow_on_meta_allocate_nothing(dendrite_type):
    # 2 x 40e9 parameters: any real allocation of a weight (or of a dendrite drawn on the CPU first) would need
    # 160 GB and fail, so passing shows that nothing of this size is ever materialised.
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(200_000, 200_000), nn.ReLU(), nn.Linear(200_000, 200_000))
    plan = td.plan(model, td.DendriteConfig(dendrite_type=dendrite_type))
    assert [t.name for t in plan.targets] == ["0", "2"]
    td.add_dendrites(model, td.DendriteConfig(dendrite_type=dendrite_type))
    added = td.grow(model, torch.Generator().manual_seed(0))
    added += td.grow(model, torch.Generator().manual_seed(1))
    assert added > 0 and all(layer.num_dendrites == 2 for layer in td.dendritic_layers(model).values())
    assert all(p.is_meta for p in model.parameters())
    assert td.summary(model).total_parameters == sum(p.numel() for p in model.parameters())
    # Materialised afterwards, as with any meta-built model, it runs.
    with torch.device("meta"):
        small = nn.Sequential(nn.Linear(8, 4))
    td.add_dendrites(small, td.DendriteConfig(dendrite_type=dendrite_type))
    td.grow(small)
    small.to_empty(device="cpu")
    for p in small.parameters():
        nn.init.normal_(p)
    assert torch.isfinite(small(torch.randn(2, 8))).all()


@pytest.mark.parametrize("base_weights", [True, False])
def test_a_model_planned_and_grown_on_meta_loads_a_checkpoint_after_to_empty(tmp_path, base_weights):
    """The large-model path: build, wrap and grow on meta (nothing allocated), materialise with to_empty, then
    td.load fills every weight (full folder), or the dendrites onto the pretrained base (adapter-sized)."""

    def build():
        return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))

    torch.manual_seed(0)
    trained = td.add_dendrites(build())
    td.grow(trained, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in td.dendritic_layers(trained)["0"].dendrites.parameters():
            p.add_(0.1)  # output gains away from zero, as after training
    if not base_weights:
        for name, p in trained.named_parameters():
            p.requires_grad_("dendrites" in name)
    td.save(tmp_path / "ck", trained, base_weights=base_weights)
    x = torch.randn(4, 6)
    with torch.device("meta"):
        fresh = build()
    td.add_dendrites(fresh)
    td.grow(fresh)
    assert all(p.is_meta for p in fresh.parameters())
    with pytest.raises(td.CheckpointError, match="meta"):
        td.load(tmp_path / "ck", fresh)  # refused, with the fix named, and nothing changed
    assert all(p.is_meta for p in fresh.parameters())
    fresh.to_empty(device="cpu")
    if not base_weights:  # the pretrained base is loaded first, as it would be from its own files
        fresh.load_state_dict({k: v for k, v in trained.state_dict().items() if "dendrites" not in k}, strict=False)
    td.load(tmp_path / "ck", fresh)
    with torch.no_grad():
        assert torch.equal(fresh(x), trained(x))
