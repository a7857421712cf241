"""The one training epoch and the one evaluation the benchmarks share.

An epoch visits the training split in batches: a fresh random permutation drawn from ``gen`` cut into ``batch``
sized pieces, a fixed ``order`` cut the same way (no draw), or, with ``batch=None``, the whole split ``steps``
times (full-batch training). Random draws happen in that order only (the permutation first, then whatever the
model draws, e.g. dropout), so a seeded run gives the same numbers every time.

A split is a tuple of tensors indexed together, ``(x, y)`` or ``(x, y, *extra)``; the model is called as
``forward(model, x, *extra)`` (default ``model(x)``), e.g. to pass a task context or an attention mask.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

__all__ = ["accuracy", "batches", "evaluate", "predict", "train_epoch"]

Forward = Callable[..., torch.Tensor]


def _call(model: nn.Module, forward: Optional[Forward], x: torch.Tensor, extra: Sequence[torch.Tensor]):
    return forward(model, x, *extra) if forward is not None else model(x)


def batches(
    n: int,
    batch: Optional[int],
    gen: Optional[torch.Generator] = None,
    steps: int = 1,
    order: Optional[torch.Tensor] = None,
):
    """The index batches of one epoch over ``n`` samples (see the module docstring)."""
    if batch is None:
        return [slice(None)] * steps
    if order is None:
        order = torch.randperm(n, generator=gen)
    return order.split(batch)


def train_epoch(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    split: Sequence[torch.Tensor],
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batch: Optional[int],
    gen: Optional[torch.Generator] = None,
    *,
    steps: int = 1,
    order: Optional[torch.Tensor] = None,
    forward: Optional[Forward] = None,
) -> None:
    """One epoch of ``opt`` steps on ``loss(output, y)`` over the batches of :func:`batches`."""
    model.train()
    x, y, *extra = split
    for idx in batches(len(y), batch, gen, steps, order):
        opt.zero_grad(set_to_none=True)
        loss(_call(model, forward, x[idx], [e[idx] for e in extra]), y[idx]).backward()
        opt.step()


@torch.no_grad()
def predict(model: nn.Module, split: Sequence[torch.Tensor], batch: int, forward: Optional[Forward] = None):
    """The model's outputs (eval mode, no gradients) over the split, computed ``batch`` samples at a time; the
    model is left in eval mode."""
    model.eval()
    x, y, *extra = split
    return torch.cat([_call(model, forward, x[i : i + batch], [e[i : i + batch] for e in extra])
                      for i in range(0, len(y), batch)])  # fmt: skip


def evaluate(
    model: nn.Module,
    split: Sequence[torch.Tensor],
    metric: Callable[[torch.Tensor, torch.Tensor], object],
    batch: int = 1000,
    forward: Optional[Forward] = None,
):
    """``metric(outputs, y)`` over the whole split (outputs from :func:`predict`)."""
    return metric(predict(model, split, batch, forward), split[1])


def accuracy(out: torch.Tensor, y: torch.Tensor) -> float:
    """Percent of rows whose largest output is the label, counted exactly (``100 * correct / n``).

    Example:
        >>> accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]), torch.tensor([1, 1, 1]))
        66.66666666666667
    """
    return 100.0 * (out.argmax(1) == y).sum().item() / len(y)
