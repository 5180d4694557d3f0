"""Random access to the lines of a big text file without loading or parsing it.

PRM800K's phase-2 train file is 456 MB of JSONL. Parsing it at start-up would cost minutes and
gigabytes; grain instead wants random access to record i from a thread pool. `LineFile` scans
the file once for newline bytes (numpy on fixed-size chunks, so memory stays bounded by the
chunk size plus 8 bytes per line; roughly 1 GB/s on one core, i.e. well under a second for
the 456 MB file once it is in the page cache) and then reads line i with `os.pread` at its byte
offset, which is thread-safe because pread never moves a shared file position.

Line i of the index is line i + 1 of the file (1-based, as editors show it); empty lines are
kept so that this numbering always holds. Only a final empty "line" after a trailing newline
is dropped, and a UTF-8 byte order mark before the first line (editors on Windows write one)
is not part of that line, so the first record parses like the others.

`path_kind` says what a path that is no regular file is: a FIFO or a device given where a data
file belongs would block the scan or never end it, so callers check before reading.
"""

from __future__ import annotations

import errno
import os
import stat
import threading

import numpy as np

DEFAULT_CHUNK_BYTES = 16 << 20
DEFAULT_MAX_LINE_BYTES = 64 << 20
_NEWLINE = 10
BOM = b"\xef\xbb\xbf"  # UTF-8 byte order mark, which Windows editors write first
REGULAR, DIRECTORY, FIFO, MISSING = "a regular file", "a directory", "a FIFO (named pipe)", "missing"  # path_kind's
_KINDS = ((stat.S_ISREG, REGULAR), (stat.S_ISDIR, DIRECTORY), (stat.S_ISFIFO, FIFO),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def path_kind(path: str | os.PathLike) -> str:
  """What `path` is, in words for a message: "a regular file", "a directory", "a FIFO (named
  pipe)", "a character device", "a symlink loop", "a broken symlink", "missing", ... (symlinks
  followed), so a message about a path that is there never says it does not exist."""
  try:
    mode = os.stat(path).st_mode
  except OSError as e:
    if e.errno == errno.ELOOP:
      return "a symlink loop"
    if os.path.islink(path):
      return "a broken symlink"
    if e.errno in (errno.ENOENT, errno.ENOTDIR):
      return MISSING
    return f"unreadable ({e.strerror})"
  return next((words for test, words in _KINDS if test(mode)), "a special file")


class LineTooLong(ValueError):
  """A line longer than `max_line_bytes` (a corrupt file, e.g. binary data without newlines)."""


def scan_line_starts(path: str, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> tuple[np.ndarray, int]:
  """Byte offset of the start of every line of `path` (the first after a UTF-8 BOM), and the
  file size.

  Reads `chunk_bytes` at a time into one reused buffer; the result is an int64 array with one
  entry per line.
  """
  pieces = [np.zeros(1, dtype=np.int64)]
  buf = bytearray(chunk_bytes)
  offset = 0
  with open(path, "rb", buffering=0) as f:
    if f.read(len(BOM)) == BOM:  # the first line starts after the byte order mark
      pieces[0][0] = offset = len(BOM)
    f.seek(offset)
    while True:
      n = f.readinto(buf)
      if not n:
        break
      arr = np.frombuffer(buf, dtype=np.uint8, count=n)
      newlines = np.flatnonzero(arr == _NEWLINE)
      pieces.append(newlines.astype(np.int64) + (offset + 1))
      offset += n
  starts = np.concatenate(pieces)
  if starts[-1] == offset:  # trailing newline (or empty file): no line starts at EOF
    starts = starts[:-1]
  return starts, offset


class LineFile:
  """Thread-safe random access to the lines of one file (bytes, without the line ending).

  Picklable: the file descriptor is reopened lazily in the receiving process.
  """

  def __init__(self, path: str, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
               max_line_bytes: int = DEFAULT_MAX_LINE_BYTES):
    self.path = str(path)
    self.max_line_bytes = max_line_bytes
    self._starts, self._size = scan_line_starts(self.path, chunk_bytes)
    self._fd: int | None = None
    self._fd_pid: int | None = None
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return int(self._starts.shape[0])

  def span(self, i: int) -> tuple[int, int]:
    """[start, end) byte range of line i, end including its newline if any."""
    start = int(self._starts[i])
    end = int(self._starts[i + 1]) if i + 1 < len(self) else self._size
    return start, end

  def read(self, i: int) -> bytes:
    """Line i (0-based) as bytes, without the trailing "\\n" or "\\r\\n"."""
    if not -len(self) <= i < len(self):
      raise IndexError(f"line index {i} out of range for {self.path} ({len(self)} lines)")
    i %= len(self)
    start, end = self.span(i)
    if end - start > self.max_line_bytes:
      raise LineTooLong(f"{self.path}:{i + 1}: line of {end - start} bytes exceeds {self.max_line_bytes}")
    data = os.pread(self._descriptor(), end - start, start)
    if data.endswith(b"\n"):
      data = data[:-1]
    if data.endswith(b"\r"):
      data = data[:-1]
    return data

  def _descriptor(self) -> int:
    pid = os.getpid()
    fd = self._fd
    if fd is not None and self._fd_pid == pid:
      return fd
    with self._lock:
      if self._fd is None or self._fd_pid != pid:
        self._fd = os.open(self.path, os.O_RDONLY)
        self._fd_pid = pid
      return self._fd

  def close(self) -> None:
    with self._lock:
      if self._fd is not None and self._fd_pid == os.getpid():
        os.close(self._fd)
      self._fd = None
      self._fd_pid = None

  def __del__(self):
    try:
      self.close()
    except Exception:  # interpreter shutdown: nothing useful to do
      pass

  def __getstate__(self) -> dict:
    state = dict(self.__dict__)
    state["_fd"] = None
    state["_fd_pid"] = None
    del state["_lock"]
    return state

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._lock = threading.Lock()
