"""The optimizer: schedules, trainable labels and masking, clipping, weight decay and the Adam
moments' dtype, on tiny trees and a tiny ConfidenceModel."""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from rmjax import sharding as shd
from rmjax.train import optim
from rmjax.train import state as st
from rmjax.train import step as sp

from _tiny_train import assert_trees_equal, make_batch, snapshot, tiny_model


warnings.filterwarnings("ignore", message="Some donated buffers were not usable")


# -- optimizer pieces -------------------------------------------------------------------------

def test_schedule_warmup_starts_positive_and_decays():
  cfg = optim.OptimConfig(lr=1e-3, warmup_steps=4, max_steps=14, schedule="cosine")
  lr = optim.make_schedule(cfg)
  np.testing.assert_allclose([float(lr(i)) for i in range(4)], [2.5e-4, 5e-4, 7.5e-4, 1e-3], rtol=1e-6)
  np.testing.assert_allclose(float(lr(4)), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(float(lr(9)), 0.5e-3, rtol=1e-5)  # half way through the decay
  assert 0 < float(lr(13)) < 1e-4  # the last executed step still learns
  lin = optim.make_schedule(optim.OptimConfig(lr=1e-3, warmup_steps=0, max_steps=10, schedule="linear"))
  np.testing.assert_allclose([float(lin(0)), float(lin(5))], [1e-3, 0.5e-3], rtol=1e-6)
  const = optim.make_schedule(optim.OptimConfig(lr=1e-3, warmup_steps=2, max_steps=10, schedule="constant"))
  np.testing.assert_allclose([float(const(0)), float(const(9))], [0.5e-3, 1e-3], rtol=1e-6)


def test_optim_config_from_spec_and_validation():
  from ml_collections import ConfigDict
  spec = ConfigDict({"lr": 2e-5, "schedule": "linear", "warmup_steps": 5, "max_steps": 50,
                     "weight_decay": 0.01, "max_grad_norm": 1.0, "grad_accum_steps": 4, "loss": "bce",
                     "mode": "lora", "nan_policy": "skip", "opt_state_dtype": "float32",
                     "model": {"frozen_dtype": "bfloat16"}})
  cfg = optim.OptimConfig.from_spec(spec)
  assert (cfg.lr, cfg.schedule, cfg.grad_accum_steps, cfg.loss, cfg.mode, cfg.nan_policy, cfg.frozen_dtype) == (
    2e-5, "linear", 4, "bce", "lora", "skip", "bfloat16")
  with pytest.raises(ValueError, match="schedule 'cosinus' must be one of"):
    optim.OptimConfig(schedule="cosinus")
  with pytest.raises(ValueError, match="warmup_steps"):
    optim.OptimConfig(warmup_steps=10, max_steps=5)


def _abstract(lora_rank):
  model = tiny_model(lora_rank=lora_rank)
  return jax.eval_shape(lambda k: model.init(k, *st.dummy_inputs())["params"], jax.random.PRNGKey(0))


def test_labels_full_and_lora():
  params = _abstract(lora_rank=4)
  full = traverse_util.flatten_dict(optim.trainable_labels(params, "full"), sep="/")
  assert set(full.values()) == {"train"}
  lora = traverse_util.flatten_dict(optim.trainable_labels(params, "lora"), sep="/")
  assert lora.keys() == full.keys()  # every parameter labelled
  trained = sorted(k for k, v in lora.items() if v == "train")
  assert "decoder/embed/marker" in trained
  assert "decoder/layers/attn/q_proj/lora_a" in trained and "decoder/layers/attn/o_proj/lora_b" in trained
  assert "head/linear_0/kernel" in trained
  for frozen in ("decoder/embed/embedding", "decoder/layers/attn/q_proj/kernel",
                 "decoder/layers/mlp/up_proj/kernel", "decoder/final_norm/scale"):
    assert lora[frozen] == "freeze"
  assert all(re.search(r"lora_[ab]$|^head/|^decoder/embed/marker$", k) for k in trained)
  with pytest.raises(ValueError, match="no lora_a/lora_b"):
    optim.trainable_labels(_abstract(lora_rank=0), "lora")


def test_decay_mask_only_matrices():
  mask = traverse_util.flatten_dict(optim.decay_mask(_abstract(lora_rank=4)), sep="/")
  assert mask["decoder/layers/attn/q_proj/kernel"] and mask["head/linear_0/kernel"]
  assert mask["decoder/layers/attn/q_proj/lora_a"]
  assert not mask["decoder/embed/embedding"] and not mask["decoder/embed/marker"]
  assert not mask["decoder/final_norm/scale"] and not mask["head/linear_0/bias"]


def test_masked_optimizer_gives_frozen_leaves_no_state():
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), _abstract(lora_rank=4))
  labels = optim.trainable_labels(params, "lora")
  opt_state = optim.masked_optimizer(optim.OptimConfig(mode="lora"), labels).init(params)
  n_train = optim.param_counts(*optim.split_params(params, labels))["trainable"]
  n_state = sum(x.size for x in jax.tree.leaves(opt_state) if x.ndim)
  assert n_state == 2 * n_train  # Adam mu + nu, trainable leaves only


def test_clipping_by_a_scale_matches_optax_and_leaves_small_or_zero_gradients_alone():
  grads = {"a": jnp.asarray([3.0, -4.0]), "b": {"c": jnp.asarray([[12.0]])}}  # global norm 13
  clip = optim.clip_by_global_norm(1.0)
  clipped, _ = clip.update(grads, clip.init(grads))
  expected, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
  for got, want in zip(jax.tree.leaves(clipped), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(float(optax.tree.norm(clipped)), 1.0, rtol=1e-6)
  for small in (grads, jax.tree.map(jnp.zeros_like, grads)):
    unchanged, _ = optim.clip_by_global_norm(100.0).update(small, clip.init(small))
    assert_trees_equal(unchanged, small)  # a factor of exactly 1: no NaN from a zero norm


def test_clipping_uses_a_global_norm_passed_to_it_through_the_chain():
  """The train step hands the clipping the norm it already computed; a different norm passed in
  must change the factor (13 / 26 = 0.5), so the argument is really read and not recomputed."""
  grads = {"a": jnp.asarray([3.0, -4.0]), "b": {"c": jnp.asarray([[12.0]])}}  # global norm 13
  tx = optax.chain(optim.clip_by_global_norm(13.0), optax.identity())
  state = tx.init(grads)
  same, _ = tx.update(grads, state, global_norm=optax.tree.norm(grads))
  assert_trees_equal(same, tx.update(grads, state)[0])
  halved, _ = tx.update(grads, state, global_norm=jnp.asarray(26.0))
  for got, want in zip(jax.tree.leaves(halved), jax.tree.leaves(grads), strict=True):
    np.testing.assert_allclose(got, 0.5 * want, rtol=1e-6)
  # and the train step's update hands it on through make_optimizer's whole chain: Adam's first
  # moment holds (1 - b1) times the clipped gradient, half as large under a norm twice as large
  tx = optim.make_optimizer(optim.OptimConfig(max_grad_norm=1.0, warmup_steps=0, schedule="constant"))
  moments = [_adam_state(sp.apply_update(tx, grads, norm, grads, tx.init(grads))[1]).mu
             for norm in (jnp.asarray(13.0), jnp.asarray(26.0))]
  for full, half, g in zip(*map(jax.tree.leaves, moments), jax.tree.leaves(grads), strict=True):
    np.testing.assert_allclose(full, 0.1 * g / 13.0, rtol=1e-5)
    np.testing.assert_allclose(half, 0.5 * full, rtol=1e-6)


def _adam_state(opt_state):
  return next(x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
              if isinstance(x, optax.ScaleByAdamState))


@pytest.mark.parametrize("moments", ["float32", "bfloat16"])
def test_weight_decay_reaches_matrices_only_and_clipping_its_threshold(moments):
  params = {"a": {"kernel": jnp.ones((2, 2)), "scale": jnp.ones(2), "bias": jnp.ones(2)}}
  cfg = dict(lr=0.1, weight_decay=0.5, warmup_steps=0, schedule="constant", opt_state_dtype=moments)
  tx = optim.make_optimizer(optim.OptimConfig(max_grad_norm=0.0, **cfg))
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new["a"]["kernel"], 1 - 0.1 * 0.5, rtol=1e-6)  # decayed, no gradient
  np.testing.assert_array_equal(new["a"]["scale"], 1.0)
  np.testing.assert_array_equal(new["a"]["bias"], 1.0)
  # A gradient of global norm 20 is clipped to norm 1 before the moments see it: mu = (1 - b1) g / 20.
  grads = {"w": jnp.full((4,), 10.0)}
  for max_norm, scale in ((1.0, 1 / 20), (0.0, 1.0)):
    tx = optim.make_optimizer(optim.OptimConfig(max_grad_norm=max_norm, **cfg))
    _, opt_state = tx.update(grads, tx.init({"w": jnp.ones(4)}), {"w": jnp.ones(4)})
    np.testing.assert_allclose(np.asarray(_adam_state(opt_state).mu["w"], np.float32), 0.1 * 10.0 * scale, rtol=1e-2)


# -- optimizer-state dtype (Adam moments) -------------------------------------------------------
def _adam_run(tx, params, grads_seq):
  state = tx.init(params)
  out = []
  for g in grads_seq:
    upd, state = tx.update(g, state, params)
    out.append(upd)
  return out, state


def _ours_and_optax(moments: str, shape: tuple[int, int], steps: int, seed: int):
  """Our Adam with moments in `moments` and optax's scale_by_adam (the reference), run on the
  same random parameters and gradients: (our updates, our state, optax's updates)."""
  rng = np.random.default_rng(seed)
  params = {"w": jnp.asarray(rng.normal(size=shape), jnp.float32)}
  grads = [{"w": jnp.asarray(rng.normal(size=shape), jnp.float32)} for _ in range(steps)]
  ours, state = _adam_run(optim.scale_by_adam_in(moments, 0.9, 0.999, 1e-8), params, grads)
  ref, _ = _adam_run(optax.scale_by_adam(0.9, 0.999, 1e-8), params, grads)
  return ours, state, ref


def test_adam_moments_in_float32_equal_optax_scale_by_adam():
  """Our low-precision-capable Adam at float32 is optax's scale_by_adam."""
  ours, _, ref = _ours_and_optax("float32", (5, 3), steps=4, seed=0)
  for a, b in zip(ours, ref, strict=True):
    np.testing.assert_allclose(np.asarray(a["w"]), np.asarray(b["w"]), rtol=1e-6, atol=1e-7)


def test_bfloat16_moments_are_stored_in_bfloat16_and_track_float32():
  ours, state, ref = _ours_and_optax("bfloat16", (64, 32), steps=5, seed=1)
  assert state.mu["w"].dtype == jnp.bfloat16 and state.nu["w"].dtype == jnp.bfloat16
  assert ours[-1]["w"].dtype == jnp.float32
  rel = np.linalg.norm(np.asarray(ours[-1]["w"] - ref[-1]["w"])) / np.linalg.norm(np.asarray(ref[-1]["w"]))
  assert rel < 2e-2  # bf16 has an 8-bit mantissa: ~0.4% per rounding


def test_train_state_with_bfloat16_opt_state_steps_and_is_sharded():
  model = tiny_model()
  mesh = shd.make_mesh(shd.MeshConfig(2, 2, 2))
  cfg = optim.OptimConfig(lr=1e-3, schedule="constant", max_steps=10, opt_state_dtype="bfloat16")
  state, shardings = st.create_train_state(model, cfg, mesh, jax.random.key(0))
  moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
  assert moments and all(x.dtype == jnp.bfloat16 for x in moments)
  steps = sp.make_steps(model, cfg, mesh, shardings)
  before = snapshot(state.params)
  state, metrics = steps.train_step(state, sp.device_batch(make_batch(0), mesh))
  assert bool(metrics["finite"]) and int(state.step) == 1
  changed = [not np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params))]
  assert any(changed)
  abstract, abs_shardings = st.abstract_train_state(model, cfg, mesh)
  assert jax.tree.structure(abstract) == jax.tree.structure(state)
  assert all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(jax.tree.leaves(abstract), jax.tree.leaves(state)))


def test_opt_state_dtype_validation():
  with pytest.raises(ValueError, match="opt_state_dtype"):
    optim.OptimConfig(opt_state_dtype="float16")
