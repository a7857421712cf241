"""The cascade kernel option: the compiled kernel computes what the eager one does, ``"auto"`` chooses by size,
a compiler that fails falls back to eager with one warning, and the option survives save/load."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import torch_dendrites as td
from torch_dendrites.dendrites import kernel as kernel_mod
from torch_dendrites.dendrites.kernel import AUTO_MIN_ELEMENTS, CascadeKernel, compiled_available

needs_compiler = pytest.mark.skipif(not compiled_available("cpu"), reason="torch.compile has no C++ compiler here")


def _grown(module: nn.Module, k: int, kernel: str, dendrite_type: str = "cascade", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = td.DendriteConfig(dendrite_type=dendrite_type, dendrite_options={"kernel": kernel})
    model = td.add_dendrites(module, cfg)
    g = torch.Generator().manual_seed(seed)
    for _ in range(k):
        td.grow(model, g)
    with torch.no_grad():  # non-zero output gains, as after training
        for layer in td.dendritic_layers(model).values():
            for u in layer.dendrites.units:
                u.out_gain.normal_(0, 0.5, generator=g)
    return model


def _with_kernel(model: nn.Module, choice: str) -> nn.Module:
    other = copy.deepcopy(model)
    for layer in td.dendritic_layers(other).values():
        layer.dendrites.kernel = CascadeKernel(choice)
    return other


def _compiled_calls() -> int:
    infos = kernel_mod._compiled.cache_info(), kernel_mod._compiled_fn.cache_info()
    return sum(i.hits + i.misses for i in infos)


def _step(model: nn.Module, x: torch.Tensor):
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out.square().mean() + out.mean()).backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_step(a: nn.Module, b: nn.Module, x: torch.Tensor, exact: bool = False, tol: float = 1e-5) -> None:
    out_a, grads_a = _step(a, x)
    calls = None if exact else _compiled_calls()
    out_b, grads_b = _step(b, x)
    if not exact:  # b is meant to run the compiled kernel: check that it did
        assert _compiled_calls() > calls
        assert all(layer.dendrites.kernel.failed is None for layer in td.dendritic_layers(b).values())
    check = torch.equal if exact else (lambda s, t: torch.allclose(s, t, rtol=tol, atol=tol / 10))
    assert check(out_a, out_b), (out_a - out_b).abs().max()
    assert grads_a.keys() == grads_b.keys()
    for n in grads_a:
        assert check(grads_a[n], grads_b[n]), (n, (grads_a[n] - grads_b[n]).abs().max())


def test_auto_chooses_by_size():
    k = CascadeKernel("auto")
    small = torch.zeros(AUTO_MIN_ELEMENTS // 2 - 1, 2, 1)
    big = torch.zeros(AUTO_MIN_ELEMENTS // 2, 2, 1)
    assert not k.use_compiled(small)
    assert k.use_compiled(big) == compiled_available("cpu")
    assert not CascadeKernel("eager").use_compiled(big)
    assert not k.use_compiled(big.to("meta"))  # no compiled kernels for meta tensors


def test_default_kernel_is_auto_and_the_option_survives_save_and_load(tmp_path):
    model = _grown(nn.Sequential(nn.Linear(6, 4)), 1, "eager")
    assert td.add_dendrites(nn.Sequential(nn.Linear(6, 4)))[0].dendrites.kernel.choice == "auto"
    folder = td.save(tmp_path / "m", model)
    fresh = td.load(folder, nn.Sequential(nn.Linear(6, 4)))
    assert fresh[0].dendrites.kernel.choice == "eager"
    assert fresh[0].dendrites.options.kernel == "eager"


def test_a_failing_compiler_falls_back_to_eager_with_one_warning(monkeypatch):
    eager = _grown(nn.Sequential(nn.Linear(5, 3)), 2, "eager")
    forced = _with_kernel(eager, "compiled")

    def broken(*key):
        raise RuntimeError("no compiler in this test")

    monkeypatch.setattr(kernel_mod, "compiled_available", lambda device_type: True)
    monkeypatch.setattr(kernel_mod, "_compiled", broken)
    x = torch.randn(7, 5)
    with pytest.warns(RuntimeWarning, match="no compiler in this test.*kernel': 'eager'"):
        _assert_same_step(eager, forced, x, exact=True)
    assert "no compiler" in forced[0].dendrites.kernel.failed
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only: later steps run eager without asking again
        _assert_same_step(eager, forced, x, exact=True)


def test_kernel_run_refuses_numbers():
    with pytest.raises(TypeError, match="bake numbers"):
        CascadeKernel("eager").run(lambda t, p: t, torch.zeros(2), 1)


def test_compiled_where_unavailable_warns_and_runs_eager(monkeypatch):
    eager = _grown(nn.Sequential(nn.Linear(5, 3)), 2, "eager")
    forced = _with_kernel(eager, "compiled")
    monkeypatch.setattr(kernel_mod, "compiled_available", lambda device_type: False)
    with pytest.warns(RuntimeWarning, match="cannot build kernels for cpu"):
        _assert_same_step(eager, forced, torch.randn(7, 5), exact=True)


def test_dispatch_modes_get_the_eager_kernel(monkeypatch):
    """Under a dispatch mode (FlopCounterMode here) dynamo would skip the compiled kernel's frame and remember the
    skip, so the kernel must not be called there; results and the FLOP count are the eager kernel's."""
    from torch.utils.flop_counter import FlopCounterMode

    eager = _grown(nn.Sequential(nn.Linear(5, 3)), 2, "eager")
    forced = _with_kernel(eager, "compiled")

    def not_here(*key):
        raise AssertionError("the compiled kernel was called under a dispatch mode")

    monkeypatch.setattr(kernel_mod, "compiled_available", lambda device_type: True)
    monkeypatch.setattr(kernel_mod, "_compiled", not_here)
    monkeypatch.setattr(kernel_mod, "_compiled_fn", not_here)
    x = torch.randn(7, 5)
    counts = []
    for model in (eager, forced):
        with FlopCounterMode(display=False) as counter, warnings.catch_warnings():
            warnings.simplefilter("error")
            out, grads = _step(model, x)
        counts.append((counter.get_total_flops(), out, grads))
    assert counts[0][0] == counts[1][0] > 0
    assert torch.equal(counts[0][1], counts[1][1])
    assert all(torch.equal(counts[0][2][n], counts[1][2][n]) for n in counts[0][2])
    assert forced[0].dendrites.kernel.failed is None


@needs_compiler
def test_the_compiled_kernel_still_runs_after_a_flop_count():
    from torch.profiler import profile
    from torch.utils.flop_counter import FlopCounterMode

    model = _grown(nn.Sequential(nn.Linear(9, 7)), 1, "compiled", seed=3)
    x = torch.randn(5, 9)
    with FlopCounterMode(display=False):
        _step(model, x)
    with profile() as prof:
        _step(model, x)
    assert any("Compiled" in e.key for e in prof.key_averages())


@needs_compiler
def test_compiled_kernel_matches_eager_on_linear_and_keeps_growth_exact():
    eager = _grown(nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)), 2, "eager")
    compiled = _with_kernel(eager, "compiled")
    x = torch.randn(2, 5, 8)
    _assert_same_step(eager, compiled, x)
    # Growth leaves the compiled model's function exactly as it was (the new output gains are zero).
    compiled.eval()
    with torch.no_grad():
        before = compiled(x)
        td.grow(compiled, torch.Generator().manual_seed(3))
        assert torch.equal(compiled(x), before)


@pytest.mark.slow
@needs_compiler
@pytest.mark.parametrize("dendrite_type", ["cascade", "lowrank"])
def test_compiled_kernel_matches_eager_on_convolutions(dendrite_type):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3))
    eager = _grown(net, 3, "eager", dendrite_type)
    _assert_same_step(eager, _with_kernel(eager, "compiled"), torch.randn(2, 3, 9, 9))


@pytest.mark.slow
@needs_compiler
@pytest.mark.parametrize("k", [0, 1])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_compiled_kernel_matches_eager_in_a_candidate_phase(kind, k):
    """Candidates' activations, the correlation statistics and the tap's gradient, compiled and eager."""
    if kind == "linear":
        net, x = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)), torch.randn(2, 9, 8)
    else:
        net, x = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3)), torch.randn(2, 3, 8, 8)
    eager = _grown(net, k, "eager")
    for layer in td.dendritic_layers(eager).values():
        layer.dendrites.add_candidates(2, torch.Generator().manual_seed(1))
    compiled = _with_kernel(eager, "compiled")
    _assert_same_step(eager, compiled, x)
    _assert_same_step(eager, compiled, x)  # a second batch: statistics accumulate
    for (name, a), b in zip(td.dendritic_layers(eager).items(), td.dendritic_layers(compiled).values()):
        sa, sb = a.dendrites.correlation, b.dendrites.correlation
        assert float(sa.n) > 0
        for field in ("sum_s", "sum_ss", "sum_se", "sum_e", "sum_ee"):
            assert torch.allclose(getattr(sa, field), getattr(sb, field), rtol=1e-5, atol=1e-6), (name, field)


@pytest.mark.skipif(
    not torch.cuda.is_available() or not compiled_available("cuda"), reason="needs a CUDA GPU with Triton"
)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_kernel_matches_eager_on_cuda(precision):
    """The Triton kernel (benchmarks/gpu_check.sh runs this file on the GPU)."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    eager = _grown(net, 2, "eager").cuda()
    compiled = _with_kernel(eager, "compiled")
    x = torch.randn(4, 3, 16, 16, device="cuda")
    if precision == "fp32":
        _assert_same_step(eager, compiled, x)
    else:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _assert_same_step(eager, compiled, x, tol=5e-2)


@pytest.mark.parametrize("activation", ["sigmoid", "tanh"])
@pytest.mark.parametrize("shape,p", [((6, 1, 5), 1), ((2, 4, 1, 5), 2), ((2, 1, 5, 3, 3), 1), ((1, 5), 0)])
@pytest.mark.parametrize("return_s", [False, True])
def test_one_dendrite_runs_plain_ops_that_match_the_hand_written_kernel(activation, shape, p, return_s):
    """One dendrite skips the Python autograd Function: same outputs, activations and gradients."""
    from torch_dendrites.dendrites.kernel import CascadeKernel, _Cascade

    torch.manual_seed(0)
    c = shape[p + 1]
    a = torch.randn(*shape, requires_grad=True)
    y = torch.randn(*shape[:p], *shape[p + 1 :], requires_grad=True)
    v = torch.randn(1, c, requires_grad=True)
    g = torch.randn_like(y)

    def run(fn):
        res = fn(a, y, v)
        out, s = res if return_s else (res, None)
        grads = torch.autograd.grad(out, (a, y, v), g, retain_graph=True)
        return out.detach(), s, grads, type(out.grad_fn).__name__

    new = run(lambda a, y, v: CascadeKernel("eager")(a, y, v, p, activation, return_s, []))
    old = run(lambda a, y, v: _Cascade.apply(a, y, v, p, activation, return_s))
    assert (new[3], old[3]) == ("AddcmulBackward0", "_CascadeBackward")  # C++ autograd nodes only
    torch.testing.assert_close(new[0], old[0], rtol=0, atol=0)
    if return_s:
        assert new[1].shape == a.shape and not new[1].requires_grad
        torch.testing.assert_close(new[1], old[1], rtol=0, atol=0)
    for gn, go in zip(new[2], old[2]):
        torch.testing.assert_close(gn, go, rtol=1e-6, atol=1e-7)
    x = torch.randn(*shape, dtype=torch.double, requires_grad=True)
    yd, vd = y.detach().double().requires_grad_(), v.detach().double().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, y, v: CascadeKernel("eager")(a, y, v, p, activation, False, []), (x, yd, vd)
    )
