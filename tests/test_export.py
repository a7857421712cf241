"""A grown model runs under torch.export with the same outputs as eager (inference shipping path)."""

from __future__ import annotations

import pytest
import torch
from models import CNNBN, MLP

import torch_dendrites as td


@pytest.mark.parametrize("factory,shape", [(MLP, (4, 6)), (CNNBN, (2, 3, 8, 8))])
def test_export_matches_eager(factory, shape):
    torch.manual_seed(0)
    model = td.add_dendrites(factory())
    td.grow(model)
    td.grow(model)
    with torch.no_grad():  # as after training: gains and cascade weights off zero
        for layer in td.dendritic_layers(model).values():
            for u in layer.dendrites.units:
                u.out_gain.normal_()
                if u.cascade_gain is not None:
                    u.cascade_gain.normal_()
    model.eval()
    x = torch.randn(*shape)
    ep = torch.export.export(model, (x,))
    with torch.no_grad():
        assert torch.allclose(ep.module()(x), model(x), atol=1e-6, rtol=1e-5)
    x2 = torch.randn(*shape)
    with torch.no_grad():
        assert torch.allclose(ep.module()(x2), model(x2), atol=1e-6, rtol=1e-5)
