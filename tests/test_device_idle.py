"""DeviceIdleMeter: the device's idle gap before each step, from when the previous step's outputs
became ready to when the next step was dispatched; zero while the device is still busy."""

from __future__ import annotations

import threading
import time

import jax
import jax.numpy as jnp

from rmjax.train.device_idle import DeviceIdleMeter


class _Step:
  """A dispatched step's output whose completion the test controls (the device, faked)."""

  def __init__(self):
    self.done = threading.Event()

  def is_ready(self) -> bool:
    return self.done.is_set()


def _finish(meter: DeviceIdleMeter, clock: list[float], step: _Step, at: float, index: int) -> None:
  """The device finishes `step` (the meter's `index`-th) at time `at`; wait for the stamp."""
  clock[0] = at
  step.done.set()
  deadline = time.monotonic() + 5
  while index not in meter._stamps and time.monotonic() < deadline:
    time.sleep(0.001)
  assert meter._stamps.get(index) == at


def test_gaps_count_only_when_the_device_had_nothing_queued():
  clock = [0.0]
  steps = [_Step() for _ in range(6)]
  with DeviceIdleMeter(block=lambda s: s.done.wait(), clock=lambda: clock[0]) as meter:
    assert meter.dispatched(steps[0]) == 0.0  # the first step has no predecessor
    clock[0] = 1.0
    assert meter.dispatched(steps[1]) == 0.0  # step 1 still running: the device is busy
    _finish(meter, clock, steps[0], at=10.0, index=1)
    _finish(meter, clock, steps[1], at=12.0, index=2)
    clock[0] = 15.0  # the host came back 3 s after the device ran dry
    assert meter.dispatched(steps[2]) == 3.0
    _finish(meter, clock, steps[2], at=16.0, index=3)
    meter.pause()  # an evaluation in between: the next gap is not training's
    clock[0] = 20.0
    assert meter.dispatched(steps[3]) == 0.0
    _finish(meter, clock, steps[3], at=25.0, index=4)
    clock[0] = 30.0
    assert meter.dispatched(steps[4]) == 5.0  # counted again after the paused one


def test_real_arrays_the_gap_covers_the_time_the_host_kept_an_idle_device_waiting():
  f = jax.jit(lambda x: x @ x)
  x = jnp.ones((64, 64))
  with DeviceIdleMeter() as meter:
    first = f(x)
    start = time.perf_counter()
    assert meter.dispatched(first) == 0.0
    jax.block_until_ready(first)
    deadline = time.monotonic() + 5
    while 1 not in meter._stamps and time.monotonic() < deadline:  # the watcher saw it finish
      time.sleep(0.001)
    time.sleep(0.02)  # the device is idle now: the "host" is late with the next step
    second = f(x)
    gap = meter.dispatched(second)
    assert 0.02 <= gap <= time.perf_counter() - start
