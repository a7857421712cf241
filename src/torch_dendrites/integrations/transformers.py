"""``DendriteTrainerCallback``: dendrite growth inside a stock Hugging Face ``transformers.Trainer``.

Example (added to an existing Trainer script)::

    from torch_dendrites.integrations.transformers import DendriteTrainerCallback

    model = td.add_dendrites(model)
    args = TrainingArguments(..., eval_strategy="epoch", metric_for_best_model="accuracy",
                             load_best_model_at_end=False)
    trainer = Trainer(model=model, args=args, ..., callbacks=[DendriteTrainerCallback()])
    trainer.train()                            # stops when the controller says done
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

try:
    import transformers
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "torch_dendrites.integrations.transformers needs `transformers`: pip install 'torch-dendrites[hf]'"
    ) from exc

from ..config import GrowthConfig
from ..errors import ConfigError, TargetError
from ..growth import GrowthController
from ..optim import sync_optimizer
from ..surgery import dendritic_layers

__all__ = ["DendriteTrainerCallback"]


class DendriteTrainerCallback(transformers.TrainerCallback):
    """Step a :class:`~torch_dendrites.GrowthController` at every evaluation of a ``Trainer``.

    The score is ``metrics["eval_" + args.metric_for_best_model]`` (``eval_loss`` if unset), maximised when
    ``args.greater_is_better``. After a growth (or a restore of the best weights) the Trainer's optimizer is
    updated in place with :func:`torch_dendrites.sync_optimizer` (new parameters join its first group, so
    the Trainer's scheduler keeps driving them); at ``done`` training stops with the best weights in the
    model. The controller restores the best weights itself, so ``load_best_model_at_end`` must be off.

    Args:
        config: the growth policy; ``maximize`` is taken from ``args.greater_is_better`` when ``None``.
        out_dir: where the controller writes its records (process 0 only).
    """

    def __init__(self, config: Optional[GrowthConfig] = None, out_dir: Union[str, Path, None] = None):
        self.config = config
        self.out_dir = out_dir
        self.controller: Optional[GrowthController] = None
        self.metric: Optional[str] = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.controller is not None:
            return
        if getattr(args, "load_best_model_at_end", False):
            raise ConfigError(
                "DendriteTrainerCallback restores the best weights itself (with their dendrites); set "
                "TrainingArguments(load_best_model_at_end=False)."
            )
        if model is None or not dendritic_layers(model):
            raise TargetError("the Trainer's model has no dendrites: call td.add_dendrites(model) before Trainer(...).")
        metric = args.metric_for_best_model or "loss"
        self.metric = metric if metric.startswith("eval_") else f"eval_{metric}"
        greater = args.greater_is_better if args.greater_is_better is not None else not self.metric.endswith("loss")
        config = self.config or GrowthConfig(maximize=bool(greater))
        if config.maximize != bool(greater):
            raise ConfigError(
                f"GrowthConfig(maximize={config.maximize}) disagrees with TrainingArguments(greater_is_better="
                f"{greater}) for {self.metric!r}; make them agree."
            )
        out_dir = self.out_dir if state.is_world_process_zero else None
        self.controller = GrowthController(model, config, out_dir=out_dir)

    def on_evaluate(self, args, state, control, metrics=None, model=None, optimizer=None, **kwargs):
        if self.controller is None or self.controller.done:
            return
        if not metrics or self.metric not in metrics:
            raise ConfigError(
                f"DendriteTrainerCallback needs {self.metric!r} in the evaluation metrics; got {sorted(metrics or {})}."
                " Set TrainingArguments(metric_for_best_model=...) to a metric your compute_metrics returns."
            )
        result = self.controller.step(metrics[self.metric])
        if result.restructured and optimizer is not None:
            sync_optimizer(optimizer, self.controller.model)
        if result.done:
            control.should_training_stop = True
