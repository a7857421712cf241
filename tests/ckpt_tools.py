"""Test helpers that edit checkpoint folders the way an attacker who knows the format would: after an
edit, ``resign`` recomputes the recipe's file hashes and checksum, so that the library's structural
checks (not only its integrity check) must catch the edit. Written independently of the library's code."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_recipe(folder) -> dict:
    return json.loads((Path(folder) / "recipe.json").read_text())


def write_recipe(folder, recipe: dict, sign: bool = True) -> None:
    folder = Path(folder)
    if sign and isinstance(recipe, dict) and "checksum" in recipe:  # format version 2 and later
        files = {}
        for p in sorted(folder.iterdir()):
            if p.name != "recipe.json":
                data = p.read_bytes()
                files[p.name] = {"bytes": len(data), "sha256": _sha(data)}
        recipe = dict(recipe, files=files)
        recipe.pop("checksum", None)
        canonical = json.dumps(recipe, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
        recipe["checksum"] = _sha(canonical)
    (folder / "recipe.json").write_text(json.dumps(recipe, indent=1))


def resign_base(recipe: dict) -> None:
    """Recompute the fingerprint hash of an adapter-sized recipe's ``base`` table after an edit of the table."""
    base = recipe.get("base")
    if isinstance(base, dict) and isinstance(base.get("tensors"), dict):
        canonical = json.dumps(base["tensors"], sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
        base["sha256"] = _sha(canonical)


def resign(folder) -> None:
    """Make the recipe's hashes and checksum agree with the folder's current files."""
    write_recipe(folder, read_recipe(folder))


def edit_recipe(folder, fn) -> None:
    recipe = read_recipe(folder)
    fn(recipe)
    write_recipe(folder, recipe)


def read_safetensors_header(path):
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def write_safetensors_raw(path, header: dict, body: bytes) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def save_id(folder) -> str:
    return read_recipe(folder)["save_id"]


def snapshot_files(root) -> dict:
    """Every file under ``root`` (recursively, links as their target text) with its bytes."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(root))] = ("link", str(p.readlink()))
        elif p.is_file():
            out[str(p.relative_to(root))] = p.read_bytes()
        elif p.is_dir():
            out[str(p.relative_to(root))] = "dir"
    return out


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")


def in_child(fn, *, timeout: float = 60.0, extra_address_space: int = None, file_size: int = None, user: int = None):
    """Run ``fn()`` in a forked child (cheap: torch is already imported) and return what happened as a
    dict: ``{"ok": True, "result": ...}`` or ``{"ok": False, "error": class name, "library": bool,
    "message": str}``, or ``{"timeout": True}`` / ``{"died": signal}``.

    ``extra_address_space`` caps the child's virtual memory at its size now plus that many bytes
    (``RLIMIT_AS``): an allocation beyond it fails instead of exhausting the machine. ``file_size`` caps
    the size of files it writes (``RLIMIT_FSIZE``, a full disk). ``user`` switches to that uid (root only).
    """
    import os
    import resource
    import select
    import signal
    import time

    import torch

    import torch_dendrites as td

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(r)
            # One intra-op thread in the child: a parallel region entered after fork can wait forever on the
            # parent's OpenMP pool (its threads do not exist here), which hung the child whenever the parent
            # ran with more than one thread.
            torch.set_num_threads(1)
            if extra_address_space is not None:
                limit = _vm_size() + extra_address_space
                resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            if file_size is not None:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
                resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
            if user is not None:
                os.setgid(user)
                os.setuid(user)
            out = {"ok": True, "result": fn()}
        except BaseException as exc:  # noqa: BLE001 - everything is reported to the parent
            out = {
                "ok": False,
                "error": type(exc).__name__,
                "library": isinstance(exc, td.DendriteError),
                "message": str(exc)[:3000],
            }
        try:
            data = json.dumps(out, default=repr).encode()
        except BaseException:  # noqa: BLE001
            data = b'{"ok": false, "error": "unreportable", "library": false, "message": ""}'
        view = memoryview(data)
        while view:
            view = view[os.write(w, view) :]
        os._exit(0)
    os.close(w)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return {"timeout": True}
            ready, _, _ = select.select([r], [], [], left)
            if ready:
                chunk = os.read(r, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
    finally:
        os.close(r)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return {"died": os.WTERMSIG(status)}
    return json.loads(b"".join(chunks) or b'{"ok": false, "error": "no report", "library": false, "message": ""}')
