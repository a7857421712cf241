"""Time and peak memory of the library's whole-model operations as models grow: ``add_dendrites``, ``grow``,
``td.save`` (full and adapter-sized), ``td.load`` into a freshly built model, and the same plan/wrap/grow on the
``meta`` device (nothing allocated) followed by ``to_empty`` and a load.

Models are built from configs (no weights are downloaded): GPT-2-124M (``GPT2Config()``) and a Llama-shaped
model of about 1B parameters (Llama-3.2-1B's shape with a 32k vocabulary). Weights are drawn with ``normal_`` on
a model materialised from ``meta`` (Hugging Face's own initialisation of 1B parameters would dominate the time
and is not what is measured).

Peak memory: the process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` before each
operation) minus its resident set before the operation, in units of the wrapped layers' weights (``copies``):
an operation that stays at or below 1.0 holds at most one extra copy of them. Linux only.

Run: ``python -m benchmarks.scaling`` (writes ``benchmarks/results/scaling.md``), or ``--models gpt2-124m`` for
the small one alone.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
from torch import nn

import torch_dendrites as td

RESULTS = Path(__file__).resolve().parent / "results"


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config())


def _llama_1b() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=32_000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


MODELS: Dict[str, Callable[[], nn.Module]] = {"gpt2-124m": _gpt2, "llama-1b": _llama_1b}


def _status(field: str) -> int:
    """A size field of ``/proc/self/status`` (``VmRSS``: resident now, ``VmHWM``: peak), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


_LIBC = ctypes.CDLL(None)


def measure(fn: Callable[[], object]) -> tuple:
    """``(result, seconds, peak bytes above the resident set before the call)``. Freed memory is handed back
    to the system first (``malloc_trim``), so that an operation cannot hide its peak in memory an earlier one
    left in the allocator's free lists."""
    gc.collect()
    _LIBC.malloc_trim(0)
    _reset_peak()
    before = _status("VmRSS")
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    return out, seconds, max(0, _status("VmHWM") - before)


def build_materialised(name: str, seed: int = 0) -> nn.Module:
    """The model built on ``meta``, then materialised on the CPU and filled with small random weights."""
    with torch.device("meta"):
        model = MODELS[name]()
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=g)
    return model


def wrapped_weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights of the layers ``add_dendrites`` wraps (what one dendrite set copies)."""
    total = 0
    for t in td.plan(model).targets:
        weight = getattr(model.get_submodule(t.name), "weight", None)
        if isinstance(weight, torch.Tensor):
            total += weight.numel() * 4  # fp32, as the models are built (meta tensors report it too)
    return total


def run_model(name: str, work: Path) -> List[dict]:
    rows: List[dict] = []

    def row(op: str, seconds: float, peak: int, unit: int, note: str = "") -> None:
        rows.append({"model": name, "op": op, "s": seconds, "peak": peak, "copies": peak / unit, "note": note})
        print(f"{name:10s} {op:34s} {seconds:8.2f} s  peak +{peak / 2**30:6.2f} GiB  {peak / unit:5.2f} copies",
              flush=True)  # fmt: skip

    # On meta: plan, wrap and grow allocate nothing.
    with torch.device("meta"):
        meta_model = MODELS[name]()
    n_base = sum(p.numel() for p in meta_model.parameters())
    unit = wrapped_weight_bytes(meta_model)
    _, s, peak = measure(lambda: td.add_dendrites(meta_model))
    row("add_dendrites (meta)", s, peak, unit)
    _, s, peak = measure(lambda: td.grow(meta_model, torch.Generator().manual_seed(0)))
    row("grow (meta)", s, peak, unit)
    n_grown = sum(p.numel() for p in meta_model.parameters())
    meta_model = None

    model, s, peak = measure(lambda: build_materialised(name))
    row("build (meta, to_empty, normal_)", s, peak, unit, "the base model itself")
    _, s, peak = measure(lambda: td.add_dendrites(model))
    row("add_dendrites", s, peak, unit)
    _, s, peak = measure(lambda: td.grow(model, torch.Generator().manual_seed(0)))
    row("grow (1 set)", s, peak, unit, "the new set itself is one copy")
    # Freeze the base (a LoRA-like fine-tune of the dendrites only) so the adapter-sized save has something to
    # leave out.
    full, adapter = work / f"{name}-full", work / f"{name}-adapter"
    _, s, peak = measure(lambda: td.save(full, model))
    row("td.save (full)", s, peak, unit)
    dendrite_ids = {id(p) for layer in td.dendritic_layers(model).values() for p in layer.dendrite_parameters()}
    for p in model.parameters():
        if id(p) not in dendrite_ids:
            p.requires_grad_(False)
    _, s, peak = measure(lambda: td.save(adapter, model, base_weights=False))
    row("td.save (adapter-sized)", s, peak, unit)
    model = None  # noqa: F841 - frees the model before the load below
    gc.collect()

    # Load into a freshly built model: materialised from meta (to_empty) and zeroed, so that its own memory is
    # resident before the load (untouched pages of to_empty would count as the load's).
    def fresh():
        with torch.device("meta"):
            m = MODELS[name]()
        m.to_empty(device="cpu")
        with torch.no_grad():
            for t in list(m.parameters()) + list(m.buffers()):
                t.zero_()
        return m

    target, _, _ = measure(fresh)
    _, s, peak = measure(lambda: td.load(full, target))
    row(
        "td.load (full)",
        s,
        peak,
        unit,
        "the new set; the file is hashed, then read again in 64 MiB batches; the base values it overwrites are "
        "kept for a rollback in a temporary file (beyond 256 MiB; in memory below)",
    )
    target = None  # noqa: F841
    gc.collect()
    # An adapter-sized folder loads into the same pretrained base (here: the same seeded weights).
    target, _, _ = measure(lambda: build_materialised(name))
    _, s, peak = measure(lambda: td.load(adapter, target))
    row("td.load (adapter-sized)", s, peak, unit, "the new set; base weights checked against the saved fingerprint")
    target = None  # noqa: F841
    gc.collect()
    sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in (full, adapter)}
    rows.append({"model": name, "params": n_base, "params_grown": n_grown, "unit": unit, "sizes": sizes})
    shutil.rmtree(full, ignore_errors=True)
    shutil.rmtree(adapter, ignore_errors=True)
    return rows


def table(rows: List[dict]) -> str:
    lines = [
        "# Scaling: whole-model operations on config-built models",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), fp32, CPU. Peak: the process's peak "
        "resident memory during the operation above its resident memory before it; copies: that peak in units "
        "of the wrapped layers' weights (one dendrite set of the default type is one copy). Generated by "
        "`python -m benchmarks.scaling`.",
        "",
    ]
    for info in (r for r in rows if "unit" in r):
        name = info["model"]
        lines += [
            f"## {name}: {info['params'] / 1e6:,.0f}M parameters, wrapped weights "
            f"{info['unit'] / 2**30:.2f} GiB; {info['params_grown'] / 1e6:,.0f}M with one dendrite set",
            "",
            "| operation | seconds | peak above before (GiB) | copies of the wrapped weights | note |",
            "|---|---:|---:|---:|---|",
        ]
        for r in rows:
            if r.get("model") == name and "op" in r:
                gib = r["peak"] / 2**30
                lines.append(f"| {r['op']} | {r['s']:.2f} | {gib:.2f} | {r['copies']:.2f} | {r['note']} |")
        sizes = info["sizes"]
        lines += [
            "",
            f"Folder sizes: full {sizes[name + '-full'] / 2**30:.2f} GiB, adapter-sized "
            f"{sizes[name + '-adapter'] / 2**30:.2f} GiB.",
            "",
        ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--out", type=Path, default=RESULTS / "scaling.md")
    ap.add_argument("--work", type=Path, default=None, help="folder for the checkpoints (default: a temp folder)")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, int(os.environ.get("BENCH_THREADS", "1"))))
    work = Path(tempfile.mkdtemp(prefix="td-scaling-")) if args.work is None else args.work
    work.mkdir(parents=True, exist_ok=True)
    rows: List[dict] = []
    for name in args.models.split(","):
        rows += run_model(name, work)
    text = table(rows)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
