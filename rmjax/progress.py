"""A training progress bar that appears only where a person is watching.

Why this module exists: tqdm on a terminal is useful (steps/s, ETA, loss), but in batch jobs the
same bar floods log files with carriage returns. `Progress` shows a bar only when stdout is a tty
on the main process and is silent otherwise; the loop calls it the same way in both cases.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO


class Progress:
  """`update(step, loss=...)` moves the bar to `step` (absolute), showing steps/s and ETA (none
  when `total` is None: a count without an end)."""

  def __init__(self, total: int | None, initial: int = 0, is_main_process: bool = True,
               enabled: bool | None = None, stream: TextIO | None = None, desc: str = "train"):
    stream = stream or sys.stdout
    if enabled is None:
      enabled = is_main_process and hasattr(stream, "isatty") and stream.isatty()
    self.enabled = bool(enabled)
    self.step = initial
    self._bar = None
    if self.enabled:
      from tqdm import tqdm
      self._bar = tqdm(total=total, initial=initial, file=stream, desc=desc, unit="step",
                       dynamic_ncols=True, smoothing=0.1)

  def update(self, step: int, **postfix: Any) -> None:
    if self._bar is not None:
      if step > self.step:
        self._bar.update(step - self.step)
      if postfix:
        self._bar.set_postfix({k: _short(v) for k, v in postfix.items()}, refresh=False)
    self.step = max(self.step, step)

  def write(self, msg: str) -> None:
    """Prints a line above the bar without breaking it (no-op when silent)."""
    if self._bar is not None:
      self._bar.write(msg)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  def __enter__(self) -> "Progress":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _short(value: Any) -> str:
  try:
    return f"{float(value):.4g}"
  except (TypeError, ValueError):
    return str(value)
