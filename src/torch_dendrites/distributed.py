"""Collectives the library itself needs in a multi-process run (``torch.distributed``): agreeing on scores
and seeds, telling sharded tensors apart, checking that replicas agree. Each is a no-op outside a process group.

The helpers users call around DDP and FSDP2 (``rewrap_ddp``, ``shard_dendritic``, ``sync_dendrite_grads``, ...)
live in :mod:`torch_dendrites.integrations.distributed`.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from .errors import StateError

__all__ = [
    "all_reduce_mean",
    "all_reduce_sum_",
    "broadcast_int",
    "check_replicas",
    "full_state_dict",
    "is_distributed",
    "is_sharded",
    "rank",
    "replicas_agree",
    "shard_like",
    "shared_seed",
]


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


def shared_seed(seed: Optional[int]) -> Optional[int]:
    """``seed`` if given; in a multi-process run without one, a seed drawn on rank 0 and broadcast."""
    if seed is not None or not is_distributed():
        return seed
    return broadcast_int(int(torch.randint(0, 2**31 - 1, (1,)).item()) if rank() == 0 else 0)


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a ``DTensor`` (a parameter sharded by ``fully_shard`` or tensor parallelism)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - builds without distributed
        return False
    return isinstance(t, DTensor)


def replicas_agree(tensors: List[torch.Tensor]) -> bool:
    """Whether ``tensors`` (the same list on every rank) hold the same values on every rank (a checksum)."""
    if not is_distributed():
        return True
    s = torch.zeros(2, dtype=torch.float64)
    for t in tensors:
        d = t.detach().to("cpu", torch.float64)
        s[0] += d.sum()
        s[1] += d.abs().sum()
    both = torch.cat([s, -s]).to(_device())
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    hi, lo = both[:2].cpu(), -both[2:].cpu()
    return bool(torch.allclose(hi, lo, rtol=1e-9, atol=1e-12))


def check_replicas(model: nn.Module, what: str = "") -> None:
    """Raise :class:`~torch_dendrites.StateError` if the ranks' copies of ``model``'s parameters differ.

    A collective (call it on every rank, at the same point); a no-op outside a multi-process run. Parameters
    sharded by FSDP2 are left out (each rank holds a different shard); buffers too (DDP re-broadcasts them at
    every forward, so a difference there heals itself). The check is one all-reduce of two float64 sums.

    Args:
        model: the model (not its DDP wrapper; either works).
        what: added to the message (where the check ran).
    """
    if not is_distributed():
        return
    params = [p for p in model.parameters() if not is_sharded(p)]
    if not replicas_agree(params):
        where = f" ({what})" if what else ""
        raise StateError(
            f"the model's weights differ between ranks{where}: the replicas drifted apart, so every rank now trains "
            "a different model. Parameters added after the DDP wrapper was built are not averaged by it: after a "
            "restructured step rebuild it (rewrap_ddp / rebuild_ddp, which the Lightning, Trainer and accelerate "
            "integrations do), and under FSDP2 call sync_dendrite_grads(model) after every backward."
        )


def full_state_dict(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``state`` with every sharded tensor gathered whole (a collective: call it on every rank)."""
    return {k: (v.full_tensor() if is_sharded(v) else v) for k, v in state.items()}


def shard_like(state: Dict[str, torch.Tensor], reference: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``state`` with each whole tensor cut to the sharding of ``reference``'s tensor of the same key.

    Each rank keeps its own shard of the (identical) whole tensor it holds, so no communication happens.
    """
    if not any(is_sharded(v) for v in reference.values()):
        return state
    from torch.distributed.tensor import distribute_tensor

    out = {}
    for k, v in state.items():
        ref = reference.get(k)
        if ref is not None and is_sharded(ref) and not is_sharded(v):
            v = distribute_tensor(v.to(ref.device), ref.device_mesh, ref.placements, src_data_rank=None)
        out[k] = v
    return out
