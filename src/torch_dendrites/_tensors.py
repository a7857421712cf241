"""Small tensor helpers every part of the library uses (a leaf module: it imports nothing of the library)."""

from __future__ import annotations

from typing import List, Optional

import torch

__all__ = ["cat", "flat_name", "uniform"]


def flat_name(name: str) -> str:
    """A dotted parameter path as one attribute name (``"a.b"`` -> ``"a__b"``)."""
    return name.replace(".", "__")


def uniform(shape, bound: float, like: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """``U(-bound, bound)`` with ``like``'s dtype and device.

    Drawn on the CPU in float32, so that a seeded generator gives the same dendrites on every device and rank.
    On the ``meta`` device nothing is drawn or allocated (a meta-built model is initialised when materialised).
    """
    if like.is_meta:
        return torch.empty(shape, dtype=like.dtype, device="meta")
    t = torch.rand(shape, generator=generator, dtype=torch.float32) * (2 * bound) - bound
    return t.to(device=like.device, dtype=like.dtype)


def cat(ts: List[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """``torch.cat`` that returns a lone tensor as it is (no copy)."""
    return ts[0] if len(ts) == 1 else torch.cat(ts, dim)
