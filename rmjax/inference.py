"""Score solutions with a run's checkpoint: the one scoring path of evaluate, score and rerank.

Why it exists: training evaluates with `Steps.eval_step` (jitted, sharded over the mesh);
scoring outside training must compute the same probabilities the same way, on every local
device, instead of each command keeping its own jitted forward pass.

  scorer = RunScorer(load_run_model("runs/demo-full"))
  scorer.score([("Compute 2 + 3.", ["2 + 3 = 5"])])  # -> [Scored(scores=[0.97], tokens=...)]
  scorer.probs(batch)  # (B, M) probabilities of a pipeline batch (rows padded to the mesh)

Every step of a solution is rendered (not only the run's max_steps_per_example); a step whose
marker falls past `render_cfg.max_length` gets the score None, as does every step of a
solution nothing of which fits. When the model attends within segments (the default), several
solutions share a row (first-fit packing, as training packs, longest first), each in its own
segment, so a batch of short solutions costs few rows; rows are padded to the run's length
buckets or a power of two.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import numpy as np

from rmjax.data.example import Example, SkipCounter
from rmjax.data.packing import Packer, batch_rows
from rmjax.data.render import RenderConfig, Renderer, Tokenized
from rmjax.tokenizer import pad_id


@dataclasses.dataclass(frozen=True)
class Scored:
  scores: list[Optional[float]]  # one per step; None where the step's marker did not fit
  tokens: Optional[Tokenized]  # the rendered solution (None when nothing of it fits)


def with_max_length(cfg: RenderConfig, max_length: int) -> RenderConfig:
  """`cfg` rendering up to `max_length` tokens, which becomes its largest length bucket."""
  if max_length < 2:
    raise ValueError(f"max_length must be >= 2, got {max_length}")
  buckets = tuple(b for b in cfg.length_buckets if b < max_length) + (max_length,)
  return dataclasses.replace(cfg, max_length=max_length, length_buckets=buckets)


_PACK_WINDOW = 256  # solutions (sorted by length) packed together; bounds the packer's work


def _pow2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


class RunScorer:
  """A restored run (rmjax.run_artifacts.RunModel) placed on every local device."""

  def __init__(self, rm: Any, render_cfg: Optional[RenderConfig] = None, rows: int = 8):
    import jax
    from rmjax import sharding as shd
    from rmjax.model.confidence import ConfidenceModel
    from rmjax.train import optim
    from rmjax.train import state as st
    from rmjax.train.step import Steps
    if rows < 1:
      raise ValueError(f"rows per batch must be >= 1, got {rows}")
    self.run, self.tokenizer = rm, rm.tokenizer
    self.render_cfg = render_cfg or rm.render_cfg
    model = ConfidenceModel(rm.model_cfg, rm.head_cfg)
    self.mesh = shd.make_mesh(shd.MeshConfig(data=-1), devices=jax.local_devices())
    self.shards = shd.batch_shards(self.mesh)
    ocfg = optim.OptimConfig(mode=rm.mode)
    layout = st.param_layout(model, ocfg, self.mesh)
    st.check_same_tree(rm.params, layout.abstract)
    trainable, frozen = optim.split_params(rm.params, layout.labels)
    self.params, self.frozen = jax.device_put(
      (trainable, frozen), (layout.trainable_shardings, layout.frozen_shardings))
    rep = shd.replicated(self.mesh)
    self.steps = Steps(model, ocfg, self.mesh, st.TrainState(
      step=rep, params=layout.trainable_shardings, frozen=layout.frozen_shardings, opt_state=rep, rng=rep))
    self.rows = rows + (-rows % self.shards)  # a whole number of rows per device
    packs = rm.model_cfg.attention_mask == "segments"
    self.max_segments = (rm.model_cfg.max_segments or self.render_cfg.max_segments or 0) if packs else 1
    self._pad = pad_id(self.tokenizer)
    # rows are padded to these lengths: the run's buckets and the powers of two up to max_length
    # (a raised max_length would otherwise pad every long solution to it)
    top = self.render_cfg.max_length
    self.buckets = tuple(sorted({b for b in self.render_cfg.length_buckets if b <= top} | {top} | {
      1 << e for e in range(6, top.bit_length()) if (1 << e) < top}))
    self.skips = SkipCounter()
    self._renderers: dict[int, Renderer] = {}

  # -- one batch of rows -------------------------------------------------------------------------
  def probs(self, batch: dict[str, Any]) -> np.ndarray:
    """(B, M) probabilities of a batch of rows (the pipeline's or batch_rows' keys), by
    Steps.eval_step; rows are padded to a multiple of the devices and the padding dropped."""
    from rmjax.train.step import EVAL_KEYS, device_batch
    b = int(np.shape(batch["input_ids"])[0])
    pad = -b % self.shards
    arrays = {}
    for k in EVAL_KEYS:
      v = np.asarray(batch[k])
      arrays[k] = np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) if pad else v
    out = self.steps.eval_step(self.params, self.frozen, device_batch(arrays, self.mesh, EVAL_KEYS))
    return np.asarray(out)[:b]

  # -- solutions ---------------------------------------------------------------------------------
  def _renderer(self, num_steps: int) -> Renderer:
    if num_steps not in self._renderers:
      cfg = dataclasses.replace(self.render_cfg, max_steps_per_example=num_steps, max_markers=0)
      self._renderers[num_steps] = Renderer(self.tokenizer, cfg, skips=self.skips)
    return self._renderers[num_steps]

  def render(self, problem: str, steps: Sequence[str], ident: str) -> Optional[Tokenized]:
    if not steps:
      return None
    ex = Example("score", ident, problem, tuple(steps), (None,) * len(steps))
    return self._renderer(_pow2(len(steps)))(ex)

  def score(self, solutions: Sequence[tuple[str, Sequence[str]]]) -> list[Scored]:
    """Step scores of each (problem, steps), in order."""
    toks = [self.render(p, s, str(i)) for i, (p, s) in enumerate(solutions)]
    order = sorted((t for t in toks if t is not None), key=len, reverse=True)
    found: dict[str, np.ndarray] = {}
    if order:
      markers = _pow2(max(max(t.marker_positions.shape[0] for t in order), self.render_cfg.markers))
      segments = min(self.max_segments or markers, markers)
      cfg = dataclasses.replace(self.render_cfg, max_steps_per_example=markers, max_markers=markers,
                                max_segments=segments, length_buckets=self.buckets)
    for start in range(0, len(order), _PACK_WINDOW):
      pending = order[start:start + _PACK_WINDOW]
      while pending:  # longest first, each batch in rows of the bucket its longest solution needs
        packer = Packer(cfg.bucket(len(pending[0])), markers, max_rows=self.rows, max_segments=segments)
        pending = [t for t in pending if not packer.add(t)]
        rows = _pow2(len(packer.bins))  # few shapes; a small call runs few rows
        rows = min(self.rows, rows + (-rows % self.shards))
        probs = self.probs(batch_rows(packer.rows(), cfg, self._pad, num_rows=rows))
        for r, parts in enumerate(packer.bins):
          offset = 0
          for t in parts:
            k = t.marker_positions.shape[0]
            found[t.id] = probs[r, offset:offset + k]
            offset += k
    out = []
    for (_, steps), t in zip(solutions, toks):
      got = [float(x) for x in found[t.id]] if t is not None else []
      out.append(Scored(got + [None] * (len(steps) - len(got)), t))
    return out
