"""Speed table: torch-dendrites and perforatedai side by side, each against plain PyTorch in the same process.

For k = 0..3 dendrite sets on the MNIST example CNN (half-width convolutions, batch 64): training step time
relative to the plain model (the one harness, ``benchmarks/timing.py``: interleaved rounds in one child process
per repeat, median and interquartile range over the repeats; torch-dendrites' rows are the very measurement of
``overhead.py``'s CNN rows, :func:`benchmarks.overhead.pair_spreads`, so the two tables are two runs of it and
``benchmarks/agreement.py`` checks that they agree), peak resident memory relative to plain (each
variant in its own process), per-epoch bookkeeping (our ``controller.step`` vs the peer's
``add_validation_score``), and the time to convert a GPT-2-124M-shaped model (built from a config).

Run: ``python -m benchmarks.speed`` (``--quick`` for a smoke run); writes benchmarks/results/speed.md. Each
measurement runs in a child process (``python -m benchmarks.speed --child ...``) in a fresh folder.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import overhead, peer, timing
from benchmarks.models import MnistNet, n_params
from benchmarks.overhead import build_variant, make_step, workload
from benchmarks.spawn import child_env, module_command

HERE = Path(__file__).resolve().parent


def cnn():
    return MnistNet(16, 32, 128)


def peer_model(k: int, switch_every: bool = True):
    # each score adds a dendrite set (or, for the bookkeeping measurement, never)
    GPA, UPA = peer.configure(["Conv2d", "Linear"], switch="every" if switch_every else "never", max_dendrites=10)
    model = UPA.perforate_model(cnn(), save_name="speed", making_graphs=False, maximizing_score=True)
    GPA.pai_tracker.set_optimizer(torch.optim.SGD)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    for i in range(k):
        # the peer needs a training step before a switch (it stops in pdb otherwise)
        opt = GPA.pai_tracker.setup_optimizer(model, {"params": model.parameters(), "lr": 1e-3})[0]
        opt.zero_grad()
        F.nll_loss(model(x), y).backward()
        opt.step()
        model, _, _ = GPA.pai_tracker.add_validation_score(float(i + 1), model)
    GPA.pai_tracker.setup_optimizer(model, {"params": model.parameters(), "lr": 1e-3})
    return model, GPA


def ours_model(k: int):
    """The model ``overhead.py`` times as ``"{k} dendrites"`` on the CNN."""
    return build_variant(cnn(), f"{k} dendrites")


def step_fn(model, x, y):
    """The training step every speed table times (``overhead.make_step``), with the CNN's loss."""
    return make_step(model, x, y, F.nll_loss)


def child(lib: str, k: int, rounds: int, steps: int, mode: str) -> dict:
    """Runs in a subprocess: time (the peer's variant vs plain, interleaved, as ``overhead.time_pair`` times
    ours) or peak memory of one variant."""
    timing.pin_threads()
    _, _, x, y, _ = workload("cnn", torch.device("cpu"))
    if mode == "memory":
        model = cnn() if lib == "plain" else (ours_model(k) if lib == "ours" else peer_model(k)[0])
        fn = step_fn(model, x, y)
        for _ in range(steps):
            fn()
        return {"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
    if mode == "bookkeeping":
        return _bookkeeping(lib, ours_model(0) if lib == "ours" else peer_model(0, switch_every=False)[0])
    if lib != "peer":
        raise ValueError("torch-dendrites' step times come from overhead.pair_spreads")
    variant = peer_model(k)[0]
    med = timing.interleaved({"plain": step_fn(cnn(), x, y), "variant": step_fn(variant, x, y)}, rounds, steps)
    return {"ratio": med["variant"] / med["plain"], "params": n_params(variant)}


def _bookkeeping(lib, variant) -> dict:
    """Median cost of one epoch's score bookkeeping, on non-improving epochs (no growth, no save)."""
    ts = []
    if lib == "ours":
        import torch_dendrites as td

        ctl = td.GrowthController(variant, td.GrowthConfig(mode="never", patience=10**6))
        ctl.step(1.0)
        for _ in range(30):
            t0 = time.perf_counter()
            ctl.step(0.5)
            ts.append(time.perf_counter() - t0)
    else:
        GPA, _ = peer.load()
        m, _, _ = GPA.pai_tracker.add_validation_score(1.0, variant)
        for _ in range(30):
            t0 = time.perf_counter()
            m, _, _ = GPA.pai_tracker.add_validation_score(0.5, m)
            ts.append(time.perf_counter() - t0)
    return {"bookkeeping_ms": statistics.median(ts) * 1e3}


def convert_gpt2() -> dict:
    """Seconds to wrap a GPT-2-124M-shaped model (random init from a config) and to grow one set."""
    import transformers

    import torch_dendrites as td

    res = {}
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    t0 = time.perf_counter()
    td.add_dendrites(model)
    res["ours_add_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    td.grow(model)
    res["ours_grow_s"] = time.perf_counter() - t0
    try:
        GPA, UPA = peer.configure(["Conv1D", "Linear"])
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config())
        t0 = time.perf_counter()
        UPA.perforate_model(model, save_name="gpt2", making_graphs=False, maximizing_score=True)
        res["peer_add_s"] = time.perf_counter() - t0
    except Exception as exc:  # the peer stops on models it cannot handle: record why
        res["peer_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return res


def spawn(args: list, work: Path) -> dict:
    out = work / "out.json"
    cmd = module_command("speed", "--child", json.dumps(args), "--child-out", str(out))
    proc = subprocess.run(cmd, cwd=work, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=child_env())
    if proc.returncode != 0 or not out.exists():
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["failed"]}
    return json.loads(out.read_text())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", default=None)
    ap.add_argument("--child-out", default=None)
    ap.add_argument("--repeats", type=int, default=timing.REPEATS, help="independent child processes per timed variant")
    args = ap.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        res = convert_gpt2() if spec[0] == "gpt2" else child(*spec)
        Path(args.child_out).write_text(json.dumps(res))
        return 0
    rounds, steps = (3, 2) if args.quick else (timing.ROUNDS, timing.STEPS)
    repeats = 2 if args.quick else args.repeats
    ks = [0, 1] if args.quick else [0, 1, 2, 3]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:

        def run(spec):
            work = Path(tempfile.mkdtemp(dir=tmp))
            res = spawn(spec, work)
            shutil.rmtree(work, ignore_errors=True)
            return res

        plain_mem = run(["plain", 0, 0, 3 if args.quick else 10, "memory"]).get("maxrss_kb")
        ours = overhead.pair_spreads("cnn", [f"{k} dendrites" for k in ks], rounds=rounds, steps=steps, repeats=repeats)
        peer_reps: dict = {k: [] for k in ks}
        for _ in range(repeats):  # repeats outer, as pair_spreads does
            for k in ks:
                peer_reps[k].append(run(["peer", k, rounds, steps, "time"]))
        for k in ks:
            for lib in ("ours", "peer"):
                if lib == "ours":
                    t = {"params": n_params(ours_model(k)), "ratio": ours[f"{k} dendrites"]}
                else:
                    reps = peer_reps[k]
                    failed = [r for r in reps if "error" in r]
                    t = dict(failed[0]) if failed else {"params": reps[0]["params"]}
                    if not failed:
                        t["ratio"] = timing.spread([r["ratio"] for r in reps])
                if k == 0:
                    t.update(run([lib, 0, 0, 0, "bookkeeping"]))
                m = run([lib, k, 0, 3 if args.quick else 10, "memory"])
                rows.append((lib, k, t, m))
                print(lib, k, t, m, flush=True)
        gpt2 = {} if args.quick else run(["gpt2"])
    lines = [
        f"torch {torch.__version__}, {timing.pin_threads()} thread(s) per process, MNIST example CNN (convs 16-32, "
        f"fc 128), batch 64; step time / plain: median (interquartile range) over "
        f"{repeats} child processes, each the median of {rounds} interleaved rounds of {steps} steps "
        "against plain PyTorch in the same process (`benchmarks/timing.py`); torch-dendrites' rows are the "
        "measurement of `overhead.md`'s CNN rows, run again (`benchmarks/agreement.py` compares the two).",
        "",
        "| library | dendrite sets | parameters | step time / plain | peak RSS / plain | bookkeeping per epoch |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for lib, k, t, m in rows:
        name = "torch-dendrites" if lib == "ours" else "perforatedai 3.2.9"
        if "error" in t:
            lines.append(f"| {name} | {k} | | failed: {t['error']} | | |")
            continue
        mem = f"{m['maxrss_kb'] / plain_mem:.2f}x" if "maxrss_kb" in m and plain_mem else "n/a"
        book = f"{t['bookkeeping_ms']:.2f} ms" if "bookkeeping_ms" in t else ""
        lines.append(f"| {name} | {k} | {t['params']:,} | {t['ratio']} | {mem} | {book} |")
    if gpt2:
        lines += ["", "GPT-2-124M-shaped model (random init from `GPT2Config()`), wall seconds:", ""]
        lines.append(
            f"- torch-dendrites: add_dendrites {gpt2.get('ours_add_s', float('nan')):.2f} s, "
            f"one grow {gpt2.get('ours_grow_s', float('nan')):.2f} s"
        )
        if "peer_add_s" in gpt2:
            lines.append(f"- perforatedai: perforate_model {gpt2['peer_add_s']:.2f} s")
        else:
            lines.append(f"- perforatedai: {gpt2.get('peer_error', gpt2.get('error'))}")
    text = "\n".join(lines)
    print(text)
    if not args.quick:
        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / "speed.md").write_text(text + "\n")
        # torch-dendrites' rows in overhead.json's form, for benchmarks/agreement.py.
        name = workload("cnn", torch.device("cpu"))[0]
        measured = [{"model": name, "variant": f"{k} dendrites", "precision": "fp32", "ratio": t["ratio"].to_json()}
                    for lib, k, t, _ in rows if lib == "ours"]  # fmt: skip
        meta = {"torch": torch.__version__, "threads": timing.pin_threads(), "rounds": rounds, "steps": steps,
                "repeats": repeats, "peer": {str(k): t["ratio"].to_json() for lib, k, t, _ in rows
                                             if lib == "peer" and "ratio" in t}}  # fmt: skip
        (HERE / "results" / "speed.json").write_text(json.dumps({"meta": meta, "rows": measured}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
