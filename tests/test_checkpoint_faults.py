"""Faults during td.save: SIGKILL at every file step, a full disk, read-only destinations.

Each case overwrites a checkpoint A with a checkpoint B and fails part-way; afterwards td.load must give
A or B exactly (never a mix, never an error), and the next successful save must leave nothing behind
but the folder itself. Faults are injected through the library's I/O seam (``persistence.io``) in a
forked child, which is killed with SIGKILL where the fault hits. Every case runs on full folders and on
adapter-sized ones (``base_weights=False``: a frozen pretrained first layer left out).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import stat
import tempfile
from pathlib import Path

import pytest
import torch
from ckpt_tools import in_child, snapshot_files
from models import MLP

import torch_dendrites as td
from torch_dendrites.persistence import io

X = torch.linspace(-1, 1, 24).reshape(4, 6)
NAMES = ["plain", "exp[1]"]


def _pretrained():
    """The adapter-sized versions' base model: the same frozen fc1 at every call (as from_pretrained)."""
    torch.manual_seed(100)
    model = MLP()
    model.fc1.requires_grad_(False)
    return model


def _bundle(seed: int, dendrites: int, adapter: bool = False):
    """A model with a controller (with best weights), an Adam with state and a generator; ``adapter``: its
    frozen fc1 is left out of the saves."""
    base = _pretrained() if adapter else None
    torch.manual_seed(seed)
    model = td.add_dendrites(base if adapter else MLP())
    for _ in range(dendrites):
        td.grow(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    ctl = td.GrowthController(model, td.GrowthConfig(mode="never"))
    ctl.step(0.5)
    opt = torch.optim.Adam(model.parameters())
    model(X).sum().backward()
    opt.step()
    return model, ctl, opt, torch.Generator().manual_seed(seed), adapter


def _full_save(path, bundle):
    """A save with every file: model, controller and training state."""
    model, ctl, opt, gen, adapter = bundle
    return td.save(
        path, model, ctl, base_weights=not adapter, optimizer=opt, rng=True, generators={"g": gen}, extra={"k": 1}
    )


@pytest.fixture(scope="module", params=["full", "adapter"])
def versions(request):
    adapter = request.param == "adapter"
    out = {k: _bundle(seed, n, adapter) for k, seed, n in (("A", 0, 1), ("B", 1, 2), ("C", 2, 0))}
    with torch.no_grad():
        out["out"] = {k: out[k][0](X) for k in ("A", "B", "C")}
    out["base"] = _pretrained if adapter else MLP
    return out


class Recorder(io.FileSystem):
    def __init__(self):
        self.ops = []

    def before(self, op, name):
        self.ops.append((op, name))


class KillBefore(io.FileSystem):
    """SIGKILL just before the n-th operation that changes the disk."""

    def __init__(self, n):
        self.n, self.count = n, 0

    def before(self, op, name):
        self.count += 1
        if self.count == self.n:
            os.kill(os.getpid(), signal.SIGKILL)


class KillMidWrite(io.FileSystem):
    """SIGKILL after writing half of the n-th file."""

    def __init__(self, n):
        self.n, self.count = n, 0

    def write_file(self, name, data, dir_fd):
        self.count += 1
        if self.count == self.n:
            super().write_file(name, data[: len(data) // 2], dir_fd)
            os.kill(os.getpid(), signal.SIGKILL)
        super().write_file(name, data, dir_fd)


class Failing(io.FileSystem):
    """Raise ``OSError(code)`` at the n-th operation of kind ``op``."""

    def __init__(self, op, n, code):
        self.op, self.n, self.code, self.count = op, n, code, 0

    def before(self, op, name):
        if op == self.op:
            self.count += 1
            if self.count == self.n:
                raise OSError(self.code, os.strerror(self.code), name)


def _load_output(path, versions):
    with torch.no_grad():
        return td.load(path, versions["base"]())(X)


def _which(path, versions):
    out = _load_output(path, versions)
    hits = [k for k in ("A", "B") if torch.equal(out, versions["out"][k])]
    assert len(hits) == 1, "the folder loads as neither copy"
    return hits[0]


def _steps():
    """The operations of one full save over an existing copy (recorded once)."""
    d = Path(tempfile.mkdtemp())
    try:
        _full_save(d / "x", _bundle(0, 1))
        rec = Recorder()
        with io.use(rec):
            _full_save(d / "x", _bundle(1, 2))
        return rec.ops
    finally:
        shutil.rmtree(d)


def _crash_and_recover(tmp_path, name, versions, fs):
    parent = tmp_path / name.replace("[", "_").replace("]", "_")
    parent.mkdir()
    path = parent / name
    _full_save(path, versions["A"])

    def crash():
        with io.use(fs):
            _full_save(path, versions["B"])

    res = in_child(crash)
    got = _which(path, versions)  # loadable, and exactly one of the two copies
    _full_save(path, versions["C"])  # the next successful save cleans every leftover
    assert sorted(p.name for p in parent.iterdir()) == [name]
    assert torch.equal(_load_output(path, versions), versions["out"]["C"])
    return res, got


def test_kill_between_the_swap_renames(tmp_path, versions):
    """The representative crash point: the old copy is renamed away, the new one not yet in place."""
    ops = _steps()
    second_rename = [i for i, (op, _) in enumerate(ops) if op == "rename"][1] + 1
    for name in NAMES:
        res, got = _crash_and_recover(tmp_path, name, versions, KillBefore(second_rename))
        assert res == {"died": signal.SIGKILL} and got == "A"


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_kill_at_every_step_of_a_save(tmp_path, versions, name):
    ops = _steps()
    assert len(ops) >= 12, ops
    seen = []
    for n in range(1, len(ops) + 2):  # the last one: no kill at all
        sub = tmp_path / f"k{n}"
        sub.mkdir()
        res, got = _crash_and_recover(sub, name, versions, KillBefore(n))
        seen.append((ops[n - 1][0] if n <= len(ops) else "none", res.get("died"), got))
    commit = [i for i, (op, what) in enumerate(ops) if op == "rename" and what.startswith(".td-")][0]
    # before the new copy is renamed into place a load gives A, after it B
    assert all(g == "A" for _, _, g in seen[: commit + 1]) and all(g == "B" for _, _, g in seen[commit + 1 :])


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_kill_in_the_middle_of_every_file_write(tmp_path, versions, name):
    writes = sum(op == "write" for op, _ in _steps())
    assert writes == 6
    for n in range(1, writes + 1):
        sub = tmp_path / f"w{n}"
        sub.mkdir()
        res, got = _crash_and_recover(sub, name, versions, KillMidWrite(n))
        assert res == {"died": signal.SIGKILL} and got == "A"


@pytest.mark.parametrize("limit", [600, 3000, 20000])
def test_disk_full_keeps_the_previous_copy(tmp_path, versions, limit):
    """RLIMIT_FSIZE in a child: a write past `limit` bytes fails (EFBIG) at one file or another."""
    path = tmp_path / "exp[1]"
    _full_save(path, versions["A"])
    before = snapshot_files(tmp_path)
    res = in_child(lambda: _full_save(path, versions["B"]) and None, file_size=limit)
    assert not res["ok"] and res["error"] == "CheckpointError" and "full" in res["message"], res
    assert snapshot_files(tmp_path) == before  # nothing changed, nothing left behind
    assert _which(path, versions) == "A"


def test_disk_full_on_a_first_save_leaves_nothing(tmp_path, versions):
    path = tmp_path / "new" / "deeper" / "ck"
    res = in_child(lambda: _full_save(path, versions["B"]) and None, file_size=1000)
    assert res["error"] == "CheckpointError", res
    assert list(tmp_path.iterdir()) == []  # even the parent folders it created are gone


@pytest.mark.parametrize(
    "op,n,code",
    [
        ("mkdir", 1, errno.EROFS),
        ("write", 3, errno.EROFS),
        ("rename", 1, errno.EACCES),
        ("rename", 2, errno.EIO),
        ("lock", 1, errno.EROFS),
        ("fsync", 1, errno.EIO),
    ],
)
def test_io_errors_at_each_kind_of_step(tmp_path, versions, op, n, code):
    path = tmp_path / "c*"
    _full_save(path, versions["A"])
    before = snapshot_files(tmp_path)
    with io.use(Failing(op, n, code)), pytest.raises(td.CheckpointError, match=os.strerror(code)):
        _full_save(path, versions["B"])
    assert snapshot_files(tmp_path) == before
    assert _which(path, versions) == "A"


def test_read_only_destination(versions):
    """A folder the saving user cannot write to: a clear error, the previous copy untouched."""
    root = Path(tempfile.mkdtemp())
    try:
        os.chmod(root, 0o755)
        path = root / "ck"
        _full_save(path, versions["A"])
        before = snapshot_files(root)
        if os.geteuid() == 0:  # root writes anywhere: save as nobody instead
            user = 65534
        else:
            os.chmod(root, stat.S_IRUSR | stat.S_IXUSR)
            user = None
        res = in_child(lambda: _full_save(path, versions["B"]) and None, user=user)
        assert res["error"] == "CheckpointError" and "Permission denied" in res["message"], res
        os.chmod(root, 0o755)
        assert snapshot_files(root) == before
        assert _which(path, versions) == "A"
        if user is not None:  # and a reader without write access can still load it
            res = in_child(lambda: _load_output(path, versions).tolist(), user=user)
            assert res["ok"] and torch.equal(torch.tensor(res["result"]), versions["out"]["A"]), res
    finally:
        os.chmod(root, 0o755)
        shutil.rmtree(root)
