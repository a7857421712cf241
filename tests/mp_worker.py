"""One training run per framework, launched with 1 process (plain python) or 2 (torchrun, gloo on CPU).

Usage: python mp_worker.py FRAMEWORK OUT_DIR [--no-rebuild]   (FRAMEWORK: ddp, accelerate, lightning, hf)

Every framework trains the same MLP on the same global batches of 16 (8 per process with 2 processes) and grows
two dendrite sets (fixed phases of 2 epochs, shared seed). Each process writes OUT_DIR/rank<r>.json: a hash of its
whole state dict, the dendrite counts, the controller's events and the state dict itself (lists) for comparisons.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

import torch_dendrites as td

EPOCHS = int(os.environ.get("MP_EPOCHS", "5"))
GLOBAL_BATCH = 16
CFG = dict(mode=os.environ.get("MP_MODE", "fixed"), switch_every=2, max_dendrites=2, seed=3)


def data(n=128):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return x, (x[:, 0] * x[:, 1] > 0).long()


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def record(out: Path, model: nn.Module, controller, world: int, rank: int, extra=None) -> None:
    state = {k: v.detach().cpu().float() for k, v in sorted(model.state_dict().items())}
    h = hashlib.sha256()
    for k, v in state.items():
        h.update(k.encode())
        h.update(v.contiguous().numpy().tobytes())
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "world": world,
        "hash": h.hexdigest(),
        "counts": {n: la.num_dendrites for n, la in td.dendritic_layers(model).items()},
        "events": [r["event"] for r in controller.history],
        "state": {k: v.flatten().tolist() for k, v in state.items()},
        **(extra or {}),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(doc))


def run_ddp(out: Path, rebuild: bool) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from torch_dendrites.integrations.distributed import check_replicas, rewrap_ddp

    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    x, y = data()
    model = td.add_dendrites(net())
    ctl = td.GrowthController(model, td.GrowthConfig(**CFG))
    wrapped = DDP(model) if distributed else model
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.2)
    local = GLOBAL_BATCH // world
    drift = ""
    try:
        while not ctl.done and ctl.epoch < EPOCHS:
            for i in range(0, len(y), GLOBAL_BATCH):
                xb = x[i : i + GLOBAL_BATCH][rank * local : (rank + 1) * local]
                yb = y[i : i + GLOBAL_BATCH][rank * local : (rank + 1) * local]
                opt.zero_grad()
                nn.functional.cross_entropy(wrapped(xb), yb).backward()
                opt.step()
            with torch.no_grad():
                acc = (model(x[rank::world]).argmax(1) == y[rank::world]).float().mean().item()
            check_replicas(model, "mp_worker")
            if ctl.step(acc).restructured:
                if distributed and rebuild:
                    wrapped = rewrap_ddp(wrapped)
                opt = torch.optim.SGD(wrapped.parameters(), lr=0.2)
    except td.StateError as exc:
        drift = str(exc)
    record(out, model, ctl, world, rank, {"drift": drift})


def run_accelerate(out: Path) -> None:
    import accelerate

    from torch_dendrites.integrations.accelerate import AcceleratedGrowth

    accelerator = accelerate.Accelerator(cpu=True)
    world, rank = accelerator.num_processes, accelerator.process_index
    x, y = data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=GLOBAL_BATCH // world)
    model = td.add_dendrites(net())
    growth = AcceleratedGrowth(accelerator, model, td.GrowthConfig(**CFG))
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    wrapped, opt, loader = accelerator.prepare(model, opt, loader)
    while not growth.done and growth.controller.epoch < EPOCHS:
        for xb, yb in loader:
            opt.zero_grad()
            accelerator.backward(nn.functional.cross_entropy(wrapped(xb), yb))
            opt.step()
        with torch.no_grad():
            acc = (model(x[rank::world]).argmax(1) == y[rank::world]).float().mean().item()
        growth.step(acc, opt)
    record(out, model, growth.controller, world, rank, {"ddp": type(wrapped).__name__})


def run_lightning(out: Path) -> None:
    import lightning.pytorch as L

    from torch_dendrites.integrations.lightning import DendriteCallback

    world = int(os.environ.get("WORLD_SIZE", "1"))
    x, y = data()

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net()

        def forward(self, inp):
            return self.net(inp)

        def training_step(self, batch, _):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def validation_step(self, batch, _):
            self.log("val_acc", (self(batch[0]).argmax(1) == batch[1]).float().mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.2)

    # Each process reads its own slice of every global batch of 16 (as the DDP worker does), so the global batches
    # are the one-process run's batches.
    rank, local = int(os.environ.get("RANK", "0")), GLOBAL_BATCH // world
    mine = [i for i in range(len(y)) if (i % GLOBAL_BATCH) // local == rank]
    ds = torch.utils.data.Subset(torch.utils.data.TensorDataset(x, y), mine)
    loader = torch.utils.data.DataLoader(ds, batch_size=local)
    module = Module()
    cb = DendriteCallback(monitor="val_acc", config=td.GrowthConfig(**CFG))
    trainer = L.Trainer(
        max_epochs=EPOCHS, accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[cb], use_distributed_sampler=False,
    )  # fmt: skip
    trainer.fit(module, loader, loader)
    record(out, module.net, cb.controller, world, trainer.global_rank, {"strategy": type(trainer.strategy).__name__})


def run_hf(out: Path) -> None:
    import transformers

    from torch_dendrites.integrations.transformers import DendriteTrainerCallback

    world = int(os.environ.get("WORLD_SIZE", "1"))
    x, y = data()

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(y)

        def __getitem__(self, i):
            return {"x": x[i], "labels": y[i]}

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net()

        def forward(self, x, labels=None):
            logits = self.net(x)
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    model = td.add_dendrites(Net())
    args = transformers.TrainingArguments(
        output_dir=str(out / "hf"), num_train_epochs=EPOCHS, per_device_train_batch_size=GLOBAL_BATCH // world,
        eval_strategy="epoch", save_strategy="no", metric_for_best_model="accuracy", greater_is_better=True,
        report_to=[], learning_rate=0.2, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
        max_grad_norm=0.0, disable_tqdm=True, use_cpu=True, logging_strategy="no", seed=0,
        train_sampling_strategy="sequential", ddp_backend="gloo" if world > 1 else None,
    )  # fmt: skip

    def metrics(p):
        return {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())}

    cb = DendriteTrainerCallback(config=td.GrowthConfig(**CFG))
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=DS(), eval_dataset=DS(), compute_metrics=metrics, callbacks=[cb]
    )
    trainer.train()
    record(out, model.net, cb.controller, world, args.process_index, {"wrapped": type(trainer.model_wrapped).__name__})


if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    framework, out = sys.argv[1], Path(sys.argv[2])
    try:
        if framework == "ddp":
            run_ddp(out, rebuild="--no-rebuild" not in sys.argv)
        else:
            {"accelerate": run_accelerate, "lightning": run_lightning, "hf": run_hf}[framework](out)
    finally:
        # Without this, gloo's worker threads can outlive the interpreter's teardown and the process aborts
        # at exit ("terminate called without an active exception", pytorch/pytorch#190489): a rare failure
        # after the run itself has finished and written its results.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
