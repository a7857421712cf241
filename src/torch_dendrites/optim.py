"""Keep an existing optimizer in step with a model whose parameters changed (growth, rollback)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .errors import StateError

__all__ = ["sync_optimizer"]


def sync_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, group: int = 0, reset_state: bool = True) -> int:
    """Update ``optimizer`` in place after a ``restructured`` step, instead of building a new one.

    Parameters the model no longer has are dropped; trainable parameters the optimizer does not hold yet
    (new dendrites) join param group ``group``, so learning-rate schedulers keep driving them; parameters
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
    inner.param_groups[group]["params"].extend(new)
    if reset_state:
        inner.state.clear()
    else:
        for p in list(inner.state):
            if id(p) not in present:
                del inner.state[p]
    return len(new)
