"""Render an Example as text with one `<CONFIDENCE>` after each step, tokenize, truncate.

This is where a target gets tied to a token position, so it is where misalignment bugs would
live. The rules kept here:
- the text is tokenized ONCE, in full, with the tokenizer's own rules (so the ids are exactly
  what the tokenizer gives for the rendered text); marker positions are then read back as the
  positions of the marker id, and there must be exactly one per kept step (literal
  `<CONFIDENCE>` strings inside problem or step text are defused before rendering);
- truncation to `max_length` keeps only steps whose marker survived and cuts right after the
  last surviving marker, so no target ever points at a cut-off position; an example whose
  first marker does not fit is skipped and counted ("first_marker_truncated").
Rows and batches (packing, padding to buckets) are `rmjax.data.packing`'s.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Optional

import numpy as np

from rmjax.data import defaults
from rmjax.data.example import Example, SkipCounter
from rmjax.tokenizer import MARKER, marker_id

_DEFUSED = "<CONFIDENCE_>"  # what a literal marker inside record text becomes


@dataclasses.dataclass(frozen=True)
class RenderConfig:
  """How examples become token rows; built from the spec's `data` section (`from_spec`), whose
  validation checks these values, so construction only asserts what would break rendering."""

  max_length: int  # tokens per example after truncation
  length_buckets: tuple[int, ...]  # rows padded to the smallest fit (sorted here)
  template: str = defaults.TEMPLATE  # "default" | "chat"
  max_steps_per_example: int = defaults.MAX_STEPS_PER_EXAMPLE  # later steps are dropped before rendering
  max_markers: int = 0  # marker slots M per row; 0 = max_steps_per_example (no packing)
  max_segments: int = defaults.MAX_SEGMENTS_PER_ROW  # examples per packed row at most; 0 = as many as the marker slots

  def __post_init__(self):
    buckets = tuple(sorted(int(b) for b in self.length_buckets))
    assert self.template in ("default", "chat"), f"data.template {self.template!r}"
    assert self.max_length >= 2 and self.max_steps_per_example >= 1, (self.max_length, self.max_steps_per_example)
    assert buckets and buckets[-1] >= self.max_length, f"no data.length_buckets {buckets} >= {self.max_length}"
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
    """From the spec's `data` ConfigDict. Marker slots: max_steps_per_example, or
    PACKED_MARKER_FACTOR times that when `data.pack` (several examples share a row)."""
    steps = int(data.max_steps_per_example)
    return cls(max_length=int(data.max_length), length_buckets=tuple(data.length_buckets),
               template=str(data.template), max_steps_per_example=steps,
               max_markers=defaults.PACKED_MARKER_FACTOR * steps if data.pack else 0,
               max_segments=int(data.max_segments_per_row))

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
