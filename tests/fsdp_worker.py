"""Run by test_distributed.py under torchrun: a grown dendritic model sharded with FSDP2 on CPU (gloo)."""

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import torch_dendrites as td


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    net = td.add_dendrites(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)))
    td.grow(net, torch.Generator().manual_seed(0))
    for layer in td.dendritic_layers(net).values():
        fully_shard(layer)  # the final structure: base and dendrites sharded together
    fully_shard(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 4, generator=g), torch.randn(16, 2, generator=g)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(net(x[rank * 8 : (rank + 1) * 8]), y[rank * 8 : (rank + 1) * 8])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        out = net(x).tolist()
    refused = ""
    try:
        td.GrowthController(net, td.GrowthConfig())
    except td.StateError as exc:
        refused = str(exc)
    json.dump({"out": out, "losses": losses, "refused": refused}, open(f"{out_dir}/fsdp{rank}.json", "w"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
