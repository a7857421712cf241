"""Task-prototype contexts (``td.TaskPrototypes``) for context-gated dendrites.

Iyer et al. (2022) give each task's active dendrites a *prototype* context: the mean of the task's training
inputs. During training the task is known and its prototype is the context; at inference the task is not
given, and each input takes the prototype nearest to it (Euclidean distance in input space). The prototype can
be passed through a fixed random projection to a shorter context (Johnson-Lindenstrauss: entries drawn from
``N(0, 1 / context_dim)`` with a seeded generator, so distances are kept on average), which shrinks every gated
segment from ``input_dim`` to ``context_dim`` weights.

:class:`TaskPrototypes` keeps per task the running sum and count of the inputs it was shown (exact means, in
float64, however many batches), and the projection, as buffers: they are in the state dict, so
``td.save``/``td.load`` keep them when the module is part of the saved model. Hand its contexts to gated
dendrites with :func:`torch_dendrites.dendrite_context`.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from .errors import ConfigError, StateError

__all__ = ["TaskPrototypes"]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"TaskPrototypes {name}={value!r} must be an int >= 1.")
    return value


class TaskPrototypes(nn.Module):
    """Running mean input per task, nearest-prototype task inference, optional fixed random projection.

    Args:
        num_tasks: the number of tasks ``T`` (tasks are numbered ``0 .. T-1``).
        input_dim: the length of one input once flattened (``784`` for MNIST images).
        context_dim: the length of the context; ``None`` (default) gives the prototype itself
            (``context_dim = input_dim``), an int projects it with a fixed random matrix.
        seed: the seed of the projection (ignored without one).

    Raises:
        ConfigError: a bad argument.

    Example:
        >>> import torch, torch_dendrites as td
        >>> protos = td.TaskPrototypes(num_tasks=2, input_dim=4, context_dim=3, seed=0)
        >>> protos.update(torch.zeros(5, 4), task=0)                  # training: task 0's inputs
        >>> protos.update(torch.ones(5, 4), task=1)
        >>> protos.nearest(torch.tensor([[0.9, 1.0, 1.1, 0.8], [0.1, 0.0, 0.0, 0.2]])).tolist()
        [1, 0]
        >>> protos.context(task=torch.tensor([1, 1])).shape           # the known task's context
        torch.Size([2, 3])
        >>> cfg = td.DendriteConfig(dendrite_type="gated", dendrite_options={"context_dim": 3, "segments": 2})
        >>> net = td.add_dendrites(torch.nn.Sequential(torch.nn.Linear(4, 8)), cfg)
        >>> _ = td.grow(net)
        >>> x = torch.rand(6, 4)
        >>> with td.dendrite_context(net, protos.context(x=x)):      # inference: the nearest prototype's
        ...     y = net(x)
    """

    def __init__(self, num_tasks: int, input_dim: int, context_dim: Optional[int] = None, seed: int = 0):
        super().__init__()
        self.num_tasks = _positive_int("num_tasks", num_tasks)
        self.input_dim = _positive_int("input_dim", input_dim)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"TaskPrototypes seed={seed!r} must be an int.")
        self.register_buffer("sums", torch.zeros(num_tasks, input_dim, dtype=torch.float64))
        self.register_buffer("counts", torch.zeros(num_tasks, dtype=torch.long))
        if context_dim is None:
            self.context_dim = input_dim
            self.register_buffer("projection", None)
        else:
            self.context_dim = _positive_int("context_dim", context_dim)
            g = torch.Generator().manual_seed(seed)
            proj = torch.randn(input_dim, context_dim, generator=g) / context_dim**0.5
            self.register_buffer("projection", proj)

    # ------------------------------------------------------------------ training
    @torch.no_grad()
    def update(self, x: torch.Tensor, task: Union[int, torch.Tensor]) -> None:
        """Add a batch of inputs to their tasks' running means.

        Args:
            x: ``[batch, ...]`` inputs (flattened to ``[batch, input_dim]``).
            task: one task for the whole batch (an int), or one per sample (``[batch]`` integer tensor).

        Raises:
            StateError: ``x`` or ``task`` has the wrong shape, or a task is out of range.
        """
        flat = self._flat(x)
        tasks = self._tasks(task, flat.shape[0])
        self.sums.index_add_(0, tasks.to(self.sums.device), flat.to(self.sums))
        self.counts += torch.bincount(tasks.cpu(), minlength=self.num_tasks).to(self.counts.device)

    # ------------------------------------------------------------------ queries
    @property
    def seen(self) -> torch.Tensor:
        """Bool ``[T]``: the tasks with at least one input."""
        return self.counts > 0

    def prototypes(self) -> torch.Tensor:
        """The mean input of every task, ``[T, input_dim]`` (zero for tasks never shown)."""
        return (self.sums / self.counts.clamp(min=1).unsqueeze(1)).to(self._dtype())

    def contexts(self) -> torch.Tensor:
        """Every task's context, ``[T, context_dim]``: its prototype, projected if there is a projection."""
        p = self.prototypes()
        return p if self.projection is None else p @ self.projection

    @torch.no_grad()
    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """The task whose prototype is nearest each input (Euclidean, input space), ``[batch]`` long.

        Only tasks that were shown inputs take part. Raises :class:`~torch_dendrites.StateError` if none was.
        """
        flat = self._flat(x)
        seen = self.seen
        if not bool(seen.any()):
            raise StateError("TaskPrototypes has no prototype yet: call update(x, task) with training inputs first.")
        dist = torch.cdist(flat.to(self._dtype()), self.prototypes().to(flat.device))
        dist = dist.masked_fill(~seen.to(dist.device), float("inf"))
        return dist.argmin(1)

    def context(self, task: Union[int, torch.Tensor, None] = None, x: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The context for known tasks (training) or for inputs whose task is inferred (inference).

        Args:
            task: the task of every sample (int or ``[batch]`` tensor); give this or ``x``.
            x: inputs ``[batch, ...]``; each takes the nearest prototype's context.

        Returns:
            ``[batch, context_dim]`` (``[context_dim]`` for an int ``task``: the same context for the whole batch).

        Raises:
            ConfigError: both or neither of ``task`` and ``x`` given.
            StateError: a task was never shown inputs, or bad shapes.
        """
        if (task is None) == (x is None):
            raise ConfigError("TaskPrototypes.context needs exactly one of task= (known tasks) or x= (inferred).")
        if x is not None:
            return self.contexts()[self.nearest(x)]
        single = isinstance(task, int) and not isinstance(task, bool)
        tasks = self._tasks(task, None)
        unseen = sorted(set(tasks[~self.seen.cpu()[tasks]].tolist()))
        if unseen:
            raise StateError(
                f"task(s) {unseen} have no prototype yet: call update(x, task) with their training inputs first."
            )
        ctx = self.contexts()[tasks.to(self.sums.device)]
        return ctx[0] if single else ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``context(x=x)``: the nearest prototype's context for every input."""
        return self.context(x=x)

    # ------------------------------------------------------------------ helpers
    def _dtype(self) -> torch.dtype:
        return self.projection.dtype if self.projection is not None else torch.get_default_dtype()

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        if not (isinstance(x, torch.Tensor) and x.dim() >= 1 and math.prod(x.shape[1:]) == self.input_dim):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise StateError(
                f"TaskPrototypes(input_dim={self.input_dim}) needs inputs [batch, ...] of {self.input_dim} values "
                f"per sample, got {shape}."
            )
        return x.reshape(x.shape[0], self.input_dim)

    def _tasks(self, task, batch: Optional[int]) -> torch.Tensor:
        if isinstance(task, int) and not isinstance(task, bool):
            tasks = torch.full((batch or 1,), task, dtype=torch.long)
        elif isinstance(task, torch.Tensor) and task.dim() == 1 and not task.is_floating_point():
            tasks = task.detach().long().cpu()
            if batch is not None and len(tasks) != batch:
                raise StateError(f"task has {len(tasks)} entries for a batch of {batch} inputs.")
        else:
            raise StateError(f"task must be an int or a 1-D integer tensor, got {task!r}.")
        if len(tasks) and (int(tasks.min()) < 0 or int(tasks.max()) >= self.num_tasks):
            raise StateError(f"task ids must be in 0..{self.num_tasks - 1}, got {sorted(set(tasks.tolist()))[:10]}.")
        return tasks

    def extra_repr(self) -> str:
        proj = "" if self.projection is None else ", projected"
        return f"num_tasks={self.num_tasks}, input_dim={self.input_dim}, context_dim={self.context_dim}{proj}"
