"""bf16 autocast, torch.compile, and CUDA checks (the CUDA ones run only where a GPU is present)."""

from __future__ import annotations

import pytest
import torch
from models import CNNBN, MLP, TokenMLP

import torch_dendrites as td


def grown(factory, sets=2, seed=0):
    torch.manual_seed(seed)
    model = td.add_dendrites(factory())
    for _ in range(sets):
        td.grow(model)
    with torch.no_grad():
        for layer in td.dendritic_layers(model).values():
            for u in layer.dendrites.units:
                u.out_gain.normal_()
                if u.cascade_gain is not None:
                    u.cascade_gain.normal_()
    return model


CASES = [(MLP, (8, 6)), (CNNBN, (4, 3, 8, 8)), (TokenMLP, (2, 5, 8))]


@pytest.mark.parametrize("factory,shape", CASES)
def test_bf16_autocast_close_to_float32(factory, shape):
    model = grown(factory).eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
    assert y.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: relative error of a few 1e-3 per op; 5e-2 of the output scale overall.
    assert (y.float() - ref).abs().max() <= 5e-2 * ref.abs().max().clamp_min(1.0)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    y.float().pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    dend = [p.grad for layer in td.dendritic_layers(model).values() for p in layer.dendrite_parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in dend)


@pytest.mark.parametrize("factory,shape", CASES)
def test_compile_fullgraph_matches_eager_before_and_after_growth(factory, shape):
    model = grown(factory, sets=1).eval()
    x = torch.randn(*shape)
    explain = torch._dynamo.explain(model)(x)
    assert explain.graph_break_count == 0, explain.break_reasons
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), atol=1e-6)
    td.grow(model)  # a new structure: dynamo guards fail and it recompiles
    with torch.no_grad():
        for layer in td.dendritic_layers(model).values():
            layer.dendrites.units[-1].out_gain.normal_()
        assert torch.allclose(compiled(x), model(x), atol=1e-6)
    # gradients through the compiled graph equal eager ones
    model.train()
    compiled(x).pow(2).sum().backward()
    g_comp = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).pow(2).sum().backward()
    for a, b in zip(g_comp, [p.grad for p in model.parameters()]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("factory,shape", CASES)
def test_cuda_matches_cpu_and_fp16_gradscaler(factory, shape):
    model = grown(factory).eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        ref = model(x)
    cuda = model.cuda()
    with torch.no_grad():
        assert torch.allclose(cuda(x.cuda()).cpu(), ref, atol=1e-4, rtol=1e-4)
    td.grow(cuda, torch.Generator().manual_seed(0))  # growth on the GPU: weights drawn on the CPU, moved
    cuda.train()
    opt = torch.optim.SGD(cuda.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda")
    for _ in range(3):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = cuda(x.cuda()).float().pow(2).mean()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    assert all(torch.isfinite(p).all() for p in cuda.parameters())


@needs_cuda
def test_cuda_correlation_candidates():
    from torch import nn

    torch.manual_seed(0)
    model = td.add_dendrites(nn.Sequential(nn.Linear(4, 3))).cuda()
    model[0].dendrites.add_candidates(2)
    for p in model[0].base.parameters():
        p.requires_grad_(False)
    model.train()
    model(torch.randn(8, 4, device="cuda")).sum().backward()
    assert model[0].dendrites.correlation.n.item() == 8
    assert all(c.weight.grad is not None for c in model[0].dendrites.candidates)
