"""Folders written by format versions 1 (before issue 13) and 2 (before adapter-sized checkpoints) still load,
exactly.

``tests/fixtures/v1_*`` were written by ``tests/fixtures/make_v1_fixtures.py`` with the code of commit
d7d7942, ``v2_*`` by ``make_v2_fixtures.py`` with the code of commit 77bfd67: a model with a controller,
optimizer, scheduler, RNG and generator states, and a model with tied weights and low-rank dendrites. Their
expected outputs were saved beside them.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import torch_dendrites as td
from torch_dendrites.persistence.recipe import FORMAT_VERSION

FIXTURES = Path(__file__).with_name("fixtures")
sys.path.insert(0, str(FIXTURES))
from make_v1_fixtures import Tied, mlp  # noqa: E402


def same_model(model, folder, x, y):
    """The weights as the folder stores them, bit for bit, and the saved output: to the last bits only with the
    torch build and CPU that wrote the fixture (kernels differ in rounding elsewhere), so to 1e-5 relative; a
    weight in the wrong place changes the output by far more."""
    stored = load_file(str(Path(folder) / "model.safetensors"))
    state = model.state_dict()
    shared = [k for k in stored if k in state]
    assert shared and all(torch.equal(state[k], stored[k]) for k in shared)
    with torch.no_grad():
        out = model(x)
    assert out.shape == y.shape and torch.allclose(out, y, rtol=1e-5, atol=1e-6)


def test_v1_model_controller_and_training_state_load_exactly():
    expect = load_file(str(FIXTURES / "v1_mlp.expected.safetensors"))
    model = mlp()
    ctl = td.GrowthController(td.add_dendrites(mlp()), td.GrowthConfig(mode="fixed", switch_every=2, seed=1))
    td.remove_dendrites(ctl.model)
    td.load(FIXTURES / "v1_mlp", model, ctl)
    same_model(model, FIXTURES / "v1_mlp", expect["x"], expect["y"])
    assert ctl.epoch == 3 and [r["score"] for r in ctl.history] == [0.5, 0.6, 0.55]
    assert ctl.best_counts == {"0": 0, "2": 0}
    assert sorted(ctl.best_state) == ["0.base.bias", "0.base.weight", "2.base.bias", "2.base.weight"]
    opt = torch.optim.Adam(model.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.1)
    gen = torch.Generator()
    torch.manual_seed(0)
    random.seed(0)
    extra = td.persistence.load_training_state(
        FIXTURES / "v1_mlp", optimizer=opt, scheduler=sched, rng=True, generators={"g": gen}
    )
    assert extra == {"e": 2}
    assert torch.equal(torch.rand(3), expect["rng"]) and torch.equal(torch.rand(2, generator=gen), expect["gen"])
    assert sched.state_dict()["step_size"] == 3 and opt.param_groups[0]["lr"] == 0.01
    assert all(len(opt.state[p]) == 3 for p in model.parameters())


def test_v1_tied_lowrank_model_loads_exactly():
    expect = load_file(str(FIXTURES / "v1_tied.expected.safetensors"))
    model = td.load(FIXTURES / "v1_tied", Tied())
    assert model.proj.base.weight is model.emb.weight
    same_model(model, FIXTURES / "v1_tied", expect["idx"], expect["y"])


def test_a_v1_folder_resaved_is_the_current_version_and_identical(tmp_path):
    expect = load_file(str(FIXTURES / "v1_tied.expected.safetensors"))
    model = td.load(FIXTURES / "v1_tied", Tied())
    td.save(tmp_path / "v2", model)
    recipe = json.loads((tmp_path / "v2" / "recipe.json").read_text())
    assert recipe["format_version"] == FORMAT_VERSION and len(recipe["save_id"]) == 32
    assert "model.safetensors" in recipe["files"] and recipe["base"] is None
    same_model(td.load(tmp_path / "v2", Tied()), tmp_path / "v2", expect["idx"], expect["y"])


def test_v1_folders_are_still_checked(tmp_path):
    """Version 1 has no hashes, but its structure is checked like any other (and a crash copy is found)."""
    folder = tmp_path / "v1"
    shutil.copytree(FIXTURES / "v1_mlp", folder)
    recipe = json.loads((folder / "recipe.json").read_text())
    recipe["layers"][0]["num_dendrites"] = 9
    (folder / "recipe.json").write_text(json.dumps(recipe))
    with pytest.raises(td.CheckpointError, match="num_dendrites=9"):
        td.load(folder, mlp())
    # a version-1 save killed between its renames left `.name.old-<pid>`: still found
    shutil.copytree(FIXTURES / "v1_mlp", tmp_path / ".crashed.old-4194000")
    assert td.load(tmp_path / "crashed", mlp())[0].num_dendrites == 1
    np.testing.assert_equal(sorted(p.name for p in tmp_path.iterdir()), [".crashed.old-4194000", "v1"])


# ---------------------------------------------------------------------- format version 2 (issues 13 and 14)
def test_v2_model_controller_and_training_state_load_exactly():
    """Written by the code of commit 77bfd67 (tests/fixtures/make_v2_fixtures.py): every tensor stored, a frozen
    base weight among them, no fingerprint and no peft field."""
    expect = load_file(str(FIXTURES / "v2_mlp.expected.safetensors"))
    model = mlp()
    ctl = td.GrowthController(td.add_dendrites(mlp()), td.GrowthConfig(mode="fixed", switch_every=2, seed=1))
    td.remove_dendrites(ctl.model)
    ctl.model = model
    td.load(FIXTURES / "v2_mlp", model, ctl)
    same_model(model, FIXTURES / "v2_mlp", expect["x"], expect["y"])
    assert ctl.epoch == 3 and [r["score"] for r in ctl.history] == [0.5, 0.6, 0.55]
    assert "0.base.weight" not in ctl.best_state and "0.base.bias" in ctl.best_state  # frozen: not snapshotted
    trainable = [p for p in model.parameters() if p is not model[0].base.weight]
    opt = torch.optim.Adam(trainable, lr=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.1)
    gen = torch.Generator()
    torch.manual_seed(0)
    extra = td.persistence.load_training_state(
        FIXTURES / "v2_mlp", optimizer=opt, scheduler=sched, rng=True, generators={"g": gen}
    )
    assert extra == {"e": 2}
    assert torch.equal(torch.rand(3), expect["rng"]) and torch.equal(torch.rand(2, generator=gen), expect["gen"])
    assert sched.state_dict()["step_size"] == 3 and opt.param_groups[0]["lr"] == 0.01


def test_v2_tied_lowrank_model_loads_exactly():
    expect = load_file(str(FIXTURES / "v2_tied.expected.safetensors"))
    model = td.load(FIXTURES / "v2_tied", Tied())
    assert model.proj.base.weight is model.emb.weight
    same_model(model, FIXTURES / "v2_tied", expect["idx"], expect["y"])


def test_a_v2_folder_resaved_adapter_sized_is_version_3_and_loads_onto_its_base(tmp_path):
    expect = load_file(str(FIXTURES / "v2_mlp.expected.safetensors"))
    model = td.load(FIXTURES / "v2_mlp", mlp())
    model[0].base.weight.requires_grad_(False)  # frozen, as when it was saved
    folder = td.save(tmp_path / "v3", model, base_weights=False)
    recipe = json.loads((folder / "recipe.json").read_text())
    assert recipe["format_version"] == 3 and list(recipe["base"]["tensors"]) == ["0.base.weight"]
    base = mlp()
    with torch.no_grad():
        base[0].weight.copy_(model[0].base.weight)  # the base weights it was trained on
    same_model(td.load(folder, base), folder, expect["x"], expect["y"])
    with pytest.raises(td.CheckpointError, match=r"base tensors differ.*'0\.weight'"):
        td.load(folder, mlp())


def test_a_newer_format_is_refused_with_the_fix(tmp_path):
    shutil.copytree(FIXTURES / "v2_tied", tmp_path / "v9")
    recipe = json.loads((tmp_path / "v9" / "recipe.json").read_text())
    recipe["format_version"] = 9
    (tmp_path / "v9" / "recipe.json").write_text(json.dumps(recipe))
    with pytest.raises(td.CheckpointError, match="format version 9, newer.*upgrade torch-dendrites"):
        td.load(tmp_path / "v9", Tied())
