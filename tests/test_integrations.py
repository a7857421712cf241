"""Lightning and Hugging Face Trainer integrations: growth every epoch, optimizers follow, stop at done."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torch_dendrites as td


def data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] * x[:, 1] > 0).long()
    return x, y


def test_lightning_callback_grows_rebuilds_optimizer_and_stops():
    L = pytest.importorskip("lightning.pytorch")
    from torch_dendrites.integrations.lightning import DendriteCallback

    x, y = data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    checks = []

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, _):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def validation_step(self, batch, _):
            self(batch[0])
            # A scripted, rising score: every set is kept, so the structure does not depend on the trajectory.
            self.log("val_acc", torch.tensor(0.5 + 0.01 * self.current_epoch))

        def configure_optimizers(self):
            opt = torch.optim.Adam(self.parameters(), lr=1e-2)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.9)}

        def on_train_epoch_start(self):
            held = {id(p) for g in self.trainer.optimizers[0].param_groups for p in g["params"]}
            mine = [p for p in self.parameters() if p.requires_grad]
            checks.append((cb.controller.num_dendrites, all(id(p) in held for p in mine)))

    torch.manual_seed(0)
    cb = DendriteCallback(monitor="val_acc", config=td.GrowthConfig(mode="every", max_dendrites=2))
    module = Module()
    trainer = L.Trainer(
        max_epochs=10, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=1, callbacks=[cb],
    )  # fmt: skip
    trainer.fit(module, loader, loader)
    assert [k for k, _ in checks][:3] == [0, 1, 2]  # a growth after every epoch
    assert all(ok for _, ok in checks)  # the rebuilt optimizer holds every new parameter
    assert cb.controller.done and trainer.current_epoch < 10  # stopped at done
    assert td.dendritic_layers(module)


def test_lightning_missing_metric_is_explained():
    L = pytest.importorskip("lightning.pytorch")
    from torch_dendrites.integrations.lightning import DendriteCallback

    x, y = data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(4, 2)

        def training_step(self, batch, _):
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def validation_step(self, batch, _):
            self.log("val_loss", nn.functional.cross_entropy(self.net(batch[0]), batch[1]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    root = Module()
    cb = DendriteCallback(monitor="val_acc", dendrite_config=td.DendriteConfig())
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[cb])  # fmt: skip
    with pytest.raises(td.ConfigError, match="val_loss"):
        trainer.fit(root, loader, loader)


def test_hf_trainer_callback_grows_syncs_optimizer_and_stops(tmp_path):
    transformers = pytest.importorskip("transformers")
    from torch_dendrites.integrations.transformers import DendriteTrainerCallback

    x, y = data(96)

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
            loss = nn.functional.cross_entropy(logits, labels)
            return {"loss": loss, "logits": logits}

    calls = []

    def metrics(p):  # a scripted, rising score: every set is kept, whatever the trajectory
        calls.append(p)
        return {"accuracy": 0.5 + 0.01 * len(calls)}

    torch.manual_seed(0)
    model = td.add_dendrites(Net())
    seen = []

    class Probe(transformers.TrainerCallback):
        def on_epoch_begin(self, args, state, control, model=None, optimizer=None, **kw):
            held = {id(p) for g in optimizer.param_groups for p in g["params"]}
            # every trainable parameter, and none of the frozen input weights of the sets before the newest
            seen.append(
                (cb.controller.num_dendrites, all((id(p) in held) == p.requires_grad for p in model.parameters()))
            )

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=12, per_device_train_batch_size=16, eval_strategy="epoch",
        save_strategy="no", metric_for_best_model="accuracy", greater_is_better=True, report_to=[],
        learning_rate=1e-2, disable_tqdm=True, use_cpu=True, logging_strategy="no",
    )  # fmt: skip
    cb = DendriteTrainerCallback(config=td.GrowthConfig(mode="every", max_dendrites=2))
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=DS(), eval_dataset=DS(), compute_metrics=metrics, callbacks=[cb, Probe()]
    )
    trainer.train()
    assert [k for k, _ in seen][:3] == [0, 1, 2]
    assert all(ok for _, ok in seen)
    assert cb.controller.done and len(seen) < 12
