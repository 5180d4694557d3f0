"""The MLP's gated activation (model/swiglu.py): autodiff's values and gradients, only its inputs
kept for the backward pass in float32, and bf16 left to autodiff."""

import jax
import jax.numpy as jnp
import numpy as np

from rmjax.model.swiglu import swiglu

T, I = 32, 24


def _plain(gate, up):
  return jax.nn.silu(gate) * up


def _inputs(scale=3.0):
  keys = jax.random.split(jax.random.key(5), 3)
  gate = scale * jax.random.normal(keys[0], (T, I))
  gate = gate.at[0, :4].set(jnp.array([-40.0, 40.0, 0.0, -1e-3]))  # saturated, zero, tiny
  return gate, jax.random.normal(keys[1], (T, I)), jax.random.normal(keys[2], (T, I))


def _loss(fn):
  return lambda gate, up, target: jnp.sum(fn(gate, up) * target)  # target: the cotangent


def test_values_and_gradients_are_autodiffs():
  gate, up, target = _inputs()
  np.testing.assert_array_equal(jax.jit(swiglu)(gate, up), jax.jit(_plain)(gate, up))
  ours = jax.jit(jax.grad(_loss(swiglu), argnums=(0, 1)))(gate, up, target)
  reference = jax.jit(jax.grad(_loss(_plain), argnums=(0, 1)))(gate, up, target)
  for got, want in zip(ours, reference, strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)  # rounding order only
  g, u, t = (np.asarray(a, np.float64) for a in (gate, up, target))  # by hand, in float64
  sig = 1 / (1 + np.exp(-g))
  np.testing.assert_allclose(ours[0], t * u * (sig + g * sig * (1 - sig)), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(ours[1], t * g * sig, rtol=1e-4, atol=1e-6)


def test_float32_backward_keeps_only_gate_and_up():
  """What the forward pass leaves for the backward: autodiff's keeps sigmoid(gate) and silu(gate)
  too (the widest activations of a layer, written by passes of their own on a CPU)."""
  gate, up, _ = _inputs()

  def kept(fn):
    _, vjp = jax.vjp(fn, gate, up)
    return [leaf for leaf in jax.tree.leaves(vjp) if getattr(leaf, "shape", None) == (T, I)]

  ours, autodiffs = kept(swiglu), kept(_plain)
  assert len(ours) == 2 and all(any(np.array_equal(a, b) for b in (gate, up)) for a in ours)
  assert len(autodiffs) > 2


def test_bfloat16_keeps_autodiffs_pass_and_values():
  gate, up, target = (a.astype(jnp.bfloat16) for a in _inputs())
  assert "custom_vjp_call" not in str(jax.make_jaxpr(swiglu)(gate, up))
  assert "custom_vjp_call" in str(jax.make_jaxpr(swiglu)(*(a.astype(jnp.float32) for a in (gate, up))))
  ours = jax.jit(jax.grad(_loss(swiglu), argnums=(0, 1)))(gate, up, target)
  reference = jax.jit(jax.grad(_loss(_plain), argnums=(0, 1)))(gate, up, target)
  for got, want in zip(ours, reference, strict=True):
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(got, want)
