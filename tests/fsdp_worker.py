"""Run by test_distributed.py: dendrite growth on an FSDP2-sharded model (torchrun, gloo, CPU).

With ``RANK`` set, the model is sharded with ``shard_dendritic`` and each rank trains on its half of
every global batch; without it, one process trains on the whole batches (the reference). Writes
``<out>/rank<r>.json``: losses, structure, a hash of the whole (gathered) state, and what the checks saw.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import torch_dendrites as td
from torch_dendrites.integrations.distributed import full_state_dict, shard_dendritic, sync_dendrite_grads


def whole_hash(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(full_state_dict(model.state_dict()).items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def build(world: int) -> nn.Module:
    torch.manual_seed(0)
    net = td.add_dendrites(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)))
    if world > 1:
        shard_dendritic(net)
    return net


def make_opt(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def main(out_dir: str) -> None:
    out = Path(out_dir)
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 4, generator=g), torch.randn(64, 2, generator=g)
    xv, yv = x[:32], y[:32]  # scored on training data: the score keeps improving, so grown sets are kept

    net = build(world)
    cfg = td.GrowthConfig(mode="fixed", switch_every=2, max_dendrites=2, max_tries=1, seed=3)
    ctl = td.GrowthController(net, cfg, out_dir=out / "ctl")
    opt = make_opt(net)
    losses, local_scores, events = [], [], []
    for _ in range(7):
        for b in range(4):  # global batches of 16; each rank takes its contiguous share
            xb, yb = x[b * 16 : (b + 1) * 16], y[b * 16 : (b + 1) * 16]
            n = 16 // world
            xb, yb = xb[rank * n : (rank + 1) * n], yb[rank * n : (rank + 1) * n]
            opt.zero_grad()
            loss = nn.functional.mse_loss(net(xb), yb)
            loss.backward()
            sync_dendrite_grads(net)
            opt.step()
            t = loss.detach().clone()
            if distributed:
                dist.all_reduce(t)
            losses.append(t.item() / world)
        with torch.no_grad():  # each rank scores its own half of the validation set: the scores differ
            halves = [
                -nn.functional.mse_loss(net(xv[i * 16 : (i + 1) * 16]), yv[i * 16 : (i + 1) * 16]).item()
                for i in range(2)
            ]
        local = halves[rank] if distributed else sum(halves) / 2
        local_scores.append(local)
        r = ctl.step(local)
        events.append(r.event)
        if r.restructured:
            opt = make_opt(net)  # FSDP needs no re-wrap: its groups hold only the base weights
        if r.done:
            break
    ctl.save_latest(opt)
    final = whole_hash(net)
    counts = {k: v.num_dendrites for k, v in td.dendritic_layers(net).items()}
    kinds = sorted({type(p).__name__ for p in net.parameters()})

    # Resume into a freshly built (and sharded) model: same weights, and the optimizer's state fits.
    net2 = build(world)
    ctl2 = td.GrowthController(net2, cfg, out_dir=out / "ctl")
    opt2 = ctl2.resume(make_opt).optimizer
    resumed_same = whole_hash(net2) == final
    for m, o in ((net, opt), (net2, opt2)):
        o.zero_grad()
        n = 16 // world
        nn.functional.mse_loss(m(x[rank * n : (rank + 1) * n]), y[rank * n : (rank + 1) * n]).backward()
        sync_dendrite_grads(m)
        o.step()
    step_same = whole_hash(net2) == whole_hash(net)

    # Forgetting sync_dendrite_grads lets the replicas drift apart: the controller says so, changing nothing.
    drift = ""
    if distributed:
        net3 = build(world)
        td.grow(net3, torch.Generator().manual_seed(0))
        ctl3 = td.GrowthController(net3, td.GrowthConfig(patience=3))
        o3 = make_opt(net3)
        nn.functional.mse_loss(net3(x[rank * 8 : rank * 8 + 8]), y[rank * 8 : rank * 8 + 8]).backward()
        o3.step()  # no sync: each rank's dendrites moved by its own gradient
        try:
            ctl3.step(0.5)
        except td.StateError as exc:
            drift = str(exc) if ctl3.epoch == 0 else "state changed"
    record = {
        "losses": losses,
        "local_scores": local_scores,
        "history": [{k: h[k] for k in ("event", "score", "dendrites")} for h in ctl.history],
        "events": events,
        "hash": final,
        "counts": counts,
        "param_kinds": kinds,
        "resumed_same": resumed_same,
        "step_same": step_same,
        "drift": drift,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    if distributed:
        # Every rank reaches the end before the group is torn down: rank 0 alone saves, and a rank that tore
        # down while the other was still saving once left that one hanging in gloo's teardown.
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
