"""Where a growth run's records go: pluggable sinks called by the controller.

A sink gets two calls per epoch: :meth:`Sink.on_best` when the epoch set a new best (before any growth
action, so it sees the best epoch's structure; a failure there aborts the step with nothing changed), and
:meth:`Sink.on_step` once the step is done. The controller builds the built-in sinks from its ``out_dir``
and ``writer`` arguments; pass more with ``GrowthController(sinks=[...])``.

- :class:`HistorySink`: ``history.csv`` (a row per epoch, appended) and ``architectures.csv``.
- :class:`FigureSink`: ``growth.png``, redrawn only at growth, retry and the end.
- :class:`BestCheckpointSink`: ``best/``, the best model, written with :func:`torch_dendrites.save`
  (adapter-sized when the model has frozen base weights).
- :class:`WriterSink`: TensorBoard-style scalars and event texts.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any, Dict, List

from ..persistence import save

__all__ = ["BestCheckpointSink", "FigureSink", "HistorySink", "Sink", "WriterSink", "plot_history"]

# The history's own columns (extra scores may not take these names). ``kept`` is 1/0 on the step that ended a
# dendrite set's trial; ``snapshot_bytes`` is the size of the best-weight copy held off the accelerator.
BASE_COLUMNS = [
    "epoch", "phase", "dendrites", "parameters", "score", "smoothed", "best", "improved", "event", "kept",
    "snapshot_bytes",
]  # fmt: skip


class Sink:
    """Base class of the controller's sinks (override either method; both default to nothing)."""

    def on_best(self, controller: Any) -> None:
        """The epoch set a new best; ``controller.model`` holds it (before any growth action)."""

    def on_step(self, controller: Any, row: Dict[str, Any], event: str) -> None:
        """The step is done: ``row`` is its history row, ``event`` its event (``""``, ``"grow"``, ...)."""


def _columns(history: List[Dict[str, Any]]) -> List[str]:
    cols = list(BASE_COLUMNS)
    for row in history:
        for k in row:
            if k not in cols:
                cols.append(k)
    return cols


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class HistorySink(Sink):
    """``history.csv`` and ``architectures.csv`` in ``out_dir`` (CSV rows are appended: milliseconds)."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._written_rows = 0
        self._columns: List[str] = []

    def on_step(self, controller: Any, row: Dict[str, Any], event: str) -> None:
        self.write_history(controller.history)
        self.write_architectures(controller.architectures)

    def write_history(self, history: List[Dict[str, Any]]) -> None:
        path = self.out_dir / "history.csv"
        cols = _columns(history)
        if cols != self._columns or self._written_rows > len(history) or not path.exists():
            # A new extra-score column (or a fresh file): rewrite the whole file once.
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=cols, restval="")
            w.writeheader()
            w.writerows(history)
            _atomic_write_text(path, buf.getvalue())
            self._columns = cols
        else:
            with open(path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=cols, restval="").writerows(history[self._written_rows :])
        self._written_rows = len(history)

    def write_architectures(self, architectures: Dict[int, Dict[str, Any]]) -> None:
        rows = []
        for k in sorted(architectures):
            a = architectures[k]
            rows.append(
                {
                    "dendrites": k,
                    "parameters": a["parameters"],
                    "best_validation": a["best_score"],
                    "best_epoch": a["best_epoch"],
                    "epochs": a["epochs"],
                    **{f"{n}_at_best": v for n, v in a["extras"].items()},
                }
            )
        cols = ["dendrites", "parameters", "best_validation", "best_epoch", "epochs"]
        for r in rows:
            cols += [c for c in r if c not in cols]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, restval="")
        w.writeheader()
        w.writerows(rows)
        _atomic_write_text(self.out_dir / "architectures.csv", buf.getvalue())


class FigureSink(Sink):
    """``growth.png`` in ``out_dir``, redrawn at growth, retry and the end only (a figure takes ~0.1 s)."""

    EVENTS = ("grow", "retry", "done")

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)

    def on_step(self, controller: Any, row: Dict[str, Any], event: str) -> None:
        if event in self.EVENTS:
            self.plot(controller.history)

    def plot(self, history: List[Dict[str, Any]]) -> Path:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        return plot_history(history, self.out_dir / "growth.png")


class BestCheckpointSink(Sink):
    """``out_dir/best``: the model at each new best, with :func:`torch_dendrites.save` (atomic).

    The folder is adapter-sized (``base_weights=False``): a model with frozen base weights (a LoRA model, a
    frozen backbone) keeps only what training changes, the same rule as the controller's in-memory best
    weights; a model with nothing frozen gets the full folder. Either way it loads with one call,
    ``td.load(out_dir / "best", build_base_model())``, the base model holding its pretrained weights.
    """

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)

    def on_best(self, controller: Any) -> None:
        save(self.out_dir / "best", controller.model, base_weights=False)


class WriterSink(Sink):
    """Scalars ``dendrites/score``, ``smoothed``, ``best``, ``count``, ``parameters`` and every extra score
    through ``writer.add_scalar(tag, value, step)``; growth events through ``writer.add_text`` if it exists."""

    def __init__(self, writer: Any):
        self.writer = writer

    def on_step(self, controller: Any, row: Dict[str, Any], event: str) -> None:
        w, step = self.writer, row["epoch"]
        w.add_scalar("dendrites/score", row["score"], step)
        w.add_scalar("dendrites/smoothed", row["smoothed"], step)
        if row["best"] is not None:
            w.add_scalar("dendrites/best", row["best"], step)
        w.add_scalar("dendrites/count", row["dendrites"], step)
        w.add_scalar("dendrites/parameters", row["parameters"], step)
        for k, v in row.items():
            if k not in BASE_COLUMNS and isinstance(v, (int, float)):
                w.add_scalar(f"dendrites/{k}", v, step)
        if event and callable(getattr(w, "add_text", None)):
            w.add_text("dendrites/event", f"epoch {step}: {event}", step)


def _same_scale(values: List[float], ref: List[float]) -> bool:
    lo, hi = min(ref), max(ref)
    pad = max(hi - lo, 1e-12)
    return min(values) <= hi + pad and max(values) >= lo - pad


def plot_history(history: List[Dict[str, Any]], path: Path) -> Path:
    """Scores against epochs with a vertical line at each growth and the parameter count on a second axis.

    Extra scores on the validation score's scale (e.g. test accuracy) share its panel; candidate
    correlation scores (``corr:<layer>``) and other scores (e.g. a training loss) get panels below.
    """
    from matplotlib.figure import Figure

    epochs = [r["epoch"] for r in history]
    val = [r["score"] for r in history]
    extras = {}
    for name in (c for c in _columns(history) if c not in BASE_COLUMNS):
        pts = [(r["epoch"], r[name]) for r in history if r.get(name, "") != ""]
        if pts:
            extras[name] = pts
    corr = {n: p for n, p in extras.items() if n.startswith("corr:")}
    top = {n: p for n, p in extras.items() if n not in corr and _same_scale([v for _, v in p], val)}
    bottom = {n: p for n, p in extras.items() if n not in top and n not in corr}
    panels = (
        [(top, None)]
        + ([(corr, "candidate correlation")] if corr else [])
        + ([(bottom, "other scores")] if bottom else [])
    )
    # A bare Figure (no pyplot): no global figure registry, safe off the main thread.
    fig = Figure(figsize=(8, 3 + 2 * len(panels)), dpi=100)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    ax = axes[0]
    ax.plot(epochs, val, label="validation", color="C0")
    color = 2
    for a, (series, label) in zip(axes, panels):
        for name, pts in series.items():
            a.plot(*zip(*pts), label=name, color=f"C{color % 10}", alpha=0.85, marker="." if label else None)
            color += 1
        if label:
            a.set_ylabel(label)
            a.legend(loc="upper right", fontsize=8)
    for a in axes:
        for r in history:
            if r["event"] in ("grow", "retry"):
                a.axvline(r["epoch"] + 0.5, color="k" if r["event"] == "grow" else "r", ls="--", lw=0.8)
            elif r["event"] == "candidates":
                a.axvline(r["epoch"] + 0.5, color="g", ls=":", lw=0.8)
    ax.set_ylabel("score")
    ax2 = ax.twinx()
    ax2.step(epochs, [r["parameters"] for r in history], where="post", color="C1", label="parameters")
    ax2.set_ylabel("parameters")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="lower right", fontsize=8)
    ax.set_title("validation score and growth (dashed: growth, red: retry, dotted green: candidates)")
    axes[-1].set_xlabel("epoch")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, path)
    return path
