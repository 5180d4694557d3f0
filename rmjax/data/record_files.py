"""Record files of the field's stepwise datasets: where they are, and record i of them.

Why one module: ProcessBench, Math-Shepherd, TRL stepwise rows and rmjax's own JSONL differ in
what a record holds, not in how records are stored. Hub datasets come as `.json` arrays,
`.jsonl` lines or `.parquet` shards, in a directory per dataset with one file (or several
shards) per split, often inside the Hugging Face cache. Every reader gets the same file
handling from here, so adding a format means writing only its record -> `Example` rule.

Storage rules:
  .jsonl    indexed lazily (byte offsets, `jsonl_index.LineFile`), a line parsed when read,
            so a 793 MB Math-Shepherd file costs one scan and 8 bytes a line.
  .json     one JSON array, decoded at start-up element by element (a corrupt tail is one
            counted skip, the elements before it survive); a `.json` file that does not start
            with "[" is read as JSON Lines (hub datasets often name JSONL files .json).
  .parquet  read once into Arrow memory (columnar, no Python objects per row; slicing an
            immutable Arrow table is thread-safe), row i converted to a dict when read.
A path is a file, a directory plus a split (`<split>.{jsonl,json,parquet}`, or shards
`<split>-*.parquet` / `<split>/*`, directly or under data/), or `hf://datasets/<owner>/<name>`
with an optional path inside the dataset, resolved offline in the local Hugging Face cache. A
path there that is no regular file (a directory named test.json, a FIFO, a symlink loop) is
refused, saying what it is: never opened (a FIFO would block), never dropped without a word.
"""

from __future__ import annotations

import bisect
import glob
import json
import os
import re
from typing import Any, Iterator, Optional, Sequence

from rmjax.cli import json_value
from rmjax.data.jsonl_index import LineFile, LineTooLong, path_kind
from rmjax.data.reader_base import Skip, unusable_path_error

EXTENSIONS = (".jsonl", ".json", ".parquet")
_WS = " \t\n\r"
_HF = re.compile(r"hf://datasets/([^/\s]+/[^/\s]+?)(?:/(.*))?")
_SHARD = re.compile(r"[-_.]\d{5}-of-\d{5}.*$")


# ---------------------------------------------------------------------------------------------
# Where the files are.

def download_hint(repo_id: str) -> str:
  return (f"huggingface-cli download --repo-type dataset {repo_id}  (or in Python: "
          f"huggingface_hub.snapshot_download({repo_id!r}, repo_type='dataset'))")


def resolve_hf(path: str) -> str:
  """The local path of `hf://datasets/<owner>/<name>[/<inside>]`, from the Hugging Face cache
  only (training must not depend on the network); one-line FileNotFoundError when absent."""
  m = _HF.fullmatch(path)
  if not m:
    raise ValueError(f"{path!r}: expected hf://datasets/<owner>/<name>[/<path in the dataset>]")
  repo_id, inside = m.group(1), m.group(2) or ""
  try:
    from huggingface_hub import snapshot_download
    root = snapshot_download(repo_id, repo_type="dataset", local_files_only=True)
  except Exception as e:  # noqa: BLE001  not cached (LocalEntryNotFoundError) or a broken cache
    raise FileNotFoundError(f"dataset {repo_id} is not in the local Hugging Face cache "
                            f"({type(e).__name__}); download it once with: {download_hint(repo_id)}") from None
  local = os.path.join(root, inside) if inside else root
  if not os.path.exists(local):
    raise FileNotFoundError(f"{path}: no {inside!r} in the cached dataset {repo_id} ({root})")
  return local


def _data_paths(pattern: str) -> list[str]:
  """Paths matching `pattern` named like data files, regular files or not (a directory or FIFO
  named test.json): the split such a path names is refused in words (`_split_files`) instead of
  vanishing from the splits, and a FIFO is never opened (its read would block)."""
  return sorted(f for f in glob.glob(pattern) if f.endswith(EXTENSIONS))


def _data_files(pattern: str) -> list[str]:
  return [f for f in _data_paths(pattern) if os.path.isfile(f)]


def _split_files(pattern: str, what: str) -> list[str]:
  files = _data_paths(pattern)
  for f in files:
    if not os.path.isfile(f):
      raise ValueError(f"{what}: {f!r} is {path_kind(f)}, not a data file")
  return files


def available_splits(directory: str) -> list[str]:
  """Split names a directory offers: stems of its data files (shard suffixes removed), and of
  paths named like one that are no regular file (reading that split then says what they are)."""
  names = set()
  for base in (directory, os.path.join(directory, "data")):
    for f in _data_paths(os.path.join(base, "*")):
      names.add(_SHARD.sub("", os.path.splitext(os.path.basename(f))[0]))
    for d in glob.glob(os.path.join(base, "*", "")):
      if _data_files(os.path.join(d, "*")) and os.path.basename(d.rstrip("/")) != "data":
        names.add(os.path.basename(d.rstrip("/")))
  return sorted(names)


def resolve_record_files(path: Any, split: Optional[str], what: str) -> tuple[str, list[str]]:
  """(resolved path, the data files to read in order) for a file, directory + split or hf path.

  Raises a one-line FileNotFoundError / ValueError naming the path and what was expected.
  """
  path = os.fspath(path) if path is not None else ""
  if not path:
    raise ValueError(f"no path given for {what}")
  if path.startswith("hf://"):
    path = resolve_hf(path)
  if os.path.isfile(path):
    if not path.endswith(EXTENSIONS):
      raise ValueError(f"{what}: {path!r} is not a {'/'.join(EXTENSIONS)} file")
    return path, [path]
  if not os.path.isdir(path):
    raise unusable_path_error(path, what)
  splits = available_splits(path)
  if not split:
    raise ValueError(f"{what}: {path!r} is a directory; name the split to read (found {splits}), "
                     f"or give the file itself")
  for base in (path, os.path.join(path, "data")):
    # test.jsonl beside test.json (a conversion kept beside its source) may not hold the same
    # records: reading one of them would be a guess, so neither is read
    whole = [f for ext in EXTENSIONS for f in _split_files(os.path.join(base, glob.escape(split) + ext), what)]
    if len(whole) > 1:
      raise ValueError(f"{what}: split {split!r} has {len(whole)} files in {base!r} "
                       f"({', '.join(os.path.basename(f) for f in whole)}); give the file to read itself")
    if whole:
      return path, whole
    for pattern in ("[-_.]*", "/*"):
      files = _split_files(os.path.join(base, glob.escape(split) + pattern), what)
      if files:
        return path, files
  raise FileNotFoundError(f"{what}: no file for split {split!r} in {path!r}; splits found there: {splits}")


# ---------------------------------------------------------------------------------------------
# Record i of a file.

def read_text(path: str) -> str:
  """A whole file as text; a UTF-8 BOM dropped, undecodable bytes kept as lone surrogates
  (`reader_base.text_field` then rejects the records that hold them)."""
  with open(path, "rb") as f:
    data = f.read()
  if data.startswith(b"\xef\xbb\xbf"):
    data = data[3:]
  return data.decode("utf-8", errors="surrogateescape")


def _skip_ws(text: str, pos: int) -> int:
  while pos < len(text) and text[pos] in _WS:
    pos += 1
  return pos


def iter_json_array(text: str) -> Iterator[tuple[int, Any]]:
  """Yields (index, element) of a JSON array; raises Skip("bad_json") where decoding fails.

  Elements decoded before a failure are still yielded, so one truncated record at the end of
  a file costs one skip, not the file.
  """
  decoder = json.JSONDecoder()
  pos = _skip_ws(text, 0)
  if not text.startswith("[", pos):
    raise Skip("not_a_json_array", "file does not start with a JSON array")
  pos = _skip_ws(text, pos + 1)
  if text.startswith("]", pos):
    return
  index = 0
  while True:
    try:
      value, pos = decoder.raw_decode(text, pos)
    except (ValueError, RecursionError) as e:  # bad JSON, an int past Python's digit limit, deep nesting
      raise Skip("bad_json", f"element {index}: {str(e)[:200]}") from None
    yield index, value
    index += 1
    pos = _skip_ws(text, pos)
    if text.startswith("]", pos):
      end = _skip_ws(text, pos + 1)
      if end < len(text):  # a second array or stray text: counted, not dropped unseen
        raise Skip("bad_json", f"text after the array's closing ']' at char {end}")
      return
    if not text.startswith(",", pos):
      raise Skip("bad_json", f"after element {index - 1}: expected ',' or ']' at char {pos}")
    pos = _skip_ws(text, pos + 1)


def parse_json_line(data: bytes) -> Any:
  """JSON value of one raw line; Skip for empty lines, non-UTF-8 bytes or bad JSON."""
  if not data.strip():
    raise Skip("empty_line")
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise Skip("not_utf8", str(e)) from None
  try:
    return json_value(text)
  except ValueError as e:
    raise Skip("bad_json", str(e)[:200]) from None


class _Lines:
  """A JSONL file: line i parsed when read."""

  def __init__(self, path: str):
    self._lines = LineFile(path)

  def __len__(self) -> int:
    return len(self._lines)

  def record(self, i: int) -> Any:
    try:
      return parse_json_line(self._lines.read(i))
    except LineTooLong as e:
      raise Skip("line_too_long", str(e)) from None


class _Array:
  """A JSON array file, decoded at start-up; `tail_skip` is the Skip that ended decoding early."""

  def __init__(self, path: str):
    self.tail_skip: Optional[Skip] = None
    self._items: list[Any] = []
    try:
      for _, value in iter_json_array(read_text(path)):
        self._items.append(value)
    except Skip as skip:
      self.tail_skip = skip

  def __len__(self) -> int:
    return len(self._items)

  def record(self, i: int) -> Any:
    return self._items[i]


class _Parquet:
  """A parquet file held as an immutable Arrow table; row i becomes a dict when read."""

  def __init__(self, path: str):
    try:
      import pyarrow.parquet as pq
      self._table = pq.read_table(path, memory_map=True)
    except ImportError:
      raise ValueError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    except Exception as e:  # noqa: BLE001  ArrowInvalid, OSError: a broken file is one line
      raise ValueError(f"{path}: cannot read parquet: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None

  def __len__(self) -> int:
    return self._table.num_rows

  def record(self, i: int) -> Any:
    return self._table.slice(i, 1).to_pylist()[0]


def _starts_with_bracket(path: str) -> bool:
  with open(path, "rb") as f:
    head = f.read(4096).lstrip(b"\xef\xbb\xbf" + _WS.encode())
  return head.startswith(b"[")


def open_file(path: str):
  if path.endswith(".parquet"):
    return _Parquet(path)
  if path.endswith(".json") and _starts_with_bracket(path):
    return _Array(path)
  return _Lines(path)


class RecordFiles:
  """Records of several files in order, addressed by one index (thread-safe: read-only state).

  `locate(i)` gives (file position, record number within the file, 1-based), for ids and
  messages; `tail_skips` lists (file, Skip) for arrays whose tail could not be decoded.
  """

  def __init__(self, files: Sequence[str]):
    self.files = list(files)
    self._parts = [open_file(f) for f in self.files]
    self._starts = [0]
    for part in self._parts:
      self._starts.append(self._starts[-1] + len(part))
    self.tail_skips = [(f, p.tail_skip) for f, p in zip(self.files, self._parts)
                       if getattr(p, "tail_skip", None) is not None]

  def __len__(self) -> int:
    return self._starts[-1]

  def locate(self, i: int) -> tuple[int, int]:
    k = bisect.bisect_right(self._starts, i) - 1
    return k, i - self._starts[k] + 1

  def record(self, i: int) -> Any:
    k, n = self.locate(i)
    return self._parts[k].record(n - 1)


__all__ = ["resolve_record_files", "resolve_hf", "RecordFiles", "iter_json_array", "read_text",
           "parse_json_line", "available_splits", "EXTENSIONS"]
