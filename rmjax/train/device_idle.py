"""How long the device sat with no training step queued: measured, not inferred from host waits.

Runs only with `spec.perf_metrics` (train/perf.py): it adds a watcher thread.

Why it exists: the loop dispatches step N+1 while step N still runs, so time the host spends
blocked on the next batch (`train/data_wait_frac`) costs the device nothing unless it outlasts
the step in flight; the host wait is only an upper bound on what the device lost to data. This
meter measures the device side: a watcher thread blocks on each step's outputs and stamps when
they became ready; the next step's dispatch is compared with that stamp.

A dispatch is a span, not an instant, and the two ends bound the device's idle time:
- `idle_s`: from the previous step finishing to the host *calling* the next step. The device had
  nothing queued for certain (a lower bound, 0 when the call began while the device was busy).
- `idle_max_s`: to the call *returning*. On a GPU the call returns only after it has enqueued
  the step's kernels, and the driver's launch queue is bounded, so a call begun in time can
  return well after the device started on it: this end is an upper bound. The two ends together
  say whether a gap was the host's fault (BUILD.md, Results: the device idle row).
- `dispatch_s`: the call's own length (host time inside the step call).

Only gaps between consecutive training steps count: `pause()` before evaluation or a checkpoint
(which use the device, or stall the loop, on purpose) makes the next step's gaps 0. The stamp is
taken when the watcher thread wakes, at most a GIL hand-off after the device finished, so a gap
can only be under-estimated by that much.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable, NamedTuple


class StepGap(NamedTuple):
  """Seconds around one step's dispatch (module docstring): the device idle for certain, idle at
  most, and the host's time inside the step call."""
  idle_s: float
  idle_max_s: float
  dispatch_s: float


class DeviceIdleMeter:
  """`clock()` before each step's call, `dispatched(outputs, called_at)` after it: the StepGap."""

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
      except Exception:  # noqa: BLE001 - a failed step is the training thread's to report, once,
        pass  # as one line; here it has only "finished" (a traceback from this thread is noise)
      with self._stamped:
        self._stamps[index] = self._clock()
        self._stamps.pop(index - 2, None)
        self._stamped.notify_all()

  def clock(self) -> float:
    """The meter's time: take it right before calling the step, for `dispatched`."""
    return self._clock()

  def dispatched(self, outputs: Any, called_at: float) -> StepGap:
    """Call right after a step's call returns, with its outputs and when the call began: how long
    the device had nothing queued between the previous step finishing and this one's call
    (certain, and at most up to the return)."""
    now = self._clock()
    self._count += 1
    index = self._count
    idle = idle_max = 0.0
    if index >= self._counted_from:
      with self._stamped:
        previous = self._stamps.get(index - 1)
      if previous is None and _is_ready(self._previous_outputs):
        with self._stamped:  # finished but not stamped yet: the watcher is about to
          self._stamped.wait_for(lambda: index - 1 in self._stamps, timeout=1.0)
          previous = self._stamps.get(index - 1)
      if previous is not None:
        idle, idle_max = max(0.0, called_at - previous), max(0.0, now - previous)
    self._previous_outputs = outputs
    self._queue.put((index, outputs))
    return StepGap(idle, idle_max, max(0.0, now - called_at))

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
