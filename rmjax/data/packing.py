"""Rows: several Tokenized examples packed into one, and rows padded into a batch.

Why one module: packing has three layers that must agree (the first-fit bins, the stream packer
that fills a batch of rows with lookahead, and the grain iterator that checkpoints what it held
over), and `batch_rows` turns any row, packed or single, into the arrays the model takes.
- a packed row keeps its examples apart: segment ids 1, 2, ... per example, positions restart
  at 0 in each, and marker positions are offset to where their example starts;
- batches are padded on the right to the smallest of a few bucket lengths, so jit sees a
  bounded set of shapes;
- the packing iterator's state is the parent's state plus, per held-over example, the parent's
  state from before it was read: resume is exact and the state stays a few small dicts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import grain
import numpy as np

from rmjax.data.render import RenderConfig, Tokenized

@dataclasses.dataclass(frozen=True)
class Row:
  """One batch row: a single Tokenized example, or several packed ones."""

  input_ids: np.ndarray
  positions: np.ndarray
  segment_ids: np.ndarray
  marker_positions: np.ndarray
  targets: np.ndarray
  target_mask: np.ndarray
  step_index: np.ndarray
  example_ids: tuple[str, ...]  # one per segment

  @classmethod
  def single(cls, t: Tokenized) -> "Row":
    n, k = len(t), t.marker_positions.shape[0]
    return cls(t.input_ids, np.arange(n, dtype=np.int32), np.ones(n, np.int32),
               t.marker_positions, t.targets, t.target_mask, np.arange(k, dtype=np.int32), (t.id,))

  def __len__(self) -> int:
    return int(self.input_ids.shape[0])


class Packer:
  """First-fit bins of Tokenized examples: at most `row_length` tokens, `max_markers` markers
  and `max_segments` examples per row (None = no limit but the markers), at most `max_rows`
  rows (None = unbounded)."""

  def __init__(self, row_length: int, max_markers: int, max_rows: Optional[int] = None, *,
               max_segments: Optional[int] = None):
    self.row_length, self.max_markers, self.max_rows = row_length, max_markers, max_rows
    self.max_segments = max_segments or max_markers
    self.bins: list[list[Tokenized]] = []
    self._used: list[tuple[int, int]] = []  # (tokens, markers) per bin

  def add(self, t: Tokenized) -> bool:
    """Place `t` in the first row with room (opening a row if allowed); False if it fits nowhere."""
    k = t.marker_positions.shape[0]
    if len(t) > self.row_length or k > self.max_markers:
      raise ValueError(f"example {t.id} ({len(t)} tokens, {k} markers) cannot fit a row of "
                       f"{self.row_length} tokens / {self.max_markers} markers")
    for i, (n, m) in enumerate(self._used):
      if n + len(t) <= self.row_length and m + k <= self.max_markers and len(self.bins[i]) < self.max_segments:
        self.bins[i].append(t)
        self._used[i] = (n + len(t), m + k)
        return True
    if self.max_rows is not None and len(self.bins) >= self.max_rows:
      return False
    self.bins.append([t])
    self._used.append((len(t), k))
    return True

  def rows(self) -> list["Row"]:
    return [_concat(b) for b in self.bins]


def pack_examples(examples: Sequence[Tokenized], row_length: int, max_markers: int) -> list[Row]:
  """Greedy first-fit packing of examples into rows of at most `row_length` tokens and
  `max_markers` markers. Segment ids are 1, 2, ... per row, positions restart at 0 in each
  segment, and marker positions are offset to where their segment starts."""
  packer = Packer(row_length, max_markers)
  for t in examples:
    packer.add(t)
  return packer.rows()


def pack_batch(pending: Sequence[tuple[Tokenized, Any]], read: Callable[[], Optional[tuple[Tokenized, Any]]],
               rows: int, row_length: int, max_markers: int, lookahead: int = 0, *,
               max_segments: Optional[int] = None) -> tuple[list[Row], list[tuple[Tokenized, Any]]]:
  """One batch of at most `rows` first-fit rows from a stream; returns (rows, still pending).

  The examples held over from earlier batches (`pending`, in order) are placed first, then
  examples from `read()` (None once the stream ends). An example that fits no row is held over
  (a miss); reading stops after `lookahead + 1` misses, so later short examples fill the holes
  the first miss left (lookahead 0: stop at the first miss). Each item carries a tag (the
  pipeline's iterator state before it was read) that is returned with it untouched. The number
  held over stays bounded: at most `lookahead + 1` when anything was read, and it shrinks
  otherwise (the first pending example always opens a row).
  """
  packer, held = Packer(row_length, max_markers, rows, max_segments=max_segments), []  # len(held): misses
  for item in pending:
    if not packer.add(item[0]):
      held.append(item)
  while len(held) <= lookahead and (item := read()) is not None:
    if not packer.add(item[0]):
      held.append(item)
  return packer.rows(), held


def _concat(parts: Sequence[Tokenized]) -> Row:
  offsets = np.cumsum([0] + [len(p) for p in parts[:-1]])
  cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0)
  return Row(
    input_ids=cat([p.input_ids for p in parts]).astype(np.int32),
    positions=cat([np.arange(len(p), dtype=np.int32) for p in parts]).astype(np.int32),
    segment_ids=cat([np.full(len(p), s + 1, np.int32) for s, p in enumerate(parts)]).astype(np.int32),
    marker_positions=cat([p.marker_positions + o for p, o in zip(parts, offsets)]).astype(np.int32),
    targets=cat([p.targets for p in parts]).astype(np.float32),
    target_mask=cat([p.target_mask for p in parts]).astype(np.float32),
    step_index=cat([np.arange(p.marker_positions.shape[0], dtype=np.int32) for p in parts]).astype(np.int32),
    example_ids=tuple(p.id for p in parts))


def batch_rows(rows: Sequence[Optional[Tokenized | Row]], cfg: RenderConfig, pad_id: int, *,
               num_rows: Optional[int] = None, with_meta: bool = False) -> dict[str, np.ndarray]:
  """Pad rows on the right to the smallest bucket that fits the longest one (the BUILD.md batch).

  `None` rows (and rows up to `num_rows`) become all-padding rows with no supervised slot, so
  evaluation batches keep a fixed row count. `with_meta` adds `example_ids`, `example_index`,
  `step_index` (unpacked rows only: one example per row).
  """
  rows = [r if r is None or isinstance(r, Row) else Row.single(r) for r in rows]
  b = num_rows if num_rows is not None else len(rows)
  if len(rows) > b:
    raise ValueError(f"{len(rows)} rows for a batch of {b}")
  t = cfg.bucket(max([len(r) for r in rows if r is not None], default=1))
  m = cfg.markers
  out = {
    "input_ids": np.full((b, t), pad_id, np.int32),
    "positions": np.zeros((b, t), np.int32),
    "segment_ids": np.zeros((b, t), np.int32),
    "marker_positions": np.zeros((b, m), np.int32),
    "targets": np.zeros((b, m), np.float32),
    "target_mask": np.zeros((b, m), np.float32),
  }
  step_index = np.zeros((b, m), np.int32)
  example_ids = np.full((b,), "", dtype=object)
  for i, r in enumerate(rows):
    if r is None:
      continue
    n, k = len(r), r.marker_positions.shape[0]
    if k > m:
      raise ValueError(f"row with {k} markers exceeds max_markers={m}")
    if len(r.example_ids) > cfg.segments:  # the model's packed attention has this many slots
      raise ValueError(f"row with {len(r.example_ids)} examples exceeds {cfg.segments} per row")
    out["input_ids"][i, :n] = r.input_ids
    out["positions"][i, :n] = r.positions
    out["segment_ids"][i, :n] = r.segment_ids
    out["marker_positions"][i, :k] = r.marker_positions
    out["targets"][i, :k] = r.targets
    out["target_mask"][i, :k] = r.target_mask
    step_index[i, :k] = r.step_index
    if with_meta:
      if len(r.example_ids) != 1:
        raise ValueError("evaluation batches need one example per row (no packing)")
      example_ids[i] = r.example_ids[0]
  if with_meta:
    out["example_ids"] = example_ids.astype(str)
    out["example_index"] = np.repeat(np.arange(b, dtype=np.int32)[:, None], m, axis=1)
    out["step_index"] = step_index
  return out


class PackedBatchDataset(grain.IterDataset):
  """Packs the mixed example stream into batches of `rows` rows (first-fit with lookahead,
  see pack_batch)."""

  def __init__(self, parent: grain.IterDataset, rows: int, row_length: int, max_markers: int,
               batch_fn, lookahead: int = 0, *, max_segments: Optional[int] = None):
    super().__init__(parent)
    self._args = (rows, row_length, max_markers, batch_fn, lookahead)
    self._max_segments = max_segments

  def __iter__(self) -> grain.DatasetIterator:
    return _PackedBatchIterator(self._parent.__iter__(), *self._args, max_segments=self._max_segments)


class _PackedBatchIterator(grain.DatasetIterator):
  """Batches of up to `rows` first-fit rows; examples that fit nowhere are held over for the
  next batch, and reading goes on past them for `lookahead` more misses (pack_batch).

  State: the parent's current state plus, for each held-over example, the parent's state from
  just BEFORE it was read. A restore re-reads each held-over example from its own state, then
  returns the parent to the current one, so resume is exact and the state stays a few small
  dicts (at most lookahead + 1 held over). A state with no `pending` restores with nothing held
  over (the parent reads on from its own state).
  """

  def __init__(self, parent: grain.DatasetIterator, rows: int, row_length: int,
               max_markers: int, batch_fn, lookahead: int = 0, *, max_segments: Optional[int] = None):
    super().__init__(parent)
    self._rows, self._row_length, self._max_markers = rows, row_length, max_markers
    self._max_segments = max_segments
    self._batch_fn, self._lookahead = batch_fn, lookahead
    self._pending: list[tuple[Tokenized, Any]] = []
    self._exhausted = False

  def _read(self) -> Optional[tuple[Tokenized, Any]]:
    if self._exhausted:
      return None
    state = self._parent.get_state()
    try:
      return next(self._parent), state
    except StopIteration:
      self._exhausted = True
      return None

  def __next__(self) -> dict:
    rows, self._pending = pack_batch(self._pending, self._read, self._rows, self._row_length,
                                     self._max_markers, self._lookahead, max_segments=self._max_segments)
    if not rows:
      raise StopIteration
    return self._batch_fn(rows)

  def get_state(self) -> dict:
    return {"parent": self._parent.get_state(), "pending": [state for _, state in self._pending]}

  def set_state(self, state: dict) -> None:
    pending = []
    for before in state.get("pending", []):
      self._parent.set_state(before)
      pending.append((next(self._parent), before))
    self._parent.set_state(state["parent"])
    self._pending, self._exhausted = pending, False
