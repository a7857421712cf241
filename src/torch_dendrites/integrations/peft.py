"""peft models with dendrites on their LoRA adapters: merging for inference, and guarding peft's own unloading.

``td.add_dendrites(peft_model)`` wraps the ``lora_B`` adapters. peft's ``merge_and_unload()`` folds ``B @ A`` into
the base weight, which a ``lora_B`` with dendrites does not have, and ``unload()`` would silently drop the LoRA
adapters together with their dendrites; so while a peft model has dendrites, both raise a
:class:`~torch_dendrites.StateError` that says what to do. :func:`merge_and_unload` here is the merge that keeps
the dendrites::

    merged = merge_and_unload(peft_model)   # the base model: W + s * B @ A, dendrites moved onto the merged layers

A cascade dendrite on ``lora_B`` computes ``D(A x) = (W_d A) x + b_d`` and its output is scaled like the adapter's,
so on the merged layer it becomes a cascade dendrite with input weights ``W_d A`` and output gains ``s * v``: the
merged model computes the same function (up to float rounding), with dendrites of the base layer's full shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

import torch
from safetensors.torch import load_file
from torch import nn

from ..config import DendriteConfig
from ..correlation import candidates_of
from ..errors import CheckpointError, StateError
from ..layer import DendriticLayer
from ..persistence import load
from ..persistence.codec import MAX_JSON_BYTES, loads
from ..persistence.recipe import RECIPE
from ..surgery import _RECORD, MISSING, add_dendrites, dendritic_layers, remove_dendrites
from . import embedded
from .transformers import guard as transformers_guard

__all__ = ["from_pretrained", "merge_and_unload"]

_FIX = (
    "To merge the LoRA adapters and keep their dendrites, call "
    "torch_dendrites.integrations.peft.merge_and_unload(model); to drop the dendrites first, call "
    "td.remove_dendrites(model), after which peft's own merge_and_unload()/unload() work."
)


def _refuse(name: str, *args, **kwargs):
    raise StateError(
        f"peft's {name} on a model whose LoRA adapters carry dendrites: peft folds lora_B's weight matrix into the "
        f"base layer (or drops the adapters), which would lose the dendrites. {_FIX}"
    )


def _refuse_merge(*args, **kwargs):
    _refuse("merge (merge_and_unload / merge_adapter)")


def _refuse_unload(*args, merge: bool = True, **kwargs):
    _refuse("merge_and_unload()" if merge else "unload()")


def after_wrap(model: nn.Module, record) -> None:
    """Run by :func:`torch_dendrites.add_dendrites` on a model holding peft modules: peft's
    ``merge_and_unload()``/``unload()`` would fold or drop adapters that now carry dendrites, so they refuse;
    a peft model's ``save_pretrained`` keeps the dendrites."""
    has = [t for _, t in tuner_layers(model) for a in ("lora_A", "lora_B") if _has_dendrites(getattr(t, a))]
    if has:
        guard(model, record.restore)
    if type(model).__module__.startswith("peft.") and callable(getattr(model, "save_pretrained", None)):
        transformers_guard(model)


def _has_dendrites(module: nn.Module) -> bool:
    return any(isinstance(m, DendriticLayer) for m in module.modules())


def tuner_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """peft's tuner layers (LoRA-wrapped modules) of ``model``, by path."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "get_base_layer")]


def guard(model: nn.Module, restore: list) -> None:
    """Make peft's merge and unload of every tuner layer raise (see the module docstring).

    peft asks each tuner layer for ``unload_and_optionally_merge_module`` before it unloads it and calls its
    ``merge`` to merge; instance attributes of those names answer with a clear error before anything changes.
    ``restore`` receives ``(object, attribute, previous value)`` entries that :func:`remove_dendrites` undoes.
    """
    for _, layer in tuner_layers(model):
        for attr, fn in (("unload_and_optionally_merge_module", _refuse_unload), ("merge", _refuse_merge)):
            restore.append((layer, attr, layer.__dict__.get(attr, MISSING)))
            layer.__dict__[attr] = fn


def _merge_plan(model: nn.Module):
    """Everything the merge writes, computed before anything changes."""
    base_model = getattr(getattr(model, "base_model", None), "model", None)
    if base_model is None or not tuner_layers(model):
        raise StateError("merge_and_unload needs a peft model (peft.get_peft_model) with LoRA adapters.")
    layers = tuner_layers(base_model)
    paths = {id(m): n for n, m in layers}
    plan: Dict[str, dict] = {}
    for path, tuner in layers:
        adapters = list(tuner.lora_A.keys())
        if len(adapters) != 1:
            raise StateError(f"'{path}' holds LoRA adapters {adapters}; merge_and_unload here supports one adapter.")
        (name,) = adapters
        lora_a, lora_b = tuner.lora_A[name], tuner.lora_B[name]
        base = tuner.get_base_layer()
        if name in getattr(tuner, "lora_variant", {}) or getattr(tuner, "use_dora", {}).get(name, False):
            raise StateError(f"'{path}' uses a LoRA variant (DoRA, ...); merge_and_unload here merges plain LoRA.")
        if not isinstance(base, nn.Linear) or not isinstance(lora_a, nn.Linear):
            raise StateError(
                f"'{path}' is a LoRA {type(base).__name__}; merge_and_unload here merges LoRA on nn.Linear layers."
            )
        scaling = float(tuner.scaling[name])
        b_layer = lora_b.base if isinstance(lora_b, DendriticLayer) else lora_b
        a_w = lora_a.weight.detach()
        delta = (b_layer.weight.detach() @ a_w) * scaling
        entry = {"weight": base.weight.detach() + delta.to(base.weight.dtype), "units": [], "dendrites": None}
        if getattr(b_layer, "bias", None) is not None:  # LoRA with lora_bias=True
            bias = base.bias.detach() if base.bias is not None else torch.zeros_like(b_layer.bias)
            entry["bias"] = bias + b_layer.bias.detach() * scaling
        if isinstance(lora_b, DendriticLayer):
            if lora_b.dendrite_type != "cascade":
                raise StateError(
                    f"'{path}': merge_and_unload moves cascade dendrites onto the merged layer; these are "
                    f"{lora_b.dendrite_type!r}. Keep the peft model, or td.remove_dendrites(model) first."
                )
            if len(candidates_of(lora_b.dendrites)):
                raise StateError(f"'{path}' is in a correlation candidate phase; finish training before merging.")
            entry["dendrites"] = lora_b
            for u in lora_b.dendrites.units:
                entry["units"].append(
                    {
                        "weight": u.weight.detach() @ a_w,
                        "bias": u.bias.detach().clone(),
                        "out_gain": u.out_gain.detach() * scaling,
                        "cascade_gain": None if u.cascade_gain is None else u.cascade_gain.detach().clone(),
                        "frozen_inputs": getattr(u, "inputs_frozen", False),
                    }
                )
        plan[paths[id(tuner)]] = entry
    return base_model, plan


def merge_and_unload(model: nn.Module) -> nn.Module:
    """peft's ``merge_and_unload`` for a model with dendrites on its LoRA adapters: fold each adapter into its
    base layer and move the adapter's dendrites onto the merged layer, so the result computes the same function.

    Args:
        model: a peft model (``peft.get_peft_model``) with one plain LoRA adapter on ``nn.Linear`` layers, with or
            without ``td.add_dendrites`` (cascade dendrites).

    Returns:
        The base model (``model.base_model.model``) with merged weights; layers whose ``lora_B`` had dendrites are
        :class:`~torch_dendrites.DendriticLayer` s holding them (save it with ``td.save``).

    Raises:
        StateError: not a peft LoRA model, several adapters, a LoRA variant or layer type this merge does not
            cover, non-cascade dendrites, or a candidate phase in progress (nothing is changed).

    Example:
        >>> import torch, peft, torch_dendrites as td
        >>> from torch_dendrites.integrations.peft import merge_and_unload
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> base = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> model = td.add_dendrites(peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["0"])))
        >>> _ = td.grow(model)
        >>> merged = merge_and_unload(model)
        >>> type(merged[0]).__name__, merged[0].num_dendrites
        ('DendriticLayer', 1)
    """
    base_model, plan = _merge_plan(model)
    layer_settings = {
        path: (e["dendrites"].dendrites.activation, e["dendrites"].dendrites.init_scale, e["dendrites"].neuron_axis)
        for path, e in plan.items()
        if e["dendrites"] is not None
    }
    # Everything is computed: now change the model. The dendrites come off lora_B (so peft's unload runs), peft
    # drops the adapters, the merged weights go in, and the dendrites are rebuilt on the merged layers.
    if getattr(model, _RECORD, None) is not None or dendritic_layers(model):
        remove_dendrites(model)
    unloaded = model.unload()
    modules = dict(unloaded.named_modules())
    with torch.no_grad():
        for path, e in plan.items():
            layer = modules[path]
            layer.weight.copy_(e["weight"])
            if "bias" in e:
                if layer.bias is None:
                    layer.bias = nn.Parameter(e["bias"].clone(), requires_grad=layer.weight.requires_grad)
                else:
                    layer.bias.copy_(e["bias"])
    if layer_settings:
        add_dendrites(unloaded, DendriteConfig(filter_fn=lambda m, n: n in layer_settings, dendrite_type="cascade"))
        layers = dendritic_layers(unloaded)
        for path, (activation, init_scale, axis) in layer_settings.items():
            layer = layers[path]
            layer.dendrites.activation, layer.dendrites.init_scale, layer.neuron_axis = activation, init_scale, axis
            for u in plan[path]["units"]:
                layer.grow(torch.Generator().manual_seed(0))  # placeholders, overwritten below
                new = layer.dendrites.units[-1]
                with torch.no_grad():
                    for key in ("weight", "bias", "out_gain", "cascade_gain"):
                        if u[key] is not None:
                            getattr(new, key).copy_(u[key])
                if u["frozen_inputs"]:  # input weights stay frozen, as before the merge
                    layer.dendrites.set_inputs_frozen(len(layer.dendrites.units) - 1, True)
    return unloaded


def from_pretrained(base_model: nn.Module, path, controller=None) -> nn.Module:
    """Load a peft model with dendrites onto ``base_model``, a freshly built base model holding its pretrained
    weights: the one call for both kinds of folder such a model is saved in.

    - a peft adapter folder written by ``save_pretrained`` of a model with dendrites: peft's own
      ``PeftModel.from_pretrained`` refuses it (its ``lora_B`` weights are placeholders of the wrong shape); the
      peft model is built from ``adapter_config.json``.
    - a folder written by :func:`torch_dendrites.save` of a peft model, adapter-sized (``base_weights=False``,
      as a growth controller's ``best/`` and ``latest/`` of a LoRA run are) or not: the peft model is built from
      the adapter configs in its recipe.

    Then the dendrites are re-applied and every weight is loaded strictly. The base model's weights must be the
    ones the folder was trained on (their fingerprint is compared).

    Args:
        base_model: the base model, as built for ``peft.get_peft_model`` (e.g. ``from_pretrained``).
        path: the folder.
        controller: a :class:`~torch_dendrites.GrowthController` to restore too.

    Returns:
        The peft model with its dendrites, in eval mode.

    Raises:
        CheckpointError: the folder holds no dendrites (load it with ``peft.PeftModel.from_pretrained``), was not
            saved from a peft model, or does not fit the base model (another base is refused; peft's adapters are
            taken off ``base_model`` again).

    Example:
        >>> import tempfile, torch, peft, torch_dendrites as td
        >>> from torch_dendrites.integrations.peft import from_pretrained
        >>> def pretrained():  # stands for AutoModel.from_pretrained(...)
        ...     torch.manual_seed(0)
        ...     return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> lora = peft.LoraConfig(r=2, target_modules=["0"])
        >>> model = td.add_dendrites(peft.get_peft_model(pretrained(), lora))
        >>> _ = td.grow(model)
        >>> folder = td.save(tempfile.mkdtemp() + "/best", model, base_weights=False)  # LoRA + dendrites only
        >>> loaded = from_pretrained(pretrained(), folder)
        >>> x = torch.randn(3, 4)
        >>> torch.equal(loaded(x), model.eval()(x))
        True
    """
    import peft  # peft itself only where it is used: wrapping and merging need only the model's classes

    path = Path(path)
    file = path / embedded.PEFT_FILE
    if file.is_file():
        configs = {"default": peft.PeftConfig.from_pretrained(str(path))}
    elif (path / RECIPE).is_file():
        configs = _recipe_configs(path / RECIPE)
    else:
        raise CheckpointError(
            f"{path} holds neither {embedded.PEFT_FILE} nor {RECIPE}; load a plain peft adapter folder with "
            "peft.PeftModel.from_pretrained."
        )
    names = sorted(configs, key=lambda n: n != "default")
    model = peft.get_peft_model(base_model, configs[names[0]], adapter_name=names[0])
    old_model = controller.model if controller is not None else None
    try:
        for name in names[1:]:
            model.add_adapter(name, configs[name])
        if controller is not None:
            controller.model = model
        if file.is_file():
            # The base model passed in holds the base weights (nothing loads them later): its fingerprint is checked.
            embedded.load_entries(model, load_file(str(file)), controller, check_base=True)
        else:
            load(path, model, controller)
    except BaseException:
        if controller is not None:
            controller.model = old_model
        model.unload()  # peft injected its adapters into base_model in place: take them off again
        raise
    transformers_guard(model)
    return model.eval()


def _recipe_configs(recipe_file) -> dict:
    """The peft configs recorded in a td.save folder's recipe (td.load checks the whole recipe afterwards)."""
    import peft

    data = recipe_file.read_bytes()[: MAX_JSON_BYTES + 1]
    doc = loads(data, recipe_file)
    saved = doc.get("peft") if isinstance(doc, dict) else None
    if not isinstance(saved, dict) or not isinstance(saved.get("adapters"), dict) or not saved["adapters"]:
        raise CheckpointError(
            f"{recipe_file} records no peft adapters (it was not saved from a peft model, or by a version before "
            "adapter configs were recorded); build the peft model yourself and call td.load(folder, peft_model)."
        )
    if saved.get("path") != "":
        raise CheckpointError(
            f"{recipe_file} was saved from a model holding its peft model at {saved.get('path')!r}; build that model "
            "yourself and call td.load(folder, model)."
        )
    try:
        return {name: peft.PeftConfig.from_peft_type(**cfg) for name, cfg in saved["adapters"].items()}
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{recipe_file}: a recorded peft config cannot be rebuilt ({exc}).") from None
