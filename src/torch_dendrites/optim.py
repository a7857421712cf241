"""Optimizers for dendritic models: parameter groups with a dendrite learning-rate scale
(:func:`param_groups`), and keeping an existing optimizer in step with a model whose parameters changed
(:func:`sync_optimizer`)."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from .errors import ConfigError, StateError

__all__ = ["DENDRITE_LR_SCALE", "param_groups", "sync_optimizer"]

# The learning-rate multiplier of dendrite parameters that param_groups uses by default (chosen by the sweep in
# benchmarks/results/defaults_sweep.md).
DENDRITE_LR_SCALE = 1.0


def _dendrite_ids(model: nn.Module) -> set:
    from .surgery import dendritic_layers

    return {id(p) for layer in dendritic_layers(model).values() for p in layer.dendrite_parameters()}


def param_groups(model: nn.Module, lr: float, dendrite_lr_scale: float = DENDRITE_LR_SCALE) -> List[Dict[str, Any]]:
    """Optimizer parameter groups: the model's trainable parameters, dendrites apart with their own learning rate.

    Only parameters with ``requires_grad`` are included, so weights the growth controller froze (a candidate
    phase, the input weights of correlation-trained dendrites) never see weight decay or momentum. The
    dendrite group carries ``"dendrites": True``, which :func:`sync_optimizer` uses to place new dendrites.

    Args:
        model: the model (with or without dendrites).
        lr: the learning rate of the model's own parameters.
        dendrite_lr_scale: the dendrites' learning rate is ``lr * dendrite_lr_scale``.

    Returns:
        Two groups (the second may be empty): pass them to any ``torch.optim`` optimizer.

    Example:
        >>> import torch, torch_dendrites as td
        >>> net = td.add_dendrites(torch.nn.Sequential(torch.nn.Linear(3, 2)))
        >>> _ = td.grow(net)
        >>> opt = torch.optim.Adam(td.param_groups(net, lr=1e-3, dendrite_lr_scale=3.0))
        >>> [round(g["lr"], 4) for g in opt.param_groups], len(opt.param_groups[1]["params"])
        ([0.001, 0.003], 3)
    """
    for name, value in (("lr", lr), ("dendrite_lr_scale", dendrite_lr_scale)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{name}={value!r} must be a finite number > 0.")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be an nn.Module, got {type(model).__name__}.")
    dendrite = _dendrite_ids(model)
    base = [p for p in model.parameters() if p.requires_grad and id(p) not in dendrite]
    dend = [p for p in model.parameters() if p.requires_grad and id(p) in dendrite]
    return [{"params": base, "lr": float(lr)}, {"params": dend, "lr": float(lr) * dendrite_lr_scale, "dendrites": True}]


def sync_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, group: int = 0, reset_state: bool = True) -> int:
    """Update ``optimizer`` in place after a ``restructured`` step, instead of building a new one.

    Parameters the model no longer has are dropped; trainable parameters the optimizer does not hold yet
    (new dendrites) join the group marked ``"dendrites": True`` (see :func:`param_groups`) if there is one,
    else param group ``group``, so learning-rate schedulers keep driving them; parameters
    frozen by the controller stay in their groups (they get no gradient). With ``reset_state`` (the default)
    every per-parameter state (Adam moments, momentum) is cleared, as a freshly built optimizer would have
    it. Works through wrappers that expose the inner optimizer as ``.optimizer`` (Accelerate, Lightning).

    Args:
        optimizer: the optimizer to update.
        model: the model after the step.
        group: the param group that receives new parameters.
        reset_state: clear per-parameter state.

    Returns:
        The number of parameters (tensors) added.

    Example:
        >>> import torch, torch_dendrites as td
        >>> net = td.add_dendrites(torch.nn.Sequential(torch.nn.Linear(3, 2)))
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> _ = td.grow(net)
        >>> td.sync_optimizer(opt, net)  # the new dendrite's weight, bias and output gain
        3
    """
    inner: Optional[torch.optim.Optimizer] = optimizer
    while hasattr(inner, "optimizer") and not isinstance(inner, torch.optim.Optimizer):
        inner = inner.optimizer
    if not hasattr(inner, "param_groups") or not inner.param_groups:
        raise StateError(f"{type(optimizer).__name__} has no param_groups to update.")
    if not 0 <= group < len(inner.param_groups):
        raise StateError(f"group={group} is out of range: the optimizer has {len(inner.param_groups)} param groups.")
    present = {id(p) for p in model.parameters()}
    held = set()
    for g in inner.param_groups:
        g["params"] = [p for p in g["params"] if id(p) in present]
        held.update(id(p) for p in g["params"])
    new = [p for p in model.parameters() if p.requires_grad and id(p) not in held]
    dendrite_group = next((g for g in inner.param_groups if g.get("dendrites")), None)
    if dendrite_group is not None:
        dendrite = _dendrite_ids(model)
        dendrite_group["params"].extend(p for p in new if id(p) in dendrite)
        inner.param_groups[group]["params"].extend(p for p in new if id(p) not in dendrite)
    else:
        inner.param_groups[group]["params"].extend(new)
    if reset_state:
        inner.state.clear()
    else:
        for p in list(inner.state):
            if id(p) not in present:
                del inner.state[p]
    return len(new)
