"""Kill a training run with SIGKILL at several points (also mid-checkpoint); the resumed run must end
exactly where an uninterrupted one does, and no checkpoint may ever be unreadable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torch_dendrites as td

SCRIPT = Path(__file__).with_name("crash_train.py")


def run(out_dir, crash=None):
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    env.pop("TD_CRASH", None)
    if crash:
        env["TD_CRASH"] = crash
    return subprocess.run([sys.executable, str(SCRIPT), str(out_dir)], env=env, capture_output=True, text=True)


def fresh_model():
    return torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Dropout(0.1), torch.nn.Linear(4, 2))


def final_state(out_dir):
    model = fresh_model()
    ctl = td.GrowthController(td.add_dendrites(fresh_model()), td.GrowthConfig(mode="never"))
    td.remove_dendrites(ctl.model)
    td.load(Path(out_dir) / "final", model, ctl)
    return model.state_dict(), ctl.history, {n: m.num_dendrites for n, m in td.dendritic_layers(model).items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    proc = run(out)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert not info["resumed"]
    state, history, counts = final_state(out)
    assert history[2]["event"] == "grow"  # the run does grow (fixed phases: at epoch 3)
    return state, history, counts


# One crash point runs by default (killed between a swap's two renames); the others with `make test-all`.
_slow = pytest.mark.slow


@pytest.mark.parametrize(
    "crash",
    [
        "swap:6",
        pytest.param("epoch:3", marks=_slow),
        pytest.param("epoch:9", marks=_slow),
        pytest.param("write:4", marks=_slow),
        pytest.param("write:10", marks=_slow),
        pytest.param("write:17", marks=_slow),
        pytest.param("swap:13", marks=_slow),
    ],
)
def test_killed_run_resumes_to_the_same_result(tmp_path, reference, crash):
    proc = run(tmp_path, crash)
    assert proc.returncode == -9, (proc.returncode, proc.stderr[-2000:])
    # Whatever is on disk now must load: the latest checkpoint (or its previous copy) and best/.
    present = {}
    for name in ("latest", "best"):
        try:
            where = td.persistence._resolve(tmp_path / name)  # the folder, or the copy a swap left beside it
        except td.CheckpointError:
            where = None
        present[name] = where is not None
        if present[name]:
            td.load(tmp_path / name, fresh_model())
    assert present["best"]  # every crash point lies after the first epoch's best/ was written
    if crash == "swap:6":  # killed between a swap's two renames: only the previous copy is left
        assert not (tmp_path / "latest").exists()
        assert td.persistence._resolve(tmp_path / "latest").name.endswith(".old")
    proc = run(tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["resumed"] is present["latest"]
    state, history, counts = final_state(tmp_path)
    ref_state, ref_history, ref_counts = reference
    assert counts == ref_counts
    assert history == ref_history
    assert state.keys() == ref_state.keys()
    assert all(torch.equal(state[k], ref_state[k]) for k in ref_state)
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == ["architectures.csv", "best", "final", "growth.png", "history.csv", "latest"]
