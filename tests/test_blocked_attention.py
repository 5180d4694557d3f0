"""XLA attention in query blocks (model/blocked_attention.py): the plain call's values and
gradients, with fewer FLOPs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmjax.model.blocked_attention import blocked_causal_attention
from rmjax.model.transformer import attention_mask

B, T, N, K, H = 2, 70, 4, 2, 8
SCALE = H ** -0.5


def _inputs():
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (B, T, N, H))
  k, v = (jax.random.normal(key, (B, T, K, H)) for key in keys[1:])
  return q, k, v


def _segments():
  """Row 0: three examples then padding; row 1: one example filling the row."""
  row0 = np.concatenate([np.full(20, 1), np.full(25, 2), np.full(15, 3), np.zeros(10)])
  return jnp.asarray(np.stack([row0, np.ones(T)]), jnp.int32)


@functools.cache
def _attend(block: int, masked: bool):
  """(attention output, (loss, (dq, dk, dv))) of blocked_causal_attention, one compiled call
  per (block, masked); block 0 is the plain call."""
  q, k, v = _inputs()
  mask = attention_mask(_segments()) if masked else None

  def loss(q, k, v):
    out = blocked_causal_attention(q, k, v, mask, SCALE, block)
    return jnp.sum(jnp.sin(out)), out
  (value, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return np.asarray(out), jax.tree.map(np.asarray, (value, grads))


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("block", [16, 35, 69])
def test_blocks_give_the_plain_calls_values_and_gradients(masked, block):
  out, blocked = _attend(block, masked)
  for want, got in zip(jax.tree.leaves(_attend(0, masked)[1]), jax.tree.leaves(blocked), strict=True):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  # and jax's XLA attention is the reference: causal, within segments, values and gradients
  want_out, want = _reference(masked)
  np.testing.assert_allclose(out, want_out, atol=1e-5, rtol=1e-5)
  for want_leaf, got in zip(jax.tree.leaves(want), jax.tree.leaves(blocked), strict=True):
    np.testing.assert_allclose(got, want_leaf, atol=1e-5, rtol=1e-5)


@functools.cache
def _reference(masked: bool):
  """_attend's results from jax.nn.dot_product_attention(implementation="xla")."""
  mask = attention_mask(_segments()) if masked else None

  def loss(q, k, v):
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=SCALE, is_causal=True, implementation="xla")
    return jnp.sum(jnp.sin(out)), out
  (value, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(*_inputs())
  return np.asarray(out), jax.tree.map(np.asarray, (value, grads))


def test_blocks_above_the_diagonal_are_not_computed():
  q, k, v = _inputs()
  def flops(block):
    fn = jax.jit(jax.grad(lambda q: jnp.sum(blocked_causal_attention(q, k, v, None, SCALE, block))))
    return fn.lower(q).compile().cost_analysis()["flops"]
  # 5 blocks of 14 rows: the scores of (1 + 2 + ... + 5) / 25 = 60% of the T x T matrix
  assert flops(14) < 0.75 * flops(0)

