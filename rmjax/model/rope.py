"""Rotary position embeddings from explicit position ids, with a backward pass of one elementwise pass.

Why it exists: the decoder rotates q and k by angles of explicit positions (packed rows restart
them per example), with transformers' inverse frequencies (default, linear and llama3 scaling)
and its rotate_half layout, to match its hidden states to 1e-5 (tests/test_model_parity.py).
Autodiff of the rotation transposes rotate_half's concatenate of slices into pads of the full
width and their sum, which XLA's CPU backend writes as passes of their own over q and k in
every layer; the rotation's transpose is the rotation by the negated angles, so in float32 the
backward pass here is that (as model/swiglu.py, bf16 keeps autodiff's pass and values). The
step with each: BUILD.md, Results.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from rmjax.model.config import ModelConfig

Array = jax.Array


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """Inverse frequencies (head_dim/2,), float32, computed as transformers does."""
  dim = cfg.head_dim
  exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  inv_freq = (np.float32(1.0) / (np.float32(cfg.rope_theta) ** exponent)).astype(np.float32)
  rs = cfg.rope_scaling
  if rs is None or rs.rope_type == "default":
    return inv_freq
  if rs.rope_type == "linear":
    return (inv_freq / np.float32(rs.factor)).astype(np.float32)
  old_len = rs.original_max_position_embeddings
  low_wavelen, high_wavelen = old_len / rs.low_freq_factor, old_len / rs.high_freq_factor
  wavelen = (np.float32(2 * math.pi) / inv_freq).astype(np.float32)
  scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(rs.factor), inv_freq).astype(np.float32)
  smooth = ((old_len / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)).astype(np.float32)
  smoothed = ((1 - smooth) * scaled / np.float32(rs.factor) + smooth * scaled).astype(np.float32)
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(cfg: ModelConfig, positions_BT: Array) -> tuple[Array, Array]:
  """cos/sin tables (B, T, head_dim) in float32 for explicit positions."""
  freqs_BTF = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(cfg))
  emb_BTH = jnp.concatenate([freqs_BTF, freqs_BTF], axis=-1)
  return jnp.cos(emb_BTH), jnp.sin(emb_BTH)


def _rotate_half(x_BTNH: Array) -> Array:
  """(x1, x2) -> (-x2, x1) over the last axis's halves."""
  half = x_BTNH.shape[-1] // 2
  return jnp.concatenate([-x_BTNH[..., half:], x_BTNH[..., :half]], axis=-1)


def plain_rope(x_BTNH: Array, cos_BTH: Array, sin_BTH: Array) -> Array:
  """The rotation as transformers writes it (autodiff's backward pass)."""
  cos, sin = cos_BTH[:, :, None, :].astype(x_BTNH.dtype), sin_BTH[:, :, None, :].astype(x_BTNH.dtype)
  return x_BTNH * cos + _rotate_half(x_BTNH) * sin


@jax.custom_vjp
def _rope_by_inverse_rotation(x_BTNH: Array, cos_BTH: Array, sin_BTH: Array) -> Array:
  return plain_rope(x_BTNH, cos_BTH, sin_BTH)


def _fwd(x_BTNH: Array, cos_BTH: Array, sin_BTH: Array):
  return plain_rope(x_BTNH, cos_BTH, sin_BTH), (cos_BTH, sin_BTH)


def _bwd(residuals, d_out_BTNH: Array):
  """The transposed rotation: rotate_half's transpose is -rotate_half, so the input gradient is
  d * cos - rotate_half(d * sin), one elementwise pass. The tables come from integer positions
  and take no gradient."""
  cos_BTH, sin_BTH = residuals
  cos, sin = cos_BTH[:, :, None, :], sin_BTH[:, :, None, :]
  return d_out_BTNH * cos - _rotate_half(d_out_BTNH * sin), None, None


_rope_by_inverse_rotation.defvjp(_fwd, _bwd)


def apply_rope(x_BTNH: Array, cos_BTH: Array, sin_BTH: Array) -> Array:
  """x rotated by the positions' angles (HF's rotate_half layout); float32 takes the backward
  pass above (module docstring), other dtypes autodiff's."""
  if x_BTNH.dtype == jnp.float32:
    return _rope_by_inverse_rotation(x_BTNH, cos_BTH, sin_BTH)
  return plain_rope(x_BTNH, cos_BTH, sin_BTH)
