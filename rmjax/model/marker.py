"""Give the `<CONFIDENCE>` marker its own embedding parameter.

Why it exists: the marker is a token the base model never saw. Its embedding is a separate
param (`embed/marker`) so LoRA runs can train it while the embedding matrix stays frozen, and
export writes it back into row `marker_id`. Where that row lives depends on the checkpoint:
Qwen pads its embedding matrix past the tokenizer, so a new token usually lands in a spare
row; otherwise the matrix grows. A new marker starts at the mean of the real token rows (a
neutral, in-distribution vector); a marker the tokenizer already had keeps its trained row.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rmjax.model.config import ModelConfig

Params = dict[str, Any]


def grow_rows(matrix_VD: np.ndarray, rows: int, fill_D: np.ndarray | None = None) -> np.ndarray:
  """`matrix_VD` with rows appended up to `rows`, each `fill_D` (default: the mean of its rows)."""
  if fill_D is None:
    fill_D = np.asarray(matrix_VD).astype(np.float32).mean(axis=0)
  extra = np.broadcast_to(fill_D.astype(matrix_VD.dtype), (rows - matrix_VD.shape[0], matrix_VD.shape[1]))
  return np.concatenate([np.asarray(matrix_VD), extra], axis=0)


def add_marker(params: Params, cfg: ModelConfig, marker_id: int, num_real_tokens: int,
               pad_multiple: int = 64) -> tuple[Params, ModelConfig]:
  """Return decoder params with `embed/marker` set, and cfg with marker_id (and vocab) updated.

  num_real_tokens: how many tokens the tokenizer had BEFORE the marker was added (rows below it
  are trained). marker_id < num_real_tokens means the tokenizer already had the marker: its
  own row is used. Otherwise the marker starts at the mean of rows [0, num_real_tokens), and if
  marker_id is past the matrix, the matrix (and an untied lm_head) grows to a multiple of
  `pad_multiple` rows, new rows filled with that mean.
  """
  table_VD = np.asarray(params["embed"]["embedding"])
  rows = table_VD.shape[0]
  if marker_id < 0 or num_real_tokens <= 0 or num_real_tokens > rows:
    raise ValueError(f"bad marker placement: marker_id={marker_id}, num_real_tokens={num_real_tokens}, "
                     f"embedding rows={rows}")
  mean_D = table_VD[:num_real_tokens].astype(np.float32).mean(axis=0)
  new = {k: v for k, v in params.items()}
  embed = dict(params["embed"])
  if marker_id < num_real_tokens:
    marker_D = table_VD[marker_id].astype(np.float32)
  else:
    marker_D = mean_D
  vocab = rows
  if marker_id >= rows:
    vocab = -(-(marker_id + 1) // pad_multiple) * pad_multiple
    embed["embedding"] = grow_rows(table_VD, vocab, mean_D)
    if "lm_head" in params:
      head_VD = np.asarray(params["lm_head"]["embedding"])
      new["lm_head"] = {"embedding": grow_rows(head_VD, vocab, head_VD[:num_real_tokens].astype(np.float32).mean(0))}
  embed["marker"] = marker_D.astype(np.float32)
  new["embed"] = embed
  return new, cfg.replace(vocab_size=vocab, marker_id=marker_id)
