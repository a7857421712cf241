"""Whole-run checkpoints: ``out_dir/latest`` (model, controller, optimizer, scheduler, RNG) and resuming.

``latest/`` is adapter-sized, like ``best/``: frozen base weights are left out (their fingerprint is kept), so a
resumed run needs the same base weights, as it would anyway (the same ``from_pretrained`` call).

:class:`RunCheckpoints` is the controller's one seam for run-level files; all file work itself goes through
:mod:`torch_dendrites.persistence`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from .. import distributed
from ..errors import StateError
from ..persistence import _resolve, load, load_training_state, save
from ..persistence.io import NoCheckpoint

__all__ = ["Resumed", "RunCheckpoints"]


@dataclass(frozen=True)
class Resumed:
    """What :meth:`GrowthController.resume` restored.

    Attributes:
        resumed: a checkpoint was found and restored (False: a fresh start).
        optimizer: the optimizer built by ``make_optimizer`` (with its saved state, if resumed).
        scheduler: the scheduler built by ``make_scheduler`` (with its saved state, if resumed).
        epoch: epochs already stepped (0 for a fresh start).
        extra: the ``extra`` dict saved with :meth:`GrowthController.save_latest`.
    """

    resumed: bool
    optimizer: Any
    scheduler: Any
    epoch: int
    extra: Dict[str, Any]


class RunCheckpoints:
    """Saves and resumes one controller's run in its ``out_dir``."""

    def __init__(self, controller: Any):
        self.controller = controller

    def _out_dir(self, what: str) -> Path:
        out = self.controller.out_dir
        if out is None:
            raise StateError(f"{what} needs the controller's out_dir; pass out_dir= to GrowthController.")
        return out

    def save_latest(self, optimizer=None, scheduler=None, generators=None, extra=None) -> Path:
        ctl = self.controller
        out = self._out_dir("save_latest")
        sharded = any(distributed.is_sharded(p) for p in ctl.model.parameters())
        if not ctl.writes_files and not sharded:
            return out / "latest"  # rank 0 writes for everyone (under FSDP2 every rank helps gather)
        if optimizer is not None:
            mine = {id(p) for p in ctl.model.parameters()}
            if any(id(p) not in mine for g in optimizer.param_groups for p in g["params"]):
                raise StateError(
                    "the optimizer holds parameters the model no longer has; rebuild it after a step that "
                    "returned restructured=True, then call save_latest."
                )
        return save(
            out / "latest",
            ctl.model,
            ctl,
            base_weights=False,
            optimizer=optimizer,
            scheduler=scheduler,
            rng=True,
            generators=generators,
            extra=extra,
        )

    def resume(self, make_optimizer=None, make_scheduler=None, generators: Optional[Dict[str, torch.Generator]] = None):
        ctl = self.controller
        out = self._out_dir("resume")
        try:
            folder = _resolve(out / "latest")
        except NoCheckpoint:  # nothing there: a fresh start (an unreadable copy raises instead of being replaced)
            folder = None
        extra: Dict[str, Any] = {}
        if folder is not None:
            load(folder, ctl.model, ctl)
        optimizer = make_optimizer(ctl.model) if make_optimizer is not None else None
        scheduler = make_scheduler(optimizer) if make_scheduler is not None else None
        if folder is not None:
            extra = load_training_state(
                folder, optimizer=optimizer, scheduler=scheduler, rng=True, generators=generators
            )
        return Resumed(folder is not None, optimizer, scheduler, ctl.epoch, extra)
