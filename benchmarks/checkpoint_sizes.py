"""File sizes of full and adapter-sized checkpoints of the LoRA benchmark model (the README's table).

Run: ``python -m benchmarks.checkpoint_sizes`` (the LoRA task's model: SmolLM2-135M's top decoder layer with LoRA
r=8 on q_proj/v_proj and dendrites on ``lora_B``; needs ``make bench-data``), ``--whole`` to also measure all 30
layers of SmolLM2-135M with LoRA on every q_proj/v_proj (save/load times included), ``--quick`` for the tiny
config-built Llama of the task's quick variant (no data needed).

Per dendrite count it prints, in bytes: ``td.save`` (full), ``td.save(..., base_weights=False)`` (adapter-sized),
peft's own ``adapter_model.safetensors`` of the same LoRA model without dendrites, the trainable tensors alone
(LoRA, the classification head peft saves, dendrites) and the dendrite tensors, then the ratio the issue bounds:
adapter-sized / (peft adapter + dendrites) <= 2.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import torch_dendrites as td
from benchmarks import text


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def _tensor_bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _peft_of(model):
    return next(m for m in model.modules() if hasattr(m, "peft_config"))


def _measure(build, dendrites, tmp: Path, timing: bool = False) -> dict:
    model = build()
    peft_dir = tmp / "peft"
    _peft_of(model).save_pretrained(str(peft_dir))  # peft's own adapter folder, before any dendrite
    row = {"peft": (peft_dir / "adapter_model.safetensors").stat().st_size}
    td.add_dendrites(model)
    wrapped = list(td.dendritic_layers(model))
    assert wrapped and all(".lora_B." in n for n in wrapped), wrapped
    for _ in range(dendrites):
        td.grow(model)
    row["dendrites"] = dendrites
    row["parameters"] = sum(p.numel() for p in model.parameters())
    row["trainable"] = _tensor_bytes(p for p in model.parameters() if p.requires_grad)
    row["dendrite_tensors"] = _tensor_bytes(
        p for layer in td.dendritic_layers(model).values() for p in layer.dendrite_parameters()
    )
    t0 = time.perf_counter()
    full = td.save(tmp / "full", model)
    t1 = time.perf_counter()
    adapter = td.save(tmp / "adapter", model, base_weights=False)
    t2 = time.perf_counter()
    row["full"], row["adapter"] = _folder_bytes(full), _folder_bytes(adapter)
    row["adapter_weights"] = (adapter / "model.safetensors").stat().st_size
    row["adapter_recipe"] = (adapter / "recipe.json").stat().st_size
    if timing:
        from torch_dendrites.persistence.base import base_keys, fingerprint

        state = model.state_dict()
        base = {k: state[k] for k in base_keys(model, state)}
        t3 = time.perf_counter()
        fingerprint(base)
        t4 = time.perf_counter()
        fresh = build()
        t5 = time.perf_counter()
        td.load(full, fresh)
        t6 = time.perf_counter()
        fresh = build()
        t7 = time.perf_counter()
        td.load(adapter, fresh)
        t8 = time.perf_counter()
        row.update(
            save_full_s=t1 - t0,
            save_adapter_s=t2 - t1,
            fingerprint_s=t4 - t3,
            base_bytes=_tensor_bytes(base.values()),
            load_full_s=t6 - t5,
            load_adapter_s=t8 - t7,
        )
    return row


def _mb(n: int) -> str:
    return f"{n / 1e6:.3f} MB" if n < 10e6 else f"{n / 1e6:.1f} MB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the tiny config-built Llama of the quick variant")
    ap.add_argument("--whole", action="store_true", help="also all 30 layers of SmolLM2-135M with LoRA (slow)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    models = {"LoRA task model" + (" (quick)" if args.quick else ""): lambda: text.lora_model(1.0, quick=args.quick)}
    if args.whole and not args.quick:
        models["SmolLM2-135M, all 30 layers"] = _whole_model
    for name, build in models.items():
        print(f"\n{name}")
        print("| dendrites | parameters | td.save (full) | adapter-sized | peft adapter file | trainable tensors "
              "| dendrite tensors | adapter / (peft + dendrites) |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|")
        for k in (0, 1, 2):
            with tempfile.TemporaryDirectory(prefix="td-sizes-") as tmp:
                r = _measure(build, k, Path(tmp), timing=(k == 2))
            ratio = r["adapter"] / (r["peft"] + r["dendrite_tensors"])
            print(
                f"| {k} | {r['parameters'] / 1e6:.2f} M | {_mb(r['full'])} | {_mb(r['adapter'])} "
                f"(weights {_mb(r['adapter_weights'])}, recipe {r['adapter_recipe'] / 1e3:.1f} kB) | {_mb(r['peft'])} "
                f"| {_mb(r['trainable'])} | {_mb(r['dendrite_tensors'])} | {ratio:.2f} |"
            )
            if "fingerprint_s" in r:
                print(
                    f"timings at {k} dendrites (one thread): fingerprint of {_mb(r['base_bytes'])} of base weights "
                    f"{r['fingerprint_s']:.2f} s; save full {r['save_full_s']:.2f} s, adapter-sized "
                    f"{r['save_adapter_s']:.2f} s; load full {r['load_full_s']:.2f} s, adapter-sized (fingerprint "
                    f"checked) {r['load_adapter_s']:.2f} s"
                )


_WHOLE = {}


def _whole_model():
    """SmolLM2-135M (all 30 decoder layers, float32) with the task's LoRA config, built once and copied."""
    import copy

    from peft import LoraConfig, get_peft_model

    if "base" not in _WHOLE:
        torch.manual_seed(0)
        _WHOLE["base"] = text.load_lm()[1]
    model = copy.deepcopy(_WHOLE["base"])
    torch.manual_seed(0)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], modules_to_save=["score"],
                     task_type="SEQ_CLS")  # fmt: skip
    return text.TopLayers(get_peft_model(model, cfg))


if __name__ == "__main__":
    main()
