"""The training loop's meters: tokens per second always; where the time goes only when asked.

Why it exists: tokens/s is the one throughput number every run logs. Finding where a step's
time goes (the host's wait for data, the device's idle gaps between steps, the time inside the
step call) takes a watcher thread and clock reads around every dispatch, so it runs only with
`spec.perf_metrics` (BUILD.md has the numbers it produced). Time spent in evaluation and
checkpoints is left out of every window: they stall training on purpose.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator

from rmjax.train.device_idle import DeviceIdleMeter

# Per-step seconds, summed over a window (perf_metrics only).
_TIMES = ("data_wait", "data_read", "data_place", "device_idle", "device_idle_max", "dispatch")


class LoopMeter:
  """`next_batch` and `dispatch` wrap the loop's two calls; `count` adds a step once its metrics
  are read; `scalars()` ends a logging window."""

  def __init__(self, detailed: bool):
    self.detailed = detailed
    self._idle = DeviceIdleMeter() if detailed else None
    self._times: dict[str, float] = {}  # the step being dispatched
    self._reset(time.perf_counter())

  def _reset(self, start: float) -> None:
    self._start, self._tokens, self._steps = start, 0.0, 0
    self._sums = dict.fromkeys(_TIMES, 0.0)

  def next_batch(self, iterator: Iterator[Any]) -> Any:
    """The next prefetched batch; with perf_metrics, how long the host waited for it."""
    if not self.detailed:
      return next(iterator)
    t0 = time.perf_counter()
    item = next(iterator)
    self._times = {"data_wait": time.perf_counter() - t0, "data_read": item.read_s, "data_place": item.place_s}
    return item

  def dispatch(self, train_step: Callable[..., tuple[Any, Any]], *args: Any) -> tuple[Any, Any]:
    """`train_step(*args)` -> (state, metrics); with perf_metrics, the device's idle gap before it."""
    if not self.detailed:
      return train_step(*args)
    called_at = self._idle.clock()
    state, metrics = train_step(*args)
    gap = self._idle.dispatched(metrics, called_at)
    self._times.update(device_idle=gap.idle_s, device_idle_max=gap.idle_max_s, dispatch=gap.dispatch_s)
    return state, metrics

  def step_times(self) -> dict[str, float]:
    """The timings of the step just dispatched (empty without perf_metrics), for `count`."""
    return self._times

  def count(self, tokens: float, times: dict[str, float]) -> None:
    self._tokens += tokens
    self._steps += 1
    for key, seconds in times.items():
      self._sums[key] += seconds

  @contextlib.contextmanager
  def paused(self) -> Iterator[None]:
    """Evaluation or a checkpoint: its time is left out of the window, and of the next gap."""
    if self._idle is not None:
      self._idle.pause()
    paused_at = time.perf_counter()
    try:
      yield
    finally:
      self._start += time.perf_counter() - paused_at

  def scalars(self) -> dict[str, float]:
    """The window's train/ scalars; starts the next window."""
    now = time.perf_counter()
    elapsed, steps = max(now - self._start, 1e-9), max(self._steps, 1)
    out = {"train/tokens_per_s": self._tokens / elapsed}
    if self.detailed:
      s = self._sums
      out |= {
        "train/data_wait_frac": min(s["data_wait"] / elapsed, 1.0),
        # What the device lost: time with no step queued (a host wait shorter than the step in
        # flight costs nothing), for certain and at most (device_idle.py); and the host's time
        # inside the step call.
        "train/device_idle_frac": min(s["device_idle"] / elapsed, 1.0),
        "train/device_idle_max_frac": min(s["device_idle_max"] / elapsed, 1.0),
        "train/dispatch_ms": 1e3 * s["dispatch"] / steps,
        # Where a wait comes from: the prefetch thread's time per batch in the pipeline and in
        # placing it on the devices (both overlap the device's work unless data_wait_frac says not).
        "train/data_read_ms": 1e3 * s["data_read"] / steps,
        "train/data_place_ms": 1e3 * s["data_place"] / steps}
    self._reset(now)
    return out

  def __enter__(self) -> "LoopMeter":
    return self

  def __exit__(self, *exc) -> None:
    if self._idle is not None:
      self._idle.close()
