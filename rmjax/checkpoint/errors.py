"""Checkpoint failures, each reported as one line, and the decoding of tensorstore's messages.

Why it exists: orbax and tensorstore raise many exception types with multi-line messages whose
useful part (the OS reason) is often only an error code at the end; rmjax says what failed, on
which path, in one line a user can act on.
"""

from __future__ import annotations

import os
import pathlib
import re



class CheckpointError(RuntimeError):
  """Base class: every checkpoint failure is reported as one clear line."""


class CheckpointNotFound(CheckpointError):
  """The requested step does not exist in the checkpoint directory."""


class CheckpointCorrupt(CheckpointError):
  """A committed checkpoint folder cannot be restored (truncated, files missing, or
  not matching the restore target)."""

  def __init__(self, path: os.PathLike | str, reason: str):
    self.path, self.reason = pathlib.Path(path), reason
    super().__init__(f"corrupt or unreadable checkpoint {self.path}: {reason}")


class CheckpointProcessMismatch(CheckpointError):
  """The checkpoint's data positions were written by another number of processes."""


class CheckpointMismatch(CheckpointError):
  """A readable checkpoint whose arrays do not fit the model this spec builds."""


class CheckpointWriteError(CheckpointError):
  """A save could not be written; the previously committed steps are untouched."""

  def __init__(self, directory: os.PathLike | str, reason: str):
    self.directory = pathlib.Path(directory)
    super().__init__(f"cannot write checkpoint in {self.directory}: {reason}")


_ORBAX_READ_WRAPPER = "Encountered error while reading array index"
_TENSORSTORE_DETAIL = re.compile(r"\s*\[(tensorstore_spec|source locations)='[^']*'\]")
_UNCLOSED_DETAIL = re.compile(r"\s*\[(tensorstore_spec|source locations)='.*$")  # cut off by the message's end


def one_line(exc: BaseException) -> str:
  """First line of an exception message, bounded, prefixed with its type, ending with the OS
  reason when tensorstore only gives its code (`[os_error_code='27']` -> "File too large").
  orbax wraps a failed array read in an `Exception` whose message is the index read and the
  store's whole spec (tensorstore's own error, naming the array and the file, is its cause):
  the cause is reported instead. tensorstore's bracketed store spec (a page of JSON) and source
  locations are left out."""
  if _ORBAX_READ_WRAPPER in str(exc) and exc.__cause__ is not None:
    exc = exc.__cause__
  message = _TENSORSTORE_DETAIL.sub("", str(exc))  # before the first line: a spec may span lines
  text = next((line.strip() for line in message.splitlines() if line.strip()), "")
  text = _UNCLOSED_DETAIL.sub("", text)
  code = re.search(r"os_error_code='?(\d+)", text)
  if len(text) > 400:  # keep the end too: tensorstore puts the OS reason last
    text = f"{text[:220]} ... {text[-170:]}"
  reason = os.strerror(int(code.group(1))) if code else ""
  return f"{type(exc).__name__}: {text}" + (f" ({reason})" if reason and reason not in text else "")
