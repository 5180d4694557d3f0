"""DeviceIdleMeter: the device's idle gap before each step, from when the previous step's outputs
became ready to when the next step's call began (certain) and returned (at most); zero while the
device is still busy."""

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

  def dispatch(step: _Step, called: float, returned: float):
    clock[0] = returned
    return meter.dispatched(step, called)

  with DeviceIdleMeter(block=lambda s: s.done.wait(), clock=lambda: clock[0]) as meter:
    assert dispatch(steps[0], 0.0, 0.5) == (0.0, 0.0, 0.5)  # the first step has no predecessor
    assert dispatch(steps[1], 1.0, 1.25) == (0.0, 0.0, 0.25)  # step 1 still running: the device is busy
    _finish(meter, clock, steps[0], at=10.0, index=1)
    _finish(meter, clock, steps[1], at=12.0, index=2)
    # the host called 3 s after the device ran dry; its call returned 1 s later
    assert dispatch(steps[2], 15.0, 16.0) == (3.0, 4.0, 1.0)
    _finish(meter, clock, steps[2], at=17.0, index=3)
    meter.pause()  # an evaluation in between: the next gap is not training's
    assert dispatch(steps[3], 20.0, 20.5) == (0.0, 0.0, 0.5)
    _finish(meter, clock, steps[3], at=25.0, index=4)
    assert dispatch(steps[4], 30.0, 30.5) == (5.0, 5.5, 0.5)  # counted again after the paused one


def test_a_call_begun_while_the_device_was_busy_is_no_certain_idle():
  """On a GPU a step call returns only once its kernels are enqueued, which the bounded launch
  queue paces to the device: a call begun before the previous step finished can return after it.
  The device had work queued all along: idle for certain 0, at most up to the return."""
  clock = [0.0]
  steps = [_Step() for _ in range(2)]
  with DeviceIdleMeter(block=lambda s: s.done.wait(), clock=lambda: clock[0]) as meter:
    meter.dispatched(steps[0], 0.0)
    _finish(meter, clock, steps[0], at=10.0, index=1)
    clock[0] = 10.25  # the call for step 2 began at 9.5, before step 1 finished at 10.0
    gap = meter.dispatched(steps[1], 9.5)
  assert gap.idle_s == 0.0 and gap.idle_max_s == 0.25 and gap.dispatch_s == 0.75


def test_real_arrays_the_gap_covers_the_time_the_host_kept_an_idle_device_waiting():
  f = jax.jit(lambda x: x @ x)
  x = jnp.ones((64, 64))
  with DeviceIdleMeter() as meter:
    called = meter.clock()
    first = f(x)
    start = time.perf_counter()
    assert meter.dispatched(first, called).idle_s == 0.0
    jax.block_until_ready(first)
    deadline = time.monotonic() + 5
    while 1 not in meter._stamps and time.monotonic() < deadline:  # the watcher saw it finish
      time.sleep(0.001)
    time.sleep(0.02)  # the device is idle now: the "host" is late with the next step
    called = meter.clock()
    second = f(x)
    gap = meter.dispatched(second, called)
    assert 0.02 <= gap.idle_s <= gap.idle_max_s <= time.perf_counter() - start


def test_a_step_that_fails_is_stamped_and_the_watcher_prints_nothing(monkeypatch):
  """A step whose outputs raise (a device out of memory) is the training thread's to report as
  one line; the watcher thread stamps it as finished and raises nothing of its own."""
  raised = []
  monkeypatch.setattr(threading, "excepthook", lambda args: raised.append(args.exc_value))

  def failing_block(outputs):
    raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 8357888882752 bytes.")
  clock = [0.0]
  with DeviceIdleMeter(block=failing_block, clock=lambda: clock[0]) as meter:
    meter.dispatched(_Step(), 0.0)
    deadline = time.monotonic() + 5
    while 1 not in meter._stamps and time.monotonic() < deadline:
      time.sleep(0.001)
    assert 1 in meter._stamps and meter._thread.is_alive()
  assert raised == []
