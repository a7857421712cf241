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

import weakref
from typing import Any, Dict, List

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

# The core collectives, re-exported: users of this module reach everything distributed from one place.
from ..distributed import (
    _device,
    all_reduce_mean,
    all_reduce_sum_,
    broadcast_int,
    check_replicas,
    full_state_dict,
    is_distributed,
    is_sharded,
    rank,
    replicas_agree,
    shard_like,
    shared_seed,
)
from ..errors import TargetError
from ..surgery import dendritic_layers

__all__ = [
    "all_reduce_mean",
    "all_reduce_sum_",
    "broadcast_int",
    "check_replicas",
    "ddp_of",
    "full_state_dict",
    "is_distributed",
    "is_sharded",
    "rank",
    "rebuild_ddp",
    "replicas_agree",
    "rewrap_ddp",
    "shard_dendritic",
    "shard_like",
    "shared_seed",
    "sync_dendrite_grads",
]


def rewrap_ddp(model: nn.Module, **ddp_kwargs: Any) -> nn.Module:
    """A new ``DistributedDataParallel`` around ``model``'s module, with the old wrapper's options.

    Call it after a ``restructured`` step: the old DDP reducer knows only the old parameters. The new
    wrapper broadcasts rank 0's parameters and buffers, so every rank starts the phase identical.

    Args:
        model: a DDP-wrapped model (or a bare module, which is wrapped).
        ddp_kwargs: options overriding those read from the old wrapper.
    """
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


# --------------------------------------------------------------------------- FSDP2
def _dendrite_params(model: nn.Module) -> List[nn.Parameter]:
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
    from torch.distributed.fsdp import fully_shard  # here: builds without distributed support lack it

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
