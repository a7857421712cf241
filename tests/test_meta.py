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
