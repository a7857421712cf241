"""benchmarks/fused_probe.py: the hand-fused cascade kernel it times computes what the library's kernels compute."""

from __future__ import annotations

import copy

import pytest
import torch

import torch_dendrites as td
from benchmarks import fused_probe
from torch_dendrites.dendrites.kernel import compiled_available


def test_pack_puts_each_dendrites_gains_below_the_diagonal():
    u = [torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0], [5.0, 6.0]])]
    U = fused_probe.pack(u, 3, torch.zeros(3, 2))
    assert U.shape == (3, 3, 2)
    assert torch.equal(U[1, 0], u[0][0]) and torch.equal(U[2, :2], u[1])
    assert torch.equal(U[0], torch.zeros(3, 2)) and torch.equal(U[1, 1:], torch.zeros(2, 2))
    assert torch.equal(U[2, 2], torch.zeros(2))


@pytest.mark.slow
def test_hand_fused_kernel_agrees_with_the_library_and_passes_gradcheck():
    if not compiled_available("cpu") or not fused_probe.find_ninja():
        pytest.skip("no C++ compiler or ninja here: the probe's kernel cannot be built")
    worst = fused_probe.agreement(ks=(1, 2, 3))
    assert worst.pop("gradcheck (float64, k=3)") == 0.0
    assert len(worst) == 9 and max(worst.values()) < 1e-5, worst
    # Swapped into a model: the same loss and gradients as the library's own kernel.
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 36, 5))
    x = torch.randn(3, 2, 8, 8)
    models = []
    for swap in (False, True):
        m = td.add_dendrites(copy.deepcopy(base), td.DendriteConfig())
        g = torch.Generator().manual_seed(1)
        td.grow(m, g), td.grow(m, g)
        for layer in td.dendritic_layers(m).values():
            for d in layer.dendrites.units:
                torch.nn.init.normal_(d.out_gain, std=0.5, generator=g)
        models.append(fused_probe.with_fused_kernel(m) if swap else m)
    assert isinstance(td.dendritic_layers(models[1])["0"].dendrites.kernel, fused_probe.FusedKernel)
    losses = []
    for m in models:
        loss = m(x).square().sum()
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1])
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p.grad, q.grad)
