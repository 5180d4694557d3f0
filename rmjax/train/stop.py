"""When a run stops early: SIGTERM (a preemption notice) or Ctrl-C, agreed on by every process.

Why it exists: the loop saves a checkpoint at the next step boundary after SIGTERM and returns.
Several processes must stop at the same step (a collective step with a missing process hangs),
so they agree on it every step. Ctrl-C (SIGINT) in the training loop does the same, so the
steps since the last save are kept; a second Ctrl-C stops at once (KeyboardInterrupt), without
saving.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from typing import Iterator

from rmjax.runtime import sigterm_during_startup
from rmjax.train.multiprocess import any_process


class StopFlag:
  """Set by SIGTERM (also one caught during start-up); `should_stop()` once per step."""

  def __init__(self, process_count: int = 1):
    self.signum: int | None = sigterm_during_startup()
    self._process_count = process_count
    self._agreed = False

  def should_stop(self) -> bool:
    """True once any process got the signal."""
    if not self._agreed:
      self._agreed = any_process(self.signum is not None, self._process_count)
      if self._agreed and self.signum is None:
        self.signum = int(signal.SIGTERM)
    return self._agreed

  @contextlib.contextmanager
  def installed(self) -> Iterator[None]:
    def handler(signum, _frame):
      self.signum = signum

    def first_interrupt(signum, _frame):
      self.signum = signum
      signal.signal(signal.SIGINT, signal.default_int_handler)  # the next Ctrl-C: KeyboardInterrupt
      print("\nCtrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again stops at once, "
            "without saving)", file=sys.stderr, flush=True)
    try:
      previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, handler),
                  signal.SIGINT: signal.signal(signal.SIGINT, first_interrupt)}
    except ValueError:  # not the main thread (e.g. called from a worker thread): no handler
      yield
      return
    try:
      yield
    finally:
      for signum, before in previous.items():
        signal.signal(signum, before)

  def name(self) -> str | None:
    """The signal's name ("SIGTERM", "SIGINT"), once one stopped the run."""
    return None if self.signum is None else signal.Signals(self.signum).name
