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
    if sign and isinstance(recipe, dict) and recipe.get("format_version", 0) >= 2:
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
