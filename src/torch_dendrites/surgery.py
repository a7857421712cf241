"""Find the target layers of a model and wrap them (``add_dendrites``), unwrap them
(``remove_dendrites``), grow every wrapped layer (``grow``) and describe the result (``summary``).

Every check runs before the model is touched: a failing call leaves it exactly as it was.
"""

from __future__ import annotations

import importlib
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .config import DendriteConfig, name_matches
from .dendrites import make_dendrites
from .dendrites.base import INIT_SCALE
from .errors import CheckpointError, ConfigError, TargetError, UnsupportedModuleError
from .layer import DendriticLayer
from .specs import LayerSpec, spec_for, spec_for_type, supported_types

__all__ = [
    "Plan",
    "Target",
    "add_dendrites",
    "plan",
    "remove_dendrites",
    "grow",
    "summary",
    "dendritic_layers",
    "load_base_state_dict",
    "Summary",
]

# (library, torch-dendrites integration with an ``after_wrap(model, record)``), in the order they run.
_INTEGRATIONS = (
    ("peft", "torch_dendrites.integrations.peft"),
    ("transformers", "torch_dendrites.integrations.transformers"),
)

# Parents that read some children's weights directly instead of calling them: a wrapper there would be
# silently bypassed, so those children are skipped and reported.
_DIRECT_WEIGHT_READERS = {
    nn.MultiheadAttention: "nn.MultiheadAttention reads out_proj.weight directly (F.multi_head_attention_forward)",
}
# Parents with an inference fast path that reads the children's weights directly but falls back to calling
# them when a forward hook is present; wrapped children get a no-op pre-hook so dendrites stay live.
_FAST_PATH_PARENTS = (nn.TransformerEncoderLayer,)

_RECORD = "_dendrite_record"

# Layer types with no dendrite handler that users of dendrite libraries expect: listed in td.summary with why.
_RECURRENT_WHY = (
    "not supported: {name} computes its gates inside one fused recurrent kernel, so there is no per-gate "
    "pre-activation to add dendrites to; the library does not re-implement the recurrence (wrap the Linear "
    "layers before and after it instead)"
)
_UNSUPPORTED = {
    nn.LSTM: _RECURRENT_WHY,
    nn.GRU: _RECURRENT_WHY,
    nn.RNN: _RECURRENT_WHY,
    nn.LSTMCell: _RECURRENT_WHY,
    nn.GRUCell: _RECURRENT_WHY,
    nn.RNNCell: _RECURRENT_WHY,
    nn.EmbeddingBag: "not supported: {name} sums or averages a bag of rows inside one kernel (nn.Embedding is "
    "supported when named in target_types or target_names)",
}


def _unsupported_reason(module: nn.Module) -> Optional[str]:
    for cls, why in _UNSUPPORTED.items():
        if isinstance(module, cls):
            return why.format(name=f"nn.{cls.__name__}")
    return None


# Zero-config defaults for Hugging Face models: task heads are left alone unless named explicitly.
_HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "cls", "head")


def _zero_config_policy(model: nn.Module):
    """What a config with no selectors skips by default, as ``fn(name, module) -> reason or None``."""
    if any(type(m).__module__.startswith("peft.") for m in model.modules()):

        def peft_policy(name, module):
            if ".lora_B." in f".{name}.":
                return None
            if ".lora_A." in f".{name}.":
                return "peft reads lora_A's weight directly (dtype cast); zero-config wraps the lora_B adapters"
            return "zero-config on a peft model wraps only the LoRA adapters (name other layers to wrap them)"

        return peft_policy
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out) and type(model).__module__.startswith("transformers."):
        try:
            out_emb = get_out()
        except (AttributeError, NotImplementedError):  # some heads do not implement it
            out_emb = None

        def hf_policy(name, module):
            if out_emb is not None and module is out_emb:
                return "the output embedding / LM head (name it in target_names to wrap it)"
            parts = name.split(".")
            if any(part in _HEAD_NAMES for part in parts):
                return "a task head (name it in target_names to wrap it)"
            if any(part.startswith("embed") for part in parts):
                # e.g. ViT's patch projection, whose weight dtype the model reads directly
                return "part of the embeddings (name it in target_names to wrap it)"
            return None

        return hf_policy
    return None


class _Missing:
    """A _Record.restore value: the attribute did not exist before, so removal deletes it."""


MISSING = _Missing()


@dataclass
class _Record:
    """What add_dendrites did to a model, kept on the model so remove/summary/save can use it."""

    config: DendriteConfig
    skipped: Dict[str, str] = field(default_factory=dict)
    # (object, attribute, original value) to set back on removal.
    restore: List[Tuple[nn.Module, str, object]] = field(default_factory=list)
    # Functions to call on removal (hooks the integrations installed).
    on_remove: List[Callable[[], None]] = field(default_factory=list)
    # A weak reference to the GrowthController a framework callback attached (its checkpoints carry its state),
    # and a function giving the controller that a checkpoint being loaded restores.
    controller: object = None
    restore_target: object = None
    load_hook: bool = False


def _fast_path_guard(module, args):
    """A no-op forward pre-hook; its presence makes nn.TransformerEncoderLayer take its slow path."""
    return None


def _refs(model: nn.Module):
    """Every (parent, attribute) reference to every submodule, and each module's paths, in model order."""
    refs: Dict[int, List[Tuple[nn.Module, str]]] = defaultdict(list)
    paths: Dict[int, List[str]] = defaultdict(list)
    parents: Dict[int, List[nn.Module]] = defaultdict(list)
    for pname, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent._modules.items():
            if child is None:
                continue
            full = f"{pname}.{attr}" if pname else attr
            if full not in paths[id(child)]:
                paths[id(child)].append(full)
            if not any(p is parent and a == attr for p, a in refs[id(child)]):
                refs[id(child)].append((parent, attr))
                parents[id(child)].append(parent)
    return refs, paths, parents


def _has_lazy(module: nn.Module) -> bool:
    return any(isinstance(p, nn.parameter.UninitializedParameter) for p in module.parameters(recurse=False))


def _explicit_name_match(paths: List[str], patterns) -> Optional[str]:
    for p in patterns:
        for n in paths:
            if n == p or n.endswith("." + p):
                return p
    return None


def build_layer(
    module: nn.Module,
    spec: LayerSpec,
    dendrite_type: str = "cascade",
    activation: str = "sigmoid",
    init_scale: float = INIT_SCALE,
    neuron_axis: Optional[int] = None,
    options: Optional[dict] = None,
) -> DendriticLayer:
    """A :class:`DendriticLayer` around ``module`` with an empty stack of ``dendrite_type`` (nothing is attached
    to any model)."""
    stack = make_dendrites(dendrite_type, module, spec, activation=activation, init_scale=init_scale, **(options or {}))
    return DendriticLayer(module, spec, stack, neuron_axis=neuron_axis)


@dataclass
class Target:
    """One layer a :class:`Plan` wraps: its first path, every path it is reachable at, the module and its spec."""

    name: str
    paths: List[str]
    module: nn.Module
    spec: LayerSpec


@dataclass
class Plan:
    """What :func:`add_dendrites` would do to a model with a config (see :func:`plan`).

    Attributes:
        config: the config planned with.
        targets: the layers to wrap, in model order.
        skipped: every other layer of a known type (or a type users may expect), by path, with the reason.
    """

    config: DendriteConfig
    targets: List[Target]
    skipped: Dict[str, str]

    @property
    def wrapped(self) -> List[str]:
        return [t.name for t in self.targets]

    def __str__(self) -> str:
        lines = [f"wrap {t.name} ({type(t.module).__name__})" for t in self.targets]
        lines += [f"skip {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _reader_parent(parents: List[nn.Module]) -> Optional[str]:
    return next((why for par in parents for t, why in _DIRECT_WEIGHT_READERS.items() if isinstance(par, t)), None)


def _skip_reason(cfg: DendriteConfig, name: str, module: nn.Module, spec: LayerSpec, mpaths, parents, policy, explicit):
    """Why a module of a known type is not wrapped (None: it is). The rules, in order."""
    if cfg.target_types is not None and not isinstance(module, cfg.target_types):
        return "type not in target_types"
    if cfg.target_names is not None and not any(name_matches(n, cfg.target_names) for n in mpaths):
        return "name not in target_names"
    if cfg.filter_fn is not None and not cfg.filter_fn(module, name):
        return "filter_fn returned False"
    excl = next((p for p in cfg.exclude if any(name_matches(n, [p]) for n in mpaths)), None)
    if excl is not None:
        return f"excluded by {excl!r}"
    reader = _reader_parent(parents)
    if reader is not None:
        return f"not wrappable: {reader}"
    default_skip = policy(name, module) if policy is not None else None
    if default_skip is None and not explicit and not spec.default_target:
        default_skip = f"{type(module).__name__} layers are wrapped only when named (target_types or target_names)"
    if default_skip is not None:
        return f"default: {default_skip}"
    return None


def plan(model: nn.Module, config: Optional[DendriteConfig] = None) -> Plan:
    """A dry run of :func:`add_dendrites`: which layers it would wrap, and why every other one is skipped.

    Nothing is changed. :func:`add_dendrites` carries out exactly this plan and :func:`summary` reports it.

    Args:
        model: any ``nn.Module`` (without dendrites).
        config: what to wrap; default ``DendriteConfig()``.

    Returns:
        A :class:`Plan` (``str(plan)`` lists it).

    Raises:
        TargetError: nothing would be wrapped, the model already has dendrites, or a target has lazy parameters.
        UnsupportedModuleError: a module type with no layer handler was targeted explicitly.
        ConfigError: ``config`` is not a DendriteConfig.

    Example:
        >>> import torch, torch_dendrites as td
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> p = td.plan(net, td.DendriteConfig(exclude=["2"]))
        >>> p.wrapped, p.skipped
        (['0'], {'2': "excluded by '2'"})
    """
    cfg = DendriteConfig() if config is None else config
    if not isinstance(cfg, DendriteConfig):
        raise ConfigError(f"config must be a torch_dendrites.DendriteConfig, got {type(cfg).__name__}.")
    if not isinstance(model, nn.Module):
        raise TargetError(f"model must be an nn.Module, got {type(model).__name__}.")
    if any(isinstance(m, DendriticLayer) for m in model.modules()):
        raise TargetError("this model already has dendrites; call td.remove_dendrites(model) before adding again.")
    for t in cfg.target_types or ():
        if spec_for_type(t) is None:
            raise UnsupportedModuleError(
                f"target_types holds {t.__name__}, which has no dendrite handler. Supported types: "
                f"{', '.join(supported_types())}. Register new ones with td.register_layer_type({t.__name__}, ...)."
            )
    _, paths, parents = _refs(model)
    explicit = cfg.target_types is not None or cfg.target_names is not None or cfg.filter_fn is not None
    policy = None if explicit else _zero_config_policy(model)
    targets: List[Target] = []
    skipped: Dict[str, str] = {}
    for name, module in model.named_modules():
        if module is model:
            continue
        mpaths = paths[id(module)]
        spec = spec_for(module)
        ancestor = next((t.name for t in targets if _is_inside(name, t.name)), None)
        if spec is None:
            if cfg.target_names is not None:
                hit = _explicit_name_match(mpaths, cfg.target_names)
                if hit is not None:
                    inside = re.escape(name) + r"\..*"
                    raise UnsupportedModuleError(
                        f"target_names entry {hit!r} names '{name}', a {type(module).__name__}, which has no "
                        f"dendrite handler. Supported types: {', '.join(supported_types())}. To wrap the layers "
                        f"inside it, use a regex such as {inside!r}; to support the type, call "
                        f"td.register_layer_type({type(module).__name__}, ...)."
                    )
            unsupported = _unsupported_reason(module)
            if unsupported is not None and ancestor is None:
                skipped[name] = unsupported
            continue
        if ancestor is not None:
            skipped[name] = f"inside wrapped layer '{ancestor}'"
            continue
        why = _skip_reason(cfg, name, module, spec, mpaths, parents[id(module)], policy, explicit)
        if why is not None:
            skipped[name] = why
            continue
        if _has_lazy(module):
            raise TargetError(
                f"'{name}' ({type(module).__name__}) has uninitialized lazy parameters; run one forward pass "
                "to materialize them before td.add_dendrites."
            )
        targets.append(Target(name, list(mpaths), module, spec))
    if not targets:
        present = sorted({type(m).__name__ for m in model.modules() if m is not model})
        why = "; ".join(f"{n}: {r}" for n, r in list(skipped.items())[:8])
        d = cfg.to_dict()
        raise TargetError(
            "no module matched the dendrite config "
            f"(target_types={d['target_types']}, target_names={d['target_names']}, "
            f"filter_fn={d['filter_fn']}, exclude={d['exclude']}). Module types present: "
            f"{', '.join(present) or 'none'}. Supported types: {', '.join(supported_types())}."
            + (f" Skipped: {why}." if why else "")
            + (" The root module itself is never wrapped: put it inside a container." if spec_for(model) else "")
        )
    return Plan(cfg, targets, skipped)


def add_dendrites(model: nn.Module, config: Optional[DendriteConfig] = None) -> nn.Module:
    """Wrap every target layer of ``model`` in place with a :class:`DendriticLayer` holding zero dendrites.

    The model computes exactly what it did before; :func:`grow` (or a
    :class:`~torch_dendrites.GrowthController`) adds dendrites later. A module reachable at several paths
    is wrapped once, and tied parameters stay tied (the original modules are kept, not copied). Which layers
    are wrapped, and why the others are not, is :func:`plan`'s answer.

    Args:
        model: any ``nn.Module``; the root itself is never wrapped (wrap its layers).
        config: what to wrap; ``DendriteConfig()`` wraps every supported layer.

    Returns:
        ``model`` itself, modified in place.

    Raises:
        TargetError: nothing matched, or the model already has dendrites.
        UnsupportedModuleError: a module type with no layer handler was targeted explicitly.
        ConfigError: ``config`` is not a DendriteConfig.

    Example:
        >>> import torch, torch_dendrites as td
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> net = td.add_dendrites(net, td.DendriteConfig(exclude=["2"]))
        >>> [type(m).__name__ for m in net]
        ['DendriticLayer', 'ReLU', 'Linear']
    """
    the_plan = plan(model, config)
    cfg = the_plan.config
    refs, _, parents = _refs(model)
    selected = [(t.module, t.name) for t in the_plan.targets]
    skipped = the_plan.skipped

    # Build every wrapper before touching the model, so any failure leaves it as it was.
    wrappers = []
    for module, name in selected:
        spec = spec_for(module)
        layer = build_layer(
            module,
            spec,
            dendrite_type=cfg.dendrite_type,
            activation=cfg.activation,
            init_scale=cfg.init_scale,
            neuron_axis=cfg.neuron_axis,
            options=cfg.dendrite_options,
        )
        layer.path = name
        wrappers.append((module, layer))
    record = _Record(config=cfg, skipped=skipped)
    for module, layer in wrappers:
        for parent, attr in refs[id(module)]:
            setattr(parent, attr, layer)
        if any(isinstance(p, _FAST_PATH_PARENTS) for p in parents[id(module)]):
            layer.register_forward_pre_hook(_fast_path_guard)
    # nn.TransformerEncoder's nested-tensor fast path reads its first layer's linear weights directly.
    for enc in model.modules():
        if isinstance(enc, nn.TransformerEncoder) and getattr(enc, "use_nested_tensor", False):
            if any(isinstance(m, DendriticLayer) for m in enc.modules()):
                record.restore.append((enc, "use_nested_tensor", enc.use_nested_tensor))
                enc.use_nested_tensor = False
    model.__dict__[_RECORD] = record
    # Models built from these libraries get that library's integration after wrapping (peft's merges refuse,
    # save_pretrained keeps the dendrites). The integration is imported only then: the library is loaded
    # already, since the model's classes come from it, and torch-dendrites itself never needs it.
    loaded = {type(m).__module__.partition(".")[0] for m in model.modules()}
    for library, integration in _INTEGRATIONS:
        if library in loaded:
            importlib.import_module(integration).after_wrap(model, record)
    return model


def _is_inside(name: str, ancestor: str) -> bool:
    return name.startswith(ancestor + ".")


def dendritic_layers(model: nn.Module) -> Dict[str, DendriticLayer]:
    """Every wrapped layer of ``model`` by its first path (a shared layer appears once)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, DendriticLayer)}


def remove_dendrites(model: nn.Module) -> nn.Module:
    """Undo :func:`add_dendrites` in place: the original modules (same objects, same parameters) come back
    and every dendrite is discarded.

    Raises:
        TargetError: the model has no dendrites.

    Example:
        >>> import torch, torch_dendrites as td
        >>> lin = torch.nn.Linear(3, 3)
        >>> net = td.remove_dendrites(td.add_dendrites(torch.nn.Sequential(lin)))
        >>> net[0] is lin
        True
    """
    refs, _, _ = _refs(model)
    layers = [m for m in model.modules() if isinstance(m, DendriticLayer)]
    if not layers:
        raise TargetError("this model has no dendrites to remove (td.add_dendrites was not applied).")
    record = getattr(model, _RECORD, None)
    for layer in layers:
        for parent, attr in refs[id(layer)]:
            setattr(parent, attr, layer.base)
    if record is not None:
        for obj, attr, old in reversed(record.restore):
            if old is MISSING:
                obj.__dict__.pop(attr, None)
            else:
                setattr(obj, attr, old)
        for fn in record.on_remove:
            fn()
        del model.__dict__[_RECORD]
    return model


def grow(model: nn.Module, generator: Optional[torch.Generator] = None) -> int:
    """Add one dendrite to every neuron of every wrapped layer, in place.

    The model's function is unchanged at that moment (new output gains are zero; the one exception is the
    first gate of ``gated`` dendrites with ``first_gate="full"``, the paper's starting point). Rebuild the optimizer
    afterwards: the new parameters are not in the old one.

    Args:
        model: a model prepared with :func:`add_dendrites`.
        generator: optional ``torch.Generator`` (CPU) for the new weights, for reproducible growth.

    Returns:
        The number of parameters added.

    Example:
        >>> import torch, torch_dendrites as td
        >>> net = td.add_dendrites(torch.nn.Sequential(torch.nn.Linear(4, 3)))
        >>> td.grow(net)  # 3x4 weights + 3 biases + 3 output gains
        18
    """
    layers = list(dendritic_layers(model).values())
    if not layers:
        raise TargetError("this model has no dendritic layers; call td.add_dendrites(model) first.")
    return sum(layer.grow(generator) for layer in layers)


def load_base_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor], strict: bool = True) -> nn.Module:
    """Load a state dict saved *before* :func:`add_dendrites` (a plain ``model.state_dict()``, a Lightning
    checkpoint's ``"state_dict"``, a pretrained file) into a wrapped model.

    Wrapping moves each wrapped layer's weights under ``.base.`` (``fc1.weight`` becomes ``fc1.base.weight``),
    so ``model.load_state_dict(old)`` fails; this helper renames the keys and loads. The dendrites keep their
    current values (a plain state dict has none).

    Args:
        model: a model prepared with :func:`add_dendrites` (or a plain one: then it is ``load_state_dict``).
        state_dict: the plain state dict. Keys of a DDP (``module.``) or compiled (``_orig_mod.``) model are
            not renamed: strip those prefixes first.
        strict: every key of ``state_dict`` must be used and every non-dendrite entry of the model filled.

    Returns:
        ``model``.

    Raises:
        CheckpointError: with ``strict``, keys are missing or unexpected, or (always) shapes differ; the model
            is left unchanged.

    Example:
        >>> import torch, torch_dendrites as td
        >>> plain = torch.nn.Sequential(torch.nn.Linear(3, 2))
        >>> saved = plain.state_dict()
        >>> net = td.add_dendrites(torch.nn.Sequential(torch.nn.Linear(3, 2)))
        >>> _ = td.grow(net)
        >>> torch.equal(td.load_base_state_dict(net, saved)[0].base.weight, saved["0.weight"])
        True
    """
    # Every path of every wrapped layer (a shared layer has several): "<path>." -> "<path>.base."
    prefixes = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, DendriticLayer) and name:
            prefixes[name + "."] = name + ".base."
    dendrite_keys = set()
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, DendriticLayer):
            dendrite_keys.update(f"{name}.dendrites.{k}" for k in module.dendrites.state_dict())
    renamed = {}
    for key, value in state_dict.items():
        new = key
        for old_prefix, new_prefix in prefixes.items():
            if key.startswith(old_prefix) and not key.startswith(new_prefix):
                new = new_prefix + key[len(old_prefix) :]
                break
        renamed[new] = value
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in renamed and k not in dendrite_keys)
    unexpected = sorted(k for k in renamed if k not in expected)
    shapes = [
        f"{k}: given {tuple(v.shape)}, model {tuple(expected[k].shape)}"
        for k, v in renamed.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    problems = []
    if strict and missing:
        problems.append(f"missing keys {missing[:6]}{' ...' if len(missing) > 6 else ''}")
    if strict and unexpected:
        problems.append(f"unexpected keys {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
    if shapes:
        problems.append(f"shape mismatches {shapes[:6]}")
    if problems:
        raise CheckpointError(
            "the state dict does not fit this model (after renaming wrapped layers' keys under '.base.'): "
            + "; ".join(problems)
            + ". Pass strict=False to load the keys that fit, or build the model the state dict was saved from."
        )
    model.load_state_dict({k: v for k, v in renamed.items() if k in expected}, strict=False)
    return model


def set_dendrite_counts(model: nn.Module, counts: Dict[str, int], generator: Optional[torch.Generator] = None):
    """Grow or truncate every wrapped layer to ``counts[path]`` (0 if absent).

    Returns:
        A function that undoes the change exactly (the very same dendrite modules come back).
    """
    kept = []
    for name, layer in dendritic_layers(model).items():
        kept.append((layer, list(layer.dendrites.units)))
        want = counts.get(name, 0)
        while layer.num_dendrites < want:
            layer.grow(generator)
        if layer.num_dendrites > want:
            layer.truncate(want)

    def undo():
        for layer, units in kept:
            layer.dendrites.units = nn.ModuleList(units)

    return undo


def _param_counts(model: nn.Module) -> Dict[str, int]:
    """Parameter counts (shared parameters once): base vs dendrites, each split into trainable and frozen."""
    dendrite_ids = {id(p) for layer in dendritic_layers(model).values() for p in layer.dendrite_parameters()}
    counts = dict.fromkeys(("base", "dendrites", "base_trainable", "dendrites_trainable"), 0)
    for p in model.parameters():
        kind = "dendrites" if id(p) in dendrite_ids else "base"
        counts[kind] += p.numel()
        if p.requires_grad:
            counts[f"{kind}_trainable"] += p.numel()
    return counts


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.2f}%" if whole else "0.00%"


@dataclass
class Summary:
    """What :func:`summary` reports; ``str()`` renders it as a table.

    "Base" parameters are every parameter that is not a dendrite's (the model's own, and adapters such as
    LoRA); each kind is split into trainable (``requires_grad``) and frozen.
    """

    wrapped: List[dict]
    skipped: List[dict]
    base_parameters: int
    dendrite_parameters: int
    trainable_base_parameters: int = 0
    trainable_dendrite_parameters: int = 0

    @property
    def total_parameters(self) -> int:
        return self.base_parameters + self.dendrite_parameters

    @property
    def trainable_parameters(self) -> int:
        return self.trainable_base_parameters + self.trainable_dendrite_parameters

    @property
    def frozen_parameters(self) -> int:
        return self.total_parameters - self.trainable_parameters

    def to_dict(self) -> dict:
        return {
            "wrapped": self.wrapped,
            "skipped": self.skipped,
            "base_parameters": self.base_parameters,
            "dendrite_parameters": self.dendrite_parameters,
            "trainable_base_parameters": self.trainable_base_parameters,
            "trainable_dendrite_parameters": self.trainable_dendrite_parameters,
            "trainable_parameters": self.trainable_parameters,
            "frozen_parameters": self.frozen_parameters,
        }

    def __str__(self) -> str:
        w = max([len("layer")] + [len(r["name"]) for r in self.wrapped])
        t = max([len("type")] + [len(r["type"]) for r in self.wrapped])
        lines = [f"{'layer':<{w}}  {'type':<{t}}  {'neurons':>8}  {'dendrites':>9}  {'dendrite params':>15}"]
        for r in self.wrapped:
            lines.append(
                f"{r['name']:<{w}}  {r['type']:<{t}}  {r['neurons']:>8}  {r['dendrites']:>9}  "
                f"{r['dendrite_parameters']:>15,}"
            )
        # Skipped layers, grouped by reason (a large model skips hundreds); the full list is .skipped.
        groups: Dict[str, List[str]] = {}
        for r in self.skipped:
            groups.setdefault(r["reason"], []).append(r["name"])
        for reason, names in groups.items():
            shown = ", ".join(names[:3]) + (f", ... ({len(names)} layers)" if len(names) > 3 else "")
            lines.append(f"not wrapped: {shown}: {reason}")
        total = self.total_parameters
        lines.append(
            f"parameters: base {self.base_parameters:,}, dendrites {self.dendrite_parameters:,}, total {total:,} "
            f"(dendrites {_pct(self.dendrite_parameters, total)})"
        )
        lines.append(
            f"trainable: {self.trainable_parameters:,} ({_pct(self.trainable_parameters, total)}): base "
            f"{self.trainable_base_parameters:,}, dendrites {self.trainable_dendrite_parameters:,}; frozen: "
            f"{self.frozen_parameters:,} ({_pct(self.frozen_parameters, total)})"
        )
        return "\n".join(lines)


def summary(model: nn.Module) -> Summary:
    """What was wrapped, what was not and why, dendrites per layer, base vs dendrite parameter counts, and
    the trainable/frozen split (a peft model's LoRA adapters count as trainable base parameters).

    Example:
        >>> import torch, torch_dendrites as td
        >>> net = td.add_dendrites(torch.nn.Sequential(torch.nn.Linear(4, 3)))
        >>> s = td.summary(net)
        >>> s.wrapped[0]["name"], s.base_parameters, s.dendrite_parameters
        ('0', 15, 0)
    """
    record = getattr(model, _RECORD, None)
    modules = dict(model.named_modules())
    wrapped = [
        {
            "name": name,
            "type": type(layer.base).__name__,
            "neurons": layer.num_neurons,
            "dendrites": layer.num_dendrites,
            "neuron_axis": layer.neuron_axis,
            "dendrite_parameters": sum(p.numel() for p in layer.dendrite_parameters()),
        }
        for name, layer in dendritic_layers(model).items()
    ]
    skipped = []
    if record is not None:
        order = {name: i for i, name in enumerate(modules)}  # model order, however the record was stored
        for name in sorted(record.skipped, key=lambda n: order.get(n, len(order))):
            m = modules.get(name)
            skipped.append(
                {"name": name, "type": type(m).__name__ if m is not None else "?", "reason": record.skipped[name]}
            )
    c = _param_counts(model)
    return Summary(
        wrapped=wrapped,
        skipped=skipped,
        base_parameters=c["base"],
        dendrite_parameters=c["dendrites"],
        trainable_base_parameters=c["base_trainable"],
        trainable_dendrite_parameters=c["dendrites_trainable"],
    )
