"""The cascade's kernels: the elementwise passes that turn the dendrites' pre-activations into the layer output.

The cascade of :mod:`.cascade` costs, besides the dendrites' batched matmul or convolution, a few passes over
activation-sized tensors per dendrite pair: ``k (k + 1) / 2`` products in the forward, as many in the
backward, and the gain reductions. The eager kernel (:class:`_Cascade`, a hand-written autograd
Function) runs each pass as its own op. The compiled kernel is the same math (:func:`_cascade_reference`, the
plain differentiable ops that traced code runs) under
``torch.compile``: inductor fuses the forward into one pass over the pre-activations and the backward into one
pass plus the gain reductions (C++/OpenMP on the CPU, Triton on CUDA).

``dendrite_options={"kernel": ...}`` of the ``cascade`` and ``lowrank`` types chooses:

- ``"eager"``: always the eager kernel;
- ``"compiled"``: the compiled kernel wherever ``torch.compile`` can build it (a C++ compiler on the CPU,
  Triton on CUDA), the eager one elsewhere (with a warning);
- ``"auto"`` (the default): the compiled kernel where it is available and measured faster
  (``benchmarks/results/overhead.md`` against ``overhead_eager.md``): on calls with at least
  ``AUTO_MIN_ELEMENTS`` dendrite pre-activations (all ``k`` dendrites together); smaller calls, where
  compiling (seconds, once per dendrite count) would cost more than it saves, stay eager.

There is no third, hand-written native kernel: one fused by hand in C++ (one pass forward, one backward) was
built and measured against the compiled one and was not faster (``benchmarks/fused_probe.py``).

The two kernels agree to float rounding, not bit for bit (fused multiply-adds), so a layer's output can move
by an ulp when ``"auto"`` switches kernels as it grows. A model that is itself compiled (``torch.compile(model)``)
or exported traces the plain ops of ``_cascade_reference`` whatever the option says.

Example:
    >>> import torch_dendrites as td
    >>> td.DendriteConfig(dendrite_options={"kernel": "eager"}).dendrite_options
    {'kernel': 'eager'}
"""

from __future__ import annotations

import functools
import math
import types
import warnings
from typing import Any, Callable, Optional, Sequence

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from .base import ACTIVATIONS

__all__ = ["AUTO_MIN_ELEMENTS", "KERNELS", "CascadeKernel", "compiled_available"]

_ACTIVATION_GRADS = {
    "sigmoid": torch.ops.aten.sigmoid_backward.grad_input,
    "tanh": torch.ops.aten.tanh_backward.grad_input,
}


def _gain_sum(t: torch.Tensor, p: int) -> torch.Tensor:
    """Reduce ``[..., k, C, ...]`` (dendrite axis ``p``, channel axis ``p + 1``) to ``[k, C]``."""
    dims = [d for d in range(t.dim()) if d not in (p, p + 1)]
    return t.sum(dims) if dims else t


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def _cascade_reference(a, y, v, p, activation, u):
    """The cascade in plain differentiable ops (for tracing); same math as :class:`_Cascade`."""
    tail = (1,) * (y.dim() - p - 1)
    act = ACTIVATIONS[activation]
    out, s = y, []
    for i, z in enumerate(a.unbind(p)):
        for j in range(i):
            z = z + u[i - 1][j].view(-1, *tail) * s[j]
        s.append(act(z))
        out = out + v[i].view(-1, *tail) * s[i]
    return out, torch.stack(s, p).detach()


class _Cascade(torch.autograd.Function):
    """The per-channel cascade with a hand-written backward.

    Autograd through the plain loop spends most of a dendritic step on elementwise passes (a scatter per
    dendrite slice, two products per gain). Here the backward writes each dendrite's gradient straight into
    one buffer shaped like the batched pre-activations (what the stacked matmul/conv backward wants) and
    reduces the gain gradients in one pass each.

    Inputs: ``a`` pre-activations ``[..., k, C, ...]`` (dendrite axis at ``p``), ``y`` the layer output,
    ``v`` output gains ``[k, C]``, then ``k - 1`` cascade-gain tensors ``[i, C]``. Returns the layer output
    and the dendrite activations ``s`` (shaped like ``a``, not differentiable).
    """

    @staticmethod
    def forward(ctx, a, y, v, p, activation, return_s, *u):
        k = a.shape[p]
        tail = (1,) * (y.dim() - p - 1)
        act = ACTIVATIONS[activation]
        s = torch.empty_like(a)
        out = y
        for i in range(k):
            # z_i is built in s_i's own slot, then activated in place: no temporaries (on the CPU each
            # fresh activation-sized buffer costs page faults).
            s_i = s.select(p, i)
            if i == 0:
                act(a.select(p, 0), out=s_i)
            else:
                torch.addcmul(a.select(p, i), u[i - 1][0].view(-1, *tail), s.select(p, 0), out=s_i)
                for j in range(1, i):
                    s_i.addcmul_(u[i - 1][j].view(-1, *tail), s.select(p, j))
                act(s_i, out=s_i)
            # Out of place once (y belongs to the caller), then in place.
            out = torch.addcmul(out, v[i].view(-1, *tail), s_i) if i == 0 else out.addcmul_(v[i].view(-1, *tail), s_i)
        ctx.save_for_backward(s, v, *u)
        ctx.p, ctx.activation = p, activation
        if not return_s:
            return out
        # s is returned too (for correlation candidates, which read it detached); it carries no gradient.
        ctx.mark_non_differentiable(s)
        return out, s

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g, _g_s=None):
        s, v, *u = ctx.saved_tensors
        p = ctx.p
        k = s.shape[p]
        tail = (1,) * (g.dim() - p - 1)
        act_grad = _ACTIVATION_GRADS[ctx.activation]
        grad_a = torch.empty_like(s)
        for i in reversed(range(k)):
            gs = grad_a.select(p, i)  # built in place: the slice is this dendrite's dL/dz
            torch.mul(g, v[i].view(-1, *tail), out=gs)
            for j in range(i + 1, k):  # later dendrites read s_i through their cascade gains
                gs.addcmul_(grad_a.select(p, j), u[j - 1][i].view(-1, *tail))
            act_grad(gs, s.select(p, i), grad_input=gs)
        scratch = torch.mul(g.unsqueeze(p), s)
        grad_v = _gain_sum(scratch, p)  # [k, C]
        grad_u = []
        for i in range(1, k):
            prod = torch.mul(grad_a.select(p, i).unsqueeze(p), s.narrow(p, 0, i), out=scratch.narrow(p, 0, i))
            grad_u.append(_gain_sum(prod, p))  # [i, C]
        return (grad_a, g, grad_v, None, None, None, *grad_u)


KERNELS = ("auto", "eager", "compiled")
# Measured on one CPU thread (whole training steps, eager against compiled, interleaved): the compiled kernel
# saves 10-15 % of a step from 1 dendrite on the MNIST CNN's convolutions (0.7-1.2M pre-activations per
# dendrite), about 7 % at 3 dendrites of the Linear stack (0.79M), little at 2 (0.52M), nothing at 1 (0.26M).
AUTO_MIN_ELEMENTS = 1 << 19


@functools.cache
def compiled_available(device_type: str) -> bool:
    """Whether ``torch.compile`` can build the fused cascade for tensors on ``device_type`` here."""
    try:
        import torch._dynamo

        if not torch._dynamo.is_dynamo_supported():
            return False
        if device_type == "cuda":
            from torch.utils._triton import has_triton

            return bool(has_triton())
        if device_type == "cpu":
            from torch._inductor.cpp_builder import get_cpp_compiler

            return bool(get_cpp_compiler())
    except Exception:  # noqa: BLE001 - no compiler, no Triton, an unsupported platform: all mean "eager"
        return False
    return False


@functools.cache
def _compiled(k: int, activation: str, return_s: bool) -> Callable:
    """The compiled cascade for ``k`` dendrites on canonical shapes (``a``: ``[N, k, C, R]``, ``y``: ``[N, C, R]``).

    Built once per process and key, shared by every layer (shapes are dynamic, so layers of any size reuse
    it)."""

    def fused(a, y, v, *u):
        out, s = _cascade_reference(a, y, v, 1, activation, list(u))
        return (out, s) if return_s else out

    return _compile(fused, f"fused_cascade_k{k}_{activation}_{int(return_s)}")


@functools.cache
def _compiled_fn(fn: Callable) -> Callable:
    """``fn`` (a pure tensor function of the correlation candidates' phase) compiled, once per process."""
    return _compile(fn, f"fused_{fn.__name__.lstrip('_')}")


def _compile(fn: Callable, name: str) -> Callable:
    # Dynamo keeps compiled graphs, and its limit on recompiles, per code object: one code object per kernel,
    # so that growing past a few dendrite counts never falls back to uncompiled ops.
    code = fn.__code__.replace(co_name=name)
    fn = types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    return torch.compile(fn, dynamic=True)


class CascadeKernel:
    """Runs the cascade of one dendrite stack with the kernel its ``kernel`` option names.

    Args:
        choice: ``"auto"``, ``"eager"`` or ``"compiled"`` (see the module docstring).
    """

    def __init__(self, choice: str = "auto"):
        self.choice = choice
        self.failed: Optional[str] = None  # why the compiled kernel could not run here (then: eager for good)

    def use_compiled(self, t: torch.Tensor) -> bool:
        """Whether a kernel over tensors like ``t`` (the largest it reads) runs compiled."""
        if self.choice == "eager" or self.failed is not None:
            return False
        if is_in_torch_dispatch_mode():
            # Under a dispatch mode (FlopCounterMode, a profiler's or a planner's fake tensors) dynamo skips the
            # frame and remembers the skip for the code object: every later call would then run the reference
            # ops uncompiled, silently. The eager kernel does the same math and leaves the compiled one intact.
            return False
        if not compiled_available(t.device.type):
            if self.choice == "compiled":
                self._fall_back(f"torch.compile cannot build kernels for {t.device.type} tensors here")
            return False
        return self.choice == "compiled" or t.numel() >= AUTO_MIN_ELEMENTS

    def run(self, fn: Callable, *args: Any) -> Any:
        """``fn(*args)``, compiled where :meth:`use_compiled` says so for ``args[0]`` (its largest input).

        ``args`` are tensors, None or strings: a compiled function with dynamic shapes takes an int argument as
        a symbol, and code that branches on it (``d not in (p, p + 1)``) can then compute something else."""
        if any(isinstance(a, (int, float)) for a in args):
            raise TypeError("CascadeKernel.run takes tensors, None and strings only; bake numbers into fn.")
        if self.use_compiled(args[0]):
            try:
                return _compiled_fn(fn)(*args)
            except Exception as exc:  # noqa: BLE001 - a compiler failure must not stop training: run eager
                self._fall_back(f"{type(exc).__name__}: {str(exc)[:200]}")
        return fn(*args)

    def _fall_back(self, why: str) -> None:
        self.failed = why
        warnings.warn(
            f"torch-dendrites: the compiled cascade kernel is not used ({why}); the eager kernel runs instead "
            "(same results, slower). Pass dendrite_options={'kernel': 'eager'} to silence this.",
            RuntimeWarning,
            stacklevel=4,
        )

    def __call__(self, a, y, v, p: int, activation: str, return_s: bool, u: Sequence[torch.Tensor]):
        """The layer output (and the dendrite activations ``s`` if ``return_s``); ``a``: ``[..., k, C, ...]``
        with the dendrite axis at ``p``; ``v``: ``[k, C]``; ``u[i - 1]``: ``[i, C]``."""
        k = a.shape[p]
        if k == 1 and not self.use_compiled(a):
            # One dendrite (the common case): the plain differentiable ops run exactly the hand-written kernel's
            # passes (the activation and one product-add; backward: two products, the gain's reduction, the
            # activation's backward) as C++ autograd nodes, without a Python autograd Function's cost per call
            # (about 0.1 ms per layer and training step on one CPU thread, a few percent of a small layer's step).
            tail = (1,) * (y.dim() - p - 1)
            s = ACTIVATIONS[activation](a.squeeze(p))
            out = torch.addcmul(y, v.view(-1, *tail), s)
            return (out, s.detach().unsqueeze(p)) if return_s else out
        if self.use_compiled(a):
            c, r = a.shape[p + 1], math.prod(a.shape[p + 2 :])
            # Canonical [N, k, C, R]: one compiled graph serves every layout (Linear, convolutions, tokens).
            a3 = a.reshape(-1, k, c, r)
            y3 = y.reshape(a3.shape[0], c, r)
            try:
                res = _compiled(k, activation, return_s)(a3, y3, v, *u)
            except Exception as exc:  # noqa: BLE001 - a compiler failure must not stop training: run eager
                self._fall_back(f"{type(exc).__name__}: {str(exc)[:200]}")
            else:
                if return_s:
                    out, s = res
                    return out.reshape(y.shape), s.reshape(a.shape)
                return res.reshape(y.shape)
        return _Cascade.apply(a, y, v, p, activation, return_s, *u)
