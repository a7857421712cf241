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

Under FSDP2, :func:`shard_dendritic` shards the base weights and keeps the dendrites replicated, so
growth needs no re-wrap; :func:`sync_dendrite_grads` averages the dendrites' gradients after backward,
and ``td.save`` gathers the shards (call it on every rank; rank 0 writes).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "is_distributed",
    "rank",
    "rewrap_ddp",
    "rebuild_ddp",
    "check_replicas",
    "ddp_of",
    "shard_dendritic",
    "sync_dendrite_grads",
    "all_reduce_mean",
    "all_reduce_sum_",
    "broadcast_int",
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
    opts = _ddp_options(model) if isinstance(model, DDP) else {}
    opts.update(ddp_kwargs)
    return DDP(inner, **opts)


def _ddp_options(model: nn.Module) -> Dict[str, Any]:
    opts: Dict[str, Any] = {
        "device_ids": model.device_ids,
        "output_device": model.output_device,
        "find_unused_parameters": model.find_unused_parameters,
        "gradient_as_bucket_view": model.gradient_as_bucket_view,
    }
    if not model.broadcast_buffers:  # passed only when changed: the option is being renamed
        opts["broadcast_buffers"] = False
    if getattr(model, "process_group", None) is not None:
        opts["process_group"] = model.process_group
    if getattr(model, "static_graph", False):
        opts["static_graph"] = True
    return opts


def rebuild_ddp(model: nn.Module) -> nn.Module:
    """Rebuild a ``DistributedDataParallel`` wrapper *in place* over its module's current parameters.

    For training loops that hold the wrapper where user code cannot replace it (the Hugging Face Trainer keeps
    it in a local variable; accelerate and Lightning keep references too): the object stays the same, its
    reducer is built anew over the new parameter list (the old one is released, which removes its autograd
    hooks), and rank 0's parameters and buffers are broadcast, so every rank continues identical. Hooks
    registered on the wrapper itself and its train/eval mode are kept; communication hooks registered on the
    old reducer are not (register them again). A no-op for anything that is not a DDP wrapper.

    Args:
        model: the DDP wrapper (anything else is returned unchanged).

    Returns:
        ``model``.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not isinstance(model, DDP):
        return model
    opts = _ddp_options(model)
    module, training = model.module, model.training
    hooks = {k: v for k, v in model.__dict__.items() if k.startswith("_") and "hooks" in k and isinstance(v, dict)}
    DDP.__init__(model, module, **opts)
    for k, v in hooks.items():
        if v:
            model.__dict__[k] = v
    model.train(training)
    return model


def ddp_of(model: nn.Module) -> Any:
    """A recorder of the ``DistributedDataParallel`` wrapper that runs ``model`` (found during its forward).

    Frameworks wrap the model in DDP where user code cannot see the wrapper; a forward pre-hook on ``model``
    notes the DDP instance that is running it. Returns an object whose ``get()`` gives the wrapper (or None)
    and whose ``remove()`` removes the hook.
    """
    import weakref

    from torch.nn.parallel import DistributedDataParallel as DDP

    class _Recorder:
        ref = None

        def get(self):
            return None if self.ref is None else self.ref()

        def remove(self):
            handle.remove()

    rec = _Recorder()

    def hook(module, args):
        active = DDP._get_active_ddp_module()
        if active is not None and active.module is module and rec.get() is not active:
            rec.ref = weakref.ref(active)

    handle = model.register_forward_pre_hook(hook)
    return rec


def shared_seed(seed: Optional[int]) -> Optional[int]:
    """``seed`` if given; in a multi-process run without one, a seed drawn on rank 0 and broadcast."""
    if seed is not None or not is_distributed():
        return seed
    return broadcast_int(int(torch.randint(0, 2**31 - 1, (1,)).item()) if rank() == 0 else 0)


# --------------------------------------------------------------------------- FSDP2
def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a ``DTensor`` (a parameter sharded by ``fully_shard`` or tensor parallelism)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - builds without distributed
        return False
    return isinstance(t, DTensor)


def _dendrite_params(model: nn.Module) -> List[nn.Parameter]:
    from ..surgery import dendritic_layers

    return [p for layer in dendritic_layers(model).values() for p in layer.dendrites.parameters()]


def shard_dendritic(model: nn.Module, *, shard_root: bool = True, **fsdp_kwargs: Any) -> nn.Module:
    """FSDP2 (``fully_shard``) for a model that will keep growing dendrites.

    Every wrapped layer's ``base`` becomes its own FSDP unit (then the root, unless ``shard_root=False``,
    for the parameters outside wrapped layers); the dendrites are left out of every FSDP group and stay
    ordinary, replicated tensors. FSDP's parameter groups are fixed when ``fully_shard`` runs, so this is
    what lets growth add and drop dendrites later without resharding: the base weights (most of a model)
    stay sharded, the dendrites live whole on every rank like DDP parameters. Their gradients are averaged
    over ranks by :func:`sync_dendrite_grads`, which the training loop calls after ``loss.backward()``::

        net = td.add_dendrites(model)
        shard_dendritic(net)                  # after add_dendrites, before the optimizer
        ctl = td.GrowthController(net, cfg)   # every rank grows identical dendrites (shared seed)
        ...
        loss.backward()
        sync_dendrite_grads(net)
        opt.step()
        ...
        if ctl.step(val_score).restructured:
            opt = make_optimizer(net)         # FSDP itself needs no re-wrapping

    Sharding finer units yourself (say, each transformer block) works too, provided the dendrite
    parameters are passed as ``ignored_params`` (or the layers have no dendrites yet when you shard).

    Args:
        model: a model prepared with :func:`torch_dendrites.add_dendrites`, inside an initialised process
            group.
        shard_root: also ``fully_shard`` the model itself (the usual FSDP2 recipe).
        fsdp_kwargs: passed to every ``fully_shard`` call (``mesh``, ``reshard_after_forward``,
            ``mp_policy``...); ``ignored_params`` is extended with the dendrite parameters.

    Returns:
        ``model``, sharded in place.
    """
    from torch.distributed.fsdp import fully_shard

    from ..errors import TargetError
    from ..surgery import dendritic_layers

    layers = dendritic_layers(model)
    if not layers:
        raise TargetError("shard_dendritic needs a model with dendritic layers; call td.add_dendrites(model) first.")
    if not (dist.is_available() and dist.is_initialized()):
        raise TargetError("shard_dendritic needs an initialised process group (torch.distributed.init_process_group).")
    ignored = set(fsdp_kwargs.pop("ignored_params", None) or ()) | set(_dendrite_params(model))
    for layer in layers.values():
        fully_shard(layer.base, **fsdp_kwargs)
    if shard_root:
        fully_shard(model, ignored_params=ignored, **fsdp_kwargs)
    return model


def _replicated_grads(model: nn.Module) -> List[torch.Tensor]:
    return [p.grad for p in model.parameters() if p.grad is not None and not is_sharded(p)]


def sync_dendrite_grads(model: nn.Module) -> None:
    """Average over ranks the gradients of every parameter that FSDP does not manage (the dendrites).

    Call it after ``loss.backward()`` and before ``optimizer.step()`` in a model sharded with
    :func:`shard_dendritic`: FSDP reduce-scatters the base weights' gradients itself, the replicated
    dendrite gradients are all-reduced here in one flat buffer per dtype. A no-op outside a multi-process
    run. (Under DDP it is not needed: DDP averages every gradient.)
    """
    if not is_distributed():
        return
    grads = _replicated_grads(model)
    world = dist.get_world_size()
    dev = _device()
    by_dtype: Dict[torch.dtype, List[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for group in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in group]).to(dev)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world
        offset = 0
        for g in group:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


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
    from ..errors import StateError

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
