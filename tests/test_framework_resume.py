"""Resume through the frameworks' own checkpoints: stop after a growth, resume into a freshly built model, and
compare with the uninterrupted run (dendrite counts, controller history, weights)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import torch_dendrites as td

CFG = dict(mode="fixed", switch_every=2, max_dendrites=2, seed=0)


def data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] * x[:, 1] > 0).long()
    return x, y


def same_history(a, b):
    strip = [{k: v for k, v in r.items()} for r in a]
    return json.dumps(strip, sort_keys=True) == json.dumps(b, sort_keys=True)


# --------------------------------------------------------------------------- Hugging Face Trainer
def hf_run(tmp_path, name, epochs, stop_after=None, resume=None, report_to=()):
    transformers = pytest.importorskip("transformers")
    from torch_dendrites.integrations.transformers import DendriteTrainerCallback

    x, y = data()

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(y)

        def __getitem__(self, i):
            return {"x": x[i], "labels": y[i]}

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

        def forward(self, x, labels=None):
            logits = self.net(x)
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    class Stop(transformers.TrainerCallback):
        def on_epoch_end(self, args, state, control, **kw):
            if stop_after is not None and round(state.epoch) >= stop_after:
                control.should_training_stop = True

    torch.manual_seed(0 if resume is None else 123)  # a resumed run starts from other random weights
    model = td.add_dendrites(Net())
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / name), num_train_epochs=epochs, per_device_train_batch_size=16,
        eval_strategy="epoch", save_strategy="epoch", metric_for_best_model="accuracy", greater_is_better=True,
        report_to=list(report_to), learning_rate=1e-2, disable_tqdm=True, use_cpu=True, logging_strategy="no",
        seed=0, save_only_model=False,
    )  # fmt: skip
    cb = DendriteTrainerCallback(config=td.GrowthConfig(**CFG))

    def metrics(p):
        return {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())}

    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=DS(), eval_dataset=DS(), compute_metrics=metrics, callbacks=[cb, Stop()]
    )
    trainer.train(resume_from_checkpoint=resume)
    return model, cb


def test_hf_trainer_resume_from_checkpoint_continues_the_run(tmp_path):
    full, cb_full = hf_run(tmp_path, "full", epochs=6)
    assert [r["event"] for r in cb_full.controller.history][:4] == ["", "grow", "", "grow"]
    part, cb_part = hf_run(tmp_path, "part", epochs=6, stop_after=3)
    assert cb_part.controller.epoch == 3 and cb_part.controller.num_dendrites == 1
    ckpt = tmp_path / "part" / "checkpoint-18"  # 3 epochs x 6 steps
    assert ckpt.is_dir()
    resumed, cb_res = hf_run(tmp_path, "part", epochs=6, resume=str(ckpt))
    assert cb_res.controller.epoch == cb_full.controller.epoch
    assert same_history(cb_res.controller.history, cb_full.controller.history)
    counts = {n: la.num_dendrites for n, la in td.dendritic_layers(full).items()}
    assert {n: la.num_dendrites for n, la in td.dendritic_layers(resumed).items()} == counts
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), k


def test_hf_trainer_growth_scalars_reach_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    hf_run(tmp_path, "tb", epochs=3, report_to=["tensorboard"])
    acc = EventAccumulator(str(tmp_path / "tb" / "runs" / "dendrites"), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    assert [e.value for e in acc.Scalars("dendrites/count")] == [0.0, 0.0, 1.0]
    assert "dendrites/score" in acc.Tags()["scalars"]
    assert any("dendrites/event" in t for t in acc.Tags()["tensors"])


def test_hf_checkpoint_weights_regrow_dendrites_on_load_state_dict(tmp_path):
    """What Trainer resume does first (model.load_state_dict of the checkpoint's file) re-grows the dendrites of a
    freshly wrapped model, before any optimizer exists; a plain model is refused instead of silently half-loaded."""
    from safetensors.torch import load_file

    from torch_dendrites.integrations.transformers import guard

    part, _ = hf_run(tmp_path, "part", epochs=4, stop_after=3)
    state = load_file(str(tmp_path / "part" / "checkpoint-18" / "model.safetensors"))
    assert any(k.startswith("torch_dendrites/") for k in state)
    fresh = td.add_dendrites(type(part)())
    guard(fresh)  # what DendriteTrainerCallback does at Trainer(...) time
    fresh.load_state_dict(state)
    assert {n: la.num_dendrites for n, la in td.dendritic_layers(fresh).items()} == {"net.0": 1, "net.2": 1}
    with pytest.raises(RuntimeError, match="Unexpected key"):
        type(part)().load_state_dict(state)  # no dendrites, no hook: strict loading refuses


# --------------------------------------------------------------------------- Lightning
def pl_module_class():
    L = pytest.importorskip("lightning.pytorch")

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, _):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def validation_step(self, batch, _):
            self.log("val_acc", (self(batch[0]).argmax(1) == batch[1]).float().mean())

        def configure_optimizers(self):
            opt = torch.optim.Adam(self.parameters(), lr=1e-2)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.9)}

    return L, Module


def pl_run(tmp_path, epochs, ckpt_path=None, logger=False):
    L, Module = pl_module_class()
    from lightning.pytorch.callbacks import ModelCheckpoint

    from torch_dendrites.integrations.lightning import DendriteCallback

    x, y = data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    torch.manual_seed(0 if ckpt_path is None else 123)
    module = Module()
    cb = DendriteCallback(monitor="val_acc", config=td.GrowthConfig(**CFG))
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True, save_top_k=0)
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=logger, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[cb, ckpt], deterministic=True, default_root_dir=str(tmp_path),
    )  # fmt: skip
    trainer.fit(module, loader, loader, ckpt_path=ckpt_path)
    return module, cb


def test_lightning_ckpt_path_continues_the_run(tmp_path):
    full, cb_full = pl_run(tmp_path / "full", epochs=6)
    assert [r["event"] for r in cb_full.controller.history][:4] == ["", "grow", "", "grow"]
    part, cb_part = pl_run(tmp_path / "part", epochs=3)
    assert cb_part.controller.num_dendrites == 1
    last = tmp_path / "part" / "ckpt" / "last.ckpt"
    resumed, cb_res = pl_run(tmp_path / "part", epochs=6, ckpt_path=str(last))
    assert same_history(cb_res.controller.history, cb_full.controller.history)
    counts = {n: la.num_dendrites for n, la in td.dendritic_layers(full).items()}
    assert {n: la.num_dendrites for n, la in td.dendritic_layers(resumed).items()} == counts
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), k


def test_lightning_loggers_receive_growth_scalars_and_events(tmp_path):
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(str(tmp_path / "logs"), name="run")
    pl_run(tmp_path, epochs=3, logger=logger)
    import csv

    rows = list(csv.DictReader(open(logger.experiment.metrics_file_path)))
    counts = [r["dendrites/count"] for r in rows if r.get("dendrites/count")]
    assert counts and [float(c) for c in counts][:3] == [0.0, 0.0, 1.0]
    assert any(r.get("dendrites/score") for r in rows)


# --------------------------------------------------------------------------- accelerate
def acc_run(tmp_path, name, epochs, resume_from=None, log=False):
    accelerate = pytest.importorskip("accelerate")
    from torch_dendrites.integrations.accelerate import AcceleratedGrowth

    kwargs = {"log_with": "tensorboard", "project_dir": str(tmp_path / name / "tb")} if log else {}
    accelerator = accelerate.Accelerator(cpu=True, **kwargs)
    if log:
        accelerator.init_trackers("run")
    x, y = data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    torch.manual_seed(0 if resume_from is None else 123)
    model = td.add_dendrites(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
    growth = AcceleratedGrowth(accelerator, model, td.GrowthConfig(**CFG))
    if resume_from is not None:
        assert growth.restore(resume_from)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    if resume_from is not None:
        accelerator.load_state(resume_from)
    while not growth.done and growth.controller.epoch < epochs:
        model.train()
        for xb, yb in loader:
            opt.zero_grad()
            accelerator.backward(nn.functional.cross_entropy(model(xb), yb))
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = (model(x).argmax(1) == y).float().mean().item()
        growth.step(acc, opt)
        accelerator.save_state(str(tmp_path / name / "ckpt"))
    if log:
        accelerator.end_training()
    return accelerator.unwrap_model(model), growth


def test_accelerate_load_state_continues_the_run(tmp_path):
    full, g_full = acc_run(tmp_path, "full", epochs=6)
    assert [r["event"] for r in g_full.controller.history][:4] == ["", "grow", "", "grow"]
    part, g_part = acc_run(tmp_path, "part", epochs=3)
    assert g_part.controller.num_dendrites == 1
    resumed, g_res = acc_run(tmp_path, "part", epochs=6, resume_from=str(tmp_path / "part" / "ckpt"))
    assert same_history(g_res.controller.history, g_full.controller.history)
    counts = {n: la.num_dendrites for n, la in td.dendritic_layers(full).items()}
    assert {n: la.num_dendrites for n, la in td.dendritic_layers(resumed).items()} == counts
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), k


def test_accelerate_trackers_receive_growth_scalars_and_events(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc_run(tmp_path, "logged", epochs=3, log=True)
    (events,) = list((tmp_path / "logged" / "tb").rglob("events.out.tfevents.*"))[:1]
    acc = EventAccumulator(str(events.parent), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "dendrites/count" in tags["scalars"]
    assert [e.value for e in acc.Scalars("dendrites/count")] == [0.0, 0.0, 1.0]
    assert any("dendrites/event" in t for t in tags["tensors"])  # add_text stores text as tensors
