"""Causal attention for XLA in query blocks: the score blocks above the diagonal are never computed.

Why it exists: jax's XLA attention (`jax.nn.dot_product_attention(implementation="xla")`, what runs
on a CPU and for fp32 on a GPU) computes all T x T scores of a row and then masks the upper
half: twice the causal work, and (B, N, T, T) score and probability buffers that the backward
pass keeps. cuDNN skips those blocks itself; XLA does not. Here the queries are split into blocks
of `block` rows and each block attends only the keys up to its own last row, so n blocks compute
(n + 1) / 2n of the scores. Packed rows are always full-length, so they gain the most.

The values are the unblocked call's up to float rounding: a masked score contributes an exact
zero to its softmax either way, only the order of the sums differs. Rows restricted by the segment
mask take their blocks of it; rows without one (causal only) get a causal mask per block.
`python -m rmjax.bench --attention-query-block N` measures it (0 = one block, the plain call).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def blocked_causal_attention(q_BTNH: Array, k_BTKH: Array, v_BTKH: Array, mask_B1TT: Array | None,
                             scale: float, block: int) -> Array:
  """Causal XLA attention (restricted by `mask_B1TT` when given), `block` query rows at a time;
  block 0, or a row no longer than one block, is the plain call."""
  t = q_BTNH.shape[1]
  if block <= 0 or t <= block:
    return jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, mask=mask_B1TT, scale=scale, is_causal=True,
                                        implementation="xla")
  outs = []
  for lo in range(0, t, block):
    hi = min(lo + block, t)
    if mask_B1TT is None:
      mask = (jnp.arange(hi)[None, :] <= jnp.arange(lo, hi)[:, None])[None, None]
    else:
      mask = mask_B1TT[:, :, lo:hi, :hi]
    outs.append(jax.nn.dot_product_attention(q_BTNH[:, lo:hi], k_BTKH[:, :hi], v_BTKH[:, :hi], mask=mask,
                                             scale=scale, implementation="xla"))
  return jnp.concatenate(outs, axis=1)
