"""Would a hand-fused cascade kernel reach the FLOP ideal where inductor's does not?

``overhead.md`` misses its 1.05x goal on a few rows (the Linear stack at 2 and 3 dendrite sets), and
``profile_overhead.md`` puts the gap in the cascade's elementwise passes, which run about twice the time of a
copy of their bytes plus their sigmoids. This probe builds the obvious remedy and measures it: a CPU kernel
fused by hand (``benchmarks/native/fused_cascade.cpp``: one pass over the activation-sized tensors in the
forward, one in the backward with the gain reductions riding along, in ATen's AVX2 vectors), compiled with
``torch.utils.cpp_extension`` and swapped into every dendritic layer of the speed tables' models. The library
does not use it; this is evidence for the tables, with the same harness (``timing.py``).

It reports, per model and dendrite count: agreement with the library's eager kernel, the kernels alone
(forward and backward of one layer, outside a model), and whole training steps over the plain model's with the
library's ``auto`` kernel and with the hand-fused one, interleaved in one process, median and interquartile
range over repeats. Run: ``python -m benchmarks.fused_probe`` (needs a C++ compiler and ninja; about
15 minutes on one thread); writes ``benchmarks/results/fused_probe.md``.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import shutil
import sys
from typing import Dict, List, Sequence

import torch
from torch import nn

import torch_dendrites as td
from benchmarks import timing
from benchmarks.overhead import build_variant, make_step, workload
from torch_dendrites.dendrites.kernel import CascadeKernel

SOURCE = os.path.join(os.path.dirname(__file__), "native", "fused_cascade.cpp")
RESULT = os.path.join(os.path.dirname(__file__), "results", "fused_probe.md")
MODELS = {"cnn": "MNIST CNN (demo, half width)", "tokens": "Linear stack on [16, 64, 256]"}  # overhead.workload's


def find_ninja() -> bool:
    """Whether ninja (which ``torch.utils.cpp_extension`` builds with) can run; the ``ninja`` wheel of the
    ``bench`` extra installs it beside this interpreter, which is on ``PATH`` only in an activated venv, so its
    folder is put on this process's ``PATH`` where needed."""
    if shutil.which("ninja"):
        return True
    try:
        import ninja
    except ImportError:
        return False
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    return shutil.which("ninja") is not None


@functools.cache
def extension():
    """The hand-fused kernel, compiled on first use (cached by torch under ``TORCH_EXTENSIONS_DIR``)."""
    from torch.utils.cpp_extension import load, verify_ninja_availability

    find_ninja()
    verify_ninja_availability()  # a clear RuntimeError naming ninja where it is missing
    flags = ["-O3"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return load("td_fused_cascade_probe", [SOURCE], extra_cflags=flags, verbose=False)


def pack(u: Sequence[torch.Tensor], k: int, like: torch.Tensor) -> torch.Tensor:
    """The cascade gains ``u[d - 1]`` (``[d, C]``) as one ``[k, k, C]`` tensor, zero on and above the diagonal."""
    U = like.new_zeros(k, k, like.shape[-1])
    for d in range(1, k):
        U[d, :d] = u[d - 1]
    return U


class _Fused(torch.autograd.Function):
    """The cascade (sigmoid) on canonical shapes, forward and backward by the hand-fused kernel."""

    @staticmethod
    def forward(ctx, a, y, v, *u):
        U = pack(u, a.shape[1], v)
        out, s = extension().forward(a, y, v, U)
        ctx.save_for_backward(s, v, U)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        s, v, U = ctx.saved_tensors
        ga, gv, gU = extension().backward(g.contiguous(), s, v, U)
        return (ga, g, gv, *[gU[d, :d] for d in range(1, s.shape[1])])


def fused(a, y, v, p: int, u):
    """The layer output of the cascade over ``a`` (``[..., k, C, ...]``, dendrite axis ``p``), as the library's
    kernels take it: canonical ``[N, k, C, R]`` in, the layer's shape out."""
    k, c = a.shape[p], a.shape[p + 1]
    a4 = a.reshape(-1, k, c, math.prod(a.shape[p + 2 :]))
    y3 = y.reshape(a4.shape[0], c, a4.shape[3])
    return _Fused.apply(a4, y3, v, *u).reshape(y.shape)


class FusedKernel(CascadeKernel):
    """A layer's kernel object with the hand-fused kernel for the cascade (fp32 sigmoid, CPU, the model's own
    layers); anything else runs as the library's ``auto`` would."""

    def __init__(self):
        super().__init__("auto")

    def __call__(self, a, y, v, p, activation, return_s, u):
        if return_s or activation != "sigmoid" or a.dtype != torch.float32 or a.device.type != "cpu":
            return super().__call__(a, y, v, p, activation, return_s, u)
        return fused(a, y, v, p, u)


def with_fused_kernel(model: nn.Module) -> nn.Module:
    for layer in td.dendritic_layers(model).values():
        layer.dendrites.kernel = FusedKernel()
    return model


def agreement(ks=(1, 2, 3)) -> Dict[str, float]:
    """Largest relative difference from the library's eager kernel (output and every gradient, fp32) over a
    Linear-like and a convolution-like layout, and whether ``gradcheck`` passes in float64."""
    g = torch.Generator().manual_seed(0)
    worst = {}
    for shape in ((1024, 256), (16, 32, 24, 24), (7, 13, 5)):
        for k in ks:
            c = shape[1]
            a = torch.randn(shape[0], k * c, *shape[2:], generator=g).view(shape[0], k, c, *shape[2:]).requires_grad_()
            y = torch.randn(shape, generator=g).requires_grad_()
            v = (0.3 * torch.randn(k, c, generator=g)).requires_grad_()
            u = [(0.3 * torch.randn(i, c, generator=g)).requires_grad_() for i in range(1, k)]
            grad = torch.randn(shape, generator=g)
            res = []
            for library in (True, False):
                for t in (a, y, v, *u):
                    t.grad = None
                out = CascadeKernel("eager")(a, y, v, 1, "sigmoid", False, u) if library else fused(a, y, v, 1, u)
                out.backward(grad)
                res.append([out.detach()] + [t.grad.clone() for t in (a, y, v, *u)])
            key = f"{'x'.join(map(str, shape))}, k={k}"
            worst[key] = max(((r - q).abs().max() / r.abs().max()).item() for r, q in zip(*res))
    a = torch.randn(3, 3, 4, 5, dtype=torch.double, generator=g, requires_grad=True)
    y = torch.randn(3, 4, 5, dtype=torch.double, generator=g, requires_grad=True)
    v = torch.randn(3, 4, dtype=torch.double, generator=g, requires_grad=True)
    u = [torch.randn(i, 4, dtype=torch.double, generator=g, requires_grad=True) for i in (1, 2)]
    worst["gradcheck (float64, k=3)"] = float(not torch.autograd.gradcheck(lambda *t: _Fused.apply(*t), (a, y, v, *u)))
    return worst


def kernels_alone(k: int, shape, rounds: int, steps: int) -> Dict[str, float]:
    """One layer's cascade, forward and backward, outside a model (ms, median over interleaved rounds)."""
    g = torch.Generator().manual_seed(k)
    n, c, r = shape
    a = torch.randn(n, k, c, r, generator=g).requires_grad_()
    y = torch.randn(n, c, r, generator=g).requires_grad_()
    v = (0.1 * torch.randn(k, c, generator=g)).requires_grad_()
    u = [(0.1 * torch.randn(i, c, generator=g)).requires_grad_() for i in range(1, k)]
    grad = torch.randn(n, c, r, generator=g)
    auto = CascadeKernel("auto")

    def step(fn):
        def run():
            for t in (a, y, v, *u):
                t.grad = None
            fn().backward(grad)

        return run

    fns = {"auto": step(lambda: auto(a, y, v, 1, "sigmoid", False, u)), "fused": step(lambda: fused(a, y, v, 1, u))}
    med = timing.interleaved(fns, rounds, steps)
    return {name: 1e3 * t for name, t in med.items()} | {"kernel": "compiled" if auto.use_compiled(a) else "eager"}


def whole_steps(model: str, k: int, rounds: int, steps: int) -> Dict[str, float]:
    """One repeat: step time over the plain model's with the ``auto`` kernel and with the hand-fused one."""
    _, base, x, y, loss_fn = workload(model, torch.device("cpu"))
    fns = {
        "plain": make_step(build_variant(base, "plain"), x, y, loss_fn),
        "auto": make_step(build_variant(base, f"{k} dendrites"), x, y, loss_fn),
        "fused": make_step(with_fused_kernel(build_variant(base, f"{k} dendrites")), x, y, loss_fn),
    }
    med = timing.interleaved(fns, rounds, steps)
    return {"auto": med["auto"] / med["plain"], "fused": med["fused"] / med["plain"]}


def report(worst, alone, steps_table, repeats, rounds, steps) -> str:
    lines = [
        "# A hand-fused cascade kernel against inductor's",
        "",
        f"torch {torch.__version__}, CPU ({torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} "
        f"thread(s). The hand-fused kernel is `benchmarks/native/fused_cascade.cpp` (one pass forward, one pass "
        "backward with the gain reductions, ATen vectors), swapped into every dendritic layer; `auto` is the "
        "library's choice (the inductor-compiled kernel on these sizes, eager below "
        f"{td.dendrites.kernel.AUTO_MIN_ELEMENTS} pre-activations). {repeats} repeats (fresh models, one process), "
        f"each the median of {rounds} interleaved rounds of {steps} steps (`benchmarks/timing.py`). Generated by "
        "`python -m benchmarks.fused_probe`.",
        "",
        "## Agreement with the library's eager kernel",
        "",
        "| layout | largest relative difference (output and gradients, fp32) |",
        "|---|---:|",
    ]
    for key, val in worst.items():
        shown = ("passed" if val == 0 else "FAILED") if key.startswith("gradcheck") else f"{val:.1e}"
        lines.append(f"| {key} | {shown} |")
    lines += [
        "",
        "## The kernels alone: one layer, forward and backward",
        "",
        "| layer | dendrite sets | `auto` runs | `auto` ms | hand-fused ms | hand-fused / `auto` |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for (name, k), rows in alone.items():
        a = timing.spread([r["auto"] for r in rows])
        f = timing.spread([r["fused"] for r in rows])
        ratio = timing.spread([r["fused"] / r["auto"] for r in rows])
        lines.append(f"| {name} | {k} | {rows[0]['kernel']} | {a.median:.2f} | {f.median:.2f} | {ratio} |")
    lines += [
        "",
        "## Whole training steps over the plain model's",
        "",
        "| model | dendrite sets | FLOP ideal | `auto`: step / plain | hand-fused: step / plain "
        "| hand-fused time / ideal |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for (name, k), rows in steps_table.items():
        a = timing.spread([r["auto"] for r in rows])
        f = timing.spread([r["fused"] for r in rows])
        lines.append(f"| {name} | {k} | {k + 1:.2f} | {a} | {f} | {f.median / (k + 1):.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=timing.ROUNDS)
    ap.add_argument("--steps", type=int, default=timing.STEPS)
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--out", default=RESULT)
    args = ap.parse_args(argv)
    timing.pin_threads()
    extension()
    worst = agreement(args.ks)
    print(worst, flush=True)
    layers = {"Linear stack layer (1024 tokens x 256)": (1024, 256, 1), "CNN conv2 (64 x 32 x 24 x 24)": (64, 32, 576)}
    alone: Dict[tuple, List[dict]] = {}
    table: Dict[tuple, List[dict]] = {}
    for _ in range(args.repeats):
        for name, shape in layers.items():
            for k in args.ks:
                alone.setdefault((name, k), []).append(kernels_alone(k, shape, args.rounds, args.steps))
        for model in ("cnn", "tokens"):
            for k in args.ks:
                table.setdefault((MODELS[model], k), []).append(whole_steps(model, k, args.rounds, args.steps))
        print(f"repeat {len(next(iter(table.values())))} of {args.repeats} done", flush=True)
    text = report(worst, alone, table, args.repeats, args.rounds, args.steps)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
