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

import math
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple

import torch
from torch import nn

from .errors import StateError

__all__ = [
    "CandidateHolder",
    "CandidatePhase",
    "CorrelationStats",
    "candidate_tap",
    "candidates_of",
    "checksum",
    "holds_candidates",
]


# The elementwise work of a candidate phase, on canonical shapes: candidate tensors ``[N, P, C, R]`` (positions
# before the candidate axis, candidates, channels, positions after), layer tensors ``[N, C, R]``. A dendrite
# stack's kernel may run them compiled (no int arguments: a compiled function with dynamic shapes would treat
# an axis number as a symbol).


def _canonical(t: torch.Tensor, p: int, pair: bool) -> torch.Tensor:
    """``t`` viewed as ``[N, P, C, R]`` (``pair``: axes ``p``, ``p + 1`` are candidates, channels) or ``[N, C, R]``."""
    keep = 2 if pair else 1
    return t.reshape(math.prod(t.shape[:p]), *t.shape[p : p + keep], math.prod(t.shape[p + keep :]))


def _batch_sums(s: torch.Tensor, e: torch.Tensor):
    """One batch's sums of ``s``, ``s^2``, ``s e`` (per candidate and channel) and ``e``, ``e^2`` (per channel)."""
    e4 = e.unsqueeze(1)
    return (
        s.sum((0, 3)),
        (s * s).sum((0, 3)),
        (s * e4).sum((0, 3)),
        e.sum((0, 2)),
        (e * e).sum((0, 2)),
    )


def _tap_grad(g: torch.Tensor, mean_e: torch.Tensor, scale: torch.Tensor, neg_sign: torch.Tensor):
    """``-sign_qc (e_pc - mean_c) / scale_c``, ``[N, P, C, R]`` (see _CorrelationTap)."""
    ge = (g - mean_e[:, None]) / scale[:, None]
    return ge.unsqueeze(1) * neg_sign[:, :, None]


def _candidate_activations(z: torch.Tensor, u: Optional[torch.Tensor], s: Optional[torch.Tensor], activation: str):
    """``act(z + sum_j u_j s_j)``: the candidates' activations from their pre-activations ``z`` (``[N, P, C, R]``),
    their cascade gains ``u`` (``[P, k, C, 1]``) and the installed dendrites' activations ``s``
    (``[N, k, C, R]``, detached; None without installed dendrites)."""
    if s is not None:
        z = z + (u * s.unsqueeze(1)).sum(2)
    return torch.sigmoid(z) if activation == "sigmoid" else torch.tanh(z)


def _eager(fn: Callable, *args: Any) -> Any:
    return fn(*args)


class CandidateHolder(Protocol):
    """What a dendrite stack implements to take part in correlation training (the cascade type does).

    ``candidates`` holds the candidates of a phase in progress (empty otherwise) and ``correlation`` their
    :class:`CorrelationStats`; candidates are built apart from attaching them (``new_candidates`` then
    ``attach_candidates``), so that a whole model's candidates can be built before any layer changes.
    """

    candidates: nn.ModuleList
    correlation: Optional[CorrelationStats]

    def new_candidates(self, n: int, generator=None, index=None, scale=None) -> list: ...

    def attach_candidates(self, candidates: list) -> None: ...

    def add_candidates(self, n: int, generator=None, scale=None) -> None: ...

    def install_candidate(self, index: int) -> int: ...

    def clear_candidates(self) -> None: ...


_CANDIDATE_METHODS = ("new_candidates", "attach_candidates", "add_candidates", "install_candidate", "clear_candidates")


def holds_candidates(stack: Any) -> bool:
    """Whether a dendrite stack implements :class:`CandidateHolder`.

    Checked by hand, not with ``isinstance`` against a ``runtime_checkable`` protocol: from Python 3.12 on such a
    check reads attributes with ``inspect.getattr_static``, which does not see an ``nn.Module``'s submodules
    (``candidates`` lives in ``_modules``), so every stack would fail it and correlation mode would silently
    train no candidates.
    """
    return (
        all(callable(getattr(type(stack), m, None)) for m in _CANDIDATE_METHODS)
        and hasattr(stack, "candidates")
        and hasattr(stack, "correlation")
    )


def candidates_of(stack: Any) -> Sequence[nn.Module]:
    """The candidates a stack holds now (none for types without correlation training)."""
    return stack.candidates if holds_candidates(stack) else ()


class CorrelationStats:
    """Epoch-long running sums of candidate activations ``s`` and layer error ``e`` per (candidate, channel).

    Sums are kept in float64: an epoch may hold millions of positions.
    """

    def __init__(self, num_candidates: int, num_neurons: int, device: torch.device):
        self.shape = (num_candidates, num_neurons)
        self.device = device
        # Called at every backward through the candidates (the candidate phase fills zero gradients there).
        self.on_backward: Optional[Callable[[], None]] = None
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
    def update(self, s: torch.Tensor, e: torch.Tensor, p: int, run: Callable = _eager) -> None:
        """Add one batch: ``s`` is ``[..., P, C, ...]`` (candidate axis ``p``), ``e`` is ``[..., C, ...]``;
        ``run(fn, *args)`` runs the elementwise work (a dendrite stack's kernel, which may compile it)."""
        self.n += e.numel() // self.shape[1]
        sums = run(_batch_sums, _canonical(s, p, True), _canonical(e, p, False))
        for total, part in zip((self.sum_s, self.sum_ss, self.sum_se, self.sum_e, self.sum_ee), sums):
            total += part.double()

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
    def forward(ctx, out, s, stats, p, run):
        ctx.save_for_backward(s)
        ctx.stats, ctx.p, ctx.run = stats, p, run
        # A copy, not the input itself: a later in-place op (ReLU(inplace=True)) must not hit our input.
        return out.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (s,) = ctx.saved_tensors
        p, st = ctx.p, ctx.stats
        if st.on_backward is not None:
            st.on_backward()
        st.update(s, g, p, ctx.run)
        mean_e, std_e = st.error_mean_std()
        sign = torch.sign(st.covariance()).to(g.dtype)  # [P, C]
        positions = g.numel() // st.shape[1]
        # d(-|S_qc|/std_c)/ds_p = -sign_qc (e_pc - mean_c) / std_c; averaged over the batch's positions.
        scale = (std_e.clamp_min(1e-12) * positions).to(g.dtype)
        grad_s = ctx.run(_tap_grad, _canonical(g, p, False), mean_e.to(g.dtype), scale, sign.neg())
        return g, grad_s.reshape(s.shape).to(s.dtype), None, None, None


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
    run = getattr(dendrites, "kernel", None)
    run = _eager if run is None else run.run
    u = torch.stack([d.cascade_gain for d in cands]).view(n_c, k, c, 1) if k else None  # [P, k, C, 1]
    s = _canonical(s.detach(), p, True) if k else None
    s_cand = run(_candidate_activations, _canonical(z, p, True), u, s, dendrites.activation).reshape(z.shape)
    return _CorrelationTap.apply(out, s_cand, dendrites.correlation, p, run)


def checksum(tensors: List[torch.Tensor]) -> List[Tuple[float, float]]:
    """Per tensor its float64 sum and sum of squares: equal iff (in practice) nothing wrote into it; no copy is
    kept. (Two separate sums: a single combination such as ``sum + abs-sum`` cancels, and misses every change to
    negative entries.)"""
    with torch.no_grad():
        out = []
        for t in tensors:
            d = t.detach().double()
            out.append((float(d.sum()), float((d * d).sum())))
        return out


FROZEN_FIX = (
    "build the optimizer over the trainable parameters only ([p for p in model.parameters() if p.requires_grad]) "
    "and rebuild it (or call td.sync_optimizer) at every step that returns restructured=True, so that no weight "
    "decay or momentum reaches frozen parameters"
)


class CandidatePhase:
    """The model-wide part of a candidate phase: what is frozen, and the candidates of every layer.

    At :meth:`start` every trainable parameter is frozen (``requires_grad=False``; its previous state is
    recorded) and normalisation layers stop updating their running statistics, so the model computes
    exactly what it did; each layer's candidates are attached. During the phase, frozen parameters receive
    zero gradients at every backward through the candidates, so that loops which read every ``p.grad`` keep
    working; :meth:`check_frozen` tells whether an optimizer moved them anyway. :meth:`install` makes the best
    candidate of each layer a dendrite and unfreezes; :meth:`end` discards the candidates and unfreezes.

    Args:
        owner: anything with a ``model`` attribute (the model may be replaced, e.g. by ``td.load``).
        layers: ``fn() -> {path: DendriticLayer}``, the model's dendritic layers now (their stacks hold
            candidates: ``dendrite_type="cascade"``).
    """

    def __init__(self, owner: Any, layers: Callable[[], Dict[str, nn.Module]]):
        self._owner = owner
        self._layers = layers
        self.trainable_before: List[str] = []
        self.norm_momenta: Dict[str, Optional[float]] = {}
        self._frozen: List[torch.Tensor] = []
        self._sums: List[float] = []

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        return {"trainable_before": list(self.trainable_before), "norm_momenta": dict(self.norm_momenta)}

    def resume(self, state: Dict[str, Any]) -> None:
        """Re-freeze a model loaded in the middle of a candidate phase (its candidates already attached).

        The reference sums of the frozen weights are taken at the next :meth:`check_frozen`: a loader may
        copy the saved weights in after this call.
        """
        self.trainable_before = list(state["trainable_before"])
        self.norm_momenta = dict(state["norm_momenta"])
        self._freeze()
        self._sums = None

    @property
    def model(self) -> nn.Module:
        return self._owner.model

    @property
    def layers(self) -> Dict[str, nn.Module]:
        return self._layers()

    @property
    def active(self) -> bool:
        return any(len(candidates_of(layer.dendrites)) for layer in self.layers.values())

    # ------------------------------------------------------------------ phase
    def build(self, pool: int, generator: Optional[torch.Generator], scale: Optional[float], counts: Dict[str, int]):
        """Every layer's ``pool`` new candidates, built (nothing attached yet); ``counts`` are the dendrites
        each layer will have when they are attached."""
        return {
            name: layer.dendrites.new_candidates(pool, generator, index=counts[name], scale=scale)
            for name, layer in self.layers.items()
        }

    def start(self, built: Dict[str, list]) -> None:
        """Attach the candidates ``built`` by :meth:`build` and freeze everything else."""
        self.trainable_before = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.norm_momenta = {
            n: m.momentum for n, m in self.model.named_modules() if isinstance(m, nn.modules.batchnorm._NormBase)
        }
        for name, layer in self.layers.items():
            layer.dendrites.attach_candidates(built[name])
        self._freeze()

    def _candidate_ids(self) -> set:
        return {id(p) for layer in self.layers.values() for p in layer.dendrites.candidates.parameters()}

    def _freeze(self) -> None:
        cand = self._candidate_ids()
        params = dict(self.model.named_parameters())
        for p in self.model.parameters():
            if id(p) not in cand:
                p.requires_grad_(False)
        modules = dict(self.model.named_modules())
        for name in self.norm_momenta:
            modules[name].momentum = 0.0  # running statistics stay exactly as they were
        # Zero gradients go to what this phase froze (and to the candidates' frozen output gains), not to
        # parameters the user had frozen before.
        self._frozen = [params[n] for n in self.trainable_before if n in params and id(params[n]) not in cand]
        self._frozen += [
            p for layer in self.layers.values() for p in layer.dendrites.candidates.parameters() if not p.requires_grad
        ]
        self._sums = checksum(self._frozen)
        for layer in self.layers.values():
            if layer.dendrites.correlation is not None:
                layer.dendrites.correlation.on_backward = self.fill_grads

    def fill_grads(self) -> None:
        for p in self._frozen:
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    def check_frozen(self) -> None:
        """Raise :class:`StateError` if an optimizer moved a parameter this phase froze."""
        if self._sums is None:  # just resumed: these weights are the reference
            self._sums = checksum(self._frozen)
        elif self._frozen and checksum(self._frozen) != self._sums:
            raise StateError(f"an optimizer changed parameters frozen for the candidate phase; {FROZEN_FIX}.")

    def scores(self) -> Dict[str, float]:
        """Each layer's best candidate score this epoch (mean |correlation| over its neurons)."""
        out = {}
        for name, layer in self.layers.items():
            stats = layer.dendrites.correlation
            out[name] = float(stats.scores().max()) if stats is not None and stats.n > 0 else 0.0
        return out

    def reset_epoch(self) -> None:
        for layer in self.layers.values():
            layer.dendrites.correlation.reset()  # a fresh epoch-long covariance

    def install(self, warning: float) -> List[str]:
        """Install the best-correlated candidate of every layer; unfreeze. Returns the weakly correlated layers."""
        weak = []
        for name, layer in self.layers.items():
            stats = layer.dendrites.correlation
            scores = stats.scores() if stats.n > 0 else torch.zeros(len(layer.dendrites.candidates))
            best = int(scores.argmax())
            if float(scores[best]) < warning:
                weak.append(f"{name} ({float(scores[best]):.4f})")
            layer.dendrites.install_candidate(best)
        self._unfreeze()
        return weak

    def end(self) -> None:
        """Discard the candidates and unfreeze."""
        for layer in self.layers.values():
            layer.dendrites.clear_candidates()
        self._unfreeze()

    def _unfreeze(self) -> None:
        for p in self._frozen:
            p.grad = None  # the zero gradients were only for the phase
        params = dict(self.model.named_parameters())
        for name in self.trainable_before:
            if name in params:
                params[name].requires_grad_(True)
        modules = dict(self.model.named_modules())
        for name, momentum in self.norm_momenta.items():
            modules[name].momentum = momentum
        self.trainable_before, self.norm_momenta, self._frozen, self._sums = [], {}, [], []
