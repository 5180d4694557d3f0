"""Evaluation during training: every eval source's predictions, their metrics and the loss that
picks the best checkpoint.

Why it exists: the loop decides when to evaluate; what an evaluation computes is here, a pure
function of the rows a `predict(batch)` returns, so a test can check it without training.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import numpy as np

from rmjax.metrics import EvalAccumulator


def val_loss_of(per_source: dict[str, tuple[np.ndarray, np.ndarray]], kind: str) -> dict[str, float | None]:
  """The training loss measured on eval predictions: {"loss": pooled, "<source>/loss": ...}."""
  def loss(p: np.ndarray, y: np.ndarray) -> float | None:
    if p.size == 0:
      return None
    if kind == "mse":
      return float(np.mean((p - y) ** 2))
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return float(np.mean(-(y * np.log(p) + (1 - y) * np.log1p(-p))))

  out = {f"{s}/loss": loss(p, y) for s, (p, y) in per_source.items()}
  if per_source:
    out["loss"] = loss(np.concatenate([p for p, _ in per_source.values()]),
                       np.concatenate([y for _, y in per_source.values()]))
  return out


def selection_loss(metrics: Mapping[str, Any]) -> float | None:
  """The loss that picks the best checkpoint: val/loss, or val/selection_loss when a test-only
  source (REVEAL) was evaluated too."""
  return metrics.get("val/selection_loss", metrics.get("val/loss"))


def evaluate_sources(eval_ds: Mapping[str, Iterable[dict[str, np.ndarray]]],
                     predict: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
                     loss_kind: str, test_only: set[str]) -> dict[str, Any]:
  """{"val/<metric>": value} over every batch of every source. `predict(batch)` gives every
  process's rows of the batch: probs, targets, target_mask, example_index, step_index. Test-only
  sources count in val/loss; val/selection_loss leaves them out."""
  acc = EvalAccumulator()
  for name, ds in eval_ds.items():
    for i, batch in enumerate(ds):
      rows = predict(batch)
      ids = np.asarray([f"{i}:{r}" for r in range(rows["probs"].shape[0])])
      acc.add(name, rows["probs"], rows["targets"], rows["target_mask"], example_ids=ids,
              example_index_BM=rows["example_index"], step_index_BM=rows["step_index"])
  per_source = acc.per_source()
  results = acc.result() if per_source else {}
  results.update(val_loss_of(per_source, loss_kind))
  if test_only & set(per_source):
    held_in = {s: v for s, v in per_source.items() if s not in test_only}
    results["selection_loss"] = val_loss_of(held_in, loss_kind).get("loss")
  return {f"val/{k}": v for k, v in sorted(results.items())}


def describe(step: int, metrics: Mapping[str, Any], sources: Iterable[str], test_only: set[str]) -> str:
  """The train.log line of one evaluation."""
  left_out = sorted(s for s in test_only if f"val/{s}/loss" in metrics)
  return (f"Eval at step {step}: val/loss {fmt(metrics.get('val/loss'))}, val/auroc {fmt(metrics.get('val/auroc'))}, "
          + ", ".join(f"{n}/auroc {fmt(metrics.get(f'val/{n}/auroc'))}" for n in sources)
          + (f"; val/selection_loss {fmt(selection_loss(metrics))} (without the test set "
             f"{', '.join(left_out)})" if "val/selection_loss" in metrics else ""))


def fmt(value: Any) -> str:
  return "n/a" if value is None else f"{float(value):.4f}"
