"""grain input pipelines: weighted, sharded, checkpointable training mix; per-source evaluation.

Training, per enabled source:
  MapDataset.source(reader)[process_index::process_count]   each process reads only its shard
  EpochShuffle(seed_for_source)                               endless, reshuffled every epoch
  _RenderedSource(renderer)                                   Example -> Tokenized | None
  .to_iter_dataset(ReadOptions(...))                          threads; None (skipped) dropped here
then IterDataset.mix(per_source, weights) and batching (padded to buckets, or packed: both
`rmjax.data.packing`).

Why this order: filtering skipped records happens per source BEFORE mixing, and grain's mix
picks the source of the k-th element by a deterministic interleave of the integer-scaled
weights. So the proportions are exact over examples actually emitted (a source with many
skipped records is not under-sampled), on every process, and the iterator state is a few
integers (per-source next index + mix index): get_state/set_state restore bit for bit.
A source whose every record is skipped would make the mix wait forever for one: an empty source
is refused (length 0 raises), and one whose records all come to nothing raises NoUsableRecords
(`_RenderedSource`); readers report their skip counts.

Evaluation, per enabled source: unshuffled, finite, fixed-size batches with example ids. Every
process yields the same number of batches (its shard is padded with empty rows), which a
multi-process jitted eval step needs; `max_eval_batches` caps it (0 = all).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import threading
import zlib
from typing import Any, Mapping, Optional, Sequence

import grain
import numpy as np

from rmjax.data.example import BadRecord, SkipCounter
from rmjax.data import defaults
from rmjax.data.packing import PackedBatchDataset, batch_rows
from rmjax.data.render import RenderConfig, Renderer, Tokenized
from rmjax.tokenizer import pad_id


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """grain settings, from the spec's `data` section (and `max_eval_batches`)."""

  eval_batch_size: int = defaults.EVAL_BATCH_SIZE  # GLOBAL rows per evaluation batch
  num_threads: int = defaults.NUM_WORKERS  # grain read threads per source (data.num_workers); 0 = read inline
  prefetch: int = defaults.PREFETCH  # examples buffered per source (data.prefetch)
  pack: bool = defaults.PACK  # pack several examples per training row
  pack_lookahead: int = defaults.PACK_LOOKAHEAD  # packing reads on past this many misfits (fills holes)
  max_eval_batches: int = defaults.MAX_EVAL_BATCHES  # 0 = every evaluation example

  @classmethod
  def from_spec(cls, spec: Any) -> "PipelineConfig":
    d = spec.data
    return cls(eval_batch_size=int(d.eval_batch_size), num_threads=int(d.num_workers),
               prefetch=int(d.prefetch), pack=bool(d.pack), pack_lookahead=int(d.pack_lookahead),
               max_eval_batches=int(spec.max_eval_batches))

  def read_options(self, examples_per_element: int = 1) -> grain.ReadOptions:
    """Buffers about `prefetch` examples; an element may hold several (an eval batch)."""
    return grain.ReadOptions(num_threads=self.num_threads,
                             prefetch_buffer_size=max(1, self.prefetch // examples_per_element))


def _per_process(global_rows: int, process_count: int) -> int:
  """Rows per process; spec validation has checked that they divide evenly."""
  assert global_rows > 0 and global_rows % process_count == 0, (global_rows, process_count)
  return global_rows // process_count


def source_seed(seed: int, name: str) -> int:
  """A per-source shuffle seed: stable across runs and processes, different per source."""
  return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**32)


def normalized_weights(sources: Mapping[str, tuple[Any, float]]) -> dict[str, float]:
  """Weights of the sources that take part (weight > 0), summing to 1 (spec validation has
  checked that one does)."""
  ws = {n: float(w) for n, (_, w) in sources.items() if float(w) > 0}
  assert ws, "no training source has a positive weight"
  total = sum(ws.values())
  return {n: w / total for n, w in ws.items()}


class EpochShuffle(grain.MapDataset):
  """Endless dataset: epoch e is a fresh permutation of the parent, drawn from (seed, e).

  Replaces `.shuffle(seed).repeat()`: grain's index_shuffle costs ~1 ms per element on small
  sources (tests, demo evaluation), while one numpy permutation per epoch costs microseconds
  per element at any size. Deterministic, thread-safe (permutations cached under a lock).
  """

  def __init__(self, parent: grain.MapDataset, seed: int):
    super().__init__(parent)
    self._n, self._seed = len(parent), int(seed)
    self._perms: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return sys.maxsize

  def __str__(self) -> str:
    return f"EpochShuffle(seed={self._seed})"

  def _perm(self, epoch: int) -> np.ndarray:
    with self._lock:
      perm = self._perms.get(epoch)
      if perm is None:
        perm = np.random.default_rng([self._seed, epoch]).permutation(self._n)
        self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}  # prefetch overlap
        self._perms[epoch] = perm
      return perm

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, i = divmod(int(index), self._n)
    return self._parent[int(self._perm(epoch)[i])]


class NoUsableRecords(BadRecord):
  """Every record of a training source was skipped: the mix would wait forever for one."""


class _RenderedSource(grain.MapDataset):
  """One training source's records rendered (None: skipped by the reader or the renderer), and
  NoUsableRecords once 3 x its shard's size of them in a row came to nothing. Each epoch draws
  every record once, so a run of 2 epochs' length means none is usable (3: margin for the read
  threads' reordering); one usable record keeps every run shorter. (A map would not do: grain
  passes a reader's None on without calling it.)"""

  def __init__(self, parent: grain.MapDataset, name: str, records: int, renderer: Renderer):
    super().__init__(parent)
    self._name, self._records, self._renderer = name, records, renderer
    self._run = 0
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self._parent)

  def __str__(self) -> str:
    return f"RenderedSource({self._name})"

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    ex = self._parent[index]
    out = None if ex is None else self._renderer(ex)
    with self._lock:
      self._run = 0 if out is not None else self._run + 1
      hopeless = self._run >= 3 * self._records
    if hopeless:
      counts = self._renderer.skips.as_dict().get(self._name, {})
      raise NoUsableRecords(f"training source {self._name!r}: none of its {self._records} records can be used "
                            f"(skipped: {', '.join(f'{k} {v}' for k, v in sorted(counts.items())) or 'see the reader'}); "
                            f"check its path and format, or give it weight 0")
    return out


def _source_stream(name: str, source: Any, renderer: Renderer, cfg: PipelineConfig, seed: int,
                   process_index: int, process_count: int) -> grain.IterDataset:
  ds = grain.MapDataset.source(source)[process_index::process_count]
  if len(ds) == 0:
    raise ValueError(f"training source {name!r} has no records for process {process_index}")
  ds = _RenderedSource(EpochShuffle(ds, source_seed(seed, name)), name, len(ds), renderer)
  return ds.to_iter_dataset(cfg.read_options())


def train_dataset(sources: Mapping[str, tuple[Any, float]], render_cfg: RenderConfig, tokenizer,
                  cfg: PipelineConfig, *, seed: int, global_batch: int, process_index: int = 0,
                  process_count: int = 1, skips: Optional[SkipCounter] = None) -> grain.IterDataset:
  """Infinite training batches for THIS process (`global_batch // process_count` rows each).

  `sources` maps name -> (random-access source of Example | None, weight); weights are
  normalised, and sources with weight 0 are left out. `iter(ds)` gives a grain iterator whose
  `get_state()` / `set_state()` resume exactly.
  """
  rows = _per_process(global_batch, process_count)
  renderer = Renderer(tokenizer, render_cfg, skips, require_supervision=True)
  weights = normalized_weights(sources)
  streams = [_source_stream(n, sources[n][0], renderer, cfg, seed, process_index, process_count)
             for n in weights]
  mixed = grain.IterDataset.mix(streams, list(weights.values()))
  batch_fn = functools.partial(batch_rows, cfg=render_cfg, pad_id=pad_id(tokenizer), num_rows=rows)
  if cfg.pack:
    return PackedBatchDataset(mixed, rows, render_cfg.max_length, render_cfg.markers, batch_fn,
                              cfg.pack_lookahead, max_segments=render_cfg.segments)
  return mixed.batch(rows, drop_remainder=True, batch_fn=batch_fn)


class _Box:
  """Holds a Tokenized or None so grain does not drop skipped rows (eval keeps row counts)."""

  __slots__ = ("value",)

  def __init__(self, value: Optional[Tokenized]):
    self.value = value


class _EvalRows:
  """This process's shard of one source, rendered, padded to the same length on every process."""

  def __init__(self, source: Any, renderer: Renderer, process_index: int, process_count: int):
    self._source, self._renderer = source, renderer
    self._pi, self._pc = process_index, process_count
    self._len = math.ceil(len(source) / process_count)

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, i: int) -> _Box:
    j = i * self._pc + self._pi
    return _Box(self._renderer(self._source[j]) if j < len(self._source) else None)


def _eval_batch(boxes: Sequence[_Box], render_cfg: RenderConfig, pad: int, rows: int) -> dict:
  return batch_rows([b.value for b in boxes], render_cfg, pad, num_rows=rows, with_meta=True)


def eval_datasets(sources: Mapping[str, Any], render_cfg: RenderConfig, tokenizer,
                  cfg: PipelineConfig, *, process_index: int = 0, process_count: int = 1,
                  skips: Optional[SkipCounter] = None) -> dict[str, grain.IterDataset]:
  """One finite, unshuffled batched dataset per source (name -> source), in source order.

  Batches carry `example_ids`, `example_index`, `step_index`; skipped records and the tail are
  all-padding rows (target_mask 0), so every batch has `eval_batch_size // process_count` rows.
  """
  rows = _per_process(cfg.eval_batch_size, process_count)
  renderer = Renderer(tokenizer, render_cfg, skips)
  batch_fn = functools.partial(_eval_batch, render_cfg=render_cfg, pad=pad_id(tokenizer), rows=rows)
  out = {}
  for name, source in sources.items():
    ds = grain.MapDataset.source(_EvalRows(source, renderer, process_index, process_count))
    ds = ds.batch(rows, batch_fn=batch_fn)
    if cfg.max_eval_batches > 0:
      ds = ds[: cfg.max_eval_batches]
    out[name] = ds.to_iter_dataset(cfg.read_options(rows))
  return out
