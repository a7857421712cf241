"""What the experiments (``continual.py``, ``dann.py``) share: the learning-rate search every arm gets, and the
resumable log of raw runs.

The search: a small grid on a ladder of half-decades, scored on validation data, extended along the ladder
while the best value sits at an edge of what was tried.

Example:
    >>> from benchmarks.experiment import search_lr
    >>> best, tried, at_edge = search_lr(lambda lr: -abs(lr - 3e-3), [1e-4, 3e-4, 1e-3], max_extend=3)
    >>> best, sorted(tried), at_edge
    (0.003, [0.0001, 0.0003, 0.001, 0.003, 0.01], False)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, Sequence, Tuple

__all__ = ["LADDER", "RunLog", "search_lr"]

# Half-decade steps: the values a learning-rate search may try.
LADDER = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def search_lr(
    score: Callable[[float], float], grid: Sequence[float], max_extend: int = 2
) -> Tuple[float, Dict[float, float], bool]:
    """Try every learning rate of ``grid`` (values of :data:`LADDER`), then extend.

    Args:
        score: ``lr -> validation score`` (higher is better); one training run per call.
        grid: the starting values.
        max_extend: how many more ladder steps may be tried beyond an edge whose value is the best so far.

    Returns:
        ``(best_lr, {lr: score}, at_edge)``: ``at_edge`` is true when the best is still the smallest or largest
        value tried (the search budget ended before an interior optimum was found); ties go to the smaller lr.
    """
    for lr in grid:
        if lr not in LADDER:
            raise ValueError(f"learning rate {lr} is not on the search ladder {LADDER}.")
    tried: Dict[float, float] = {}
    for lr in sorted(grid):
        tried[lr] = score(lr)

    def best() -> float:
        return max(sorted(tried), key=lambda lr: tried[lr])

    for _ in range(max_extend):
        lrs, b = sorted(tried), best()
        i = LADDER.index(b)
        if b == lrs[0] and i > 0:
            nxt = LADDER[i - 1]
        elif b == lrs[-1] and i + 1 < len(LADDER):
            nxt = LADDER[i + 1]
        else:
            break
        tried[nxt] = score(nxt)
    lrs, b = sorted(tried), best()
    return b, tried, b in (lrs[0], lrs[-1])


class RunLog:
    """The raw runs of an experiment as JSON (``{"meta": ..., "runs": [...]}``), rewritten atomically after every
    run, so a killed experiment resumes (``resume=True``) without repeating finished runs."""

    def __init__(self, path: Path, resume: bool, meta: dict):
        self.path = Path(path)
        self.doc = {"meta": meta, "runs": []}
        if resume and self.path.exists():
            self.doc["runs"] = json.loads(self.path.read_text())["runs"]

    def find(self, **key):
        """The first run whose fields equal ``key``, or None."""
        for r in self.doc["runs"]:
            if all(r.get(k) == v for k, v in key.items()):
                return r
        return None

    def run_once(self, key: dict, fn: Callable[..., dict], *args, **kwargs) -> Tuple[dict, bool]:
        """``(row, new)``: the logged run with fields ``key``, or ``fn(*args, **kwargs)``'s result logged under it."""
        row = self.find(**key)
        if row is not None:
            return row, False
        row = {**key, **fn(*args, **kwargs)}
        self.doc["runs"].append(row)
        self.save()
        return row, True

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.doc, indent=1))
        tmp.replace(self.path)


def final_runs(log: RunLog, run: Callable[..., dict], arms: dict, lrs: Dict[str, float], seeds: int, key: dict,
               args: Callable[[int], tuple], label: str) -> None:  # fmt: skip
    """Every arm at its chosen learning rate (``lrs[name]``) on the reported seeds, scored on test: ``run(arm,
    *args(seed), lr, test=True)``, logged under ``key`` plus phase, arm, seed and lr (finished runs are kept)."""
    for seed in range(seeds):
        for name, arm in arms.items():
            lr = lrs[name]
            row, new = log.run_once({**key, "phase": "final", "arm": name, "seed": seed, "lr": lr}, run, arm,
                                    *args(seed), lr, test=True)  # fmt: skip
            if new:
                print(f"{label} seed {seed} {name:18s} lr {lr:g}: test {row['test']:.2f} "
                      f"({row['params']:,} params, {row['wall_s']:.0f} s)", flush=True)  # fmt: skip
