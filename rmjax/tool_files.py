"""The files a tool writes, whole or not at all; the JSON Lines it reads, in bounded lines.

Why it exists: score, rerank, evaluate, the benchmarks and export write results users keep. A
disk that fills, a Ctrl-C or any error half-way used to leave a file cut mid-line (invalid JSON
Lines), a 0-byte eval_metrics.json beside a complete predictions.jsonl, or an old bon.json
beside a new candidates.jsonl, and the error ("[Errno 28] No space left on device") named no
path. Here every file of one result is written under a temporary name in its own folder
(".<name>.<random>.partial<suffix>": same file system, so the rename is atomic) and renamed into
place only when ALL of them were written; on any failure the temporary files are removed and the
earlier outputs stay as they were. A write that fails says which file: "cannot write <path>:
<reason>".

A target that exists and is not a regular file (--output /dev/null, a pipe), or that a /dev
name points at (/dev/stdout, /dev/fd/N from `>(...)`), cannot be replaced by a rename: it is
appended to in place, as a stream (`is_stream`).

score and rerank read JSON Lines through `jsonl_lines`: a regular file or a pipe (`--input
<(zcat x.gz)`), os.devnull as an empty input, nothing else (a character device such as
/dev/zero would be read forever); lines are read in bounded chunks, and a line longer than
MAX_LINE_BYTES is a counted skip, not the whole file in memory. A UTF-8 byte order mark at the
start of line 1 (written by some Windows editors) is dropped.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import secrets
import stat
from typing import Any, Callable, Iterator

from rmjax.cli import first_line
from rmjax.data.jsonl_index import BOM, DEFAULT_MAX_LINE_BYTES, DIRECTORY, FIFO, MISSING, REGULAR, path_kind

MAX_LINE_BYTES = DEFAULT_MAX_LINE_BYTES  # the readers' bound: far above any solution, far below memory
_CHUNK = 1 << 20


def cannot_write(path: str | os.PathLike, exc: BaseException) -> OSError:
  """An OSError "cannot write <path>: <reason>" for an OSError or a library's write error (the
  safetensors library says "Error while serializing: I/O error: No space left on device")."""
  reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
  out = OSError(f"cannot write {path}: {reason}")
  out.errno = getattr(exc, "errno", None)
  return out


def _write_errors() -> tuple[type[BaseException], ...]:
  from safetensors import SafetensorError
  return (OSError, SafetensorError)


def is_stream(path: str | os.PathLike) -> bool:
  """Whether `path` is written in place, as a stream: it exists and is no regular file (a pipe,
  /dev/null), or it is a /dev or /proc name (/dev/stdout, /dev/fd/N from `>(...)`), asked before
  resolving: /dev/fd/63 resolves to no path, and /dev/stdout to whatever the shell opened."""
  path = pathlib.Path(path)
  return path.exists() and (not path.is_file() or str(path).startswith(("/dev/", "/proc/")))


@contextlib.contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
  """An OSError or safetensors error raised inside becomes `cannot_write(path, ...)`."""
  try:
    yield
  except _write_errors() as e:
    raise cannot_write(path, e) from None


class _NamedWriter:
  """A text file whose failed writes name the output they are for."""

  def __init__(self, fh: Any, path: pathlib.Path):
    self._fh, self.path = fh, path

  def write(self, text: str) -> int:
    with naming(self.path):
      return self._fh.write(text)


class OutputFiles:
  """The files of one result, each written to a temporary path and renamed into place together
  by `commit` (use `output_files()`, which commits on success and discards on failure)."""

  def __init__(self) -> None:
    self._pending: list[tuple[pathlib.Path, pathlib.Path]] = []  # (temporary, final)
    self._open: list[Any] = []

  def path(self, final: str | os.PathLike) -> pathlib.Path:
    """Where to write `final` now: a temporary path beside it (with its suffix, so a library that
    picks a format by suffix picks the same), or `final` itself when it is not a regular file."""
    final = pathlib.Path(final)
    if final.is_dir():
      raise IsADirectoryError(f"cannot write {final}: it is a directory")
    if is_stream(final):
      return final
    final = pathlib.Path(os.path.realpath(final))  # through a symlink: replace its target, not the link
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{secrets.token_hex(4)}.partial{final.suffix}")
    self._pending.append((tmp, final))
    return tmp

  def write(self, final: str | os.PathLike, write: Callable[[pathlib.Path], Any]) -> None:
    """write(path) writes the file (savefig, safetensors' save_file, ...); its OSError names `final`."""
    tmp = self.path(final)
    with naming(final):
      write(tmp)

  def write_text(self, final: str | os.PathLike, text: str) -> None:
    def write(path: pathlib.Path) -> None:
      with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    self.write(final, write)

  def open(self, final: str | os.PathLike) -> _NamedWriter:
    """A text file to write `final` line by line; closed by commit / discard."""
    tmp = self.path(final)
    with naming(final):  # a stream is appended to: `>> log` must keep what is there
      fh = open(tmp, "a" if is_stream(final) else "w", encoding="utf-8")
    self._open.append((fh, final))
    return _NamedWriter(fh, pathlib.Path(final))

  def _close(self) -> None:
    while self._open:
      fh, final = self._open.pop()
      with naming(final):
        fh.close()

  def commit(self) -> None:
    self._close()
    for tmp, final in self._pending:
      with naming(final):
        os.replace(tmp, final)
    self._pending = []

  def discard(self) -> None:
    with contextlib.suppress(OSError, *_write_errors()):
      self._close()
    for tmp, _ in self._pending:
      with contextlib.suppress(OSError):
        tmp.unlink()
    self._pending = []


@contextlib.contextmanager
def output_files() -> Iterator[OutputFiles]:
  """OutputFiles whose files appear only if the block succeeds; on any exception, Ctrl-C
  included, they are removed and what was there before stays."""
  files = OutputFiles()
  try:
    yield files
    files.commit()
  except BaseException:
    files.discard()
    raise


# -- input ------------------------------------------------------------------------------------------
def check_input(path: str | os.PathLike, flag: str = "--input") -> pathlib.Path:
  """`path` if it is a regular file, a pipe or os.devnull; else an OSError saying what it is."""
  path = pathlib.Path(path)
  kind = path_kind(path)
  if kind == MISSING:
    raise FileNotFoundError(f"input file not found: {path}")
  if kind == DIRECTORY:
    raise IsADirectoryError(f"{flag} {path} is a directory; give a JSON Lines file")
  if kind in (REGULAR, FIFO) or _is_devnull(path):
    return path
  raise OSError(f"{flag} {path} is {kind}, not a file or a pipe")


def _is_devnull(path: pathlib.Path) -> bool:
  try:
    st, null = os.stat(path), os.stat(os.devnull)
  except OSError:
    return False
  return stat.S_ISCHR(st.st_mode) and st.st_rdev == null.st_rdev


def jsonl_lines(path: pathlib.Path, warn: Callable[[str], None]) -> Iterator[tuple[int, bytes]]:
  """(1-based line number, bytes) of each non-blank line of `path`, a BOM at its start dropped; a
  line longer than MAX_LINE_BYTES is skipped with warn("<path>:<line>: skipped: ...")."""
  with open(path, "rb") as fh:
    lineno = 0
    while True:
      raw = fh.readline(MAX_LINE_BYTES + 1)
      if not raw:
        return
      lineno += 1
      if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
        while (rest := fh.readline(_CHUNK)) and not rest.endswith(b"\n"):
          pass
        warn(f"{path}:{lineno}: skipped: line longer than {MAX_LINE_BYTES} bytes ({MAX_LINE_BYTES / 2**20:g} MiB)")
        continue
      if lineno == 1 and raw.startswith(BOM):
        raw = raw[len(BOM):]
      if raw.strip():
        yield lineno, raw
