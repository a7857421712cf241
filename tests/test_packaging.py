"""The package as users get it: a wheel built offline, installed alone into a fresh environment."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_repository_files():
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()
    assert (ROOT / "src" / "torch_dendrites" / "py.typed").is_file()
    assert (ROOT / "CHANGELOG.md").read_text().startswith("# Changelog")
    assert "cff-version:" in (ROOT / "CITATION.cff").read_text()


@pytest.mark.slow
def test_wheel_installs_and_imports_in_a_fresh_environment(tmp_path):
    dist = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(dist),
         str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = dist.glob("torch_dendrites-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "torch_dendrites/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    assert not any(n.startswith(("tests/", "benchmarks/", "examples/")) for n in names)

    # A fresh venv holding only the wheel; torch, numpy, safetensors and matplotlib come from this environment
    # (appended to sys.path, so the editable install of the source tree is not visible).
    env_dir = tmp_path / "env"
    venv.create(env_dir, with_pip=False)
    py = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True
    ).stdout.strip()
    inst = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", purelib, str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert inst.returncode == 0, inst.stderr[-2000:]
    Path(purelib, "parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    code = (
        "import torch, torch_dendrites as td; "
        "net = td.add_dendrites(torch.nn.Sequential(torch.nn.Linear(3, 2))); td.grow(net); "
        "print(td.__file__); print(td.__version__)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([str(py), "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    where, version = res.stdout.split()
    assert Path(where).resolve().is_relative_to(Path(purelib).resolve())  # the wheel's copy, not the source tree
    assert version == "0.1.0"
