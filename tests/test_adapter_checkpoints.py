"""Adapter-sized checkpoints: ``td.save(..., base_weights=False)`` leaves out the frozen base weights and keeps
their fingerprint; ``td.load`` takes a base model holding them and refuses any other."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ckpt_tools import snapshot_files
from models import Backbone, pretrained_backbone, trained_backbone
from torch import nn

import torch_dendrites as td

X = torch.linspace(-1, 1, 40).reshape(5, 8)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _stored_keys(folder):
    from safetensors import safe_open

    with safe_open(str(Path(folder) / "model.safetensors"), "pt") as f:
        return set(f.keys())


def _recipe(folder):
    return json.loads((Path(folder) / "recipe.json").read_text())


def _size(folder):
    return sum(p.stat().st_size for p in Path(folder).iterdir())


def test_frozen_backbone_round_trip_is_bitwise_and_leaves_out_only_frozen_parameters(tmp_path):
    model = trained_backbone()
    folder = td.save(tmp_path / "a", model, base_weights=False)
    recipe = _recipe(folder)
    left_out = set(recipe["base"]["tensors"])
    # frozen non-dendrite parameters, tied names included; the BatchNorm buffers and the dendrites stay
    assert left_out == {"inp.weight", "inp.bias", "bn.weight", "bn.bias", "mid.base.weight", "mid.base.bias"} | {
        "mid_t.weight"
    }
    stored = _stored_keys(folder)
    assert {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked", "head.base.weight"} <= stored
    assert any(".dendrites.units." in k for k in stored) and not stored & left_out
    assert recipe["base"]["tensors"]["mid_t.weight"]["sha256"] == recipe["base"]["tensors"]["mid.base.weight"]["sha256"]
    loaded = td.load(folder, pretrained_backbone()).eval()
    assert _same_state(_state(loaded), _state(model))
    assert loaded.mid_t.weight is loaded.mid.base.weight  # still tied
    with torch.no_grad():
        assert torch.equal(loaded(X), model(X))
    full = td.save(tmp_path / "full", model)
    assert _size(folder) < _size(full)


def test_a_different_base_is_refused_and_nothing_changes(tmp_path):
    model = trained_backbone()
    ctl = td.GrowthController(model, td.GrowthConfig(mode="never"))
    ctl.step(0.5)
    folder = td.save(tmp_path / "a", model, ctl, base_weights=False)
    files = snapshot_files(tmp_path)
    other = pretrained_backbone()
    with torch.no_grad():
        other.inp.weight[0, 0] += 1e-3  # one value of one base weight
    c2 = td.GrowthController(td.add_dendrites(pretrained_backbone()), td.GrowthConfig(mode="never"))
    td.remove_dendrites(c2.model)
    before, ctl_before = _state(other), c2.state_dict()
    classes = [type(m) for m in other.modules()]
    with pytest.raises(td.CheckpointError, match=r"adapter-sized.*1 of the model's 7 base tensors.*'inp\.weight'"):
        td.load(folder, other, c2)
    assert _same_state(_state(other), before) and [type(m) for m in other.modules()] == classes
    assert c2.state_dict()["policy"] == ctl_before["policy"] and c2.best_state is None
    # a different shape, or a base tensor the model lacks, is named too
    wide = pretrained_backbone()
    wide.inp = nn.Linear(8, 12, bias=False).requires_grad_(False)
    with pytest.raises(td.CheckpointError, match="does not fit this model.*inp.bias"):
        td.load(folder, wide)
    assert snapshot_files(tmp_path) == files  # a load never writes
    # check_base=False (the framework integrations, which load the base weights next) skips the values only
    td.load(folder, other, check_base=False)
    assert torch.equal(other.inp.weight, before["inp.weight"])  # the model's own base weights stay


def test_full_folders_and_models_with_nothing_frozen(tmp_path):
    """base_weights=False on a model with nothing frozen is the ordinary full save; a full folder ignores
    check_base and restores every weight, whatever the base model held."""
    model = td.add_dendrites(nn.Sequential(nn.Linear(8, 4)))
    td.grow(model)
    folder = td.save(tmp_path / "a", model, base_weights=False)
    assert _recipe(folder)["base"] is None and _recipe(folder)["format_version"] == 3
    loaded = td.load(folder, nn.Sequential(nn.Linear(8, 4)))
    assert _same_state(_state(loaded), _state(model))
    with pytest.raises(td.ConfigError, match="base_weights"):
        td.save(tmp_path / "b", model, base_weights="no")
    with pytest.raises(td.ConfigError, match="check_base"):
        td.load(folder, nn.Sequential(nn.Linear(8, 4)), check_base=None)


def test_the_fingerprint_is_the_documented_hash():
    """The fingerprint is SHA-256 over little-endian bytes and a canonical JSON table: checked here from first
    principles (struct, hashlib, json), and pinned, since folders written today must match in every later version
    and process."""
    import hashlib
    import struct

    from torch_dendrites.persistence.base import fingerprint

    tensors = {
        "b.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "a.mask": torch.tensor([True, False]),
        "c.tied": torch.arange(6, dtype=torch.float32).reshape(2, 3).t(),  # a strided view: hashed as laid out
    }
    fp = fingerprint(tensors)
    f32 = hashlib.sha256(struct.pack("<6f", 0, 1, 2, 3, 4, 5)).hexdigest()
    assert fp["tensors"]["b.weight"] == {"dtype": "F32", "shape": [2, 3], "sha256": f32}
    assert fp["tensors"]["a.mask"]["sha256"] == hashlib.sha256(b"\x01\x00").hexdigest()
    assert fp["tensors"]["c.tied"]["sha256"] == hashlib.sha256(struct.pack("<6f", 0, 3, 1, 4, 2, 5)).hexdigest()
    table = json.dumps(fp["tensors"], sort_keys=True, separators=(",", ":")).encode()
    assert fp["sha256"] == hashlib.sha256(table).hexdigest()
    assert fp["sha256"] == "ec7fd056e8c66f7bf5bf07efa7b18a71a3c3f667f77052f7e43888a0d76d61f5"


@pytest.mark.slow
def test_the_fingerprint_is_the_same_in_a_fresh_process(tmp_path):
    model = trained_backbone()
    folder = td.save(tmp_path / "a", model, base_weights=False)
    code = (
        "import sys, torch, torch_dendrites as td\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from models import trained_backbone\n"
        "f = td.save(sys.argv[2], trained_backbone(), base_weights=False)\n"
        "import json; print(json.loads((f / 'recipe.json').read_text())['base']['sha256'])\n"
    )
    env = {"PYTHONHASHSEED": "123", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    res = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent), str(tmp_path / "b")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == _recipe(folder)["base"]["sha256"]


def test_framework_checkpoints_carry_an_adapter_sized_folder_and_take_the_base_from_the_framework():
    """A framework checkpoint (Lightning, HF Trainer, accelerate) is the model's state dict plus the entries of
    integrations.embedded: the entries no longer repeat the frozen base, and the load hook takes the base weights
    from the framework's own copy (a resumed model is built with random weights: check_base=False)."""
    import copy

    from safetensors.torch import load

    from torch_dendrites.integrations import embedded

    model = trained_backbone()
    ctl = td.GrowthController(model, td.GrowthConfig(mode="never"))
    ctl.step(0.5)
    entries = embedded.pack(model, ctl)
    stored = load(entries["torch_dendrites/model.safetensors"].numpy().tobytes())
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    frozen -= {n for n in frozen if ".dendrites." in n}
    assert frozen and not frozen & set(stored) and "bn.running_mean" in stored
    checkpoint = {**{k: v.clone() for k, v in model.state_dict().items()}, **entries}
    torch.manual_seed(5)
    fresh = Backbone()  # a resumed run: built again, random weights, no dendrites yet
    fresh = td.add_dendrites(fresh, td.DendriteConfig(target_names=["head", "mid"]))
    c2 = td.GrowthController(fresh, td.GrowthConfig(mode="never"))
    embedded.install_load_hook(fresh, controller=lambda m: c2)
    fresh.load_state_dict(copy.copy(checkpoint))  # the framework's own strict load
    assert _same_state(_state(fresh), _state(model)) and c2.epoch == 1
    with torch.no_grad():
        assert torch.equal(fresh.eval()(X), model(X))


# ---------------------------------------------------------------------- peft LoRA with dendrites
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _lora_base(seed=0):
    from test_peft import lora_llama

    return lora_llama(seed).base_model.model.config


def llama_base():
    """The tiny Llama of test_peft, as a "pretrained" base: the same weights at every call."""
    cfg = _lora_base()
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


def test_peft_lora_with_dendrites_round_trips_adapter_sized(tmp_path):
    from test_peft import grown_lora

    from torch_dendrites.integrations.peft import from_pretrained

    model = grown_lora()  # lora_llama(0): LlamaForCausalLM built right after manual_seed(0), as llama_base()
    ids = torch.randint(0, 100, (2, 7))
    folder = td.save(tmp_path / "a", model, base_weights=False)
    recipe = _recipe(folder)
    stored = _stored_keys(folder)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert stored == trainable  # LoRA and dendrites: everything trainable, nothing else (no buffers here)
    assert recipe["peft"]["path"] == "" and recipe["peft"]["adapters"]["default"]["lora_alpha"] == 8
    # td.load into a peft model built on the pretrained base ...
    fresh = peft.get_peft_model(llama_base(), peft.LoraConfig(**LORA))
    td.load(folder, fresh)
    assert _same_state(_state(fresh), _state(model))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(input_ids=ids).logits, model(input_ids=ids).logits)
    # ... or in one call, the peft model rebuilt from the recorded LoRA config
    loaded = from_pretrained(llama_base(), folder)
    assert _same_state(_state(loaded), _state(model))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    # another base is refused, and peft's adapters come off it again
    torch.manual_seed(7)
    other = transformers.LlamaForCausalLM(_lora_base())
    before = _state(other)
    with pytest.raises(td.CheckpointError, match="base tensors differ"):
        from_pretrained(other, folder)
    assert _same_state(_state(other), before) and not any("lora" in n for n, _ in other.named_modules())
    # LoRA scaling is in no tensor: a peft model with another lora_alpha would load silently, so it is refused
    alpha = peft.get_peft_model(llama_base(), peft.LoraConfig(**dict(LORA, lora_alpha=16)))
    with pytest.raises(td.CheckpointError, match="lora_alpha=8"):
        td.load(folder, alpha)


def test_the_adapter_sized_lora_folder_is_within_twice_peft_adapter_plus_dendrites(tmp_path):
    """The issue's bound, on the tiny LoRA Llama: adapter-sized <= 2 x (peft's adapter file + dendrite tensors)
    plus a fixed allowance for the JSON (recipe: fingerprint table and LoRA config), and far below the full save."""
    from test_peft import grown_lora

    model = grown_lora()
    adapter = td.save(tmp_path / "adapter", model, base_weights=False)
    full = td.save(tmp_path / "full", model)
    dendrites = sum(
        p.numel() * p.element_size() for la in td.dendritic_layers(model).values() for p in la.dendrite_parameters()
    )
    plain = grown_lora()
    td.remove_dendrites(plain)  # the same LoRA model without dendrites, as peft saves it
    plain.save_pretrained(tmp_path / "peft")
    peft_file = (tmp_path / "peft" / "adapter_model.safetensors").stat().st_size
    allowance = 16 * 1024
    assert _size(adapter) <= 2 * (peft_file + dendrites) + allowance, (_size(adapter), peft_file, dendrites)
    assert _size(adapter) * 4 < _size(full)


# ---------------------------------------------------------------------- the controller: best/ and latest/
CFG = td.GrowthConfig(mode="fixed", switch_every=2, max_dendrites=2, trial_warmup=1, seed=0)


def _train_epoch(model, seed):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    torch.manual_seed(seed)
    model.train()
    opt.zero_grad()
    model(torch.randn(16, 8)).pow(2).mean().backward()
    opt.step()
    model.eval()


def test_controller_best_and_latest_are_adapter_sized_and_load_in_one_call(tmp_path):
    model = td.add_dendrites(pretrained_backbone(), td.DendriteConfig(target_names=["head", "mid"]))
    ctl = td.GrowthController(model, CFG, out_dir=tmp_path / "run")
    best_out = None
    for epoch, score in enumerate((0.5, 0.6, 0.7, 0.65, 0.66)):  # scripted: the best is epoch 3 (1 dendrite)
        _train_epoch(model, epoch)
        r = ctl.step(score)
        if r.improved:
            with torch.no_grad():
                best_out, best_state = model(X), _state(model)
    assert ctl.best_epoch == 3 and ctl.best_counts == {"head": 1, "mid": 1}
    best = tmp_path / "run" / "best"
    assert set(_recipe(best)["base"]["tensors"]) >= {"inp.weight", "mid.base.weight", "mid_t.weight"}
    assert not _stored_keys(best) & set(_recipe(best)["base"]["tensors"])
    loaded = td.load(best, pretrained_backbone()).eval()  # the one documented call
    assert _same_state(_state(loaded), best_state)
    with torch.no_grad():
        assert torch.equal(loaded(X), best_out)
    # latest/ (model, controller, optimizer, RNG) is adapter-sized too, and resumes exactly
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
    latest = ctl.save_latest(opt)
    assert "inp.weight" in _recipe(latest)["base"]["tensors"]
    model2 = td.add_dendrites(pretrained_backbone(), td.DendriteConfig(target_names=["head", "mid"]))
    ctl2 = td.GrowthController(model2, CFG, out_dir=tmp_path / "run")
    res = ctl2.resume(lambda m: torch.optim.Adam([p for p in m.parameters() if p.requires_grad]))
    assert res.resumed and ctl2.epoch == ctl.epoch and ctl2.best_counts == ctl.best_counts
    assert _same_state(_state(model2), _state(model))
    assert all(torch.equal(ctl2.best_state[k], v) for k, v in ctl.best_state.items())
    # a resume onto another base is refused before anything changes
    model3 = td.add_dendrites(pretrained_backbone(), td.DendriteConfig(target_names=["head", "mid"]))
    with torch.no_grad():
        model3.mid.base.bias.add_(1)
    ctl3 = td.GrowthController(model3, CFG, out_dir=tmp_path / "run")
    before = _state(model3)
    with pytest.raises(td.CheckpointError, match="mid.base.bias"):
        ctl3.resume()
    assert _same_state(_state(model3), before) and ctl3.epoch == 0


def test_a_candidate_phase_keeps_the_weights_it_froze(tmp_path):
    """During a correlation candidate phase everything but the candidates is frozen *for the phase*: an
    adapter-sized save must still keep what was trainable before it, which only the controller knows."""
    model = td.add_dendrites(pretrained_backbone(), td.DendriteConfig(target_names=["head"]))
    cfg = td.GrowthConfig(patience=1, max_dendrites=2, dendrite_training="correlation", seed=0, candidate_max_epochs=3)
    ctl = td.GrowthController(model, cfg)
    assert ctl.step(0.5).improved
    assert ctl.step(0.4).event == "candidates"
    assert not model.head.base.weight.requires_grad  # frozen for the phase
    with pytest.raises(td.StateError, match="candidate phase.*controller"):
        td.save(tmp_path / "x", model, base_weights=False)
    assert not (tmp_path / "x").exists()
    folder = td.save(tmp_path / "a", model, ctl, base_weights=False)
    stored = _stored_keys(folder)
    assert {"head.base.weight", "head.base.bias"} <= stored and "inp.weight" not in stored
    assert any(".candidates." in k for k in stored)
    fresh = pretrained_backbone()
    c2 = td.GrowthController(td.add_dendrites(pretrained_backbone(), td.DendriteConfig(target_names=["head"])), cfg)
    c2.model = fresh
    td.load(folder, fresh, c2)
    assert c2.phase == "candidate" and _same_state(_state(fresh), _state(model))
