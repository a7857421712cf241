"""Draw the README's timeline of the trial rule from scripted scores run through the growth policy itself.

Run: ``python -m benchmarks.trial_rule_figure`` (writes ``benchmarks/results/trial_rule.png``).
"""

from __future__ import annotations

from pathlib import Path

import torch_dendrites as td
from torch_dendrites.growth.policy import Event, GrowthPolicy

OUT = Path(__file__).resolve().parent / "results" / "trial_rule.png"

# Phase 0 plateaus at 0.70; set 1 dips, climbs past 0.70 and is kept; set 2 never beats 0.80: rolled back;
# its retry does beat it and is kept; at max_dendrites the run ends on the best model.
SCORES = (
    [0.50, 0.60, 0.66, 0.70, 0.70, 0.69, 0.70, 0.70]
    + [0.66, 0.68, 0.71, 0.75, 0.78, 0.80, 0.80, 0.79, 0.80]
    + [0.76, 0.78, 0.79, 0.79, 0.78, 0.79]
    + [0.77, 0.79, 0.81, 0.83, 0.83, 0.82, 0.83]
)


def main() -> Path:
    from matplotlib.figure import Figure

    cfg = td.GrowthConfig(patience=3, trial_warmup=3, max_dendrites=2, max_tries=2)
    policy = GrowthPolicy(cfg)
    rows = []
    for s in SCORES:
        before = policy.state
        d = policy.step(s)
        rows.append((d.state.epoch, s, d.event, d.kept, before.trial, before.phase_start, before.pre_growth_best))
        if d.state.done:
            break
    fig = Figure(figsize=(9, 3.4), dpi=110)
    ax = fig.subplots()
    epochs = [r[0] for r in rows]
    ax.plot(epochs, [r[1] for r in rows], marker=".", color="C0", label="validation score")
    starts = [0] + [r[0] for r in rows if r[2] in (Event.GROW, Event.RETRY)]
    ends = starts[1:] + [rows[-1][0]]
    for i, (a, b) in enumerate(zip(starts, ends)):
        if i == 0:
            ax.axvspan(a + 0.5, b + 0.5, color="0.9", lw=0)
            ax.text((a + b) / 2 + 0.5, 0.515, "phase 0", ha="center", fontsize=8)
            continue
        ax.axvspan(a + 0.5, a + cfg.trial_warmup + 0.5, color="C2", alpha=0.15, lw=0)
        pre = next(r[6] for r in rows if r[0] == a + 1)
        ax.hlines(pre, a + 0.5, b + 0.5, colors="k", linestyles=":", lw=1)
    ax.axvspan(-1, -1, color="C2", alpha=0.15, label=f"warm-up ({cfg.trial_warmup} epochs, no plateau)")
    ax.hlines([], 0, 0, colors="k", linestyles=":", lw=1, label="best before the growth (the bar to beat)")
    for epoch, _, event, kept, *_ in rows:
        if event in (Event.GROW, Event.RETRY, Event.DONE):
            color = {Event.GROW: "C2", Event.RETRY: "C3", Event.DONE: "k"}[event]
            ax.axvline(epoch + 0.5, color=color, ls="--", lw=1)
            verdict = "" if kept is None else ("kept, " if kept else "rolled back, ")
            ax.text(epoch + 0.6, 0.84, verdict + event.value, rotation=90, va="top", fontsize=8, color=color)
    ax.set_xlim(0.5, rows[-1][0] + 1.5)
    ax.set_ylim(0.5, 0.85)
    ax.set_xlabel("epoch")
    ax.set_ylabel("score")
    ax.set_title("The trial rule: each dendrite set is judged at the end of its own phase", fontsize=10)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT)
    return OUT


if __name__ == "__main__":
    print(main())
