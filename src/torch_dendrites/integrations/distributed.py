"""Multi-process training helpers (``torch.distributed``).

The :class:`~torch_dendrites.GrowthController` detects an initialised process group by itself: its
``step`` averages the scores passed on each rank (all-reduce, mean), so every rank takes the same decision;
growth draws dendrite weights from a seed shared by all ranks (``GrowthConfig.seed``, or one broadcast from
rank 0); candidate correlation statistics are summed over ranks; and only rank 0 writes files.

After a ``restructured`` step, DDP must be rebuilt over the new parameters (its reducer holds a fixed
list), and so must the optimizer::

    r = ctl.step(local_val_acc)            # ctl = td.GrowthController(ddp_model.module, cfg)
    if r.restructured:
        ddp_model = rewrap_ddp(ddp_model)  # same options, new parameter list, weights broadcast from rank 0
        opt = make_optimizer(ddp_model)
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["is_distributed", "rank", "rewrap_ddp", "all_reduce_mean", "all_reduce_sum_", "broadcast_int"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def _device() -> torch.device:
    # NCCL moves only CUDA tensors; gloo takes CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(values: List[float]) -> List[float]:
    """The mean over ranks of each value (every rank must pass the same number of values)."""
    if not is_distributed() or not values:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / dist.get_world_size()).tolist()


def all_reduce_sum_(tensors: List[torch.Tensor]) -> None:
    """Sum tensors over ranks, in place."""
    if not is_distributed():
        return
    dev = _device()
    for t in tensors:
        buf = t.to(dev)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        t.copy_(buf)


def broadcast_int(value: int, src: int = 0) -> int:
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_device())
    dist.broadcast(t, src)
    return int(t.item())


def rewrap_ddp(model: nn.Module, **ddp_kwargs: Any) -> nn.Module:
    """A new ``DistributedDataParallel`` around ``model``'s module, with the old wrapper's options.

    Call it after a ``restructured`` step: the old DDP reducer knows only the old parameters. The new
    wrapper broadcasts rank 0's parameters and buffers, so every rank starts the phase identical.

    Args:
        model: a DDP-wrapped model (or a bare module, which is wrapped).
        ddp_kwargs: options overriding those read from the old wrapper.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    inner = model.module if isinstance(model, DDP) else model
    opts: Dict[str, Any] = {}
    if isinstance(model, DDP):
        opts = {
            "device_ids": model.device_ids,
            "output_device": model.output_device,
            "find_unused_parameters": model.find_unused_parameters,
            "gradient_as_bucket_view": model.gradient_as_bucket_view,
        }
        if not model.broadcast_buffers:  # passed only when changed: the option is being renamed
            opts["broadcast_buffers"] = False
    opts.update(ddp_kwargs)
    return DDP(inner, **opts)


def shared_seed(seed: Optional[int]) -> Optional[int]:
    """``seed`` if given; in a multi-process run without one, a seed drawn on rank 0 and broadcast."""
    if seed is not None or not is_distributed():
        return seed
    return broadcast_int(int(torch.randint(0, 2**31 - 1, (1,)).item()) if rank() == 0 else 0)
