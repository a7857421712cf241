"""One codec for "JSON with tensors", used for the model, controller, optimizer, RNG and generator states.

A value is split into a JSON document and a flat dict of tensors: a tensor becomes
``{"__tensor__": key}`` (tensors sharing storage are stored once), a non-finite float
``{"__float__": "nan" | "inf" | "-inf"}``, a dict that could be mistaken for one of these markers
``{"__dict__": {...}}``; tuples become lists, int dict keys become strings. The tensors go into a
safetensors file whose ``__metadata__`` carries the save id.

Reading is bounded before anything is allocated: JSON files have a size limit, a nesting limit, no
duplicate keys, no ``NaN`` literals and no integers longer than 40 digits; a safetensors header is parsed
here (not by the library), and every entry must have a known dtype, a sane shape and a byte range that
tiles the data section exactly, so that sizes can be checked against the model before any data is read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Mapping, Tuple

import torch
from safetensors.torch import load as safetensors_load

from ..errors import CheckpointError

__all__ = [
    "DTYPES",
    "Entry",
    "Header",
    "Packer",
    "dtype_name",
    "dumps",
    "loads",
    "read_header",
    "hash_data",
    "iter_data",
    "read_data",
    "safetensors_bytes",
    "TensorFile",
    "unpack",
]

MAX_JSON_BYTES = 64 * 1024 * 1024
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
MAX_ENTRIES = 1_000_000
MAX_DEPTH = 64
MAX_INT_DIGITS = 40
MAX_DIMS = 16

DTYPES: Dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}
for _name, _attr in (
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
_MARKERS = ("__tensor__", "__float__", "__dict__")
_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def dtype_name(dtype: torch.dtype, key: str) -> str:
    """The safetensors name of ``dtype`` (of the tensor ``key``), or a CheckpointError if it has none."""
    if dtype not in _NAMES:
        raise CheckpointError(f"the tensor {key!r} has dtype {dtype}, which a safetensors file cannot hold.")
    return _NAMES[dtype]


# ---------------------------------------------------------------------- encoding
class Packer:
    """Collects the tensors of one file: ``key(t, wanted)`` stores ``t`` once per storage view and returns
    the key it is stored under; ``encode(obj)`` turns a nested value into JSON with tensor references."""

    def __init__(self) -> None:
        self.tensors: Dict[str, torch.Tensor] = {}
        self._views: Dict[tuple, str] = {}
        self._storages: Dict[tuple, str] = {}

    def key(self, t: torch.Tensor, wanted: str) -> str:
        view = (
            t.device,
            t.untyped_storage().data_ptr(),
            t.storage_offset(),
            tuple(t.shape),
            tuple(t.stride()),
            t.dtype,
        )
        if t.numel() and view in self._views:
            return self._views[view]
        key, n = wanted, 1
        while key in self.tensors:
            key, n = f"{wanted}#{n}", n + 1
        self._views[view] = key
        data = t.detach().contiguous().cpu()
        # safetensors refuses shared storage: distinct views of one storage (slices) are stored separately.
        storage = (data.device, data.untyped_storage().data_ptr())
        if data.numel() and storage in self._storages:
            data = data.clone()
        self._storages[(data.device, data.untyped_storage().data_ptr())] = key
        self.tensors[key] = data
        return key

    def encode(self, obj: Any, where: str) -> Any:
        if isinstance(obj, torch.Tensor):
            return {"__tensor__": self.key(obj, where)}
        if isinstance(obj, dict):
            out = {}
            for k, v in obj.items():
                if isinstance(k, bool) or not isinstance(k, (str, int)):
                    raise CheckpointError(f"{where} has a key {k!r} of type {type(k).__name__}; JSON keys are strings.")
                out[str(k)] = self.encode(v, f"{where}.{k}")
            if len(out) == 1 and next(iter(out)) in _MARKERS:
                return {"__dict__": out}
            return out
        if isinstance(obj, (list, tuple)):
            return [self.encode(v, f"{where}.{i}") for i, v in enumerate(obj)]
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, int):
            if len(str(abs(obj))) > MAX_INT_DIGITS:
                raise CheckpointError(f"{where}={obj} has more than {MAX_INT_DIGITS} digits; it cannot be saved.")
            return obj
        if isinstance(obj, float):
            return obj if math.isfinite(obj) else {"__float__": repr(obj)}
        raise CheckpointError(f"{where} holds a {type(obj).__name__}, which cannot be saved as JSON.")


def pack_state(state: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """A flat state dict as (stored tensors, aliases): tied tensors are stored once, under their first key."""
    packer, aliases = Packer(), {}
    for k, t in state.items():
        key = packer.key(t, k)
        if key != k:
            aliases[k] = key
    return packer.tensors, aliases


def dumps(doc: Any) -> bytes:
    return json.dumps(doc, indent=1, sort_keys=True, allow_nan=False, ensure_ascii=True).encode("ascii")


def canonical(doc: Any) -> bytes:
    """The bytes a JSON value is hashed as (key order and spacing do not count)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=True).encode("ascii")


def sha256(data) -> str:
    if isinstance(data, TensorFile):
        return data.sha256()
    return hashlib.sha256(data).hexdigest()


def raw_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without copying them."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class TensorFile:
    """A safetensors file to be written, never built in memory: its header, then each tensor's own bytes.

    ``safetensors.torch.save`` makes two whole copies of the data (one ``bytes`` per tensor, then the file's),
    which for a large model is twice the model's size on top of the model (``benchmarks/results/scaling.md``).
    This writes the same format (8-byte little-endian header length, a JSON header padded with spaces to 8
    bytes, the tensors' bytes in header order, largest items first so every tensor stays aligned) straight from
    the tensors' memory. ``len()``, :meth:`chunks` and :meth:`sha256` stream; ``bytes(f)`` and slicing build the
    whole file (tests only).

    Args:
        tensors: contiguous CPU tensors by key (as :func:`pack_state` returns them), not sharing storage.
        metadata: the ``__metadata__`` strings.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]):
        order = sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0]))
        header: Dict[str, Any] = {"__metadata__": dict(metadata)}
        pos = 0
        for key, t in order:
            if t.device.type != "cpu" or not t.is_contiguous():
                raise CheckpointError(f"the tensor {key!r} is not a contiguous CPU tensor; it cannot be written as is.")
            n = t.numel() * t.element_size()
            header[key] = {"dtype": dtype_name(t.dtype, key), "shape": list(t.shape), "data_offsets": [pos, pos + n]}
            pos += n
        text = json.dumps(header, separators=(",", ":"), allow_nan=False, ensure_ascii=True).encode("ascii")
        text += b" " * (-len(text) % 8)
        self._head = struct.pack("<Q", len(text)) + text
        self._tensors = [t for _, t in order if t.numel()]
        self._size = len(self._head) + pos

    def __len__(self) -> int:
        return self._size

    def chunks(self) -> Iterator[memoryview]:
        """The file's bytes in pieces: the header, then one view per tensor (no copies)."""
        yield memoryview(self._head)
        for t in self._tensors:
            yield raw_bytes(t)

    def sha256(self) -> str:
        h = hashlib.sha256()
        for chunk in self.chunks():
            h.update(chunk)
        return h.hexdigest()

    def __bytes__(self) -> bytes:
        return b"".join(bytes(c) for c in self.chunks())

    def __getitem__(self, index: slice) -> bytes:
        return bytes(self)[index]


def safetensors_bytes(tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> TensorFile:
    """The safetensors file of ``tensors`` as a :class:`TensorFile` (written and hashed without a copy)."""
    return TensorFile(tensors, metadata)


# ---------------------------------------------------------------------- decoding JSON
def _no_constants(name: str):
    raise ValueError(f"the literal {name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:20]} is out of range")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits")
    return int(text)


def _unique_keys(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"the key {k[:40]!r} appears twice in one object")
        out[k] = v
    return out


def _depth(doc: Any) -> int:
    deepest, stack = 0, [(doc, 1)]
    while stack:
        node, d = stack.pop()
        deepest = max(deepest, d)
        if isinstance(node, dict):
            stack.extend((v, d + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, d + 1) for v in node)
    return deepest


def loads(data: bytes, where: object) -> Any:
    """Parse JSON written by :func:`dumps`, refusing anything it would not have written."""
    if len(data) > MAX_JSON_BYTES:
        raise CheckpointError(f"{where} is larger than {MAX_JSON_BYTES} bytes; refusing to read it.")
    try:
        text = data.decode("utf-8")
        doc = json.loads(
            text,
            parse_constant=_no_constants,
            parse_float=_finite,
            parse_int=_bounded_int,
            object_pairs_hook=_unique_keys,
        )
    except RecursionError:
        raise CheckpointError(f"{where} is nested too deeply; the file is corrupted or hostile.") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{where} is not valid JSON ({exc}); the file is corrupted or was replaced.") from None
    if _depth(doc) > MAX_DEPTH:
        raise CheckpointError(f"{where} is nested more than {MAX_DEPTH} levels deep; the file is corrupted or hostile.")
    return doc


def unpack(doc: Any, lookup: Callable[[str], Any], where: str) -> Any:
    """The inverse of :meth:`Packer.encode`: references become ``lookup(key)``."""
    if isinstance(doc, list):
        return [unpack(v, lookup, f"{where}.{i}") for i, v in enumerate(doc)]
    if not isinstance(doc, dict):
        return doc
    if len(doc) == 1:
        ((marker, value),) = doc.items()
        if marker == "__tensor__":
            if not isinstance(value, str):
                raise CheckpointError(f"{where}: a tensor reference is not a string.")
            return lookup(value)
        if marker == "__float__":
            if value not in ("nan", "inf", "-inf"):
                raise CheckpointError(f"{where}: {value!r} is not a non-finite float.")
            return float(value)
        if marker == "__dict__":
            if not isinstance(value, dict):
                raise CheckpointError(f"{where}: an escaped dict is not an object.")
            return {k: unpack(v, lookup, f"{where}.{k}") for k, v in value.items()}
        if marker.startswith("__") and marker.endswith("__"):
            raise CheckpointError(f"{where}: unknown marker {marker!r}; the file is corrupted or newer.")
    return {k: unpack(v, lookup, f"{where}.{k}") for k, v in doc.items()}


# ---------------------------------------------------------------------- safetensors
@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors header: what it is, without its data."""

    dtype: torch.dtype
    shape: Tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass
class Header:
    entries: Dict[str, Entry]
    metadata: Dict[str, str]
    raw: bytes  # the 8-byte length and the header, as read (hashed with the data)
    data_size: int


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _naturals(xs: Any) -> bool:
    return isinstance(xs, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in xs)


def read_header(fs, fd: int, where: object) -> Header:
    """Parse and check a safetensors header read through ``fd`` (no tensor data is read)."""
    size = os.fstat(fd).st_size
    head = fs.read_at(fd, 0, 8)
    if len(head) < 8:
        raise CheckpointError(f"{where} is truncated (shorter than a safetensors header).")
    (n,) = struct.unpack("<Q", head)
    if n > min(MAX_HEADER_BYTES, size - 8):
        raise CheckpointError(
            f"{where} declares a {n}-byte header in a {size}-byte file; the file is truncated or corrupted."
        )
    raw = fs.read_at(fd, 8, n)
    if len(raw) != n:
        raise CheckpointError(f"{where} is truncated inside its header.")
    doc = loads(bytes(raw).rstrip(b" "), where)
    if not isinstance(doc, dict):
        raise CheckpointError(f"{where}: the safetensors header is not an object.")
    meta = doc.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{where}: the safetensors __metadata__ is not a mapping of strings.")
    if len(doc) > MAX_ENTRIES:
        raise CheckpointError(f"{where} lists {len(doc)} tensors, more than {MAX_ENTRIES}.")
    entries = {}
    for key, e in doc.items():
        bad = f"{where}: the header entry {key[:80]!r}"
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{bad} is malformed.")
        if e["dtype"] not in DTYPES:
            raise CheckpointError(f"{bad} has the unknown dtype {e['dtype']!r}.")
        shape, offsets = e["shape"], e["data_offsets"]
        if not _naturals(shape) or len(shape) > MAX_DIMS or not _naturals(offsets) or len(offsets) != 2:
            raise CheckpointError(f"{bad} has a malformed shape or byte range.")
        dtype = DTYPES[e["dtype"]]
        if offsets[1] - offsets[0] != math.prod(shape) * _itemsize(dtype):
            raise CheckpointError(f"{bad}: shape {shape} does not fit its byte range {offsets}.")
        entries[key] = Entry(dtype, tuple(shape), offsets[0], offsets[1])
    data_size = size - 8 - n
    # The byte ranges must tile the data section exactly (no holes, no overlaps, nothing after).
    pos = 0
    for e in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if e.begin != pos:
            raise CheckpointError(f"{where}: the tensors' byte ranges overlap or leave holes; the file is corrupted.")
        pos = e.end
    if pos != data_size:
        raise CheckpointError(
            f"{where}: the header describes {pos} bytes of tensor data, the file holds {data_size}; it is truncated "
            "or corrupted."
        )
    return Header(entries, meta, bytes(head) + bytes(raw), data_size)


def _tensor(buf: bytearray, e: Entry, key: str, where: object) -> torch.Tensor:
    """The tensor of one header entry over ``buf``, its bytes alone (shared, not copied)."""
    if e.dtype == torch.bool and torch.frombuffer(buf, dtype=torch.uint8).gt(1).any():
        raise CheckpointError(f"{where}: the bool tensor {key!r} holds bytes other than 0 and 1.")
    t = torch.frombuffer(buf, dtype=e.dtype).view(e.shape)
    if t.data_ptr() % _itemsize(e.dtype):  # pragma: no cover - allocators align far more than any item size
        t = t.clone()
    return t


def _check_end(fs, fd: int, header: Header, where: object) -> None:
    if fs.read_at(fd, len(header.raw) + header.data_size, 1):
        raise CheckpointError(f"{where} changed size while it was read.")


def iter_data(fs, fd: int, header: Header, where: object, h: Any) -> Iterator[Tuple[str, torch.Tensor]]:
    """The tensors of a checked header in file order, read through ``fd`` one at a time, each in storage of its
    own (a caller that keeps some and drops the others frees what it drops). Every byte read goes into the
    hash object ``h`` (which the caller started with ``header.raw``); after the last tensor the file must end
    where the header says."""
    if sys.byteorder != "little":  # pragma: no cover - safetensors data is little-endian
        buf = fs.read_at(fd, len(header.raw), header.data_size)
        h.update(buf)
        _check_end(fs, fd, header, where)
        yield from safetensors_load(bytes(header.raw) + bytes(buf)).items()
        return
    start = len(header.raw)
    for key, e in sorted(header.entries.items(), key=lambda kv: kv[1].begin):
        if e.nbytes == 0:
            yield key, torch.empty(e.shape, dtype=e.dtype)
            continue
        buf = fs.read_at(fd, start + e.begin, e.nbytes)
        if len(buf) != e.nbytes:
            raise CheckpointError(f"{where} changed size while it was read.")
        h.update(buf)
        yield key, _tensor(buf, e, key, where)
    _check_end(fs, fd, header, where)


def hash_data(fs, fd: int, header: Header, where: object) -> str:
    """The SHA-256 of a file with a checked header, its data read a bounded chunk at a time and not kept."""
    h = hashlib.sha256(header.raw)
    start, chunk = len(header.raw), 1 << 26
    for offset in range(0, header.data_size, chunk):
        n = min(chunk, header.data_size - offset)
        buf = fs.read_at(fd, start + offset, n)
        if len(buf) != n:
            raise CheckpointError(f"{where} changed size while it was read.")
        h.update(buf)
    _check_end(fs, fd, header, where)
    return h.hexdigest()


def read_data(fs, fd: int, header: Header, where: object) -> Tuple[Dict[str, torch.Tensor], str]:
    """The tensors of a checked header and the SHA-256 of the whole file, read through ``fd``."""
    h = hashlib.sha256(header.raw)
    out = dict(iter_data(fs, fd, header, where, h))
    return out, h.hexdigest()
