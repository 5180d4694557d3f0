"""Decoder + confidence head: token batch in, one logit per marker slot out.

Why it exists: training, evaluation and scoring all need the same composition: run the
decoder, gather the hidden state at each `<CONFIDENCE>` marker position, apply the head.
Keeping it in one module gives one param tree `{"decoder": ..., "head": ...}` that LoRA
labelling, checkpoints and export all address by path.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from rmjax.model.config import ModelConfig
from rmjax.model.head import ConfidenceHead, HeadConfig
from rmjax.model.transformer import Decoder


class ConfidenceModel(nn.Module):
  """Returns pre-sigmoid float32 logits (B, M); dropout uses the "dropout" rng."""
  model_cfg: ModelConfig
  head_cfg: HeadConfig

  @nn.compact
  def __call__(self, input_ids_BT: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array,
               marker_positions_BM: jax.Array, deterministic: bool = True) -> jax.Array:
    # Every example in a row has at least one marker slot, so the slots bound its segments, unless
    # the config bounds them tighter (the packer then keeps to it: data.max_segments_per_row).
    max_segments = min(self.model_cfg.max_segments or marker_positions_BM.shape[1], marker_positions_BM.shape[1])
    h_BMD = Decoder(self.model_cfg, name="decoder")(input_ids_BT, positions_BT, segment_ids_BT,
                                                    max_segments, marker_positions_BM).astype(jnp.float32)
    logits_BM1 = ConfidenceHead(self.head_cfg, name="head")(h_BMD, deterministic=deterministic)
    return logits_BM1[..., 0].astype(jnp.float32)
