"""Adapter-sized checkpoints: which state-dict entries are the base model's, and their fingerprint.

``td.save(..., base_weights=False)`` leaves out the *base tensors*, the entries that training does not change and
that the user rebuilds anyway (``from_pretrained``). The rule, decided per state-dict entry:

- a parameter is a base tensor when it does not require grad and is not a dendrite parameter (a
  :class:`~torch_dendrites.DendriticLayer`'s dendrites and candidates). Frozen dendrite weights (the input
  weights of correlation-trained dendrites) are saved: they exist only in the checkpoint.
- during a correlation candidate phase every parameter but the candidates is frozen *for the phase*: what
  counts then is whether it was trainable before the phase, which the controller records (so ``td.save`` needs
  the controller then).
- buffers are always saved: BatchNorm running statistics move in train mode even when the weights are frozen.
- tied weights are one parameter under several names: every name follows the parameter.

The left-out tensors are described by a fingerprint: per state-dict key its dtype, shape and the SHA-256 of its
bytes (little-endian, as safetensors stores them), and the SHA-256 of that table's canonical JSON. It is the same
in every process and on every machine for the same values; computing it reads every base byte once (SHA-256 runs
at about 1.5 GB/s on one core: ~0.4 s for SmolLM2-135M's 0.54 GB). A load compares it with the model's own base
tensors before changing anything.

peft models also record their adapters' configs (peft's own ``to_dict()`` JSON, per adapter), so that the LoRA
settings that are not in any tensor (``lora_alpha`` sets the scaling) travel with the weights.
"""

from __future__ import annotations

import enum
import hashlib
from typing import Any, Dict, Iterable, List, Optional

import torch
from torch import nn

from ..errors import CheckpointError, StateError
from ..surgery import dendritic_layers
from .codec import DTYPES, MAX_DIMS, MAX_ENTRIES, canonical, dtype_name, sha256

__all__ = [
    "base_keys",
    "check_doc",
    "check_peft",
    "check_peft_doc",
    "digests",
    "fingerprint",
    "in_candidate_phase",
    "peft_configs",
]

MAX_KEY = 4096
# The LoRA settings that change the function without changing any tensor's shape (the scaling is
# lora_alpha / r, or / sqrt(r) with rsLoRA); everything else shows up as missing keys or other shapes.
_SCALING_FIELDS = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern")


# ---------------------------------------------------------------------- the rule
def in_candidate_phase(model: nn.Module) -> bool:
    """Whether a correlation candidate phase is in progress (its candidates are attached)."""
    return any(len(getattr(layer.dendrites, "candidates", ())) for layer in dendritic_layers(model).values())


def base_keys(
    model: nn.Module, state_keys: Iterable[str], trainable_before: Optional[Iterable[str]] = None
) -> List[str]:
    """The keys of ``state_keys`` (``model.state_dict()``'s) that are base tensors (see the module docstring).

    Args:
        model: the model.
        state_keys: the keys of its state dict.
        trainable_before: in a candidate phase, the names of the parameters that were trainable before it
            (the controller's ``state_dict()["candidate_phase"]["trainable_before"]``).

    Raises:
        StateError: a candidate phase is in progress and ``trainable_before`` is not given.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    # Saved: dendrite parameters, and whatever trains now or trained before a candidate phase froze it.
    kept = {id(p) for layer in dendritic_layers(model).values() for p in layer.dendrite_parameters()}
    kept |= {id(p) for p in params.values() if p.requires_grad}
    if in_candidate_phase(model):
        if trainable_before is None:
            raise StateError(
                "the model is in a correlation candidate phase, whose parameters are frozen for the phase only; "
                "pass its controller (td.save(path, model, controller, base_weights=False)) so that the weights "
                "trained before the phase are kept, or save with base_weights=True."
            )
        kept |= {id(params[n]) for n in trainable_before if n in params}
    return [k for k in state_keys if k in params and id(params[k]) not in kept]


# ---------------------------------------------------------------------- the fingerprint
def _bytes(t: torch.Tensor):
    """The tensor's values as a buffer of little-endian bytes (no copy for a contiguous CPU tensor)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    t = t.contiguous().reshape(-1)
    return t.view(torch.uint8).numpy() if t.numel() else b""


def digests(tensors: Dict[str, torch.Tensor]) -> Dict[str, str]:
    """Key -> SHA-256 of the tensor's bytes; tensors sharing a view (tied weights) are hashed once."""
    out: Dict[str, str] = {}
    seen: Dict[tuple, str] = {}
    for k, t in tensors.items():
        view = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        view += (t.dtype,)
        if t.numel() and view in seen:
            out[k] = seen[view]
            continue
        out[k] = seen[view] = hashlib.sha256(_bytes(t)).hexdigest()
    return out


def fingerprint(tensors: Dict[str, torch.Tensor]) -> dict:
    """The recipe's ``base`` field for the left-out ``tensors`` (whole, on any device).

    Raises:
        CheckpointError: a tensor has a dtype that safetensors cannot name.
    """
    table = {}
    for k, digest in digests(tensors).items():
        t = tensors[k]
        table[k] = {"dtype": dtype_name(t.dtype, k), "shape": list(t.shape), "sha256": digest}
    return {"tensors": table, "sha256": sha256(canonical(table))}


def _is_hex(v: Any, n: int) -> bool:
    return isinstance(v, str) and len(v) == n and all(c in "0123456789abcdef" for c in v)


def check_doc(base: Any, bad) -> None:
    """The recipe's ``base`` field is None or a fingerprint as :func:`fingerprint` writes it; ``bad(what)`` raises."""
    if base is None:
        return
    if not isinstance(base, dict) or set(base) != {"tensors", "sha256"}:
        bad("'base' is not a fingerprint (tensors and sha256)")
    table = base["tensors"]
    if not isinstance(table, dict) or len(table) > MAX_ENTRIES:
        bad("'base.tensors' is not a table of tensors")
    for k, e in table.items():
        if not k or len(k) > MAX_KEY or "\x00" in k:
            bad(f"'base.tensors' has the key {k[:80]!r}")
        ok = isinstance(e, dict) and set(e) == {"dtype", "shape", "sha256"} and e["dtype"] in DTYPES
        shape = e.get("shape") if isinstance(e, dict) else None
        ok = ok and isinstance(shape, list) and len(shape) <= MAX_DIMS
        ok = ok and all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**62 for n in shape)
        if not ok or not _is_hex(e["sha256"], 64):
            bad(f"'base.tensors.{k[:80]}' is not a dtype, a shape and a SHA-256")
    if base["sha256"] != sha256(canonical(table)):
        bad("'base.sha256' is not the hash of 'base.tensors'")


# ---------------------------------------------------------------------- peft
def _jsonable(v: Any) -> Any:
    if isinstance(v, enum.Enum):
        v = v.value
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (set, frozenset)):
        return sorted((_jsonable(x) for x in v), key=repr)
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return repr(v)  # an object peft keeps in its config (a callable, a custom layer map): named, not stored


def _peft_model(model: nn.Module) -> Optional[nn.Module]:
    for m in model.modules():  # outermost first
        configs = getattr(m, "peft_config", None)
        plain = isinstance(configs, dict) and all(callable(getattr(c, "to_dict", None)) for c in configs.values())
        if configs and plain:
            return m
    return None


def peft_configs(model: nn.Module) -> Optional[dict]:
    """``{"path": module path of the peft model, "adapters": {name: peft's to_dict() JSON}}``, or None."""
    peft_model = _peft_model(model)
    if peft_model is None:
        return None
    path = next(n for n, m in model.named_modules() if m is peft_model)
    return {"path": path, "adapters": {str(n): _jsonable(c.to_dict()) for n, c in peft_model.peft_config.items()}}


def check_peft_doc(doc: Any, bad) -> None:
    if doc is None:
        return
    if not isinstance(doc, dict) or set(doc) != {"path", "adapters"} or not isinstance(doc["path"], str):
        bad("'peft' is not a path and a table of adapter configs")
    if not isinstance(doc["adapters"], dict) or not all(isinstance(c, dict) for c in doc["adapters"].values()):
        bad("'peft.adapters' is not a table of adapter configs")


def check_peft(saved: Optional[dict], model: nn.Module, where: object) -> None:
    """A peft model loading a checkpoint of a peft model must have the saved LoRA scaling settings: they are in
    no tensor, so a different ``lora_alpha`` would load without any error and compute another function."""
    if saved is None:
        return
    peft_model = _peft_model(model)
    if peft_model is None:
        return  # not a peft model: its keys will not match the saved ones (and say so)
    for name, theirs in saved["adapters"].items():
        cfg = peft_model.peft_config.get(name)
        if cfg is None:
            continue  # a missing adapter shows up as missing keys
        mine = _jsonable(cfg.to_dict())
        differ = [f for f in _SCALING_FIELDS if f in mine and f in theirs and mine[f] != theirs[f]]
        if differ:
            shown = ", ".join(f"{f}={theirs[f]!r} (the model has {mine[f]!r})" for f in differ)
            raise CheckpointError(
                f"{where} was saved from a peft model whose adapter {name!r} has {shown}; build the peft model with "
                "the saved LoraConfig (torch_dendrites.integrations.peft.from_pretrained does)."
            )
