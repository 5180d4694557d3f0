"""Keeps a failed background checkpoint write from printing tracebacks around rmjax's own error.

Why it exists: when an asynchronous orbax save fails (a full disk, a file-size limit), the
failure reaches the run as one `CheckpointWriteError` line naming the step and the OS reason
(rmjax/checkpoint.py). Meanwhile orbax's background threads, asyncio and tensorstore each print
their own copy: orbax logs the exception with a traceback, asyncio logs every abandoned write
task ("Task exception was never retrieved", one traceback per array), and tensorstore's
callbacks, posting results to orbax's event loop after it closed, raise "Event loop is closed"
as unraisable exceptions (dozens of tracebacks). `install()` keeps orbax's messages as single
lines (without tracebacks) and drops the other two kinds when they come from orbax's or
tensorstore's code; everything else is left alone.
"""

from __future__ import annotations

import logging
import sys
import traceback
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


class _AbandonedWrites(logging.Filter):
  """asyncio's "... exception was never retrieved" for the write tasks of a failed save: raised
  in orbax's or tensorstore's Python code, or set on a future by tensorstore's C++ code (no
  Python frames at all)."""

  def filter(self, record: logging.LogRecord) -> bool:
    if "exception was never retrieved" not in record.getMessage() or not record.exc_info:
      return True
    tb = record.exc_info[2]
    return not (tb is None or _from_libraries(tb))


def _closed_loop_callback(unraisable: Any) -> bool:
  exc = unraisable.exc_value
  return (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"
          and any("asyncio" in frame.filename for frame in traceback.extract_tb(unraisable.exc_traceback)))


def install() -> None:
  """Idempotent; called when a Checkpointer opens."""
  global _installed
  if _installed:
    return
  _installed = True
  logging.getLogger("absl").addFilter(_OrbaxOneLine())  # orbax logs through absl
  logging.getLogger("asyncio").addFilter(_AbandonedWrites())
  previous = sys.unraisablehook

  def hook(unraisable: Any) -> None:
    if not _closed_loop_callback(unraisable):
      previous(unraisable)
  sys.unraisablehook = hook
