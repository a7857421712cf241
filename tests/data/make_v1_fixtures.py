"""Writes the checkpoints under tests/data/v1/ with the library as it was at commit d7d7942 (controller state
version 1, checkpoint format version 1), so that tests can check that they still load.

Run from a checkout of that commit: ``PYTHONPATH=src python tests/data/make_v1_fixtures.py tests/data/v1``.
"""

import sys
from pathlib import Path

import torch
from torch import nn

import torch_dendrites as td


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1))


def perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def main(out):
    out = Path(out)
    # gd: grown at epoch 3, rolled back and retried at epoch 4 (the rule of 0.1.0)
    model = td.add_dendrites(net())
    ctl = td.GrowthController(model, td.GrowthConfig(patience=1, max_dendrites=3, seed=0))
    for i, s in enumerate([0.5, 0.6, 0.6, 0.55]):
        perturb(model, i)
        ctl.step(s, test=s - 0.1)
    td.save(out / "gd_trial", model, ctl)
    # correlation: one epoch into a candidate phase
    model = td.add_dendrites(net())
    cfg = td.GrowthConfig(patience=1, max_dendrites=3, seed=0, dendrite_training="correlation")
    ctl = td.GrowthController(model, cfg)
    for i, s in enumerate([0.5, 0.5]):
        perturb(model, i)
        ctl.step(s)
    model.train()
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(1))
    model(x).pow(2).sum().backward()
    ctl.step(0.5)
    td.save(out / "correlation_candidates", model, ctl)


if __name__ == "__main__":
    main(sys.argv[1])
