"""Causal attention for XLA in query blocks, with its own backward pass laid out for XLA's dots.

Why it exists: jax's XLA attention (`jax.nn.dot_product_attention(implementation="xla")`, what runs
on a CPU and for fp32 on a GPU) computes all T x T scores of a row and then masks the upper
half: twice the causal work, and (B, N, T, T) score and probability buffers that the backward
pass keeps. cuDNN skips those blocks itself; XLA does not. Here the queries are split into blocks
of `block` rows and each block attends only the keys up to its own last row, so n blocks compute
(n + 1) / 2n of the scores. Packed rows are always full-length, so they gain the most.

Layout. XLA's CPU dots take materialised operands in (batch, rows, contraction) x (batch,
contraction, columns) order and transpose any operand that is not. Under autodiff of an einsum,
the key and value gradients contract the (T, S) score gradients and weights over their rows, so
XLA transposed those, the largest arrays of a layer, in every block of both passes. Here q, k and
v are put in (B, K, T, G, H) and (B, K, S, H) order once a layer (the N query heads grouped over
their K key/value heads, G = N / K, share each key in the score product), and `_attend`'s backward
pass is written out (a `jax.custom_vjp` around all the blocks, so that no block's slice of q, k
or v is transposed into a pad of the full length) so that the (T, S) arrays only ever enter a dot
in the order it reads: the key and value gradients come out transposed, (B, K, H, S), by multiplying the
small (T, H) arrays' transposes into them. The weights are normalised after the value product,
and the backward pass folds the softmax's 1 / sum into the (T, H) output gradient, so no
normalised (T, S) probabilities are ever built. One layer's forward and backward pass against
jax's XLA attention: BUILD.md, Results (`python -m benchmarks.blocked_attention`).

The values and gradients are jax's XLA attention's up to float rounding (tests/test_blocked_attention.py),
and the blocks' the unblocked call's: a masked score contributes an exact zero to its softmax
either way, only the order of the sums differs. Rows restricted by the segment mask take their
blocks of it; rows without one (causal only) get a causal mask per block.
`python -m rmjax.bench --attention-query-block N` measures it (0 = one block, the plain call).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array
_F32 = jnp.float32


def blocked_causal_attention(q_BTNH: Array, k_BTKH: Array, v_BTKH: Array, mask_B1TT: Array | None,
                             scale: float, block: int) -> Array:
  """Causal XLA attention (restricted by `mask_B1TT` when given), `block` query rows at a time;
  block 0, or a row no longer than one block, is one block: the plain call."""
  t = q_BTNH.shape[1]
  q_BKTGH, k_BKSH, v_BKSH = _grouped(q_BTNH, k_BTKH, v_BTKH)
  out_BKTGH = _attend(q_BKTGH, k_BKSH, v_BKSH, mask_B1TT, scale, t if block <= 0 else min(block, t))
  return _ungrouped(out_BKTGH)


def query_attention(q_BMNH: Array, k_BTKH: Array, v_BTKH: Array, mask_B1MT: Array, scale: float) -> Array:
  """M query rows at any positions over all T keys where `mask_B1MT` allows (every query row must
  allow one key), logits and softmax in float32 as in the blocks; plain autodiff, since M is
  small (the marker rows of the decoder's last layer)."""
  q_BKMGH, k_BKSH, v_BKSH = _grouped(q_BMNH, k_BTKH, v_BTKH)
  return _ungrouped(_forward(q_BKMGH, k_BKSH, v_BKSH, mask_B1MT, scale)[0])


def _grouped(q_BTNH: Array, k_BTKH: Array, v_BTKH: Array) -> tuple[Array, Array, Array]:
  """q in (B, K, T, G, H), k and v in (B, K, S, H): the order the dots read (module docstring)."""
  b, t, n, h = q_BTNH.shape
  kv = k_BTKH.shape[2]
  q_BKTGH = q_BTNH.reshape(b, t, kv, n // kv, h).transpose(0, 2, 1, 3, 4)
  return q_BKTGH, k_BTKH.transpose(0, 2, 1, 3), v_BTKH.transpose(0, 2, 1, 3)


def _ungrouped(out_BKTGH: Array) -> Array:
  b, kv, t, g, h = out_BKTGH.shape
  return out_BKTGH.transpose(0, 2, 1, 3, 4).reshape(b, t, kv * g, h)


def _bounds(t: int, block: int) -> list[tuple[int, int]]:
  """(first, end) query rows of each block; block i attends keys [0, end)."""
  return [(lo, min(lo + block, t)) for lo in range(0, t, block)]


def _block_mask(mask_B1TT: Array | None, lo: int, hi: int) -> Array:
  if mask_B1TT is None:
    return (jnp.arange(hi)[None, :] <= jnp.arange(lo, hi)[:, None])[None, None]
  return mask_B1TT[:, :, lo:hi, :hi]


def _dot(x: Array, y: Array, contract: tuple[int, int]) -> Array:
  """Batched (over the leading B, K) product of x and y over x's axis contract[0] and y's
  contract[1], in float32: (B, K, x's free axis, y's free axis)."""
  dims = (((contract[0],), (contract[1],)), ((0, 1), (0, 1)))
  return jax.lax.dot_general(x, y, dims, preferred_element_type=_F32)


def _forward(q_BKTGH: Array, k_BKSH: Array, v_BKSH: Array, mask_B1TS: Array, scale: float):
  """One block's (output (B, K, T, G, H) in q's dtype, and what its backward pass reads besides
  q, k and v: the softmax's numerator (B, K, M, S), its row sums and the float32 output)."""
  b, kv, t, g, h = q_BKTGH.shape
  q_BKMH = q_BKTGH.reshape(b, kv, t * g, h)  # M = T x G query rows per key/value head
  logits_BKTGS = _dot(q_BKMH, k_BKSH, (3, 3)).reshape(b, kv, t, g, -1) * scale
  logits_BKTGS = jnp.where(mask_B1TS[:, :, :, None], logits_BKTGS, jnp.finfo(_F32).min)
  # exp(logit - row max): the softmax's numerator (every row allows a key: the max is a real logit)
  weights_BKMS = jnp.exp(logits_BKTGS - logits_BKTGS.max(axis=-1, keepdims=True)).reshape(b, kv, t * g, -1)
  total_BKM1 = weights_BKMS.sum(axis=-1, keepdims=True)
  out_BKMH = _dot(weights_BKMS.astype(v_BKSH.dtype), v_BKSH, (3, 2)) / total_BKM1
  return out_BKMH.astype(q_BKTGH.dtype).reshape(q_BKTGH.shape), (weights_BKMS, total_BKM1, out_BKMH)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attend(q_BKTGH: Array, k_BKSH: Array, v_BKSH: Array, mask_B1TT: Array | None, scale: float,
            block: int) -> Array:
  """Softmax attention of T x G query rows (G heads per key/value head) over the keys up to each
  query block's last row where `mask_B1TT` allows (every query row must allow one key), logits
  and softmax in float32. The blocks are cut inside the custom_vjp so that the backward pass
  writes each gradient once: under autodiff each block's slice of q, k and v transposes to a pad
  of the full length and an add."""
  return _attend_fwd(q_BKTGH, k_BKSH, v_BKSH, mask_B1TT, scale, block)[0]


def _attend_fwd(q_BKTGH, k_BKSH, v_BKSH, mask_B1TT, scale, block):
  outs, per_block = [], []
  for lo, hi in _bounds(q_BKTGH.shape[2], block):
    out, (weights_BKMS, total_BKM1, out_BKMH) = _forward(
        q_BKTGH[:, :, lo:hi], k_BKSH[:, :, :hi], v_BKSH[:, :, :hi], _block_mask(mask_B1TT, lo, hi), scale)
    outs.append(out)
    per_block.append((weights_BKMS, total_BKM1, out_BKMH))
  out_BKTGH = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
  return out_BKTGH, (q_BKTGH, k_BKSH, v_BKSH, per_block)


def _attend_bwd(scale, block, residuals, dout_BKTGH):
  q_BKTGH, k_BKSH, v_BKSH, per_block = residuals
  bounds = _bounds(q_BKTGH.shape[2], block)
  dqs, dks, dvs = [], [], []
  for (lo, hi), saved in zip(bounds, per_block, strict=True):
    dq, dk_BKHS, dv_BKHS = _block_bwd(scale, q_BKTGH[:, :, lo:hi], k_BKSH[:, :, :hi], v_BKSH[:, :, :hi],
                                      *saved, dout_BKTGH[:, :, lo:hi])
    dqs.append(dq)
    dks.append(dk_BKHS)
    dvs.append(dv_BKHS)
  # block i's key gradients cover keys [0, end_i): key block j sums blocks j.. over its own columns
  dk_BKHS = _concat_key_blocks(dks, bounds)
  dv_BKHS = _concat_key_blocks(dvs, bounds)
  dq_BKTGH = dqs[0] if len(dqs) == 1 else jnp.concatenate(dqs, axis=2)
  return (dq_BKTGH.astype(q_BKTGH.dtype), jnp.swapaxes(dk_BKHS, 2, 3).astype(k_BKSH.dtype),
          jnp.swapaxes(dv_BKHS, 2, 3).astype(v_BKSH.dtype), None)


def _concat_key_blocks(grads_BKHS: list[Array], bounds: list[tuple[int, int]]) -> Array:
  cols = [functools.reduce(jnp.add, [g[..., lo:hi] for g in grads_BKHS[j:]]) for j, (lo, hi) in enumerate(bounds)]
  return cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)


def _block_bwd(scale, q_BKTGH, k_BKSH, v_BKSH, weights_BKMS, total_BKM1, out_BKMH, dout_BKTGH):
  """One query block's (dq (B, K, T, G, H), dk (B, K, H, S), dv (B, K, H, S)) in float32."""
  q_BKMH = q_BKTGH.reshape(out_BKMH.shape)
  dout_BKMH = dout_BKTGH.reshape(out_BKMH.shape).astype(_F32)
  # softmax backward with p = weights / total: dlogits = p * (dp - sum(p * dp)), where dp = dout v^T
  # and sum(p * dp) = sum(dout * out) over H; 1 / total moves onto the (M, H) side of each product.
  delta_BKM1 = jnp.sum(dout_BKMH * out_BKMH, axis=-1, keepdims=True)
  dp_BKMS = _dot(dout_BKMH.astype(v_BKSH.dtype), v_BKSH, (3, 3))
  dlogits_BKMS = weights_BKMS * ((dp_BKMS - delta_BKM1) * (scale / total_BKM1))
  dlogits_BKMS = dlogits_BKMS.astype(q_BKMH.dtype)
  dq_BKMH = _dot(dlogits_BKMS, k_BKSH, (3, 2))
  dk_BKHS = _dot(q_BKMH, dlogits_BKMS, (2, 2))  # contracts the M rows of both: no (M, S) transpose
  dv_BKHS = _dot((dout_BKMH / total_BKM1).astype(weights_BKMS.dtype), weights_BKMS, (2, 2))
  return dq_BKMH.reshape(dout_BKTGH.shape), dk_BKHS, dv_BKHS


_attend.defvjp(_attend_fwd, _attend_bwd)
