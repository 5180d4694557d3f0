"""Causal attention for XLA in query blocks: the score blocks above the diagonal are never computed.

Why it exists: jax's XLA attention (`jax.nn.dot_product_attention(implementation="xla")`, what runs
on a CPU and for fp32 on a GPU) computes all T x T scores of a row and then masks the upper
half: twice the causal work, and (B, N, T, T) score and probability buffers that the backward
pass keeps. cuDNN skips those blocks itself; XLA does not. Here the queries are split into blocks
of `block` rows and each block attends only the keys up to its own last row, so n blocks compute
(n + 1) / 2n of the scores. Packed rows are always full-length, so they gain the most.

Each block runs `grouped_attention`, not jax's XLA attention: the same softmax attention (logits
and softmax in fp32), with the query heads grouped over their key/value heads in the score product
and the weights normalised after the value product, so the division and its broadcast touch the
(T, H) output instead of the (T, S) weights. XLA's CPU dots take materialised operands, so jax's
order costs a broadcast, a division and a copy of the weights per layer in each direction; full
fine-tuning steps faster for it on a CPU (BUILD.md). The values are jax's up to float rounding,
and the blocks' the unblocked call's: a masked score contributes an exact zero to its softmax
either way, only the order of the sums differs. Rows restricted by the segment mask take their
blocks of it; rows without one (causal only) get a causal mask per block.
`python -m rmjax.bench --attention-query-block N` measures it (0 = one block, the plain call).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def blocked_causal_attention(q_BTNH: Array, k_BTKH: Array, v_BTKH: Array, mask_B1TT: Array | None,
                             scale: float, block: int) -> Array:
  """Causal XLA attention (restricted by `mask_B1TT` when given), `block` query rows at a time;
  block 0, or a row no longer than one block, is one block: the plain call."""
  t = q_BTNH.shape[1]
  block = t if block <= 0 else min(block, t)
  outs = []
  for lo in range(0, t, block):
    hi = min(lo + block, t)
    if mask_B1TT is None:
      mask = (jnp.arange(hi)[None, :] <= jnp.arange(lo, hi)[:, None])[None, None]
    else:
      mask = mask_B1TT[:, :, lo:hi, :hi]
    outs.append(grouped_attention(q_BTNH[:, lo:hi], k_BTKH[:, :hi], v_BTKH[:, :hi], mask, scale))
  return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def grouped_attention(q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, mask_B1TS: Array, scale: float) -> Array:
  """Softmax attention of T queries over S keys where `mask_B1TS` allows (every query row must
  allow one key); N query heads share each of the K key/value heads in groups of N / K."""
  b, t, n, h = q_BTNH.shape
  kv = k_BSKH.shape[2]
  q_BTKGH = q_BTNH.reshape(b, t, kv, n // kv, h)
  logits_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32) * scale
  logits_BKGTS = jnp.where(mask_B1TS[:, :, None], logits_BKGTS, jnp.finfo(jnp.float32).min)
  # exp(logit - row max): the softmax's numerator; the max is a constant to its value and gradient
  weights_BKGTS = jnp.exp(logits_BKGTS - jax.lax.stop_gradient(logits_BKGTS.max(axis=-1, keepdims=True)))
  out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", weights_BKGTS.astype(v_BSKH.dtype), v_BSKH,
                         preferred_element_type=jnp.float32)
  total_BTKG1 = jnp.moveaxis(weights_BKGTS.sum(axis=-1), 3, 1)[..., None]
  return (out_BTKGH / total_BTKG1).reshape(b, t, n, h).astype(q_BTNH.dtype)
