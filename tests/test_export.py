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


def grown(factory):
    torch.manual_seed(0)
    model = td.add_dendrites(factory())
    td.grow(model)
    td.grow(model)
    with torch.no_grad():
        for layer in td.dendritic_layers(model).values():
            for u in layer.dendrites.units:
                u.out_gain.normal_()
                if u.cascade_gain is not None:
                    u.cascade_gain.normal_()
    return model.eval()


@pytest.mark.parametrize(
    "factory,shape,dynamo",
    [
        (MLP, (4, 6), False),
        (MLP, (4, 6), True),
        pytest.param(CNNBN, (2, 3, 8, 8), False, marks=pytest.mark.slow),
        pytest.param(CNNBN, (2, 3, 8, 8), True, marks=pytest.mark.slow),
    ],
)
def test_onnx_export_matches_eager(factory, shape, dynamo, tmp_path):
    """torch.onnx.export, legacy (TorchScript tracing) and dynamo=True; ONNX Runtime runs the file."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    model = grown(factory)
    x = torch.randn(*shape)
    path = tmp_path / "model.onnx"
    kwargs = {"dynamo": True} if dynamo else {"dynamo": False, "dynamic_axes": {"x": {0: "batch"}}}
    torch.onnx.export(model, (x,), str(path), input_names=["x"], **kwargs)
    session = ort.InferenceSession(str(path))
    with torch.no_grad():
        for xb in (x, torch.randn(*shape)):
            (out,) = session.run(None, {"x": xb.numpy()})
            assert torch.allclose(torch.from_numpy(out), model(xb), atol=1e-5, rtol=1e-4)
