"""RMSNorm as transformers computes it, with a float32 backward pass written out in one piece.

Why it exists: autodiff of `x * rsqrt(mean(x * x) + eps) * scale` differentiates x's two uses
separately and sums them, and XLA's CPU backend writes those parts as passes of their own over
the normalised array (the largest are q_norm's and k_norm's, over every head of every token).
The gradient in closed form, dx = r * (g - x * r^2 * mean(g * x)) with g = dy * scale and
r = rsqrt(mean(x^2) + eps), needs only x and the per-row r, so the backward pass is one
reduction and one elementwise pass. As model/swiglu.py, only float32 takes it: bf16 keeps
autodiff's pass and values. The step with each: BUILD.md, Results.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_F32 = jnp.float32


def plain_rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """Normalise in float32, cast back, multiply by the scale (transformers' order of casts)."""
  x32 = x.astype(_F32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return scale.astype(x.dtype) * normed.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rms_norm_closed_form(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  return plain_rms_norm(x, scale, eps)


def _fwd(x: jax.Array, scale: jax.Array, eps: float):
  r = jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
  return scale * (x * r), (x, scale, r)


def _bwd(eps: float, residuals, d_out: jax.Array):
  del eps
  x, scale, r = residuals
  g = d_out * scale
  d_x = r * (g - x * (r * r) * jnp.mean(g * x, axis=-1, keepdims=True))
  d_scale = jnp.sum((d_out * (x * r)).reshape(-1, x.shape[-1]), axis=0)
  return d_x, d_scale


_rms_norm_closed_form.defvjp(_fwd, _bwd)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """RMSNorm of x's last axis times `scale`; float32 operands take the closed-form backward."""
  if x.dtype == _F32 and scale.dtype == _F32:
    return _rms_norm_closed_form(x, scale, eps)
  return plain_rms_norm(x, scale, eps)
