"""RMSNorm (model/rms_norm.py): the float32 closed-form backward pass gives autodiff's and the
hand-derived gradients of x and the scale, over one axis or heads; bf16 keeps autodiff's pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmjax.model.rms_norm import plain_rms_norm, rms_norm

EPS = 1e-6


def _inputs(shape, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(7), 3)
  x = (3.0 * jax.random.normal(keys[0], shape)).at[0, 0].set(0.0)  # a zero row: r = 1 / sqrt(eps)
  scale = 1.0 + 0.1 * jax.random.normal(keys[1], shape[-1:])
  return x.astype(dtype), scale.astype(dtype), jax.random.normal(keys[2], shape).astype(dtype)


def _grads(norm, x, scale, cotangent):
  return jax.jit(jax.grad(lambda x, s: jnp.sum(norm(x, s, EPS) * cotangent), argnums=(0, 1)))(x, scale)


@pytest.mark.parametrize("shape", [(2, 5, 16), (2, 5, 3, 8)])  # (B, T, D); (B, T, N, H) as q_norm
def test_float32_values_and_gradients_are_autodiffs_and_the_closed_form(shape):
  x, scale, d = _inputs(shape)
  np.testing.assert_array_equal(jax.jit(rms_norm, static_argnums=2)(x, scale, EPS),
                                jax.jit(plain_rms_norm, static_argnums=2)(x, scale, EPS))
  ours = _grads(rms_norm, x, scale, d)
  for got, want in zip(ours, _grads(plain_rms_norm, x, scale, d), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # by hand in float64, from the Jacobian of n = x r: dn_i/dx_j = r (delta_ij - x_i x_j r^2 / D)
  x64, s64, d64 = (np.asarray(a, np.float64) for a in (x, scale, d))
  r = 1 / np.sqrt(np.mean(x64 ** 2, axis=-1, keepdims=True) + EPS)
  g = d64 * s64
  want_x = r * g - x64 * r ** 3 * np.mean(g * x64, axis=-1, keepdims=True)
  want_scale = (d64 * x64 * r).reshape(-1, shape[-1]).sum(axis=0)
  np.testing.assert_allclose(ours[0], want_x, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(ours[1], want_scale, rtol=1e-4, atol=1e-4)
  assert "custom_vjp_call" in str(jax.make_jaxpr(rms_norm, static_argnums=2)(x, scale, EPS))


def test_bfloat16_keeps_autodiffs_pass_and_values():
  x, scale, d = _inputs((2, 5, 16), jnp.bfloat16)
  assert "custom_vjp_call" not in str(jax.make_jaxpr(rms_norm, static_argnums=2)(x, scale, EPS))
  for got, want in zip(_grads(rms_norm, x, scale, d), _grads(plain_rms_norm, x, scale, d), strict=True):
    np.testing.assert_array_equal(got, want)
