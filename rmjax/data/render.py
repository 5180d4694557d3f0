"""Render an Example as text with one `<CONFIDENCE>` after each step, tokenize, truncate, batch.

This is where a target gets tied to a token position, so it is where misalignment bugs would
live. The rules kept here:
- the text is tokenized ONCE, in full, with the tokenizer's own rules (so the ids are exactly
  what the tokenizer gives for the rendered text); marker positions are then read back as the
  positions of the marker id, and there must be exactly one per kept step (literal
  `<CONFIDENCE>` strings inside problem or step text are defused before rendering);
- truncation to `max_length` keeps only steps whose marker survived and cuts right after the
  last surviving marker, so no target ever points at a cut-off position; an example whose
  first marker does not fit is skipped and counted ("first_marker_truncated");
- batches are padded on the right to the smallest of a few bucket lengths, so jit sees a
  bounded set of shapes.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Callable, Optional, Sequence

import numpy as np

from rmjax.data.example import Example, SkipCounter
from rmjax.tokenizer import MARKER, marker_id

_DEFUSED = "<CONFIDENCE_>"  # what a literal marker inside record text becomes


@dataclasses.dataclass(frozen=True)
class RenderConfig:
  """How examples become token rows; built from the spec's `data` section."""

  template: str = "default"  # "default" | "chat"
  max_length: int = 2048  # tokens per example after truncation
  max_steps_per_example: int = 32  # later steps are dropped before rendering
  length_buckets: tuple[int, ...] = (256, 512, 1024, 2048)  # rows padded to the smallest fit
  max_markers: int = 0  # marker slots M per row; 0 = max_steps_per_example (no packing)
  max_segments: int = 0  # examples per packed row at most; 0 = as many as the marker slots allow

  def __post_init__(self):
    if self.template not in ("default", "chat"):
      raise ValueError(f"data.template must be 'default' or 'chat', got {self.template!r}")
    if self.max_length < 2 or self.max_steps_per_example < 1:
      raise ValueError("data.max_length must be >= 2 and data.max_steps_per_example >= 1")
    buckets = tuple(sorted(int(b) for b in self.length_buckets))
    if not buckets or buckets[-1] < self.max_length:
      raise ValueError(f"data.length_buckets {self.length_buckets} must include a length >= "
                       f"data.max_length ({self.max_length})")
    object.__setattr__(self, "length_buckets", buckets)

  @property
  def markers(self) -> int:
    return self.max_markers or self.max_steps_per_example

  @property
  def segments(self) -> int:
    """Examples per row at most (every example has a marker, so never more than the slots)."""
    return min(self.max_segments, self.markers) if self.max_segments else self.markers

  @classmethod
  def from_spec(cls, data: Any) -> "RenderConfig":
    """From the spec's `data` ConfigDict. Marker slots: `data.max_markers` if present, else
    max_steps_per_example, or 4x that when `data.pack` (several examples share a row)."""
    steps = int(data.max_steps_per_example)
    markers = int(data.get("max_markers", 0)) or (4 * steps if data.get("pack", False) else 0)
    return cls(template=data.template, max_length=int(data.max_length),
               max_steps_per_example=steps, length_buckets=tuple(data.length_buckets),
               max_markers=markers, max_segments=int(data.get("max_segments_per_row", 0)))

  def bucket(self, n: int) -> int:
    for b in self.length_buckets:
      if b >= n:
        return b
    raise ValueError(f"row of {n} tokens is longer than the largest bucket {self.length_buckets[-1]}")


@dataclasses.dataclass(frozen=True)
class Tokenized:
  """One rendered example: ids plus where its supervised markers are."""

  source: str
  id: str
  input_ids: np.ndarray  # int32 (n,)
  marker_positions: np.ndarray  # int32 (k,), one per kept step, strictly increasing, < n
  targets: np.ndarray  # float32 (k,); 0.0 where the step is unsupervised
  target_mask: np.ndarray  # float32 (k,); 0.0 for steps with target None

  def __len__(self) -> int:
    return int(self.input_ids.shape[0])


def _defuse(text: str) -> str:
  return text.replace(MARKER, _DEFUSED)


def require_chat_template(tokenizer, template: str) -> None:
  """A ValueError if `template` is "chat" and the tokenizer has no chat template to apply."""
  if template == "chat" and getattr(tokenizer, "chat_template", None) is None:
    raise ValueError("data.template='chat' but the tokenizer has no chat template")


def render_text(ex: Example, tokenizer, template: str, num_steps: int) -> str:
  """The prompt text for the first `num_steps` steps, a marker after each."""
  steps = [_defuse(s) for s in ex.steps[:num_steps]]
  body = "".join(f"{s} {MARKER}\n" for s in steps)
  if template == "default":
    return f"Problem: {_defuse(ex.problem)}\n\nSolution:\n{body}"
  require_chat_template(tokenizer, template)
  messages = [{"role": "user", "content": _defuse(ex.problem)},
              {"role": "assistant", "content": body}]
  return tokenizer.apply_chat_template(messages, tokenize=False)


class Renderer:
  """Example -> Tokenized (or None, counted in `skips`). Thread-safe: grain calls it from a
  pool, so it uses its own copy of the Rust tokenizer and never mutates tokenizer settings."""

  def __init__(self, tokenizer, cfg: RenderConfig, skips: Optional[SkipCounter] = None,
               require_supervision: bool = False):
    """require_supervision (training): an example none of whose kept steps has a target is
    skipped ("no_supervised_step"), not trained on as a row that teaches nothing yet takes its
    source's share of the mix."""
    require_chat_template(tokenizer, cfg.template)
    self.cfg = cfg
    self.require_supervision = require_supervision
    self.skips = skips if skips is not None else SkipCounter()
    self._tokenizer = tokenizer
    self._marker = marker_id(tokenizer)
    backend = tokenizer.backend_tokenizer.__class__.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    self._backend = backend
    # The default template keeps the tokenizer's own specials (e.g. Llama's BOS); a chat
    # template writes its specials into the text itself.
    self._add_special = cfg.template == "default"
    self._skipped: set[tuple[str, str]] = set()  # count each skipped example once, not per epoch
    self._lock = threading.Lock()

  def _skip(self, ex: Example, reason: str) -> None:
    with self._lock:
      if (ex.source, ex.id) in self._skipped:
        return
      self._skipped.add((ex.source, ex.id))
    self.skips.add(ex.source, reason)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._backend.encode(text, add_special_tokens=self._add_special).ids, np.int32)

  def __call__(self, ex: Optional[Example]) -> Optional[Tokenized]:
    if ex is None:
      return None
    n_steps = min(len(ex.steps), self.cfg.max_steps_per_example)
    if n_steps == 0:
      self._skip(ex, "no_steps")
      return None
    ids = self.encode(render_text(ex, self._tokenizer, self.cfg.template, n_steps))
    markers = np.flatnonzero(ids == self._marker).astype(np.int32)
    if markers.shape[0] != n_steps:
      self._skip(ex, "marker_count_mismatch")
      return None
    kept = int(np.searchsorted(markers, self.cfg.max_length))  # markers at positions < max_length
    if kept == 0:
      self._skip(ex, "first_marker_truncated")
      return None
    if kept < n_steps or ids.shape[0] > self.cfg.max_length:
      ids = ids[: markers[kept - 1] + 1]
    markers = markers[:kept]
    raw = ex.targets[:kept]
    if self.require_supervision and all(t is None for t in raw):
      self._skip(ex, "no_supervised_step")
      return None
    targets = np.asarray([0.0 if t is None else t for t in raw], np.float32)
    mask = np.asarray([0.0 if t is None else 1.0 for t in raw], np.float32)
    return Tokenized(ex.source, ex.id, ids, markers, targets, mask)


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


DEFAULT_PACK_LOOKAHEAD = 16  # data.pack_lookahead's default (rows ~97% full on PRM800K-like lengths)


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
