"""The cascade's kernels: the elementwise passes that turn the dendrites' pre-activations into the layer output.

:class:`_Cascade` is the eager kernel (an autograd Function with a hand-written backward);
:func:`_cascade_reference` is the same math in plain differentiable ops, which traced code runs.
"""

from __future__ import annotations

import torch

from .base import ACTIVATIONS

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
