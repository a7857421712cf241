"""One dendritic wrapper (:class:`DendriticLayer`) and the per-type knowledge it needs (:class:`LayerSpec`).

A :class:`LayerSpec` tells the library three things about a layer type: which output axis holds its
neurons, how many neurons it has, and how to run ``k`` fresh copies of the layer ("dendrites", with their
own weights) on the layer's input as one batched operation. Specs for ``nn.Linear``, ``nn.Conv1d/2d/3d`` and
Hugging Face's GPT-2 ``Conv1D`` are built in; :func:`register_layer_type` adds others.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, StateError, UnsupportedModuleError

__all__ = ["LayerSpec", "DendriticLayer", "register_layer_type", "spec_for", "supported_types"]

Params = Dict[str, List[torch.Tensor]]


class LayerSpec:
    """How dendrites are built and run for one layer type.

    Subclass it for full control (override :meth:`batched_forward` with a single fused op), or let
    :func:`register_layer_type` build a generic one that runs the layer's own ``forward`` on the stacked
    dendrite weights under ``torch.func.vmap``.

    Args:
        neuron_axis: the output axis holding the neurons, counted from the end (``-1`` for features-last
            layers); negative so unbatched inputs work too.
        num_neurons: ``fn(module) -> int``; default reads ``out_features``, ``out_channels`` or ``nf``.

    Attributes:
        trusted: the built-in specs set it; a layer wrapped with any other spec runs one trial forward with a
            single dendrite the first time it is called, so a spec that cannot run (a forward that does not
            vmap, a wrong output shape) fails at once with the fix, not at the first step after a growth.
        default_target: whether a config with no selectors wraps this type (``nn.Embedding``: only when asked).
    """

    trusted = False
    default_target = True

    def __init__(self, neuron_axis: int = -1, num_neurons: Optional[Callable[[nn.Module], int]] = None):
        if isinstance(neuron_axis, bool) or not isinstance(neuron_axis, int) or neuron_axis >= 0:
            raise ConfigError(f"neuron_axis={neuron_axis!r} must be a negative int counted from the end, e.g. -1.")
        self.neuron_axis = neuron_axis
        self._num_neurons = num_neurons

    def num_neurons(self, module: nn.Module) -> int:
        if self._num_neurons is not None:
            return int(self._num_neurons(module))
        for attr in ("out_features", "out_channels", "nf"):
            if isinstance(getattr(module, attr, None), int):
                return getattr(module, attr)
        raise UnsupportedModuleError(
            f"cannot tell how many neurons a {type(module).__name__} has; pass num_neurons=fn(module) -> int "
            "to torch_dendrites.register_layer_type."
        )

    def param_names(self, module: nn.Module) -> List[str]:
        """Names (no dots) of one dendrite's own weight tensors."""
        return [_flat(n) for n, _ in module.named_parameters()]

    def init_params(
        self, module: nn.Module, scale: float, generator: Optional[torch.Generator]
    ) -> Dict[str, torch.Tensor]:
        """Fresh weights for one dendrite: PyTorch's default uniform init (bound 1/sqrt(fan_in)) times scale."""
        named = list(module.named_parameters())
        fan_in = next((p[0].numel() for _, p in named if p.dim() >= 2), None)
        out = {}
        for name, p in named:
            fi = p[0].numel() if p.dim() >= 2 else (fan_in or p.numel())
            out[_flat(name)] = _uniform(p.shape, 1.0 / math.sqrt(max(fi, 1)) * scale, p, generator)
        return out

    def batched_forward(self, module: nn.Module, params: Params, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Run ``k`` dendrites at once; the result has ``k * C`` entries on the neuron axis, dendrite-major."""
        from torch.func import functional_call, vmap

        names = [n for n, _ in module.named_parameters()]
        stacked = {n: torch.stack(params[_flat(n)]) for n in names}

        def one(p: Dict[str, torch.Tensor], *a: Any) -> torch.Tensor:
            return functional_call(module, p, a, kwargs)

        out = vmap(one, in_dims=(0,) + (None,) * len(args))(stacked, *args)  # [k, *y.shape]
        p = self.neuron_axis % (out.dim() - 1)
        return out.movedim(0, p).flatten(p, p + 1)


def _flat(name: str) -> str:
    return name.replace(".", "__")


def _uniform(shape, bound: float, like: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    # Drawn on the CPU so that a seeded generator gives the same dendrites on every device and rank.
    t = torch.rand(shape, generator=generator, dtype=torch.float32) * (2 * bound) - bound
    return t.to(device=like.device, dtype=like.dtype)


def _cat(ts: List[torch.Tensor], dim: int = 0) -> torch.Tensor:
    return ts[0] if len(ts) == 1 else torch.cat(ts, dim)


class _LinearSpec(LayerSpec):
    trusted = True

    def param_names(self, module):
        return ["weight", "bias"]

    def init_params(self, module, scale, generator):
        # Dendrites always get a bias: the sigmoid needs a threshold even where the neuron has none.
        bound = scale / math.sqrt(module.in_features)
        return {
            "weight": _uniform(module.weight.shape, bound, module.weight, generator),
            "bias": _uniform((module.out_features,), bound, module.weight, generator),
        }

    def batched_forward(self, module, params, x):
        return F.linear(x, _cat(params["weight"]), _cat(params["bias"]))


class _ConvSpec(LayerSpec):
    trusted = True

    def __init__(self, dims: int):
        super().__init__(neuron_axis=-(dims + 1))
        self.dims = dims

    def param_names(self, module):
        return ["weight", "bias"]

    def init_params(self, module, scale, generator):
        bound = scale / math.sqrt(module.weight[0].numel())
        return {
            "weight": _uniform(module.weight.shape, bound, module.weight, generator),
            "bias": _uniform((module.out_channels,), bound, module.weight, generator),
        }

    def batched_forward(self, module, params, x):
        w, b = _cat(params["weight"]), _cat(params["bias"])
        g, k = module.groups, len(params["weight"])
        if g == 1 or k == 1:
            return module._conv_forward(x, w, b)
        # A grouped conv feeds output channel o from input group o // (out / g); order the stacked
        # weights group-major so every dendrite channel still reads its neuron's input group.
        c = module.out_channels
        w = w.view(k, g, c // g, *w.shape[1:]).transpose(0, 1).reshape(w.shape)
        b = b.view(k, g, c // g).transpose(0, 1).reshape(-1)
        out = module._conv_forward(x, w, b)
        ch = out.dim() - self.dims - 1
        return out.unflatten(ch, (g, k, c // g)).transpose(ch, ch + 1).flatten(ch, ch + 2)


class _HFConv1DSpec(LayerSpec):
    """Hugging Face's GPT-2 ``Conv1D``: a linear layer whose weight is stored ``[in, out]``."""

    trusted = True

    def param_names(self, module):
        return ["weight", "bias"]

    def init_params(self, module, scale, generator):
        bound = scale / math.sqrt(module.weight.shape[0])
        return {
            "weight": _uniform(module.weight.shape, bound, module.weight, generator),
            "bias": _uniform((module.nf,), bound, module.weight, generator),
        }

    def batched_forward(self, module, params, x):
        w, b = _cat(params["weight"], dim=1), _cat(params["bias"])
        out = torch.addmm(b, x.reshape(-1, x.shape[-1]), w)
        return out.view(*x.shape[:-1], w.shape[1])


class _EmbeddingSpec(LayerSpec):
    """``nn.Embedding``: a dendrite is another table of the same shape, read at the same indices; its sigmoid
    joins each embedding feature (the neurons are the ``embedding_dim`` features)."""

    trusted = True
    # An embedding is usually shared with an output projection or read directly by its model (Hugging Face's
    # get_input_embeddings, weight tying): wrapped only when a config names it.
    default_target = False

    def __init__(self):
        super().__init__(neuron_axis=-1, num_neurons=lambda m: m.embedding_dim)

    def param_names(self, module):
        return ["weight"]

    def init_params(self, module, scale, generator):
        # nn.Embedding draws N(0, 1); a dendrite's table is that times scale (uniform with the same variance).
        bound = scale * math.sqrt(3.0)
        return {"weight": _uniform(module.weight.shape, bound, module.weight, generator)}

    def batched_forward(self, module, params, idx):
        if module.max_norm is not None:
            raise UnsupportedModuleError(
                "nn.Embedding(max_norm=...) renormalises its table in place during the forward; dendrites of such "
                "an embedding are not supported. Leave it out (DendriteConfig(exclude=[...]))."
            )
        # The k tables side by side: one lookup returns [..., k * dim], dendrite-major.
        w = _cat(params["weight"], dim=1)
        return F.embedding(idx, w, module.padding_idx, None, 2.0, module.scale_grad_by_freq, module.sparse)


# The type registry: layer class (or "module.QualName" for classes of optional libraries, resolved
# without importing them) -> LayerSpec. It holds type knowledge only, never training state.
_REGISTRY: Dict[Union[type, str], LayerSpec] = {
    nn.Linear: _LinearSpec(),
    nn.Conv1d: _ConvSpec(1),
    nn.Conv2d: _ConvSpec(2),
    nn.Conv3d: _ConvSpec(3),
    nn.Embedding: _EmbeddingSpec(),
    "transformers.pytorch_utils.Conv1D": _HFConv1DSpec(),
}


def register_layer_type(
    layer_type: Union[type, str],
    spec: Optional[LayerSpec] = None,
    *,
    neuron_axis: int = -1,
    num_neurons: Optional[Callable[[nn.Module], int]] = None,
) -> LayerSpec:
    """Teach the library a new layer type (subclasses of it are covered too).

    Without ``spec``, dendrites of this type are fresh copies of its parameters run through the layer's
    own ``forward`` with ``torch.func.vmap`` (the forward must be vmap-friendly). Pass a :class:`LayerSpec`
    subclass to fuse the ``k`` dendrites into one op instead.

    Args:
        layer_type: the ``nn.Module`` subclass, or its ``"module.QualName"``.
        spec: a ready :class:`LayerSpec`; overrides the keyword arguments.
        neuron_axis: output axis of the neurons, counted from the end.
        num_neurons: ``fn(module) -> int``; default reads ``out_features``/``out_channels``.

    Returns:
        The registered spec.

    Example:
        >>> import torch, torch_dendrites as td
        >>> class Affine(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.w = torch.nn.Parameter(torch.randn(3, 4))
        ...         self.out_features = 3
        ...     def forward(self, x):
        ...         return x @ self.w.t()
        >>> _ = td.register_layer_type(Affine, neuron_axis=-1)
        >>> net = td.add_dendrites(torch.nn.Sequential(Affine()))
        >>> td.grow(net)
        15
    """
    if not (isinstance(layer_type, str) or (isinstance(layer_type, type) and issubclass(layer_type, nn.Module))):
        raise ConfigError(f"layer_type={layer_type!r} must be an nn.Module subclass or a 'module.QualName' string.")
    if spec is None:
        spec = LayerSpec(neuron_axis=neuron_axis, num_neurons=num_neurons)
    elif not isinstance(spec, LayerSpec):
        raise ConfigError(f"spec={spec!r} must be a torch_dendrites.LayerSpec instance.")
    _REGISTRY[layer_type] = spec
    return spec


def spec_for(module: nn.Module) -> Optional[LayerSpec]:
    """The spec registered for the module's class or its nearest registered base class, else None."""
    return spec_for_type(type(module))


def spec_for_type(layer_type: type) -> Optional[LayerSpec]:
    """The spec registered for ``layer_type`` or its nearest registered base class, else None."""
    for cls in layer_type.__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
        key = f"{cls.__module__}.{cls.__qualname__}"
        if key in _REGISTRY:
            return _REGISTRY[key]
    return None


def supported_types() -> List[str]:
    """Names of every registered layer type."""
    return sorted(k if isinstance(k, str) else f"{k.__module__}.{k.__qualname__}" for k in _REGISTRY)


class DendriticLayer(nn.Module):
    """A layer plus its dendrites: ``y = base(x) + dendrites(x)``, per neuron.

    The original module is kept as ``self.base`` and runs unchanged, so its parameters keep their
    identity (optimizers and tied weights keep working). ``self.dendrites`` holds the dendrite stack of
    the configured type. Built by :func:`torch_dendrites.add_dendrites`; rarely constructed by hand.

    Example:
        >>> import torch, torch_dendrites as td
        >>> net = td.add_dendrites(torch.nn.Sequential(torch.nn.Linear(4, 3)))
        >>> type(net[0]).__name__, net[0].num_dendrites
        ('DendriticLayer', 0)
    """

    def __init__(
        self,
        base: nn.Module,
        spec: LayerSpec,
        dendrite_type: str = "cascade",
        activation: str = "sigmoid",
        init_scale: float = 0.01,
        neuron_axis: Optional[int] = None,
        options: Optional[dict] = None,
    ):
        super().__init__()
        from .dendrites import make_dendrites

        self.base = base
        self.spec = spec
        self.neuron_axis = spec.neuron_axis if neuron_axis is None else neuron_axis
        self.dendrite_type = dendrite_type
        self.dendrites = make_dendrites(
            dendrite_type, base, spec, activation=activation, init_scale=init_scale, **(options or {})
        )
        # The layer's path in its model (set by add_dendrites), for error messages.
        self.path = ""
        # A spec the library does not ship is tried once, at the first call (see LayerSpec.trusted).
        self._spec_checked = spec.trusted or not getattr(self.dendrites, "uses_layer_spec", False)

    @property
    def num_dendrites(self) -> int:
        """Dendrites per neuron."""
        return self.dendrites.num_dendrites

    @property
    def num_neurons(self) -> int:
        return self.dendrites.num_neurons

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.base(*args, **kwargs)
        if not self._spec_checked:
            self._try_spec(y, args, kwargs)
        d = self.dendrites
        if d.num_dendrites == 0 and not len(getattr(d, "candidates", ())):
            return y
        return self.dendrites(y, self.neuron_axis, *args, **kwargs)

    def _try_spec(self, y: Any, args: tuple, kwargs: dict) -> None:
        """Run the spec's batched forward once with one throw-away dendrite on this call's input."""
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return  # traced code is checked by the eager call that comes first, or not at all
        base = self.base
        name = type(base).__name__
        where = f"layer '{self.path}' ({name})" if self.path else f"a {name} layer"
        if not isinstance(y, torch.Tensor):
            raise UnsupportedModuleError(
                f"{where} returns a {type(y).__name__}, not a tensor: dendrites add to a layer's one output tensor. "
                "Wrap the part of the block that computes that tensor, or leave these layers out with "
                "DendriteConfig(exclude=[...])."
            )
        fix = (
            f"register the type with a LayerSpec subclass whose batched_forward runs k dendrites in one op: "
            f"td.register_layer_type({name}, spec=MySpec()) (see the LayerSpec docstring), or leave these layers "
            "out with DendriteConfig(exclude=[...])"
        )
        buffers = {k: b.clone() for k, b in base.named_buffers()}
        try:
            with torch.no_grad():
                weights = self.spec.init_params(base, 0.01, torch.Generator().manual_seed(0))
                out = self.spec.batched_forward(base, {n: [w] for n, w in weights.items()}, *args, **kwargs)
        except Exception as exc:
            raise UnsupportedModuleError(
                f"{where}: dendrites cannot run on this layer type: its LayerSpec's batched_forward (by default "
                f"the layer's own forward under torch.func.vmap over the stacked dendrite weights) failed with "
                f"{type(exc).__name__}: {exc}. Fix: {fix}."
            ) from exc
        finally:
            # The trial must leave running statistics and other buffers as they were. Written through .data:
            # the base forward of this very call may have saved them for its backward (batch norm does).
            for k, b in base.named_buffers():
                if k in buffers and b.shape == buffers[k].shape and not torch.equal(b, buffers[k]):
                    b.data.copy_(buffers[k])
        axis_ok = -y.dim() <= self.neuron_axis < y.dim() and y.shape[self.neuron_axis] == self.num_neurons
        if not isinstance(out, torch.Tensor) or out.shape != y.shape or not axis_ok:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise UnsupportedModuleError(
                f"{where}: one dendrite's output should have the layer's output shape {tuple(y.shape)} with its "
                f"{self.num_neurons} neurons on axis {self.neuron_axis}; the LayerSpec's batched_forward returned "
                f"{got} (a wrong neuron_axis or num_neurons does this). Fix: {fix}."
            )
        self._spec_checked = True

    def grow(self, generator: Optional[torch.Generator] = None) -> int:
        """Add one dendrite to every neuron; the output is unchanged. Returns the parameters added."""
        return self.dendrites.grow(generator)

    def truncate(self, num_dendrites: int) -> None:
        """Drop the newest dendrites until ``num_dendrites`` remain."""
        if isinstance(num_dendrites, bool) or not isinstance(num_dendrites, int) or num_dendrites < 0:
            raise StateError(f"num_dendrites={num_dendrites!r} must be an int >= 0.")
        if num_dendrites > self.num_dendrites:
            raise StateError(f"cannot truncate to {num_dendrites} dendrites: the layer has only {self.num_dendrites}.")
        self.dendrites.truncate(num_dendrites)

    def dendrite_parameters(self):
        """The parameters added by dendrites (not the base layer's)."""
        return self.dendrites.parameters()

    def extra_repr(self) -> str:
        return (
            f"dendrite_type={self.dendrite_type!r}, num_dendrites={self.num_dendrites}, neuron_axis={self.neuron_axis}"
        )
