"""Dendrite growth under DistributedDataParallel, on CPU (gloo) or GPUs (nccl).

Run: ``torchrun --standalone --nproc_per_node=2 examples/ddp/train.py`` (add ``--fsdp`` for FSDP2)

Each rank trains on its share of every global batch and validates on its own shard of the validation
set; the controller averages the ranks' scores, so they all grow (or stop) together, with identical
dendrites. After each ``restructured`` step DDP is rebuilt over the new parameters (``rewrap_ddp``)
and so is the optimizer. Only rank 0 writes ``--out-dir``.

With ``--fsdp`` the base weights are sharded with FSDP2 (``shard_dendritic``) and the dendrites stay
replicated: nothing is re-wrapped after growth, and ``sync_dendrite_grads`` averages the dendrites'
gradients after each backward.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import torch_dendrites as td
from torch_dendrites.integrations.distributed import full_state_dict, rewrap_ddp, shard_dendritic, sync_dendrite_grads


def make_data(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    y = ((x[:, 0] * x[:, 1]) > 0).long()  # XOR-like: the MLP head needs its dendrites
    return x, y


def state_hash(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(full_state_dict(model.state_dict()).items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, default=Path("runs/ddp"))
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--global-batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=None, help="growth seed (default: drawn on rank 0, broadcast)")
    ap.add_argument("--fsdp", action="store_true", help="shard the base weights with FSDP2 instead of DDP")
    ap.add_argument("--record", type=Path, default=None, help="write per-rank losses, structure and weights here")
    args = ap.parse_args(argv)

    distributed = "RANK" in os.environ
    if distributed:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        rank, world = dist.get_rank(), dist.get_world_size()
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    else:
        rank, world = 0, 1
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() and distributed else "cpu"
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    x, y = make_data(512)
    xtr, ytr, xva, yva = x[:384], y[:384], x[384:], y[384:]
    xva_local, yva_local = xva[rank::world], yva[rank::world]  # each rank validates on its own shard

    torch.manual_seed(0)
    net = td.add_dendrites(nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2))).to(device)
    cfg = td.GrowthConfig(mode="fixed", switch_every=3, max_dendrites=2, max_tries=2, seed=args.seed)
    ctl = td.GrowthController(net, cfg, out_dir=args.out_dir)
    fsdp = distributed and args.fsdp
    if fsdp:
        shard_dendritic(net)  # FSDP's groups hold only the base weights: growth needs no re-wrap
    model = DDP(net) if distributed and not fsdp else net

    def make_opt(m):
        return torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9)

    opt = make_opt(model)
    local = args.global_batch // world
    losses, local_scores = [], []
    while not ctl.done and ctl.epoch < args.epochs:
        model.train()
        for i in range(0, len(ytr), args.global_batch):
            xb = xtr[i : i + args.global_batch][rank * local : (rank + 1) * local].to(device)
            yb = ytr[i : i + args.global_batch][rank * local : (rank + 1) * local].to(device)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xb), yb)
            loss.backward()  # DDP averages the gradients: the same step as one process on the global batch
            if fsdp:
                sync_dendrite_grads(net)  # FSDP averages only the sharded weights' gradients
            opt.step()
            g = loss.detach().clone()
            if distributed:
                dist.all_reduce(g)
                g /= world
            losses.append(g.item())
        model.eval()
        with torch.no_grad():
            acc = (model(xva_local.to(device)).argmax(1).cpu() == yva_local).float().mean().item()
        local_scores.append(acc)
        r = ctl.step(acc)  # ranks pass different local accuracies; the controller decides on their mean
        if r.restructured:
            model = rewrap_ddp(model) if distributed and not fsdp else net
            opt = make_opt(model)
        if rank == 0:
            print(f"epoch {ctl.epoch:>2}  val acc {r.score:.3f}  dendrites {r.num_dendrites}  {r.event}")

    if args.record is not None:
        args.record.mkdir(parents=True, exist_ok=True)
        counts = {n: m.num_dendrites for n, m in td.dendritic_layers(net).items()}
        (args.record / f"rank{rank}.json").write_text(
            json.dumps(
                {
                    "losses": losses,
                    "local_scores": local_scores,
                    "counts": counts,
                    "hash": state_hash(net),
                    "world": world,
                    "writes_files": ctl.writes_files,
                    "history": ctl.history,
                }
            )  # fmt: skip
        )
        if rank == 0 or fsdp:  # under FSDP every rank helps gather the shards; rank 0 writes
            td.save(args.record / f"model_world{world}", net)
    if distributed:
        # Every rank reaches the end before the group is torn down: rank 0 alone saves, and a rank that tore
        # down while the other was still saving once left that one hanging in gloo's teardown.
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
