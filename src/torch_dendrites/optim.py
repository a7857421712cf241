"""Optimizers for dendritic models: parameter groups with a dendrite learning-rate scale
(:func:`param_groups`), and keeping an existing optimizer in step with a model whose parameters changed
(:func:`sync_optimizer`)."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from .errors import ConfigError, StateError
from .surgery import dendritic_layers

__all__ = ["DENDRITE_LR_SCALE", "param_groups", "sync_optimizer"]

# The learning-rate multiplier of dendrite parameters that param_groups uses by default (chosen by the sweep in
# benchmarks/results/defaults_sweep.md).
DENDRITE_LR_SCALE = 3.0


def _dendrite_ids(model: nn.Module) -> set:
    return {id(p) for layer in dendritic_layers(model).values() for p in layer.dendrite_parameters()}


def _no_decay_ids(model: nn.Module) -> set:
    """Parameters that by convention get no weight decay: biases and norms (fewer than 2 dims) and every
    dendrite gain (output and cascade gains are per-neuron scalars, whatever their tensor shape)."""
    ids = {id(p) for p in model.parameters() if p.dim() < 2}
    for layer in dendritic_layers(model).values():
        for unit in layer.dendrites.units:
            for gain in (getattr(unit, "out_gain", None), getattr(unit, "cascade_gain", None)):
                if isinstance(gain, torch.Tensor):
                    ids.add(id(gain))
    return ids


# Optimizers that keep their own reference to the parameter list (or a partition of it), so that changing
# param_groups does not change what they update.
_NOT_IN_PLACE = {
    "LBFGS": "keeps its own reference to the parameter list and one flat state for all parameters",
    "ZeroRedundancyOptimizer": "partitions the parameters across ranks when it is built",
}


def _weight_decay(g: Dict[str, Any]) -> float:
    wd = g.get("weight_decay", 0.0)
    return float(wd) if isinstance(wd, (int, float)) else 0.0


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

    Parameters the model no longer has, and the frozen input weights of dendrites (which get zero gradients, so
    that weight decay would move them), are dropped; trainable parameters the optimizer does not hold yet (new
    dendrites, a thawed set) join the group marked ``"dendrites": True`` (see :func:`param_groups`) if there is
    one, else param group ``group``, so learning-rate schedulers keep driving them; parameters frozen only for a
    correlation candidate phase stay in their groups (they get no gradient); each group is then kept in the
    model's parameter order, as in an optimizer built afresh (so checkpoints of either load into the other).
    Where the candidate groups hold both a weight-decay group and a no-decay group (``weight_decay=0``), new
    biases and dendrite gains join the no-decay one and new weight matrices the other, as in the usual
    "decay / no_decay" split. With ``reset_state`` (the default) every per-parameter state (Adam moments,
    momentum) is cleared, as a freshly built optimizer would have it. Works through wrappers that expose the inner
    optimizer as ``.optimizer`` (Accelerate, Lightning).

    Args:
        optimizer: the optimizer to update.
        model: the model after the step.
        group: the param group that receives new parameters.
        reset_state: clear per-parameter state.

    Returns:
        The number of parameters (tensors) added.

    Raises:
        StateError: the optimizer cannot be updated in place (``LBFGS``, ``ZeroRedundancyOptimizer``: build a new
            one instead), it has no param groups, or ``group`` is out of range.

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
    why = next((w for name, w in _NOT_IN_PLACE.items() if any(c.__name__ == name for c in type(inner).__mro__)), None)
    if why is not None:
        raise StateError(
            f"td.sync_optimizer cannot update {type(inner).__name__} in place: it {why}, so new dendrites would "
            f"never train. Build a new optimizer over model.parameters() after each restructured step instead."
        )
    if not hasattr(inner, "param_groups") or not inner.param_groups:
        raise StateError(f"{type(optimizer).__name__} has no param_groups to update.")
    if not 0 <= group < len(inner.param_groups):
        raise StateError(f"group={group} is out of range: the optimizer has {len(inner.param_groups)} param groups.")
    # Frozen input weights of dendrites (correlation-trained, or gd sets before the newest) leave the optimizer:
    # they get zero gradients in training (for loops that read every .grad), which weight decay would turn into
    # movement. A set that thaws (rolled back to the newest) is trainable again and rejoins below as new.
    frozen_units = {
        id(w)
        for layer in dendritic_layers(model).values()
        for w in getattr(layer.dendrites, "frozen_unit_parameters", list)()
    }
    present = {id(p) for p in model.parameters() if id(p) not in frozen_units}
    held = set()
    for g in inner.param_groups:
        g["params"] = [p for p in g["params"] if id(p) in present]
        held.update(id(p) for p in g["params"])
    new = [p for p in model.parameters() if p.requires_grad and id(p) not in held]
    dendrite = _dendrite_ids(model)
    no_decay = _no_decay_ids(model)
    dendrite_groups = [g for g in inner.param_groups if g.get("dendrites")]
    for p in new:
        pool = dendrite_groups if dendrite_groups and id(p) in dendrite else inner.param_groups
        target = pool[0] if pool is dendrite_groups else inner.param_groups[group]
        decays = [g for g in pool if _weight_decay(g) > 0]
        free = [g for g in pool if _weight_decay(g) == 0]
        if decays and free:  # a decay / no-decay split: biases and gains go where the user keeps them
            wanted = free if id(p) in no_decay else decays
            if not any(g is target for g in wanted):
                target = wanted[0]
        target["params"].append(p)
    # Each group in model order: the layout an optimizer built afresh over the grown model has, so that its saved
    # state (which maps parameters by position) loads into the optimizer a resumed run builds.
    order = {id(p): i for i, p in enumerate(model.parameters())}
    for g in inner.param_groups:
        g["params"].sort(key=lambda p: order.get(id(p), len(order)))
    if reset_state:
        inner.state.clear()
    else:
        for p in list(inner.state):
            if id(p) not in present:
                del inner.state[p]
    return len(new)
