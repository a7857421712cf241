"""Dendrite growth in a plain ``accelerate`` training loop: :class:`AcceleratedGrowth`.

Example::

    accelerator = Accelerator(log_with="tensorboard", project_dir="runs/acc")
    model = td.add_dendrites(build_model())
    growth = AcceleratedGrowth(accelerator, model, td.GrowthConfig(patience=3), out_dir="runs/acc/growth")
    growth.restore("runs/acc/ckpt")           # resuming: re-grow the saved dendrites before the optimizer exists
    optimizer = torch.optim.AdamW(model.parameters())
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    accelerator.load_state("runs/acc/ckpt")   # resuming: weights, optimizer, RNG and the controller's state
    while not growth.done:
        train_one_epoch(model, optimizer, loader)
        result = growth.step(evaluate(model), optimizer)   # DDP rebuilt and the optimizer updated if needed
        accelerator.save_state("runs/acc/ckpt")             # the dendrites and the controller ride along
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Union

try:
    import accelerate  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "torch_dendrites.integrations.accelerate needs `accelerate`: pip install 'torch-dendrites[hf]'"
    ) from exc

from safetensors.torch import load_file
from torch import nn

from ..config import GrowthConfig
from ..errors import CheckpointError, TargetError
from ..growth import GrowthController, StepResult
from ..growth.sinks import BASE_COLUMNS, Sink
from ..optim import sync_optimizer
from ..surgery import dendritic_layers
from . import distributed, embedded

__all__ = ["AcceleratedGrowth", "TrackerSink"]


class TrackerSink(Sink):
    """Growth scalars (``dendrites/score``, ``smoothed``, ``best``, ``count``, ``parameters``, extra scores) and
    growth events (text, ``dendrites/event``) to the accelerator's trackers with ``accelerator.log``."""

    def __init__(self, accelerator: Any):
        self.accelerator = accelerator

    def on_step(self, controller: Any, row: Dict[str, Any], event: str) -> None:
        if not self.accelerator.trackers:
            return
        values: Dict[str, Any] = {
            "dendrites/score": row["score"],
            "dendrites/smoothed": row["smoothed"],
            "dendrites/count": row["dendrites"],
            "dendrites/parameters": row["parameters"],
        }
        if row["best"] is not None:
            values["dendrites/best"] = row["best"]
        values.update({f"dendrites/{k}": v for k, v in row.items() if k not in BASE_COLUMNS and isinstance(v, float)})
        if event:
            values["dendrites/event"] = f"epoch {row['epoch']}: {event}"  # text for TensorBoard, W&B, ...
        self.accelerator.log(values, step=row["epoch"])


def _prefix_of(model: nn.Module, container: nn.Module) -> Optional[str]:
    for name, m in container.named_modules():
        if m is model:
            return f"{name}." if name else ""
    return None


class AcceleratedGrowth:
    """A :class:`~torch_dendrites.GrowthController` wired into an ``accelerate.Accelerator``.

    - :meth:`step` checks that the replicas of a multi-process run are identical, steps the controller, and after a
      restructured step rebuilds the DDP wrapper in place over the new parameters and updates the optimizer.
    - ``accelerator.save_state`` stores the dendrite structure and the controller's state inside the model's
      weights file; ``accelerator.load_state`` restores the controller. A freshly built model needs its dendrites
      back before the optimizer is built: :meth:`restore`.
    - Growth scalars and events go to the accelerator's trackers (:class:`TrackerSink`).

    Args:
        accelerator: the ``Accelerator``.
        model: the model with dendrites (``td.add_dendrites``), unwrapped (before or after ``prepare``).
        config: the growth policy.
        out_dir: the controller's records (main process only).
        writer: optional TensorBoard-style writer, as for the controller.
    """

    def __init__(
        self,
        accelerator: Any,
        model: nn.Module,
        config: Optional[GrowthConfig] = None,
        out_dir: Union[str, Path, None] = None,
        writer: Any = None,
    ):
        model = accelerator.unwrap_model(model)
        if not dendritic_layers(model):
            raise TargetError("AcceleratedGrowth needs a model with dendrites: call td.add_dendrites(model) first.")
        self.accelerator = accelerator
        self.model = model
        out = out_dir if accelerator.is_main_process else None
        self.controller = GrowthController(model, config, out_dir=out, writer=writer, sinks=[TrackerSink(accelerator)])
        self._ddp = distributed.ddp_of(model)
        self._handle = accelerator.register_save_state_pre_hook(self._on_save)
        # load_state loads the weights file into the prepared model: the hook takes the entries out (and checks
        # that the structure fits the optimizer already built), then restores the controller.
        self._load_hook = embedded.install_load_hook(model, controller=lambda m: self.controller, restructure=False)

    @property
    def done(self) -> bool:
        return self.controller.done

    def restore(self, checkpoint_dir: Union[str, Path]) -> bool:
        """Re-grow the dendrites saved in an ``accelerator.save_state`` folder (a freshly built model), before the
        optimizer is built; ``accelerator.load_state`` then restores the weights, the optimizer and the
        controller. Returns False (and changes nothing) if the folder does not exist yet: a fresh start."""
        folder = Path(checkpoint_dir)
        if not folder.is_dir():
            return False
        files = sorted(folder.glob("model*.safetensors"))
        for f in files:
            state = load_file(str(f))
            prefix = next((k[: k.index(embedded.PREFIX)] for k in state if embedded.PREFIX in k), None)
            if prefix is not None:
                entries = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix + embedded.PREFIX)}
                embedded.load_entries(self.model, entries, self.controller)
                return True
        raise CheckpointError(
            f"{folder} holds no dendrite structure; was it written by accelerator.save_state with "
            "an AcceleratedGrowth attached?"
        )

    def step(self, score: Any, optimizer: Any = None, **extra_scores: Any) -> StepResult:
        """``controller.step`` for every process, plus what accelerate needs after a restructured step.

        Args:
            score: this process's validation score (the controller averages over processes).
            optimizer: the prepared optimizer, updated in place with :func:`torch_dendrites.sync_optimizer`.
            extra_scores: recorded only.
        """
        distributed.check_replicas(self.model, "AcceleratedGrowth.step, before the controller step")
        result = self.controller.step(score, **extra_scores)
        if result.restructured:
            ddp = self._ddp.get()
            if ddp is not None:
                distributed.rebuild_ddp(ddp)
            if optimizer is not None:
                sync_optimizer(optimizer, self.model)
        return result

    # ------------------------------------------------------------- accelerate hooks
    def _on_save(self, models, weights, output_dir) -> None:
        for i, m in enumerate(models):
            prefix = _prefix_of(self.model, m)
            if prefix is not None and i < len(weights):
                entries = embedded.pack(self.model, self.controller)
                weights[i].update({prefix + k: v for k, v in entries.items()})
