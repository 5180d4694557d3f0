"""Rotary embeddings (model/rope.py): the float32 backward pass (the inverse rotation) gives
autodiff's and the hand-derived gradients, and bf16 keeps autodiff's pass and values."""

import jax
import jax.numpy as jnp
import numpy as np

from rmjax.model import rope

B, T, N, H = 2, 12, 3, 8


def _inputs(dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(11), 2)
  positions = jnp.stack([jnp.arange(T), jnp.arange(T) % 5])  # a packed row restarts its positions
  angles = positions[..., None].astype(jnp.float32) * (10000.0 ** -(jnp.arange(H // 2) / (H // 2)))
  angles = jnp.concatenate([angles, angles], axis=-1)
  x = jax.random.normal(keys[0], (B, T, N, H)).astype(dtype)
  return x, jnp.cos(angles), jnp.sin(angles), jax.random.normal(keys[1], (B, T, N, H)).astype(dtype)


def _grad(fn, x, cos, sin, cotangent):
  return jax.jit(jax.grad(lambda x: jnp.sum(fn(x, cos, sin) * cotangent)))(x)


def test_float32_values_and_gradients_are_autodiffs_and_the_inverse_rotation():
  x, cos, sin, d = _inputs()
  np.testing.assert_array_equal(jax.jit(rope.apply_rope)(x, cos, sin), jax.jit(rope.plain_rope)(x, cos, sin))
  ours = _grad(rope.apply_rope, x, cos, sin, d)
  np.testing.assert_allclose(ours, _grad(rope.plain_rope, x, cos, sin, d), rtol=1e-6, atol=1e-6)
  # by hand in float64: each (i, i + H/2) pair is rotated by its angle, so its gradient is the
  # cotangent pair rotated back by the same angle
  d64, c, s = np.asarray(d, np.float64), np.asarray(cos, np.float64)[:, :, None], np.asarray(sin, np.float64)[:, :, None]
  h = H // 2
  d1, d2 = d64[..., :h], d64[..., h:]
  want = np.concatenate([d1 * c[..., :h] + d2 * s[..., h:], d2 * c[..., h:] - d1 * s[..., :h]], axis=-1)
  np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-6)
  assert "custom_vjp_call" in str(jax.make_jaxpr(rope.apply_rope)(x, cos, sin))


def test_bfloat16_keeps_autodiffs_pass_and_values():
  x, cos, sin, d = _inputs(jnp.bfloat16)
  assert "custom_vjp_call" not in str(jax.make_jaxpr(rope.apply_rope)(x, cos, sin))
  np.testing.assert_array_equal(_grad(rope.apply_rope, x, cos, sin, d), _grad(rope.plain_rope, x, cos, sin, d))
