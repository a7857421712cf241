"""Training-step overhead of dendritic layers relative to plain PyTorch, and controller bookkeeping cost.

For each model (the demo's MNIST CNN, and a stack of Linear layers over [batch, tokens, features]) the wrapped model
with 0, 1, 2 and 3 dendrite sets (and a correlation candidate phase) is timed against the plain model, one variant
and the plain model at a time, by the one harness (``benchmarks/timing.py``: interleaved rounds, warm-up, pinned
threads), each repeat on the CPU in a child process of its own that builds only the two models it times
(:func:`pair_spreads`, which ``speed.py`` calls for its own rows, so that the two tables are two runs of one
measurement; in one long-lived process the same pair once measured up to 20 % differently); the table gives the step
time relative to plain as the median and interquartile range over the repeats, next to the FLOP-ideal ratio (the
training step's FLOPs counted by torch.utils.flop_counter, relative to plain) and their quotient. With ``--memory``
it also gives each variant's peak memory during a step relative to plain (CUDA: ``max_memory_allocated``; CPU: not
measured in-process, see ``speed.py``'s peak RSS). Goals: 0 dendrites <= 1.03x plain; k dendrites <= 1.05x the FLOP
ideal; ``controller.step`` <= 20 ms per epoch.

Run: ``python -m benchmarks.overhead`` (``--quick`` for a smoke run; ``--device cuda --precision fp32,bf16,fp16``
on a GPU, as ``benchmarks/gpu_check.sh`` does; ``--out`` names the results file, and every repeat's ratio goes
to the same name with ``.json``, which ``benchmarks/agreement.py`` compares with another run).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import torch_dendrites as td
from benchmarks import timing
from benchmarks.models import MnistNet
from benchmarks.spawn import child_env, module_command
from torch_dendrites.dendrites.kernel import AUTO_MIN_ELEMENTS, KERNELS, compiled_available

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TokenStack(nn.Module):
    def __init__(self, d=256, layers=4):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))

    def forward(self, x):
        for lin in self.layers:
            x = F.gelu(lin(x))
        return x


def make_step(model, x, y, loss_fn, precision: str = "fp32"):
    """One SGD training step on a fixed batch; ``bf16``/``fp16`` under autocast (``fp16`` with a GradScaler)."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    dev = x.device.type
    dtype = PRECISIONS[precision]
    scaler = torch.amp.GradScaler(dev) if precision == "fp16" else None

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=dtype) if dtype is not None else contextlib.nullcontext():
            loss = loss_fn(model(x).float(), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

    return step


def step_flops(model, x, y, loss_fn) -> int:
    with FlopCounterMode(display=False) as counter:
        loss_fn(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


MAX_K = 3
# Every timed variant of a workload: k installed dendrite sets, and a correlation candidate phase (the model
# frozen, one candidate per layer trained through the tap) over 0 or 1 installed sets.
VARIANTS = tuple(f"{k} dendrites" for k in range(MAX_K + 1)) + tuple(f"{k} dendrites + 1 candidate" for k in (0, 1))


def build_variant(base: nn.Module, variant: str, kernel: str = "auto") -> nn.Module:
    """A copy of ``base`` as ``variant`` (one of ``VARIANTS``, or ``"plain"``): the same seeded dendrites in
    every process, whichever other variants it builds."""
    if variant == "plain":
        return copy.deepcopy(base)
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: choose from {('plain',) + VARIANTS}")
    k, candidate = int(variant.split()[0]), variant.endswith("candidate")
    m = td.add_dendrites(copy.deepcopy(base), td.DendriteConfig(dendrite_options={"kernel": kernel}))
    g = torch.Generator().manual_seed(k)
    for _ in range(k):
        td.grow(m, g)
    # Non-zero gains, as after training (zero gains would not change the work done anyway).
    for layer in td.dendritic_layers(m).values():
        for u in layer.dendrites.units:
            nn.init.normal_(u.out_gain, std=0.1, generator=g)
    if candidate:
        for layer in td.dendritic_layers(m).values():
            layer.dendrites.add_candidates(1, torch.Generator().manual_seed(10 + k))
        cand = {id(p) for layer in td.dendritic_layers(m).values() for p in layer.dendrites.candidates.parameters()}
        for p in m.parameters():
            p.requires_grad_(id(p) in cand)
    return m


def variants(base: nn.Module, kernel: str = "auto") -> dict:
    """``{"plain": ..., variant: model}`` for every one of ``VARIANTS``."""
    return {name: build_variant(base, name, kernel) for name in ("plain",) + VARIANTS}


def peak_memory(model, x, y, loss_fn, precision: str) -> float:
    """Peak CUDA memory (bytes) of a few training steps, above what was allocated before (NaN on the CPU)."""
    if x.device.type != "cuda":
        return float("nan")
    step = make_step(model, x, y, loss_fn, precision)
    step()  # optimizer state and autocast caches exist from here on, as in training
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated() - before)


def workload(model: str, device: torch.device):
    """``(name, base model, x, y, loss)`` of a timed model; the same seeded weights and batch in every process."""
    torch.manual_seed(0)
    cnn_x, cnn_y = torch.randn(64, 1, 28, 28, device=device), torch.randint(0, 10, (64,), device=device)
    tok_x, tok_y = torch.randn(16, 64, 256, device=device), torch.randn(16, 64, 256, device=device)
    if model == "cnn":
        return "MNIST CNN (demo, half width)", MnistNet(16, 32, 128).to(device), cnn_x, cnn_y, F.nll_loss
    return "Linear stack on [16, 64, 256]", TokenStack().to(device), tok_x, tok_y, F.mse_loss


def time_pair(
    model: str, variant: str, precision: str, device: str, rounds: int, steps: int, kernel: str = "auto"
) -> float:
    """One repeat: ``variant``'s step time over the plain model's, interleaved in this process (the warm-up
    steps include compiling the cascade kernel where ``kernel`` chooses the compiled one)."""
    timing.pin_threads()
    _, base, x, y, loss_fn = workload(model, torch.device(device))
    fns = {"plain": make_step(build_variant(base, "plain"), x, y, loss_fn, precision),
           "variant": make_step(build_variant(base, variant, kernel), x, y, loss_fn, precision)}  # fmt: skip
    med = timing.interleaved(fns, rounds, steps, device=torch.device(device))
    return med["variant"] / med["plain"]


# glibc's allocator serves large blocks with fresh mmap'd pages (page faults, zeroing) until its dynamic
# thresholds have risen; a fresh process pays that on every large temporary, a long-running one mostly not. A
# dendritic step allocates more large temporaries than the plain one, so the ratio depends on that state:
# ``--allocator fixed`` pins both thresholds high (the steady state without page faults).
FIXED_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 32)}


def _child_ratio(spec: list, allocator: str = "default") -> float:
    env = {**child_env(), **(FIXED_ALLOCATOR if allocator == "fixed" else {})}
    with tempfile.TemporaryDirectory() as work:
        out = Path(work) / "out.json"
        cmd = module_command("overhead", "--child", json.dumps(spec), "--child-out", str(out))
        proc = subprocess.run(cmd, cwd=work, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"overhead child {spec} failed: {(proc.stderr or proc.stdout).strip()[-500:]}")
        return json.loads(out.read_text())["ratio"]


def pair_spreads(
    model: str,
    names,
    precision: str = "fp32",
    device="cpu",
    rounds: int = timing.ROUNDS,
    steps: int = timing.STEPS,
    repeats: int = timing.REPEATS,
    kernel: str = "auto",
    in_process: bool = False,
    allocator: str = "default",
) -> dict:
    """The one measurement behind every step-time ratio of torch-dendrites (this table and ``speed.py``'s):
    ``{variant: Spread}`` of each variant's step time over the plain model's (:func:`time_pair`), over
    ``repeats`` repeats. On the CPU each repeat runs in a fresh child process; on an accelerator (or with
    ``in_process``) in this one (a child each would pay the CUDA start-up every time). The repeats are the
    outer loop, so that a change in the machine's load during the run hits every variant alike."""
    values: dict = {name: [] for name in names}
    for _ in range(repeats):
        for name in names:
            spec = [model, name, precision, str(device), rounds, steps, kernel]
            values[name].append(time_pair(*spec) if in_process else _child_ratio(spec, allocator))
    return {name: timing.spread(v) for name, v in values.items()}


def bench_model(
    model,
    rounds=timing.ROUNDS,
    steps=timing.STEPS,
    repeats=timing.REPEATS,
    precision="fp32",
    memory=False,
    device="cpu",
    in_process=False,
    allocator="default",
    kernel="auto",
):
    name, base, x, y, loss_fn = workload(model, torch.device(device))
    models = variants(base, kernel)
    flops = {k: step_flops(m, x, y, loss_fn) for k, m in models.items()}
    spreads = pair_spreads(model, VARIANTS, precision, device, rounds, steps, repeats, kernel, in_process, allocator)
    mem = {k: peak_memory(copy.deepcopy(m), x, y, loss_fn, precision) for k, m in models.items()} if memory else {}
    rows = []
    for k in models:
        if k == "plain":
            continue
        ideal = flops[k] / flops["plain"]
        mem_ratio = mem[k] / mem["plain"] if memory and mem["plain"] > 0 else float("nan")
        rows.append((name, k, precision, spreads[k], ideal, spreads[k].median / ideal, mem_ratio))
    return rows


def kernel_note(kernel: str, device: torch.device) -> str:
    if kernel == "eager" or not compiled_available(device.type):
        return "eager everywhere"
    if kernel == "compiled":
        return "compiled everywhere"
    return f"compiled on calls of >= {AUTO_MIN_ELEMENTS} dendrite pre-activations, else eager"


def bench_controller(rounds: int):
    model = td.add_dendrites(MnistNet(16, 32, 128))
    td.grow(model)
    out = {}
    for label, out_dir in (("no out_dir", None), ("with out_dir (CSV)", tempfile.mkdtemp())):
        ctl = td.GrowthController(model, td.GrowthConfig(mode="never", patience=10**6), out_dir=out_dir)
        ctl.step(1.0, train_loss=0.1)  # the first step snapshots the best weights (an "improved" epoch)
        ts = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            ctl.step(0.5, train_loss=0.1)  # a non-improving epoch: bookkeeping only
            ts.append(time.perf_counter() - t0)
        out[label] = statistics.median(ts) * 1e3
    # An improving epoch also snapshots the best weights (and writes them when out_dir is set).
    ctl = td.GrowthController(model, td.GrowthConfig(mode="never", patience=10**6), out_dir=tempfile.mkdtemp())
    ts = []
    for i in range(rounds // 4 + 1):
        t0 = time.perf_counter()
        ctl.step(float(i))
        ts.append(time.perf_counter() - t0)
    out["improving epoch, with out_dir (writes best/)"] = statistics.median(ts) * 1e3
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=timing.ROUNDS)
    ap.add_argument("--repeats", type=int, default=timing.REPEATS)
    ap.add_argument("--steps", type=int, default=timing.STEPS, help="training steps per timed block")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", help="comma-separated: fp32, bf16, fp16")
    ap.add_argument("--memory", action="store_true", help="also the peak memory of a step (CUDA only)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "overhead.md")
    ap.add_argument("--in-process", action="store_true", help="time every repeat in this process (the default on "
                    "an accelerator; on the CPU each repeat runs in a child process)")  # fmt: skip
    ap.add_argument("--allocator", choices=["default", "fixed"], default="default", help="child processes' glibc "
                    "allocator: as a process starts (default), or with its mmap and trim thresholds pinned high "
                    "(fixed: the steady state of a long run, no page faults for large temporaries)")  # fmt: skip
    ap.add_argument("--kernel", choices=list(KERNELS), default="auto", help="the cascade kernel "
                    "(dendrite_options={'kernel': ...}; see torch_dendrites.dendrites.kernel)")  # fmt: skip
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        Path(args.child_out).write_text(json.dumps({"ratio": time_pair(*json.loads(args.child))}))
        return 0
    threads = timing.pin_threads()
    rounds, steps, repeats = (3, 2, 2) if args.quick else (args.rounds, args.steps, args.repeats)
    device = torch.device(args.device)
    precisions = args.precision.split(",")
    for p in precisions:
        if p not in PRECISIONS:
            ap.error(f"--precision {p!r}: choose from {sorted(PRECISIONS)}")
    in_process = args.in_process or device.type != "cpu"
    rows = []
    for precision in precisions:
        for model in ("cnn", "tokens"):
            rows += bench_model(
                model, rounds, steps, repeats, precision, args.memory, device, in_process, args.allocator, args.kernel
            )
    ctl = bench_controller(8 if args.quick else 60)
    where = f"{device.type}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    lines = [
        f"torch {torch.__version__}, {where}, {threads} thread(s); step time / plain: median (interquartile range) "
        f"over {repeats} repeats ({'in one process' if in_process else 'each in a child process of its own'}"
        f"{', glibc allocator thresholds pinned: ' + str(FIXED_ALLOCATOR) if args.allocator == 'fixed' else ''}), "
        f"cascade kernel {args.kernel!r} ({kernel_note(args.kernel, device)}), "
        f"each the median of {rounds} interleaved rounds of {steps} steps (`benchmarks/timing.py`). Generated by "
        "`python -m benchmarks.overhead`.",
        "",
        "| model | variant | precision | step time / plain | FLOP-ideal ratio | time / ideal | peak memory / plain "
        "| goal |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for name, k, precision, sp, ideal, q, mem in rows:
        if "candidate" in k:
            goal = "(no goal set; candidate phase)"
        elif k.startswith("0 "):
            goal = f"<= 1.03x plain: {'met' if sp.median <= 1.03 else 'MISSED'}"
        else:
            goal = f"<= 1.05x ideal: {'met' if q <= 1.05 else 'MISSED'}"
        mem_s = "n/a" if mem != mem else f"{mem:.2f}x"
        lines.append(f"| {name} | {k} | {precision} | {sp} | {ideal:.3f} | {q:.3f} | {mem_s} | {goal} |")
    lines += ["", "| controller.step per epoch | median ms | goal <= 20 ms |", "|---|---:|---|"]
    for label, ms in ctl.items():
        lines.append(f"| {label} | {ms:.2f} | {'met' if ms <= 20 else 'MISSED'} |")
    text = "\n".join(lines)
    print(text)
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        # Every repeat's ratio, for benchmarks/agreement.py (which compares two runs of the harness).
        measured = [{"model": name, "variant": k, "precision": precision, "ratio": sp.to_json(), "flop_ideal": ideal}
                    for name, k, precision, sp, ideal, _, _ in rows]  # fmt: skip
        meta = {"torch": torch.__version__, "device": where, "threads": threads, "kernel": args.kernel,
                "rounds": rounds, "steps": steps, "repeats": repeats, "allocator": args.allocator,
                "in_process": in_process}  # fmt: skip
        args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": measured}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
