"""Keeps a failed checkpoint write or read from printing tracebacks around rmjax's own error.

Why it exists: when an asynchronous orbax save fails (a full disk, a file-size limit), the
failure reaches the run as one `CheckpointWriteError` line naming the step and the OS reason
(rmjax/checkpoint). Meanwhile orbax's background threads, asyncio and tensorstore each print
their own copy: orbax logs the exception with a traceback, asyncio logs every abandoned write
task ("Task exception was never retrieved", one traceback per array), and tensorstore's
callbacks, posting results to orbax's event loop after it closed, raise "Event loop is closed"
as unraisable exceptions (dozens of tracebacks). A restore that fails on one array's damaged
file (reported as one `CheckpointCorrupt` line) leaves the same callbacks behind, and the reads
of the other arrays as coroutines that raise when they are collected (each an unraisable
exception with orbax's frames in its traceback) or that never ran (a RuntimeWarning each).
`install()` keeps orbax's messages as single lines (without tracebacks) and drops the rest when
it comes from orbax's or tensorstore's code (or is asyncio's closed-loop error); everything
else is left alone. Every path that reads or writes a checkpoint through orbax calls it first,
and `orbax_failed()` where orbax's failure becomes rmjax's error (the never-awaited warnings
name a coroutine, not its library).
"""

from __future__ import annotations

import logging
import sys
import traceback
import warnings
from types import TracebackType
from typing import Any

_LIBRARIES = ("/orbax/", "/tensorstore/")
_installed = False


def _from_libraries(tb: TracebackType | None) -> bool:
  return any(any(lib in frame.filename for lib in _LIBRARIES) for frame in traceback.extract_tb(tb))


class _OrbaxOneLine(logging.Filter):
  """orbax's error records keep their message and lose their traceback."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.exc_info and any(lib in record.pathname for lib in _LIBRARIES):
      record.exc_info, record.exc_text = None, None
    return True


def _tensorstores_own(exc: BaseException | None, tb: TracebackType | None) -> bool:
  """Raised by tensorstore's C++ code, with no Python frames but asyncio's own (the task that
  awaited a tensorstore future): its messages carry the store's spec or source location."""
  frames = traceback.extract_tb(tb)
  return (all("/asyncio/" in frame.filename for frame in frames)
          and any(mark in str(exc) for mark in ("tensorstore_spec", "tensorstore/")))


class _AbandonedWrites(logging.Filter):
  """asyncio's "... exception was never retrieved" for the reads and writes of a failed restore
  or save: raised in orbax's or tensorstore's Python code, or set on a future by tensorstore's
  C++ code (no Python frames at all, or only those of the asyncio task that awaited it)."""

  def filter(self, record: logging.LogRecord) -> bool:
    if "exception was never retrieved" not in record.getMessage() or not record.exc_info:
      return True
    exc, tb = record.exc_info[1], record.exc_info[2]
    return not (tb is None or _from_libraries(tb) or _tensorstores_own(exc, tb))


def _abandoned_work(unraisable: Any) -> bool:
  """tensorstore's callbacks into orbax's closed event loop, or orbax's own coroutines (the
  reads or writes a failed restore or save abandoned) raising as they are collected."""
  exc, tb = unraisable.exc_value, unraisable.exc_traceback
  closed_loop = (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"
                 and any("asyncio" in frame.filename for frame in traceback.extract_tb(tb)))
  return closed_loop or _from_libraries(tb)


def orbax_failed() -> None:
  """Called where a failed orbax read or write becomes rmjax's one-line error: the coroutines it
  left pending are never awaited, and Python warns of each (mostly at exit, where no origin
  shows). From here on in this process those warnings are not shown."""
  warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)


def install() -> None:
  """Idempotent; called before orbax reads or writes a checkpoint."""
  global _installed
  if _installed:
    return
  _installed = True
  logging.getLogger("absl").addFilter(_OrbaxOneLine())  # orbax logs through absl
  logging.getLogger("asyncio").addFilter(_AbandonedWrites())
  previous = sys.unraisablehook

  def hook(unraisable: Any) -> None:
    if not _abandoned_work(unraisable):
      previous(unraisable)
  sys.unraisablehook = hook
