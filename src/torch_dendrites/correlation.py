"""Correlation-trained candidate dendrites: Perforated Backpropagation / Cascade-Correlation per neuron.

Fahlman & Lebiere (1989) train a new hidden unit, before connecting it, to maximise the magnitude of the
covariance between its output and the network's remaining error; Brenner & Itti (arXiv 2501.18018) apply
this per neuron, with dendrites. Here, for each wrapped layer and each candidate ``q``, output channel
``c``:

    S[q, c] = sum_p (s[p, q, c] - mean s) * (e[p, c] - mean e)

where ``e = dL/dy`` is the layer's back-propagated error, captured during the user's ordinary
``loss.backward()``, and ``p`` runs over the batch and every non-channel position (tokens, pixels). The
sums accumulate over a whole epoch, so the score is a true covariance. The candidates see the layer's
input and the installed dendrites' activations detached, and add nothing to the output (their output
gains are zero and frozen), so the model's function is unchanged; their gradient is that of
``-sum |S| / std(e)`` instead of the loss's.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

__all__ = ["CorrelationStats", "candidate_tap"]


def _channel_sum(t: torch.Tensor, c_axis: int) -> torch.Tensor:
    dims = [d for d in range(t.dim()) if d != c_axis]
    return t.sum(dims) if dims else t


def _pair_sum(t: torch.Tensor, p: int) -> torch.Tensor:
    """Reduce ``[..., P, C, ...]`` (candidate axis ``p``) to ``[P, C]``."""
    dims = [d for d in range(t.dim()) if d not in (p, p + 1)]
    return t.sum(dims) if dims else t


class CorrelationStats:
    """Epoch-long running sums of candidate activations ``s`` and layer error ``e`` per (candidate, channel).

    Sums are kept in float64: an epoch may hold millions of positions.
    """

    def __init__(self, num_candidates: int, num_neurons: int, device: torch.device):
        self.shape = (num_candidates, num_neurons)
        self.device = device
        self.reset()

    def reset(self) -> None:
        kw = dict(dtype=torch.float64, device=self.device)
        p, c = self.shape
        self.n = torch.zeros((), **kw)
        self.sum_s = torch.zeros(p, c, **kw)
        self.sum_ss = torch.zeros(p, c, **kw)
        self.sum_se = torch.zeros(p, c, **kw)
        self.sum_e = torch.zeros(c, **kw)
        self.sum_ee = torch.zeros(c, **kw)

    @torch.no_grad()
    def update(self, s: torch.Tensor, e: torch.Tensor, p: int) -> None:
        """Add one batch: ``s`` is ``[..., P, C, ...]`` (candidate axis ``p``), ``e`` is ``[..., C, ...]``."""
        self.n += e.numel() // self.shape[1]
        self.sum_s += _pair_sum(s, p).double()
        self.sum_ss += _pair_sum(s * s, p).double()
        self.sum_se += _pair_sum(s * e.unsqueeze(p), p).double()
        self.sum_e += _channel_sum(e, p).double()
        self.sum_ee += _channel_sum(e * e, p).double()

    def covariance(self) -> torch.Tensor:
        """``S / n``: the covariance of each candidate with its neuron's error, ``[P, C]``."""
        n = self.n.clamp_min(1)
        return self.sum_se / n - (self.sum_s / n) * (self.sum_e / n)

    def error_mean_std(self):
        n = self.n.clamp_min(1)
        mean = self.sum_e / n
        var = (self.sum_ee / n - mean * mean).clamp_min(0)
        return mean, var.sqrt()

    def scores(self) -> torch.Tensor:
        """Per candidate: the mean over channels of ``|correlation(s, e)|``, in [0, 1]; ``[P]``."""
        n = self.n.clamp_min(1)
        var_s = (self.sum_ss / n - (self.sum_s / n) ** 2).clamp_min(0)
        _, std_e = self.error_mean_std()
        corr = self.covariance() / (var_s.sqrt() * std_e + 1e-12)
        return corr.abs().clamp(max=1.0).mean(1)


class _CorrelationTap(torch.autograd.Function):
    """Identity on the layer output; in backward, reads ``e = dL/dy`` and hands the candidates the
    gradient of the negative covariance magnitude instead of the loss's (which would be zero)."""

    @staticmethod
    def forward(ctx, out, s, stats, p):
        ctx.save_for_backward(s)
        ctx.stats, ctx.p = stats, p
        # A copy, not the input itself: a later in-place op (ReLU(inplace=True)) must not hit our input.
        return out.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (s,) = ctx.saved_tensors
        p, st = ctx.p, ctx.stats
        st.update(s, g, p)
        tail = (1,) * (g.dim() - p - 1)
        mean_e, std_e = st.error_mean_std()
        sign = torch.sign(st.covariance()).to(g.dtype)  # [P, C]
        positions = g.numel() // st.shape[1]
        # d(-|S_qc|/std_c)/ds_p = -sign_qc (e_pc - mean_c) / std_c; averaged over the batch's positions.
        scale = (std_e.clamp_min(1e-12) * positions).to(g.dtype)
        ge = (g - mean_e.to(g.dtype).view(-1, *tail)) / scale.view(-1, *tail)
        grad_s = ge.unsqueeze(p) * sign.neg().view(*sign.shape, *tail)
        return g, grad_s.to(s.dtype), None, None


@torch.compiler.disable
def candidate_tap(dendrites, out: torch.Tensor, s: Optional[torch.Tensor], p: int, args: tuple, kwargs: Dict[str, Any]):
    """Run the candidates of one layer on detached inputs and attach them to ``out`` through the tap.

    Kept out of compiled graphs (the tap updates Python-side statistics in backward): a candidate phase
    runs this part eagerly, and ``fullgraph=True`` compilation belongs to the neuron phases.
    """
    cands = list(dendrites.candidates)
    n_c, c = len(cands), dendrites.num_neurons
    det_args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    det_kwargs = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    params = {n: [getattr(d, n) for d in cands] for n in dendrites.param_names}
    z = dendrites.spec.batched_forward(dendrites._base[0], params, *det_args, **det_kwargs).unflatten(p, (n_c, c))
    k = dendrites.num_dendrites
    if k:
        tail = (1,) * (out.dim() - p - 1)
        u = torch.stack([d.cascade_gain for d in cands]).view(n_c, k, c, *tail)  # [P, k, C, ...]
        z = z + (u * s.detach().unsqueeze(p)).sum(p + 1)
    act = torch.sigmoid if dendrites.activation == "sigmoid" else torch.tanh
    return _CorrelationTap.apply(out, act(z), dendrites.correlation, p)
