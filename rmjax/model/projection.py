"""The projections' matrix product, with a weight gradient that XLA's CPU backend runs fast.

Why it exists: autodiff of `x_TK @ w_KN` computes the weight gradient as one dot contracting
both operands over their leading (token) axis. XLA's CPU backend gives that dot to Eigen's GEMM,
slower than YNNPACK's, which runs the forward products (the left operand contracted over its
last axis); these gradients are a third of a full fine-tuning step's FLOPs. `project` is the
same product with its backward pass written out: on a CPU the weight gradient transposes the
(tokens, in) activations into an (in, tokens) buffer first (an optimization barrier keeps XLA
from folding that transpose back into the dot), so YNNPACK runs it. Elsewhere (GPU GEMMs read
either layout) the backward pass is autodiff's own. `jax.lax.platform_dependent` picks the
branch when the step is lowered, for the platform it is lowered for, so a step compiled for a
GPU on a CPU host gets the GPU's. Remat policies see the forward's dot as before
(tests/test_projection.py). Measured, GEMMs and whole steps (where the gain has been within a
shared CPU's noise): BUILD.md, Results.

`matmul` uses it for float32 operands only: CPU training is float32 (bf16 is a GPU's), and a
written-out backward pass changes which roundings XLA may skip under its default excess
precision, so bf16 steps keep autodiff's pass and their exact values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _weight_grad_cpu(x_TK: jax.Array, g_TN: jax.Array) -> jax.Array:
  return jnp.dot(jax.lax.optimization_barrier(x_TK.T), g_TN)


def _weight_grad(x_TK: jax.Array, g_TN: jax.Array) -> jax.Array:
  return jnp.dot(x_TK.T, g_TN)


@jax.custom_vjp
def project(x_TK: jax.Array, w_KN: jax.Array) -> jax.Array:
  """x_TK @ w_KN for 2-D operands; its gradients are autodiff's, laid out for the platform."""
  return jnp.dot(x_TK, w_KN)


def _project_fwd(x_TK: jax.Array, w_KN: jax.Array):
  return jnp.dot(x_TK, w_KN), (x_TK, w_KN)


def _project_bwd(residuals, g_TN: jax.Array):
  x_TK, w_KN = residuals
  g_x = jnp.dot(g_TN, w_KN.T).astype(x_TK.dtype)
  g_w = jax.lax.platform_dependent(x_TK, g_TN, cpu=_weight_grad_cpu, default=_weight_grad)
  return g_x, g_w.astype(w_KN.dtype)


project.defvjp(_project_fwd, _project_bwd)


def matmul(x_TK: jax.Array, w_KN: jax.Array) -> jax.Array:
  """The projections' product: `project` for float32 operands, else jnp.dot."""
  if x_TK.dtype == jnp.float32 and w_KN.dtype == jnp.float32:
    return project(x_TK, w_KN)
  return jnp.dot(x_TK, w_KN)
