"""Rotary position embeddings from explicit position ids.

Why it exists: the decoder rotates q and k by angles of explicit positions (packed rows restart
them per example), with transformers' inverse frequencies (default, linear and llama3 scaling)
and its rotate_half layout, to match its hidden states to 1e-5 (tests/test_model_parity.py).
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


def apply_rope(x_BTNH: Array, cos_BTH: Array, sin_BTH: Array) -> Array:
  """x rotated by the positions' angles (transformers' rotate_half layout)."""
  cos, sin = cos_BTH[:, :, None, :].astype(x_BTNH.dtype), sin_BTH[:, :, None, :].astype(x_BTNH.dtype)
  return x_BTNH * cos + _rotate_half(x_BTNH) * sin
