"""The projections' product (model/projection.py): jnp.dot's values and gradients, its weight
gradient laid out for YNNPACK on a CPU, autodiff's elsewhere, remat policies unchanged, and
bf16 operands left to jnp.dot."""

import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from rmjax.model.projection import matmul, project

T, K, N = 24, 16, 12


def _inputs():
  keys = jax.random.split(jax.random.key(3), 3)
  return (jax.random.normal(keys[0], (T, K)), jax.random.normal(keys[1], (K, N)),
          jax.random.normal(keys[2], (T, N)))


def _loss(product):
  return lambda x, w, target: jnp.sum(jnp.tanh(product(x, w)) * target)


def test_values_and_gradients_are_jnp_dots():
  x, w, target = _inputs()
  np.testing.assert_allclose(project(x, w), jnp.dot(x, w), rtol=1e-6, atol=1e-6)
  ours = jax.grad(_loss(project), argnums=(0, 1))(x, w, target)
  reference = jax.grad(_loss(jnp.dot), argnums=(0, 1))(x, w, target)
  for got, want in zip(ours, reference):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # summation order may differ


def test_bfloat16_gradients_keep_the_operands_dtypes():
  x, w, target = (a.astype(jnp.bfloat16) for a in _inputs())
  g_x, g_w = jax.grad(_loss(project), argnums=(0, 1))(x, w, target)
  assert g_x.dtype == jnp.bfloat16 and g_w.dtype == jnp.bfloat16


def _dots(hlo_text: str) -> list[str]:
  return [line for line in hlo_text.splitlines() if re.search(r"= f32\[[\d,]*\][^ ]* dot\(", line)]


def test_cpu_weight_gradient_contracts_the_left_operand_last():
  """The form XLA's CPU backend gives YNNPACK (a ynn fusion, not a plain `dot`); plain autodiff
  contracts both operands over the token axis and runs on Eigen."""
  x, w, target = _inputs()
  grad = jax.jit(jax.grad(_loss(project), argnums=1))
  text = grad.lower(x, w, target).compile().as_text()
  assert not [d for d in _dots(text) if "lhs_contracting_dims={0}" in d], _dots(text)
  plain = jax.jit(jax.grad(_loss(jnp.dot), argnums=1)).lower(x, w, target).compile().as_text()
  assert [d for d in _dots(plain) if "lhs_contracting_dims={0}" in d], "autodiff's layout changed: revisit projection.py"


def test_other_platforms_lower_autodiffs_weight_gradient():
  """Lowered for a GPU, the barrier and its transpose are gone: the branch is chosen per platform."""
  x, w, target = _inputs()
  traced = jax.jit(jax.grad(_loss(project), argnums=1)).trace(x, w, target)
  cpu_text = traced.lower(lowering_platforms=("cpu",)).as_text()
  gpu_text = traced.lower(lowering_platforms=("cuda",)).as_text()
  assert "optimization_barrier" in cpu_text
  assert "optimization_barrier" not in gpu_text and "dot_general" in gpu_text


def _saved(fn, args, capsys) -> list[str]:
  """The residuals jax saves for fn's backward pass, as jax prints them."""
  capsys.readouterr()
  jax.ad_checkpoint.print_saved_residuals(fn, *args)
  return sorted(capsys.readouterr().out.splitlines())


def test_remat_policies_see_the_forward_dot_and_its_name(capsys):
  x, w, target = _inputs()

  def layer(x, w, target, product):
    return jnp.sum(jnp.tanh(checkpoint_name(product(x, w), "proj")) * target)

  policies = {"dots": jax.checkpoint_policies.dots_saveable,
              "names": jax.checkpoint_policies.save_only_these_names("proj"),
              "nothing": jax.checkpoint_policies.nothing_saveable}
  for name, policy in policies.items():
    saved = {product: [re.sub(r" from .*", "", line) for line in _saved(
      jax.checkpoint(lambda x, w, t: layer(x, w, t, product), policy=policy), (x, w, target), capsys)]
      for product in (project, jnp.dot)}
    assert saved[project] == saved[jnp.dot], name
  named = _saved(jax.checkpoint(lambda x, w, t: layer(x, w, t, project), policy=policies["names"]),
                 (x, w, target), capsys)
  assert any("named 'proj'" in line for line in named), named


def test_matmul_writes_out_the_backward_pass_for_float32_only():
  x, w, _ = _inputs()
  assert "custom_vjp" in str(jax.make_jaxpr(matmul)(x, w))
  assert "custom_vjp" not in str(jax.make_jaxpr(matmul)(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)))


def test_lora_update_scales_the_rank_sized_product_in_both_passes():
  """scale * (x A) B with the scale on x A: the values and gradients of the output-scaled form,
  and no multiply of a (tokens, out) array in the step's backward pass (which the output-scaled
  form has: it scales each projection's output gradient)."""
  from _jaxpr import equations
  from rmjax.model.transformer import lora_update
  x, w, target = _inputs()
  keys = jax.random.split(jax.random.key(4), 2)
  a, b, scale = jax.random.normal(keys[0], (K, 4)), jax.random.normal(keys[1], (4, N)), 2.5

  def output_scaled(x, a, b, scale):
    return scale * matmul(matmul(x, a), b)

  def loss(update):
    return lambda x, a, b: jnp.sum(jnp.tanh(jnp.dot(x, w) + update(x, a, b, scale)) * target)

  np.testing.assert_allclose(lora_update(x, a, b, scale), output_scaled(x, a, b, scale), rtol=1e-6, atol=1e-6)
  ours = jax.grad(loss(lora_update), argnums=(0, 1, 2))(x, a, b)
  reference = jax.grad(loss(output_scaled), argnums=(0, 1, 2))(x, a, b)
  for got, want in zip(ours, reference, strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  def wide_multiplies(update):
    jaxpr = jax.make_jaxpr(jax.grad(loss(update), argnums=(1, 2)))(x, a, b).jaxpr
    return [e for e in equations(jaxpr) if e.primitive.name == "mul" and e.outvars[0].aval.shape == (T, N)
            and any(getattr(v, "val", None) is not None for v in e.invars)]  # times a constant

  assert wide_multiplies(lora_update) == [] and len(wide_multiplies(output_scaled)) >= 1
