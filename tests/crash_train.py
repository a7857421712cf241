"""A deterministic little training run used by test_crash.py: resumable from its out_dir.

``TD_CRASH=epoch:N`` kills the process (SIGKILL) right after epoch N's controller step;
``TD_CRASH=write:N`` kills it halfway through writing the N-th checkpoint file;
``TD_CRASH=swap:N`` kills it at the N-th rename of a checkpoint folder swap.
Checkpoint faults go through the library's I/O seam (``persistence.io.use``), not by patching its modules.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys

import torch
from torch import nn

import torch_dendrites as td
from torch_dendrites.persistence import io


def die():
    os.kill(os.getpid(), signal.SIGKILL)


class CrashingFileSystem(io.FileSystem):
    """Dies at the n-th file write (leaving half a file) or the n-th rename."""

    def __init__(self, kind: str, n: int):
        self.kind, self.n, self.count = kind, n, 0

    def before(self, op, name):
        if self.kind == "swap" and op == "rename":
            self.count += 1
            if self.count == self.n:
                die()

    def write_file(self, name, data, dir_fd):
        if self.kind == "write":
            self.count += 1
            if self.count == self.n:
                super().write_file(name, data[: len(data) // 2], dir_fd)  # a half-written file stays behind
                die()
        super().write_file(name, data, dir_fd)


def arm_crash():
    kind, _, n = os.environ.get("TD_CRASH", "").partition(":")
    if not kind:
        return None, -1, contextlib.nullcontext()
    n = int(n)
    if kind in ("write", "swap"):
        return kind, n, io.use(CrashingFileSystem(kind, n))
    return kind, n, contextlib.nullcontext()


def main(out_dir):
    kind, n, faults = arm_crash()
    with faults:
        train(out_dir, kind, n)


def train(out_dir, kind, n):
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(384, 2, generator=g)
    y = ((x[:, 0] * x[:, 1]) > 0).long()  # XOR-like: a linear layer alone cannot fit it
    xtr, ytr, xva, yva = x[:256], y[:256], x[256:], y[256:]

    torch.manual_seed(0)
    model = td.add_dendrites(nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Dropout(0.1), nn.Linear(4, 2)))
    # Fixed phase lengths: growth happens at epoch 3 whatever the trajectory (a plateau might never come).
    cfg = td.GrowthConfig(mode="fixed", switch_every=3, max_dendrites=2, max_tries=2, seed=0, max_epochs=24)
    ctl = td.GrowthController(model, cfg, out_dir=out_dir)
    shuffle = torch.Generator().manual_seed(1)

    def make_opt(m):
        return torch.optim.Adam(m.parameters(), lr=0.02)

    r0 = ctl.resume(make_opt, generators={"shuffle": shuffle})
    opt = r0.optimizer
    while not ctl.done:
        model.train()
        perm = torch.randperm(256, generator=shuffle)
        for i in range(0, 256, 32):
            idx = perm[i : i + 32]
            opt.zero_grad()
            nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            val = (model(xva).argmax(1) == yva).float().mean().item()
        r = ctl.step(val)
        if kind == "epoch" and ctl.epoch == n:
            die()
        if r.restructured:
            opt = make_opt(model)
        ctl.save_latest(opt, generators={"shuffle": shuffle})
    td.save(os.path.join(out_dir, "final"), model, ctl)
    print(json.dumps({"resumed": r0.resumed, "epochs": ctl.epoch, "dendrites": ctl.num_dendrites}))


if __name__ == "__main__":
    main(sys.argv[1])
