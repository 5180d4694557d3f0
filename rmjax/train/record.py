"""What a run has counted so far: the best validation loss and its step, the skipped non-finite
steps, the batch shapes it trained on, and its last evaluation.

Why it exists: the first three are saved with every checkpoint, so a resume continues them
exactly; all of them are reported in final_results.json; one value keeps the two in step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from rmjax.train.evaluation import selection_loss


@dataclasses.dataclass
class RunRecord:
  best_val_loss: float = math.inf
  best_step: int | None = None
  nonfinite_skipped: int = 0
  last_eval: dict[str, Any] = dataclasses.field(default_factory=dict)
  train_shapes: set[tuple[int, ...]] = dataclasses.field(default_factory=set)

  def best_loss(self) -> float | None:
    """The best selection loss so far; None before any finite one."""
    return self.best_val_loss if math.isfinite(self.best_val_loss) else None

  def checkpoint_metadata(self) -> dict[str, Any]:
    """What a resume must continue from (`restore` reads it back)."""
    return {"best_val_loss": self.best_loss(), "best_step": self.best_step,
            "nonfinite_steps_skipped": self.nonfinite_skipped}

  def restore(self, metadata: dict[str, Any]) -> None:
    loss = metadata["best_val_loss"]
    self.best_val_loss = math.inf if loss is None else float(loss)
    self.best_step = metadata["best_step"]
    self.nonfinite_skipped = int(metadata["nonfinite_steps_skipped"])

  def note_eval(self, step: int, metrics: dict[str, Any]) -> bool:
    """Records an evaluation; True when its selection loss is a new (finite) best. A loss equal
    to the best moves the best to this later step: orbax ranks equal losses so (its best step,
    best.json and the best checkpoint it keeps are the latest of them), and the run's record must
    name the step that is on disk."""
    self.last_eval = metrics
    loss = selection_loss(metrics)
    if loss is None or not math.isfinite(loss) or loss > self.best_val_loss:
      return False
    self.best_val_loss, self.best_step = loss, step
    return True

  def final_results(self) -> dict[str, Any]:
    """Its part of final_results.json."""
    return {"best_val_loss": self.best_loss(), "best_step": self.best_step, "final_metrics": self.last_eval,
            "nonfinite_steps_skipped": self.nonfinite_skipped,
            "train_batch_shapes": sorted(list(s) for s in self.train_shapes)}
