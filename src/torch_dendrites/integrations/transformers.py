"""Hugging Face ``transformers``: save/load that keeps the dendrites, and ``DendriteTrainerCallback``.

Saving and loading::

    from torch_dendrites.integrations.transformers import from_pretrained, save_pretrained

    save_pretrained(model, "out/model")                                  # or model.save_pretrained(...)
    model = from_pretrained(transformers.AutoModelForCausalLM, "out/model")   # bitwise, dendrites included

A dendritic model's ``save_pretrained`` (and so ``Trainer.save_model``, Trainer checkpoints and ``push_to_hub``)
writes the usual files, with the dendrite recipe inside ``model.safetensors`` (entries ``torch_dendrites/...``,
see :mod:`torch_dendrites.integrations.embedded`) and one-element placeholders at the wrapped layers' original
weight names, so that the stock ``from_pretrained`` -- which builds the model without dendrites -- raises on the
size mismatch (its load report names this loader) instead of silently re-initialising those layers.

Training (added to an existing Trainer script)::

    model = td.add_dendrites(model)
    args = TrainingArguments(..., eval_strategy="epoch", metric_for_best_model="accuracy",
                             load_best_model_at_end=False)
    trainer = Trainer(model=model, args=args, ..., callbacks=[DendriteTrainerCallback()])
    trainer.train()                                 # stops when the controller says done
    # resume: a freshly built model, td.add_dendrites(model), the same callback, then
    trainer.train(resume_from_checkpoint=True)      # dendrites, controller and optimizer come back
"""

from __future__ import annotations

import types
import weakref
from pathlib import Path
from typing import Any, Optional, Union

try:
    import transformers
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "torch_dendrites.integrations.transformers needs `transformers`: pip install 'torch-dendrites[hf]'"
    ) from exc

import torch
from safetensors.torch import load_file
from torch import nn

from ..config import GrowthConfig
from ..errors import CheckpointError, ConfigError, TargetError
from ..growth import GrowthController
from ..optim import sync_optimizer
from ..surgery import _RECORD, MISSING, dendritic_layers
from . import distributed, embedded

__all__ = ["DendriteTrainerCallback", "from_pretrained", "save_pretrained"]


def _controller_of(model: nn.Module) -> Any:
    """The controller a callback attached to the model (so that its checkpoints carry the controller's state)."""
    record = getattr(model, _RECORD, None)
    ref = getattr(record, "controller", None)
    return ref() if ref is not None else None


def _attach_controller(model: nn.Module, controller: Any) -> None:
    record = getattr(model, _RECORD, None)
    if record is not None:
        record.controller = weakref.ref(controller)


def save_pretrained(model: nn.Module, save_directory: Union[str, Path], controller: Any = None, **kwargs: Any):
    """``model.save_pretrained`` for a model with dendrites: the usual Hugging Face folder, with the dendrite
    structure (and ``controller``'s state) inside the weights, and placeholders that make a stock
    ``from_pretrained`` refuse the folder loudly.

    Works for ``transformers.PreTrainedModel`` and peft ``PeftModel`` s (whose folder is the adapter folder). It
    is also what ``model.save_pretrained`` runs once ``td.add_dendrites`` wrapped such a model.

    Args:
        model: the dendritic model.
        save_directory: the folder to write.
        controller: a :class:`~torch_dendrites.GrowthController` whose state to keep (default: the one a
            :class:`DendriteTrainerCallback` attached to the model, if any).
        kwargs: passed to the stock ``save_pretrained`` (``state_dict`` included).

    Returns:
        Whatever the stock ``save_pretrained`` returns.
    """
    controller = controller if controller is not None else _controller_of(model)
    state = kwargs.pop("state_dict", None)
    state = dict(model.state_dict() if state is None else state)
    entries = embedded.pack(model, controller) if dendritic_layers(model) else {}
    if entries:
        state.update(embedded.sentinels(model))
    stock = _stock_save_pretrained(model)
    if type(model).__module__.startswith("peft."):
        # peft keeps only adapter keys in its file: the structure goes into a file of its own beside it.
        out = stock(save_directory, state_dict=state, **kwargs)
        if entries and kwargs.get("is_main_process", True):
            from safetensors.torch import save_file

            save_file(entries, str(Path(save_directory) / embedded.PEFT_FILE), metadata={"format": "pt"})
        return out
    state.update(entries)
    return stock(save_directory, state_dict=state, **kwargs)


def _stock_save_pretrained(model: nn.Module):
    # The class's method, past the instance attribute that guard() sets.
    return types.MethodType(type(model).save_pretrained, model)


def from_pretrained(model_class: Any, path: Union[str, Path], controller: Any = None, **config_kwargs: Any):
    """Load a folder written by :func:`save_pretrained` (or by ``model.save_pretrained`` on a dendritic model):
    the model is built from its config, the dendrites are re-applied and every weight is loaded strictly.

    Args:
        model_class: a model class (``transformers.BertForSequenceClassification``) or an auto class
            (``transformers.AutoModelForCausalLM``).
        path: the folder.
        controller: a :class:`~torch_dendrites.GrowthController` to restore too (its model is replaced by the
            loaded one).
        config_kwargs: passed to ``AutoConfig.from_pretrained``.

    Returns:
        The model, in eval mode, as ``from_pretrained`` returns it.

    Raises:
        CheckpointError: the folder holds no dendrite structure (use the stock ``from_pretrained``) or does not
            fit the model class.

    Example:
        >>> import tempfile, torch, transformers, torch_dendrites as td
        >>> from torch_dendrites.integrations.transformers import from_pretrained
        >>> cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        ...                               intermediate_size=20)
        >>> model = td.add_dendrites(transformers.BertModel(cfg))
        >>> _ = td.grow(model)
        >>> folder = tempfile.mkdtemp()
        >>> model.save_pretrained(folder)  # the dendrites ride inside model.safetensors
        >>> loaded = from_pretrained(transformers.BertModel, folder)
        >>> ids = torch.randint(0, 50, (1, 5))
        >>> torch.equal(loaded(ids).last_hidden_state, model.eval()(ids).last_hidden_state)
        True
    """
    path = Path(path)
    weights = sorted(path.glob("model*.safetensors"))
    if not weights:
        raise CheckpointError(f"{path} holds no model*.safetensors; is it a folder written by save_pretrained?")
    state = {}
    for f in weights:
        state.update(load_file(str(f)))
    if not embedded.has_entries(state):
        raise CheckpointError(
            f"{path} holds no dendrite structure; load it with {model_class.__name__}.from_pretrained(...)."
        )
    config = transformers.AutoConfig.from_pretrained(str(path), **config_kwargs)
    model = model_class.from_config(config) if hasattr(model_class, "from_config") else model_class(config)
    if controller is not None:
        controller.model = model
    _load_with_structure(model, state, controller)
    return model.eval()


def _load_with_structure(model: nn.Module, state: dict, controller: Any = None) -> None:
    entries = embedded.strip(state)
    # The entries restore the structure, the controller and what training changed; the frozen base weights they
    # leave out come from the folder's own weights, loaded next.
    left_out = embedded.load_entries(model, entries, controller)
    guard(model)
    present = model.state_dict()
    for key in list(state):
        if key not in present:
            state.pop(key)  # the placeholders at the wrapped layers' original names
    result = model.load_state_dict(state, strict=False)
    # Hugging Face stores tied weights once (lm_head.weight shares embed_tokens.weight): a key missing from the
    # folder is fine when its tensor is one the folder holds, or one td.load restored.
    loaded = {present[k].data_ptr() for k in state}
    lacking = [k for k in result.missing_keys if k in left_out and present[k].data_ptr() not in loaded]
    if lacking:
        raise CheckpointError(f"the folder's weights lack the base tensors {lacking[:4]}; it is incomplete.")


def after_wrap(model: nn.Module, record) -> None:
    """Run by :func:`torch_dendrites.add_dendrites` on a model holding transformers modules: a
    ``PreTrainedModel``'s ``save_pretrained`` (``Trainer.save_model``, checkpoints, ``push_to_hub``) keeps the
    dendrites, and a stock ``from_pretrained`` of what it writes refuses instead of silently re-initialising the
    wrapped layers. (A peft model on top is guarded by the peft integration.)"""
    if type(model).__module__.startswith("transformers.") and callable(getattr(model, "save_pretrained", None)):
        guard(model)


def guard(model: nn.Module) -> None:
    """Route ``model.save_pretrained`` (and so ``Trainer.save_model``, checkpoints, ``push_to_hub``) through
    :func:`save_pretrained`, and make ``model.load_state_dict`` of such a file (Trainer resume) re-grow the saved
    dendrites first; :func:`torch_dendrites.remove_dendrites` undoes both."""
    record = getattr(model, _RECORD, None)
    if record is None:
        return
    if is_hf_model(model) and "save_pretrained" not in model.__dict__:
        record.restore.append((model, "save_pretrained", MISSING))
        model.__dict__["save_pretrained"] = types.MethodType(save_pretrained, model)
    if not getattr(record, "load_hook", False):
        handle = embedded.install_load_hook(model, controller=_restore_target)
        record.on_remove.append(handle.remove)
        record.load_hook = True


def _restore_target(model: nn.Module) -> Any:
    record = getattr(model, _RECORD, None)
    target = getattr(record, "restore_target", None)
    return target() if callable(target) else None


def is_hf_model(model: nn.Module) -> bool:
    """A transformers ``PreTrainedModel`` or a peft ``PeftModel``: models with a stock ``save_pretrained``."""
    mod = type(model).__module__
    return callable(getattr(type(model), "save_pretrained", None)) and mod.startswith(("transformers.", "peft."))


class DendriteTrainerCallback(transformers.TrainerCallback):
    """Step a :class:`~torch_dendrites.GrowthController` at every evaluation of a ``Trainer``.

    The score is ``metrics["eval_" + args.metric_for_best_model]`` (``eval_loss`` if unset), maximised when
    ``args.greater_is_better``. After a growth (or a restore of the best weights) the Trainer's optimizer is
    updated in place with :func:`torch_dendrites.sync_optimizer` (new parameters join its first group, so
    the Trainer's scheduler keeps driving them); at ``done`` training stops with the best weights in the
    model. The controller restores the best weights itself, so ``load_best_model_at_end`` must be off.

    - Multi-process runs (DDP through accelerate): after a growth the DDP wrapper is rebuilt in place over the new
      parameters (rank 0's weights broadcast), and before every step the replicas are checked to be identical.
    - Checkpoints (``save_strategy``) carry the dendrites and the controller's state inside ``model.safetensors``;
      ``trainer.train(resume_from_checkpoint=...)`` into a freshly built model (``td.add_dendrites`` applied, this
      callback attached) re-grows them before the optimizer is built, and the run continues where it stopped.
    - Growth scalars (``dendrites/score``, ``best``, ``count``, ``parameters``) and events go to TensorBoard when
      ``"tensorboard"`` is in ``args.report_to`` (run ``<output_dir>/runs/dendrites``), or to ``writer``.

    Args:
        config: the growth policy; ``maximize`` is taken from ``args.greater_is_better`` when ``None``.
        out_dir: where the controller writes its records (process 0 only).
        writer: a TensorBoard ``SummaryWriter`` (or anything with ``add_scalar``) for the growth scalars.
    """

    def __init__(
        self, config: Optional[GrowthConfig] = None, out_dir: Union[str, Path, None] = None, writer: Any = None
    ):
        self.config = config
        self.out_dir = out_dir
        self.writer = writer
        self.controller: Optional[GrowthController] = None
        self.metric: Optional[str] = None
        self._pending: Optional[_Pending] = None
        self._ddp = None

    # ------------------------------------------------------------- set-up
    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None and dendritic_layers(model):
            # Trainer resume loads checkpoint weights with model.load_state_dict before it builds the optimizer:
            # guard()'s hook re-grows the saved dendrites then; the controller state is kept for on_train_begin.
            guard(model)
            record = getattr(model, _RECORD, None)
            if record is not None:
                record.restore_target = self._restore_target

    def _restore_target(self):
        if self.controller is not None:
            return self.controller
        self._pending = _Pending()
        return self._pending

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
        zero = state.is_world_process_zero
        writer = self.writer
        if writer is None and zero and "tensorboard" in (args.report_to or []):
            from torch.utils.tensorboard import SummaryWriter

            writer = self.writer = SummaryWriter(str(Path(args.output_dir) / "runs" / "dendrites"))
        self.controller = GrowthController(model, config, out_dir=self.out_dir if zero else None, writer=writer)
        if self._pending is not None and self._pending.state is not None:
            self.controller.load_state_dict(self._pending.state, model)
        self._pending = None
        _attach_controller(model, self.controller)
        self._ddp = distributed.ddp_of(model)

    # ------------------------------------------------------------- training
    def on_evaluate(self, args, state, control, metrics=None, model=None, optimizer=None, **kwargs):
        if self.controller is None or self.controller.done:
            return
        if not metrics or self.metric not in metrics:
            raise ConfigError(
                f"DendriteTrainerCallback needs {self.metric!r} in the evaluation metrics; got {sorted(metrics or {})}."
                " Set TrainingArguments(metric_for_best_model=...) to a metric your compute_metrics returns."
            )
        distributed.check_replicas(self.controller.model, "DendriteTrainerCallback, before the controller step")
        result = self.controller.step(metrics[self.metric])
        if result.restructured:
            ddp = self._ddp.get() if self._ddp is not None else None
            if ddp is not None:
                distributed.rebuild_ddp(ddp)  # the Trainer holds the wrapper: rebuilt in place
            if optimizer is not None:
                _regroup(optimizer, self.controller.model)
        if result.done:
            control.should_training_stop = True

    def on_save(self, args, state, control, model=None, **kwargs):
        # A PreTrainedModel's checkpoint already carries the dendrites (its save_pretrained runs guard()'s
        # version); any other model's weights file gets them added here.
        if not state.is_world_process_zero or model is None or not dendritic_layers(model):
            return
        folder = Path(args.output_dir) / f"{transformers.trainer_utils.PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        weights = folder / "model.safetensors"
        if weights.is_file():
            embedded.add_to_file(weights, model, self.controller)

    def on_train_end(self, args, state, control, **kwargs):
        if self.writer is not None and callable(getattr(self.writer, "flush", None)):
            self.writer.flush()


def _trainer_groups(model: nn.Module):
    """The two parameter lists ``Trainer.create_optimizer`` builds (weight decay, none), in model order."""
    decay = set(transformers.Trainer.get_decay_parameter_names(None, model))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [p for n, p in named if n in decay], [p for n, p in named if n not in decay]


def _regroup(optimizer: Any, model: nn.Module) -> None:
    """Update the Trainer's optimizer after a restructured step.

    An optimizer the Trainer built itself gets exactly the groups ``create_optimizer`` would build over the
    grown model (same members, same order), so that a checkpoint's optimizer state maps onto the optimizer a
    resumed run builds; per-parameter state is cleared, as for a new optimizer. Any other optimizer is updated
    with :func:`torch_dendrites.sync_optimizer`.
    """
    inner = optimizer
    while hasattr(inner, "optimizer") and not isinstance(inner, torch.optim.Optimizer):
        inner = inner.optimizer
    groups = getattr(inner, "param_groups", [])
    try:
        decay, no_decay = _trainer_groups(model)
    except Exception:  # a transformers version without the Trainer's rule: the generic update
        decay = no_decay = None
    held = [{id(p) for p in g["params"]} for g in groups]
    present = {id(p) for p in model.parameters()}
    built_by_trainer = (
        decay is not None
        and len(groups) == 2
        and held[0] & present <= {id(p) for p in decay}
        and held[1] & present <= {id(p) for p in no_decay}
    )
    if not built_by_trainer:
        sync_optimizer(optimizer, model)
        return
    groups[0]["params"], groups[1]["params"] = decay, no_decay
    inner.state.clear()


class _Pending:
    """Stands in for the controller while a resumed checkpoint is read before the controller exists."""

    def __init__(self):
        self.state = None
        self.model = None

    def state_dict(self):
        return self.state

    def validate_state(self, state, model=None):
        return state

    def load_state_dict(self, state, model=None):
        self.state = state
