"""How long the device sat with no training step queued: measured, not inferred from host waits.

Why it exists: the loop dispatches step N+1 while step N still runs, so time the host spends
blocked on the next batch (`train/data_wait_frac`) costs the device nothing unless it outlasts
the step in flight; the host wait is only an upper bound on what the device lost. The H100 run
in BUILD.md shows it: 6.2% host wait at the same tokens/s as a run with 0.03%. This meter
measures the device side: a watcher thread blocks on each step's outputs and stamps when they
became ready; when the next step is dispatched, the time since the previous one finished is
time the device had nothing to do (0 when it was still busy, the normal case).

Only gaps between consecutive training steps count: `pause()` before evaluation or a checkpoint
(which use the device, or stall the loop, on purpose) makes the next step's gap 0. The stamp is
taken when the watcher thread wakes, at most a GIL hand-off after the device finished, so a gap
can only be under-estimated by that much.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable


class DeviceIdleMeter:
  """`dispatched(outputs)` after each step's dispatch returns the device's idle seconds before it."""

  def __init__(self, block: Callable[[Any], Any] | None = None, clock: Callable[[], float] = time.perf_counter):
    if block is None:
      import jax
      block = jax.block_until_ready
    self._block, self._clock = block, clock
    self._queue: queue.Queue = queue.Queue()
    self._stamps: dict[int, float] = {}  # step index -> when its outputs were ready
    self._stamped = threading.Condition()
    self._count = 0  # steps dispatched
    self._counted_from = 2  # the first step whose gap counts (none before the first; after a pause)
    self._previous_outputs: Any = None
    self._thread = threading.Thread(target=self._watch, name="rmjax-device-idle", daemon=True)
    self._thread.start()

  def _watch(self) -> None:
    while (item := self._queue.get()) is not None:
      index, outputs = item
      try:
        self._block(outputs)
      finally:  # a failed step is the training thread's to report; it still "finished"
        with self._stamped:
          self._stamps[index] = self._clock()
          self._stamps.pop(index - 2, None)
          self._stamped.notify_all()

  def dispatched(self, outputs: Any) -> float:
    """Call right after a step's dispatch returns, with its outputs; the seconds the device had
    nothing queued between the previous step finishing and this one arriving."""
    now = self._clock()
    self._count += 1
    index = self._count
    gap = 0.0
    if index >= self._counted_from:
      with self._stamped:
        previous = self._stamps.get(index - 1)
      if previous is None and _is_ready(self._previous_outputs):
        with self._stamped:  # finished but not stamped yet: the watcher is about to
          self._stamped.wait_for(lambda: index - 1 in self._stamps, timeout=1.0)
          previous = self._stamps.get(index - 1)
      if previous is not None:
        gap = max(0.0, now - previous)
    self._previous_outputs = outputs
    self._queue.put((index, outputs))
    return gap

  def pause(self) -> None:
    """The next step's gap is not counted (evaluation or a checkpoint comes in between)."""
    self._counted_from = self._count + 2

  def __enter__(self) -> "DeviceIdleMeter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    if self._thread.is_alive():
      self._queue.put(None)
      self._thread.join(timeout=5.0)


def _is_ready(outputs: Any) -> bool:
  """Whether every array of `outputs` is computed (without blocking)."""
  import jax
  leaves = jax.tree.leaves(outputs)
  return bool(leaves) and all(x.is_ready() for x in leaves)
