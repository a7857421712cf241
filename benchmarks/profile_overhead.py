"""Where the time above the FLOP ideal goes: a profile of the training steps that ``overhead.py`` times.

``overhead.py`` compares each variant's step time with the FLOP-ideal ratio, the step's FLOPs counted by
``torch.utils.flop_counter`` relative to plain. That counter counts matrix products and convolutions only, so
the ideal leaves out the elementwise work a dendrite adds (its activation, the per-neuron gains, the cascade's
sums, their backward passes) and the optimizer's per-parameter work. This script profiles the same steps
(``torch.profiler``, self CPU time per operator, one thread) and splits each step into GEMM/convolution time
and everything else, each relative to the plain model's, beside the FLOP ideal: where the GEMM ratio stays at or
below the ideal and the rest runs above it, the gap is the elementwise work the counter does not see.

Run: ``python -m benchmarks.profile_overhead`` (writes ``benchmarks/results/profile_overhead.md``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from benchmarks import timing
from benchmarks.overhead import (
    VARIANTS,
    TokenStack,
    build_variant,
    kernel_note,
    make_step,
    step_flops,
    variants,
    workload,
)
from torch_dendrites.dendrites.kernel import KERNELS, CascadeKernel

RESULTS = Path(__file__).resolve().parent / "results"
GEMM = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear")


def is_gemm(op: str) -> bool:
    """Matrix products and convolutions: the operators the FLOP counter counts."""
    return op in GEMM or "conv" in op


def split(step, steps: int, warmup: int = 3) -> Tuple[float, float, Dict[str, float]]:
    """``(gemm_ms, other_ms, other_ops)`` per step: self CPU time of the profiled steps, by operator."""
    for _ in range(warmup):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    gemm, other, ops = 0.0, 0.0, {}
    for e in prof.key_averages():
        ms = e.self_cpu_time_total / 1e3 / steps
        if is_gemm(e.key):
            gemm += ms
        else:
            other += ms
            key = "compiled kernel (inductor)" if "CompiledFxGraph" in e.key else e.key  # one name per graph hash
            ops[key] = ops.get(key, 0.0) + ms
    return gemm, other, ops


def profile_model(model: str, steps: int, repeats: int, kernel: str = "auto") -> List[dict]:
    name, base, x, y, loss_fn = workload(model, torch.device("cpu"))
    models = variants(base, kernel)
    flops = {k: step_flops(m, x, y, loss_fn) for k, m in models.items()}
    rows = []
    per: Dict[str, List[Tuple[float, float, Dict[str, float]]]] = {k: [] for k in models}
    for _ in range(repeats):  # interleaved over the variants, so that a load change hits them all
        for k, m in models.items():
            per[k].append(split(make_step(m, x, y, loss_fn), steps))
    med = {}
    for k, runs in per.items():
        gemm = sorted(r[0] for r in runs)[len(runs) // 2]
        other = sorted(r[1] for r in runs)[len(runs) // 2]
        med[k] = (gemm, other, runs[len(runs) // 2][2])
    g0, o0, ops0 = med["plain"]
    for k, (g, o, ops) in med.items():
        if k == "plain":
            continue
        extra = sorted(((ms - ops0.get(op, 0.0), op) for op, ms in ops.items()), reverse=True)[:4]
        rows.append({
            "model": name, "variant": k, "ideal": flops[k] / flops["plain"], "total": (g + o) / (g0 + o0),
            "gemm": g / g0, "other": o / o0, "other_share": o / (g + o), "plain_other_share": o0 / (g0 + o0),
            "top": ", ".join(f"{op.replace('aten::', '')} +{ms:.2f} ms" for ms, op in extra if ms > 0),
        })  # fmt: skip
    return rows


def fixed_costs(rounds: int = 15, steps: int = 20) -> Tuple[Dict[Tuple[str, str], float], float]:
    """What a step costs beyond its arithmetic: the Linear stack's layers at width 8 (batch 1 x 2 tokens), where
    the matrix products and elementwise passes take next to nothing, so a step's time is the cost of its calls
    (Python, dispatch, autograd nodes). Returns ``{(kernel, variant): ms per step above plain}`` and the
    full-width plain step's milliseconds (unprofiled), to set them against."""
    torch.manual_seed(0)
    base, x, y = TokenStack(d=8), torch.randn(1, 2, 8), torch.randn(1, 2, 8)
    fns = {("", "plain"): make_step(build_variant(base, "plain"), x, y, F.mse_loss)}
    for kernel in ("eager", "compiled"):
        for name in VARIANTS:
            fns[(kernel, name)] = make_step(build_variant(base, name, kernel), x, y, F.mse_loss)
    med = timing.interleaved(fns, rounds, steps)
    plain = med.pop(("", "plain"))
    _, full, fx, fy, loss_fn = workload("tokens", torch.device("cpu"))
    full_plain = timing.interleaved({"plain": make_step(full, fx, fy, loss_fn)}, 5, 5)["plain"]
    return {key: (t - plain) * 1e3 for key, t in med.items()}, full_plain * 1e3


def fixed_table(costs: Dict[Tuple[str, str], float], full_plain_ms: float, ideals: Dict[str, float]) -> List[str]:
    lines = [
        "",
        "## Fixed costs: what a step pays beyond its arithmetic",
        "",
        "The Linear stack's four layers at width 8 (batch 1 x 2 tokens), where arithmetic takes next to nothing: "
        "each variant's step time above the plain model's is the cost of its calls (Python, dispatch, autograd "
        f"nodes), which no FLOP count sees. Set against the full-width variant's ideal step (FLOP ideal x the plain "
        f"step, {full_plain_ms:.1f} ms here unprofiled), it is the part of `time / ideal - 1` that comes from calls "
        "rather than from the elementwise passes above.",
        "",
        "| variant | eager kernel: ms per step | share of the ideal step | compiled kernel: ms per step "
        "| share of the ideal step |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in VARIANTS:
        ideal_ms = ideals[name] * full_plain_ms
        e, c = costs[("eager", name)], costs[("compiled", name)]
        lines.append(f"| {name} | {e:.2f} | {100 * e / ideal_ms:.1f} % | {c:.2f} | {100 * c / ideal_ms:.1f} % |")
    return lines


def cascade_bytes(k: int, n: int, c: int) -> int:
    """The fewest bytes one training step's cascade over ``k`` dendrites of ``[n, c]`` can move in fp32: the
    forward reads the pre-activations (``k`` tensors of ``[n, c]``) and the layer output, writes the new output
    and the activations it keeps for the backward; the backward reads the output's gradient and those
    activations and writes the pre-activations' gradient (the gain reductions can ride along). ``4k + 3``
    tensors of ``[n, c]``."""
    return (4 * k + 3) * n * c * 4


def _cascade_and_copy(k: int, n: int, c: int, g: torch.Generator) -> Tuple[Dict[str, object], str]:
    """Step functions: one layer's cascade forward and backward, and a copy of its fewest bytes; and the kernel
    that the cascade runs."""
    a = torch.randn(n, k, c, generator=g).requires_grad_()
    y = torch.randn(n, c, generator=g).requires_grad_()
    v = (0.1 * torch.randn(k, c, generator=g)).requires_grad_()
    u = [(0.1 * torch.randn(i, c, generator=g)).requires_grad_() for i in range(1, k)]
    grad = torch.randn(n, c, generator=g)
    kernel = CascadeKernel("auto")
    src = torch.randn(cascade_bytes(k, n, c) // 8)  # a copy reads half the bytes and writes the other half
    dst = torch.empty_like(src)
    # The activation's own arithmetic, which no kernel avoids: the sigmoid of every pre-activation and its
    # backward (ATen's vectorised loops, into buffers that exist already).
    z, s, gs = torch.randn(n, k, c, generator=g), torch.empty(n, k, c), torch.empty(n, k, c)
    gz = torch.randn(n, k, c, generator=g)

    def activation():
        torch.sigmoid(z, out=s)
        torch.ops.aten.sigmoid_backward.grad_input(gz, s, grad_input=gs)

    def cascade():
        for t in (a, y, v, *u):
            t.grad = None
        kernel(a, y, v, 1, "sigmoid", False, u).backward(grad)

    fns = {"cascade": cascade, "copy": lambda: dst.copy_(src), "activation": activation}
    return fns, "compiled" if kernel.use_compiled(a) else "eager"


def bandwidth(ks=(1, 2, 3), n: int = 1024, c: int = 256, rounds: int = 15, steps: int = 5) -> List[dict]:
    """The cascade kernel alone (``"auto"``, as a layer of the Linear stack runs it: ``n`` = 16 x 64 tokens,
    ``c`` = 256 neurons), forward and backward, against a plain copy that moves its fewest bytes
    (:func:`cascade_bytes`), interleaved: how close the elementwise work that the FLOP count leaves out runs to
    the memory bandwidth of this thread."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for k in ks:
        fns, kernel = _cascade_and_copy(k, n, c, g)
        med = timing.interleaved(fns, rounds, steps)
        rows.append({"k": k, "kernel": kernel, "bytes": cascade_bytes(k, n, c),
                     "cascade_ms": med["cascade"] * 1e3, "copy_ms": med["copy"] * 1e3,
                     "activation_ms": med["activation"] * 1e3})  # fmt: skip
    return rows


def bandwidth_table(rows: List[dict], full_plain_ms: float, ideals: Dict[str, float], layers: int = 4) -> List[str]:
    lines = [
        "",
        "## The cascade against memory bandwidth",
        "",
        "One layer's cascade (the Linear stack's: 16 x 64 tokens, 256 neurons) alone, forward and backward, with the "
        "kernel `auto` picks, interleaved with a plain copy of the fewest bytes it can move "
        "(`cascade_bytes`: the pre-activations and output in, the activations out for the backward, the "
        "gradients back: 4k + 3 tensors of [1024, 256] in fp32) and with the sigmoid's own forward and backward "
        "over the pre-activations (ATen, into existing buffers): no kernel can take less than about the larger "
        "of the two, nor need more than their sum plus a little. The FLOP count sees none of this work; four "
        "layers' cascade, set against the full-width step's FLOP ideal, is the share of the step that it takes.",
        "",
        "| dendrite sets | kernel | fewest bytes | cascade ms | copy of those bytes ms | sigmoid fwd+bwd ms "
        "| cascade / (copy + sigmoid) | 4 layers' cascade, share of the ideal step |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ideal_ms = ideals[f"{r['k']} dendrites"] * full_plain_ms
        share = 100 * layers * r["cascade_ms"] / ideal_ms
        floor = r["copy_ms"] + r["activation_ms"]
        lines.append(
            f"| {r['k']} | {r['kernel']} | {r['bytes'] / 2**20:.1f} MiB | {r['cascade_ms']:.2f} | {r['copy_ms']:.2f} "
            f"| {r['activation_ms']:.2f} | {r['cascade_ms'] / floor:.2f} | {share:.1f} % |"
        )
    return lines


def gap_split(row: dict) -> Tuple[float, float]:
    """``total / ideal - 1`` of a profiled row as (GEMM's part, the rest's part): with plain GEMM time ``g0``,
    other ``o0`` and ideal ``I``, ``(g - I g0) / (I (g0 + o0))`` and ``(o - I o0) / (I (g0 + o0))``."""
    ideal, share = row["ideal"], row["plain_other_share"]
    return (1 - share) * (row["gemm"] - ideal) / ideal, share * (row["other"] - ideal) / ideal


def table(rows: List[dict], steps: int, repeats: int, kernel: str = "auto") -> str:
    lines = [
        "# Where the time above the FLOP ideal goes",
        "",
        f"torch {torch.__version__}, CPU, {torch.get_num_threads()} thread(s), cascade kernel {kernel!r} "
        f"({kernel_note(kernel, torch.device('cpu'))}); `torch.profiler` self CPU time per operator over {steps} "
        f"training steps (SGD, as in `overhead.py`), median of {repeats} repeats interleaved "
        "over the variants. GEMM: matrix products and convolutions (what the FLOP counter counts); other: everything "
        "else (activations, gains, cascade sums, their backward, copies, the optimizer). Each relative to the plain "
        "model's. Profiling adds a fixed cost per operator, so `profiled total / plain` runs above the unprofiled "
        "ratios of `overhead.md`; the split is what this table is for. Generated by "
        "`python -m benchmarks.profile_overhead`.",
        "",
        "The last two columns split the profiled `time / ideal - 1` into its two sources, in points of the ideal "
        "step (they add up to it): GEMM time above the ideal's share of it, and other time above the ideal's share "
        "of that (the ideal grants the added non-GEMM work as much per FLOP as the plain model's has).",
        "",
        "| model | variant | FLOP ideal | profiled total / plain | GEMM / plain GEMM | other / plain other "
        "| other's share of the step (plain) | largest additions (other) | gap from GEMM | gap from other |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        gemm_gap, other_gap = gap_split(r)
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['ideal']:.2f} | {r['total']:.2f} | {r['gemm']:.2f} | "
            f"{r['other']:.2f} | {100 * r['other_share']:.0f} % ({100 * r['plain_other_share']:.0f} %) | {r['top']} "
            f"| {100 * gemm_gap:+.1f} | {100 * other_gap:+.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="one repeat of 2 steps, nothing written")
    ap.add_argument("--out", type=Path, default=RESULTS / "profile_overhead.md")
    ap.add_argument("--kernel", choices=list(KERNELS), default="auto", help="the cascade kernel (as in overhead.py)")
    args = ap.parse_args(argv)
    timing.pin_threads()
    steps, repeats = (2, 1) if args.quick else (args.steps, args.repeats)
    rows = [r for model in ("cnn", "tokens") for r in profile_model(model, steps, repeats, args.kernel)]
    text = table(rows, steps, repeats, args.kernel)
    costs, full_plain_ms = fixed_costs(*((2, 2) if args.quick else (15, 20)))
    ideals = {r["variant"]: r["ideal"] for r in rows if r["model"].startswith("Linear")}
    text += "\n".join(fixed_table(costs, full_plain_ms, ideals)) + "\n"
    rounds_steps = (2, 1) if args.quick else (15, 5)
    text += "\n".join(bandwidth_table(bandwidth(rounds=rounds_steps[0], steps=rounds_steps[1]), full_plain_ms, ideals))
    text += "\n"
    print(text)
    if not args.quick:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
