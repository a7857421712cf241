"""``DendriteCallback``: dendrite growth inside a stock ``lightning`` Trainer.

Example (added to an existing Lightning script)::

    from torch_dendrites.integrations.lightning import DendriteCallback

    cb = DendriteCallback(monitor="val_acc", config=td.GrowthConfig(patience=3, maximize=True))
    trainer = L.Trainer(max_epochs=100, callbacks=[cb])
    trainer.fit(model, datamodule=dm)          # stops when the controller says done
    # resume: a freshly built module, the same callback
    trainer.fit(fresh_model, datamodule=dm, ckpt_path="last")
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "torch_dendrites.integrations.lightning needs the `lightning` package: pip install 'torch-dendrites[lightning]'"
    ) from exc

from typing import Any, Dict

from ..config import DendriteConfig, GrowthConfig
from ..errors import ConfigError
from ..growth import GrowthController
from ..growth.sinks import BASE_COLUMNS, Sink
from ..surgery import add_dendrites, dendritic_layers
from . import distributed, embedded

__all__ = ["DendriteCallback", "LightningLoggerSink"]


class LightningLoggerSink(Sink):
    """Growth scalars (``dendrites/score``, ``smoothed``, ``best``, ``count``, ``parameters``, extra scores) to every
    logger of a Lightning ``Trainer`` (``log_metrics`` at the trainer's global step), and growth events as text to
    loggers whose ``experiment`` has ``add_text`` (TensorBoard). Rank 0 only, like Lightning's loggers."""

    def __init__(self, trainer: pl.Trainer):
        self.trainer = trainer

    def on_step(self, controller: Any, row: Dict[str, Any], event: str) -> None:
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        metrics = {
            "dendrites/score": row["score"],
            "dendrites/smoothed": row["smoothed"],
            "dendrites/count": row["dendrites"],
            "dendrites/parameters": row["parameters"],
        }
        if row["best"] is not None:
            metrics["dendrites/best"] = row["best"]
        metrics.update({f"dendrites/{k}": v for k, v in row.items() if k not in BASE_COLUMNS and isinstance(v, float)})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            add_text = getattr(getattr(logger, "experiment", None), "add_text", None)
            if event and callable(add_text):
                add_text("dendrites/event", f"epoch {row['epoch']}: {event}", trainer.global_step)


class DendriteCallback(pl.Callback):
    """Step a :class:`~torch_dendrites.GrowthController` after every validation run.

    At ``fit`` start the LightningModule gets dendrites (``dendrite_config``) unless it already has some.
    After each validation (sanity checks excepted) the logged ``monitor`` metric drives the controller;
    when the model's parameters change, the trainer's optimizers and schedulers are rebuilt through
    ``configure_optimizers`` (``trainer.strategy.setup_optimizers``); at ``done`` the trainer stops with
    the best weights in the model.

    - ``strategy="ddp"``: after a growth the DDP wrapper is rebuilt in place over the new parameters (rank 0's
      weights broadcast); before every controller step the replicas are checked to be identical.
    - Checkpoints (``ModelCheckpoint``) carry the dendrites and the controller's state in their ``state_dict``;
      ``trainer.fit(fresh_module, ckpt_path=...)`` with this callback re-grows them before the weights, the
      optimizers and the loops are restored, and the run continues where it stopped.
    - The growth scalars and events go to the trainer's loggers (:class:`LightningLoggerSink`).

    Args:
        monitor: the logged validation metric, e.g. ``"val_acc"``.
        config: the growth policy; its ``maximize`` must fit the metric.
        dendrite_config: what to wrap if the module has no dendrites yet.
        out_dir: where the controller writes its records.
    """

    def __init__(
        self,
        monitor: str,
        config: Optional[GrowthConfig] = None,
        dendrite_config: Optional[DendriteConfig] = None,
        out_dir: Union[str, Path, None] = None,
    ):
        super().__init__()
        if not isinstance(monitor, str) or not monitor:
            raise ConfigError(f"monitor={monitor!r} must name a logged metric, e.g. 'val_acc'.")
        self.monitor = monitor
        self.config = config or GrowthConfig()
        self.dendrite_config = dendrite_config
        self.out_dir = out_dir
        self.controller: Optional[GrowthController] = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.controller is not None:
            return
        if not dendritic_layers(pl_module):
            add_dendrites(pl_module, self.dendrite_config)
        # Only rank 0 writes records in a multi-process run.
        out_dir = self.out_dir if trainer.is_global_zero else None
        self.controller = GrowthController(
            pl_module, self.config, out_dir=out_dir, sinks=[LightningLoggerSink(trainer)]
        )
        # ckpt_path= restores the module's weights before the optimizers: the hook re-grows the saved dendrites
        # (and restores the controller) first, so the strict load and the optimizer states fit.
        self._hook = embedded.install_load_hook(pl_module, controller=lambda m: self.controller)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: Dict[str, Any]
    ) -> None:
        if self.controller is not None and "state_dict" in checkpoint:
            checkpoint["state_dict"].update(embedded.pack(pl_module, self.controller))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.controller is None or self.controller.done:
            return
        metrics = trainer.callback_metrics
        if self.monitor not in metrics:
            raise ConfigError(
                f"DendriteCallback(monitor={self.monitor!r}): the metric was not logged; logged metrics: "
                f"{sorted(metrics)}. Log it with self.log({self.monitor!r}, value) in validation_step."
            )
        distributed.check_replicas(pl_module, "DendriteCallback, before the controller step")
        result = self.controller.step(metrics[self.monitor])
        if result.restructured:
            distributed.rebuild_ddp(trainer.strategy.model)  # DDP's reducer knows only the old parameters
            trainer.strategy.setup_optimizers(trainer)  # configure_optimizers() again, over the new parameters
        if result.done:
            trainer.should_stop = True

    def state_dict(self):
        return {} if self.controller is None else {"controller_epoch": self.controller.epoch}
