"""The MLP's gated activation, silu(gate) * up, with a backward pass that saves only its inputs.

Why it exists: autodiff of `silu(gate) * up` keeps sigmoid(gate) and silu(gate) for the backward
pass, and XLA's CPU backend then writes the forward as three elementwise passes over the
(tokens, intermediate_size) arrays, each materialising one of them: the widest activations of a
layer, written and read back for a product that needs none of them. Here the backward pass is
written out from `gate` and `up` alone (which the projections produce anyway), so the forward
is one pass that writes only the product, and the backward recomputes the sigmoid inside its own
elementwise pass. The values are autodiff's up to float rounding (tests/test_swiglu.py); the
step with each: BUILD.md, Results.

As model/projection.py's `matmul`, `swiglu` takes this path for float32 only (CPU training):
bf16 steps (a GPU's) keep autodiff's pass and its exact values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def plain_swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  """silu(gate) * up as written (autodiff's backward pass)."""
  return jax.nn.silu(gate) * up


@jax.custom_vjp
def _swiglu_from_inputs(gate: jax.Array, up: jax.Array) -> jax.Array:
  return plain_swiglu(gate, up)


def _fwd(gate: jax.Array, up: jax.Array):
  return plain_swiglu(gate, up), (gate, up)


def _bwd(residuals, d_out: jax.Array):
  gate, up = residuals
  sig = jax.nn.sigmoid(gate)
  d_up = d_out * (gate * sig)
  # d silu(g) / dg = sigmoid(g) + g * sigmoid(g) * (1 - sigmoid(g))
  d_gate = d_out * up * (sig + gate * sig * (1 - sig))
  return d_gate, d_up


_swiglu_from_inputs.defvjp(_fwd, _bwd)


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  """silu(gate) * up; float32 operands take the backward pass from the inputs alone."""
  if gate.dtype == jnp.float32 and up.dtype == jnp.float32:
    return _swiglu_from_inputs(gate, up)
  return plain_swiglu(gate, up)
