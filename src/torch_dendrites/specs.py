"""What the library knows about each layer type: :class:`LayerSpec`, and the registry from type to spec.

A :class:`LayerSpec` says which output axis holds a layer's neurons, how many there are, how to draw fresh
weights shaped like the layer's, and how to run ``k`` such copies ("dendrites") on the layer's input in one
operation. Specs whose layer is a linear map of its input (``nn.Linear``, ``nn.Conv1d/2d/3d``, Hugging Face's
GPT-2 ``Conv1D``) also give the *layer algebra*: the shape of one neuron's inputs (:meth:`LayerSpec.fan_in_shape`),
the input groups, and :meth:`LayerSpec.linear_maps`, which runs ``k`` maps shaped like the layer's weight as one
matmul or one grouped convolution. Dendrite types that build their own weights (``lowrank``, ``sparse``) use
only that algebra, so they serve any registered layer type whose spec provides it.

Specs for the built-in types are registered here; :func:`register_layer_type` adds others.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from ._tensors import cat, flat_name, uniform
from .errors import ConfigError, UnsupportedModuleError
from .registry import LAYER_TYPES

__all__ = ["LayerSpec", "register_layer_type", "spec_for", "spec_for_type", "supported_types"]

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
        return [flat_name(n) for n, _ in module.named_parameters()]

    def init_params(
        self, module: nn.Module, scale: float, generator: Optional[torch.Generator]
    ) -> Dict[str, torch.Tensor]:
        """Fresh weights for one dendrite: PyTorch's default uniform init (bound 1/sqrt(fan_in)) times scale."""
        named = list(module.named_parameters())
        fan_in = next((p[0].numel() for _, p in named if p.dim() >= 2), None)
        out = {}
        for name, p in named:
            fi = p[0].numel() if p.dim() >= 2 else (fan_in or p.numel())
            out[flat_name(name)] = uniform(p.shape, 1.0 / math.sqrt(max(fi, 1)) * scale, p, generator)
        return out

    # ------------------------------------------------------------------ the layer algebra (optional)
    def fan_in_shape(self, module: nn.Module) -> tuple:
        """The shape of one neuron's inputs: ``(in_features,)``, or ``(in_channels / groups, *kernel)``.

        Part of the layer algebra: specs of layers that are linear maps of their input implement it (with
        :meth:`groups` and :meth:`linear_maps`); dendrite types that build their own weights need it.
        """
        raise UnsupportedModuleError(
            f"{type(module).__name__}'s LayerSpec gives no layer algebra (fan_in_shape, groups, linear_maps); "
            "dendrite types that build their own weights (lowrank, sparse) need it. Implement those three methods "
            "in a LayerSpec subclass, or use dendrite_type='cascade' or 'gated' for this layer."
        )

    def groups(self, module: nn.Module) -> int:
        """Input groups: output channel ``o`` of ``C'`` reads input group ``o // (C' / groups)``."""
        return 1

    def linear_maps(
        self, module: nn.Module, weight: torch.Tensor, bias: Optional[torch.Tensor], x: torch.Tensor
    ) -> torch.Tensor:
        """Run ``k`` linear maps shaped like the layer's weight on the layer's input ``x``, as one op.

        Args:
            module: the wrapped layer (its stride, padding, ... apply).
            weight: ``[k, C', *fan_in_shape]``; ``C'`` (any multiple of :meth:`groups`) output channels per map.
            bias: ``[k, C']`` or None.
            x: the layer's input.

        Returns:
            The layer-shaped output with ``k * C'`` entries on the neuron axis, map-major.
        """
        self.fan_in_shape(module)  # raises the explanation
        raise NotImplementedError  # pragma: no cover

    # ------------------------------------------------------------------ dendrites
    def batched_forward(self, module: nn.Module, params: Params, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Run ``k`` dendrites at once; the result has ``k * C`` entries on the neuron axis, dendrite-major."""
        names = [n for n, _ in module.named_parameters()]
        stacked = {n: torch.stack(params[flat_name(n)]) for n in names}

        def one(p: Dict[str, torch.Tensor], *a: Any) -> torch.Tensor:
            return functional_call(module, p, a, kwargs)

        out = vmap(one, in_dims=(0,) + (None,) * len(args))(stacked, *args)  # [k, *y.shape]
        p = self.neuron_axis % (out.dim() - 1)
        return out.movedim(0, p).flatten(p, p + 1)


class _LinearSpec(LayerSpec):
    trusted = True

    def param_names(self, module):
        return ["weight", "bias"]

    def init_params(self, module, scale, generator):
        # Dendrites always get a bias: the sigmoid needs a threshold even where the neuron has none.
        bound = scale / math.sqrt(module.in_features)
        return {
            "weight": uniform(module.weight.shape, bound, module.weight, generator),
            "bias": uniform((module.out_features,), bound, module.weight, generator),
        }

    def fan_in_shape(self, module):
        return (module.in_features,)

    def linear_maps(self, module, weight, bias, x):
        return F.linear(x, weight.flatten(0, 1), None if bias is None else bias.flatten())

    def batched_forward(self, module, params, x):
        return F.linear(x, cat(params["weight"]), cat(params["bias"]))


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
            "weight": uniform(module.weight.shape, bound, module.weight, generator),
            "bias": uniform((module.out_channels,), bound, module.weight, generator),
        }

    def fan_in_shape(self, module):
        return tuple(module.weight.shape[1:])

    def groups(self, module):
        return module.groups

    def linear_maps(self, module, weight, bias, x):
        k, c, g = weight.shape[0], weight.shape[1], module.groups
        if g == 1 or k == 1:
            return module._conv_forward(x, weight.flatten(0, 1), None if bias is None else bias.flatten())
        # A grouped conv feeds output channel o from input group o // (out / g): order the stacked filters
        # group-major so every map's channel still reads its own input group, then restore the map-major order.
        w = weight.unflatten(1, (g, c // g)).transpose(0, 1).flatten(0, 2)
        b = None if bias is None else bias.unflatten(1, (g, c // g)).transpose(0, 1).flatten()
        out = module._conv_forward(x, w, b)
        ch = out.dim() - self.dims - 1
        return out.unflatten(ch, (g, k, c // g)).transpose(ch, ch + 1).flatten(ch, ch + 2)

    def batched_forward(self, module, params, x):
        return self.linear_maps(module, torch.stack(params["weight"]), torch.stack(params["bias"]), x)


class _HFConv1DSpec(LayerSpec):
    """Hugging Face's GPT-2 ``Conv1D``: a linear layer whose weight is stored ``[in, out]``."""

    trusted = True

    def param_names(self, module):
        return ["weight", "bias"]

    def init_params(self, module, scale, generator):
        bound = scale / math.sqrt(module.weight.shape[0])
        return {
            "weight": uniform(module.weight.shape, bound, module.weight, generator),
            "bias": uniform((module.nf,), bound, module.weight, generator),
        }

    def fan_in_shape(self, module):
        return (module.weight.shape[0],)

    def linear_maps(self, module, weight, bias, x):
        return F.linear(x, weight.flatten(0, 1), None if bias is None else bias.flatten())

    def batched_forward(self, module, params, x):
        # The dendrites' weights are stored like the layer's, [in, out]: side by side, one addmm.
        w, b = cat(params["weight"], dim=1), cat(params["bias"])
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
        return {"weight": uniform(module.weight.shape, bound, module.weight, generator)}

    def batched_forward(self, module, params, idx):
        if module.max_norm is not None:
            raise UnsupportedModuleError(
                "nn.Embedding(max_norm=...) renormalises its table in place during the forward; dendrites of such "
                "an embedding are not supported. Leave it out (DendriteConfig(exclude=[...]))."
            )
        # The k tables side by side: one lookup returns [..., k * dim], dendrite-major.
        w = cat(params["weight"], dim=1)
        return F.embedding(idx, w, module.padding_idx, None, 2.0, module.scale_grad_by_freq, module.sparse)


for _type, _spec in (
    (nn.Linear, _LinearSpec()),
    (nn.Conv1d, _ConvSpec(1)),
    (nn.Conv2d, _ConvSpec(2)),
    (nn.Conv3d, _ConvSpec(3)),
    (nn.Embedding, _EmbeddingSpec()),
    ("transformers.pytorch_utils.Conv1D", _HFConv1DSpec()),
):
    LAYER_TYPES.register(_type, _spec)


def register_layer_type(
    layer_type: Union[type, str],
    spec: Optional[LayerSpec] = None,
    *,
    neuron_axis: int = -1,
    num_neurons: Optional[Callable[[nn.Module], int]] = None,
    override: bool = False,
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
        override: replace a type registered before (otherwise that raises ConfigError).

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
    return LAYER_TYPES.register(layer_type, spec, override=override)


def spec_for(module: nn.Module) -> Optional[LayerSpec]:
    """The spec registered for the module's class or its nearest registered base class, else None."""
    return spec_for_type(type(module))


def spec_for_type(layer_type: type) -> Optional[LayerSpec]:
    """The spec registered for ``layer_type`` or its nearest registered base class, else None."""
    for cls in layer_type.__mro__:
        if cls in LAYER_TYPES:
            return LAYER_TYPES.get(cls)
        key = f"{cls.__module__}.{cls.__qualname__}"
        if key in LAYER_TYPES:
            return LAYER_TYPES.get(key)
    return None


def supported_types() -> List[str]:
    """Names of every registered layer type."""
    return sorted(k if isinstance(k, str) else f"{k.__module__}.{k.__qualname__}" for k in LAYER_TYPES)
