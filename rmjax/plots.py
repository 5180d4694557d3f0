"""Reliability diagrams: is a predicted confidence of 0.8 right 80% of the time, per source?

Why this module exists: ECE condenses calibration into one number; a person deciding whether
to trust the scores needs to see where the model is over- or under-confident and how many steps
each bin holds. One panel per source (plus the pooled "overall"), each with the diagonal, the
per-bin mean prediction vs observed mean target, and the bin counts beneath. Bins and ECE come
from `rmjax.metrics.reliability_bins`, so the plot and the logged metrics always agree.

matplotlib is imported lazily and used through `Figure` directly (Agg canvas, no pyplot global
state), so headless training jobs can call this without a display.
"""

from __future__ import annotations

import math
import os
import pathlib
from typing import Mapping, Sequence

import numpy as np

from rmjax import metrics

MAX_COLS = 4


def _panels(per_source: Mapping[str, tuple[Sequence[float], Sequence[float]]]) -> list[tuple[str, np.ndarray, np.ndarray]]:
  panels = []
  for name in sorted(per_source):
    p, y = metrics.as_pair(*per_source[name])  # one-line ValueError on bad input
    panels.append((name, p, y))
  if len(panels) > 1:
    panels.append(("overall", np.concatenate([p for _, p, _ in panels]), np.concatenate([y for _, _, y in panels])))
  return panels


def _draw_panel(ax_curve, ax_hist, name: str, p: np.ndarray, y: np.ndarray, n_bins: int) -> None:
  edges = np.linspace(0.0, 1.0, n_bins + 1)
  centers = (edges[:-1] + edges[1:]) / 2
  ax_curve.plot([0, 1], [0, 1], linestyle="--", color="0.55", linewidth=1, label="perfectly calibrated")
  ax_curve.set_xlim(-0.02, 1.02)  # a little margin so markers at 0 or 1 are not cut in half
  ax_curve.set_ylim(-0.02, 1.02)
  ax_curve.set_aspect("equal", adjustable="box")
  ax_curve.grid(True, alpha=0.3)
  ax_curve.set_ylabel("observed fraction correct")
  ax_curve.tick_params(labelbottom=False)
  if p.size == 0:
    ax_curve.set_title(f"{name}\nn=0", fontsize=11)
    ax_curve.text(0.5, 0.5, "no supervised steps", ha="center", va="center", color="0.4")
    ax_hist.set_yticks([])
    ax_hist.set_xlabel("mean predicted confidence")
    return
  counts, mean_p, mean_y = metrics.reliability_bins(p, y, n_bins)
  used = counts > 0
  # Gap bars between each bin's mean prediction and what was observed show the miscalibration.
  ax_curve.vlines(mean_p[used], mean_p[used], mean_y[used], color="tab:red", alpha=0.35, linewidth=3,
                  label="gap")
  ax_curve.plot(mean_p[used], mean_y[used], marker="o", color="tab:blue", linewidth=1.8, markersize=5,
                label="model")
  ece = metrics.ece(p, y, n_bins)
  ax_curve.set_title(f"{name}\nn={p.size:,}   ECE={ece:.3f}", fontsize=11)
  ax_hist.bar(centers, counts, width=0.9 / n_bins, color="tab:blue", alpha=0.6)
  ax_hist.set_ylim(0, counts.max() * 1.35)
  ax_hist.set_xlabel("mean predicted confidence")
  ax_hist.set_ylabel("steps")
  ax_hist.grid(True, axis="y", alpha=0.3)
  for x, c in zip(centers, counts):
    if c:
      ax_hist.annotate(_compact(int(c)), (x, c), textcoords="offset points", xytext=(0, 2),
                       ha="center", va="bottom", fontsize=7)


def _compact(n: int) -> str:
  return f"{n / 1000:.1f}k" if n >= 10_000 else str(n)


def reliability_diagram(per_source: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                        path: str | os.PathLike, n_bins: int = 10, dpi: int = 110) -> pathlib.Path:
  """Writes a PNG reliability diagram of {source: (preds, targets)} to `path`; returns the path."""
  if not per_source:
    raise ValueError("reliability_diagram needs at least one source")
  from matplotlib.figure import Figure  # lazy: matplotlib is only needed to draw
  panels = _panels(per_source)
  ncols = min(len(panels), MAX_COLS)
  nrows = math.ceil(len(panels) / ncols)
  fig = Figure(figsize=(4.3 * ncols, 5.6 * nrows), dpi=dpi, layout="constrained")
  outer = fig.add_gridspec(nrows, ncols)
  handles, labels = [], []
  for i, (name, p, y) in enumerate(panels):
    inner = outer[i // ncols, i % ncols].subgridspec(2, 1, height_ratios=[3.2, 1], hspace=0.05)
    ax_curve = fig.add_subplot(inner[0])
    ax_hist = fig.add_subplot(inner[1], sharex=ax_curve)
    _draw_panel(ax_curve, ax_hist, name, p, y, n_bins)
    found = ax_curve.get_legend_handles_labels()
    if len(found[0]) > len(handles):  # an empty first panel has only the diagonal
      handles, labels = found
  title = f"Reliability diagram ({n_bins} equal-width bins)"
  fig.suptitle(title if ncols > 1 else title.replace(" (", "\n("), fontsize=12)
  fig.legend(handles, labels, loc="outside lower center", ncols=len(handles), fontsize=9, frameon=False)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, format="png")
  return path
