"""Optimizer, labels, TrainState and the jitted train/eval steps on a tiny ConfidenceModel.

Runs on the 8 fake CPU devices set up by conftest.py, compute in float32.
"""

import json
import math
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from rmjax import sharding as shd
from rmjax.model.confidence import ConfidenceModel
from rmjax.model.config import ModelConfig
from rmjax.model.head import HeadConfig
from rmjax.train import optim
from rmjax.train import state as st
from rmjax.train import step as sp

warnings.filterwarnings("ignore", message="Some donated buffers were not usable")

VOCAB, MARKER = 64, 5


def tiny_model(lora_rank: int = 0, dropout: float = 0.0, compute_dtype: str = "float32") -> ConfidenceModel:
  mc = ModelConfig.tiny("qwen3", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=8, lora_rank=lora_rank, lora_alpha=8.0,
                        marker_id=MARKER, compute_dtype=compute_dtype)
  return ConfidenceModel(mc, HeadConfig(hidden_dims=(16,), dropout=dropout))


def make_batch(seed: int, rows: int = 8, seq: int = 16, slots: int = 3) -> dict[str, np.ndarray]:
  """Random rows with trailing padding, markers at valid positions, some empty slots."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(seq // 2, seq + 1, rows)
  valid = np.arange(seq)[None, :] < lengths[:, None]
  ids = np.where(valid, rng.integers(6, VOCAB, (rows, seq)), 0).astype(np.int32)
  pos = np.sort(rng.integers(1, seq // 2, (rows, slots)), axis=1).astype(np.int32)
  ids[np.arange(rows)[:, None], pos] = MARKER
  mask = (rng.random((rows, slots)) < 0.8).astype(np.float32)
  mask[0, 0] = 1.0
  return {
    "input_ids": ids,
    "positions": np.where(valid, np.arange(seq)[None, :], 0).astype(np.int32),
    "segment_ids": valid.astype(np.int32),
    "marker_positions": np.where(mask > 0, pos, 0).astype(np.int32),
    "targets": np.where(mask > 0, rng.integers(0, 2, (rows, slots)), 0).astype(np.float32),
    "target_mask": mask,
  }


def setup(mode="full", k=1, mesh_cfg=(2, 2, 2), devices=None, lora_rank=0, dropout=0.0,
          compute_dtype="float32", **cfg_kw):
  model = tiny_model(lora_rank=lora_rank, dropout=dropout, compute_dtype=compute_dtype)
  cfg = optim.OptimConfig(**({"lr": 1e-3, "warmup_steps": 2, "max_steps": 20, "mode": mode,
                              "grad_accum_steps": k} | cfg_kw))
  mesh = shd.make_mesh(shd.MeshConfig(*mesh_cfg), devices=devices)
  state, shardings = st.create_train_state(model, cfg, mesh, jax.random.PRNGKey(0))
  return model, cfg, mesh, state, sp.make_steps(model, cfg, mesh, shardings)


def snapshot(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


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


# -- state ------------------------------------------------------------------------------------

def test_state_is_born_sharded_and_opt_state_follows_params():
  _, _, _, state, _ = setup(mode="full")
  q = state.params["decoder"]["layers"]["attn"]["q_proj"]["kernel"]
  assert q.sharding.spec == P(None, "fsdp", "tensor")
  assert len(q.sharding.device_set) == 8
  mu = state.opt_state[1][0].mu["decoder"]["layers"]["attn"]["q_proj"]["kernel"]
  assert mu.sharding.spec == q.sharding.spec
  assert state.frozen == {} and int(state.step) == 0


def test_state_from_given_params_and_mismatch_error():
  model = tiny_model()
  params = model.init(jax.random.PRNGKey(7), *st.dummy_inputs())["params"]
  cfg = optim.OptimConfig()
  mesh = shd.make_mesh(shd.MeshConfig(2, 2, 2))
  state, _ = st.create_train_state(model, cfg, mesh, jax.random.PRNGKey(0), init_params=params)
  assert_trees_equal(snapshot(st.merged_params(state)), snapshot(params))  # caller's arrays survive
  host = snapshot(params)
  state, _ = st.create_train_state(model, cfg, mesh, jax.random.PRNGKey(0), init_params=host)
  assert_trees_equal(snapshot(st.merged_params(state)), host)
  params["head"].pop("linear_0")
  with pytest.raises(ValueError, match="missing .*head/linear_0"):
    st.create_train_state(model, cfg, mesh, jax.random.PRNGKey(0), init_params=params)


def _large_float32_values(fn, key, min_size: int) -> list[tuple[str, tuple[int, ...]]]:
  """(primitive, shape) of every float32 value of at least min_size elements in fn's jaxpr,
  nested jaxprs (the layer scan's body) included."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      found.extend((eqn.primitive.name, tuple(v.aval.shape)) for v in eqn.outvars
                   if getattr(v.aval, "dtype", None) == jnp.float32 and v.aval.size >= min_size)
      for param in eqn.params.values():
        for sub in param if isinstance(param, (tuple, list)) else (param,):
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns"):
            walk(inner)

  walk(jax.make_jaxpr(fn)(key).jaxpr)
  return found


def test_lora_random_init_draws_frozen_weights_in_their_dtype_without_a_float32_copy():
  """No float32 copy of a frozen weight exists during the init (for Qwen3-4B the layer scan's
  float32 stacks took 10.3 GB of compiled temp on an H100 before the cast; BUILD.md)."""
  model = ConfidenceModel(tiny_model(lora_rank=4).model_cfg.replace(num_layers=4, intermediate_size=256),
                          HeadConfig(hidden_dims=(16,)))
  cfg = optim.OptimConfig(mode="lora", frozen_dtype="bfloat16")
  mesh = shd.make_mesh(shd.MeshConfig(1, 1, 1), devices=jax.devices()[:1])
  layout = st.param_layout(model, cfg, mesh)
  largest = max(x.size for x in jax.tree.leaves(optim.split_params(layout.abstract, layout.labels)[1]))
  key = jax.random.PRNGKey(0)
  assert _large_float32_values(st._param_init(model), key, largest)  # the check can fail
  born = st._param_init(st._born_frozen(model, cfg.frozen_dtype, layout.labels))
  assert _large_float32_values(born, key, largest) == []
  trainable, frozen = st.random_init(model, cfg, layout)(key)
  assert {x.dtype for x in jax.tree.leaves(frozen)} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(trainable)} == {jnp.dtype(jnp.float32)}
  state, _ = st.create_train_state(model, cfg, mesh, key)
  abstract_state, _ = st.abstract_train_state(model, cfg, mesh)
  shape_dtype = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
  assert shape_dtype(state.frozen) == shape_dtype(abstract_state.frozen)
  assert shape_dtype(state.params) == shape_dtype(abstract_state.params)


def test_imported_float32_base_is_cast_on_the_host_bit_identical_to_xla():
  model = tiny_model(lora_rank=4)
  params = snapshot(model.init(jax.random.PRNGKey(3), *st.dummy_inputs())["params"])
  cfg = optim.OptimConfig(mode="lora", frozen_dtype="bfloat16")
  mesh = shd.make_mesh(shd.MeshConfig(2, 2, 2))
  state, _ = st.create_train_state(model, cfg, mesh, jax.random.PRNGKey(0), init_params=params)
  want_tr, want_fr = optim.split_params(params, st.param_layout(model, cfg, mesh).labels)
  on_device = snapshot(jax.tree.map(lambda x: jnp.asarray(x).astype(jnp.bfloat16), want_fr))
  got = snapshot(state.frozen)
  assert {x.dtype for x in jax.tree.leaves(got)} == {jnp.dtype(jnp.bfloat16)}
  assert all(np.array_equal(a.view(np.uint16), b.view(np.uint16))
             for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(on_device)))
  assert_trees_equal(snapshot(state.params), want_tr)


# -- steps ------------------------------------------------------------------------------------

def test_traces_once_first_lr_positive_and_loss_matches_eval_probs():
  _, _, _, state, steps = setup(mode="full")
  before = snapshot(state.params)
  batch = make_batch(0)
  probs = np.asarray(steps.eval_step(state.params, state.frozen, batch))
  mask = batch["target_mask"] > 0
  expected = np.mean((probs[mask] - batch["targets"][mask]) ** 2)
  state, m = steps.train_step(state, batch)
  np.testing.assert_allclose(float(m["loss"]), expected, rtol=1e-5)
  assert float(m["num_markers"]) == mask.sum()
  assert float(m["learning_rate"]) > 0 and bool(m["finite"])
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(snapshot(state.params)))]
  assert all(changed)  # the very first update moves every parameter
  for i in (1, 2, 1, 3):  # same bucket shape, different contents
    state, m = steps.train_step(state, make_batch(i))
  steps.eval_step(state.params, state.frozen, make_batch(9))
  assert int(state.step) == 5
  assert steps.traces == {"train": 1, "eval": 1}
  state, _ = steps.train_step(state, make_batch(4, seq=32))  # a new bucket length compiles once more
  assert steps.traces == {"train": 2, "eval": 1}


def test_bce_loss_matches_formula():
  _, _, _, state, steps = setup(mode="full", loss="bce")
  batch = make_batch(3)
  p = np.asarray(steps.eval_step(state.params, state.frozen, batch), np.float64)
  mask, t = batch["target_mask"] > 0, batch["targets"]
  expected = np.mean(-(t * np.log(p) + (1 - t) * np.log(1 - p))[mask])
  _, m = steps.train_step(state, batch)
  np.testing.assert_allclose(float(m["loss"]), expected, rtol=1e-5)


def test_lora_freezes_base_and_opt_state_has_only_trainable_shapes():
  _, _, _, state, steps = setup(mode="lora", lora_rank=4, dropout=0.1)
  frozen_before = snapshot(state.frozen)
  trainable_before = snapshot(state.params)
  for i in range(3):
    state, m = steps.train_step(state, make_batch(i))
    assert bool(m["finite"])
  assert_trees_equal(frozen_before, snapshot(state.frozen))
  assert not np.array_equal(trainable_before["head"]["linear_0"]["kernel"],
                            np.asarray(state.params["head"]["linear_0"]["kernel"]))
  assert not np.array_equal(trainable_before["decoder"]["embed"]["marker"],
                            np.asarray(state.params["decoder"]["embed"]["marker"]))
  opt_shapes = [x.shape for x in jax.tree.leaves(state.opt_state)]
  flat_frozen = traverse_util.flatten_dict(state.frozen, sep="/")
  for big in ("decoder/embed/embedding", "decoder/layers/attn/q_proj/kernel",
              "decoder/layers/mlp/down_proj/kernel", "decoder/layers/attn/o_proj/kernel"):
    assert flat_frozen[big].shape not in opt_shapes, big
  counts = optim.param_counts(state.params, state.frozen)
  assert sum(math.prod(s) for s in opt_shapes if s) == 2 * counts["trainable"]
  assert 0 < counts["trainable_fraction"] < 0.2


def test_lora_frozen_base_and_compute_in_bfloat16():
  _, _, _, state, steps = setup(mode="lora", lora_rank=4, frozen_dtype="bfloat16", compute_dtype="bfloat16")
  assert {x.dtype for x in jax.tree.leaves(state.frozen)} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
  state, m = steps.train_step(state, make_batch(0))
  assert bool(m["finite"]) and state.frozen["decoder"]["embed"]["embedding"].dtype == jnp.bfloat16


def test_casting_layer_weights_once_changes_no_value_of_a_bfloat16_step(monkeypatch):
  """The step casts the stacked layer weights to bf16 once, before the layer scan; the layers
  cast at use anyway, so gradients are bit-identical to the uncast model's, and the step's
  losses and gradient norms equal the uncast step's (its float32 params to rounding: XLA may
  fuse the optimizer's arithmetic differently around the cast)."""
  model, _, _, state, _ = setup(mode="full", mesh_cfg=(1, 1, 1), devices=jax.devices()[:1],
                                compute_dtype="bfloat16")
  b = {k: jnp.asarray(v) for k, v in make_batch(20).items()}

  def loss(params, cast):
    params = sp.cast_layer_weights(params, "bfloat16") if cast else params
    logits = model.apply({"params": params}, b["input_ids"], b["positions"], b["segment_ids"],
                         b["marker_positions"], deterministic=True)
    return sp.masked_loss_sum(logits, b["targets"], b["target_mask"], "mse")

  layers = sp.cast_layer_weights(state.params, "bfloat16")["decoder"]["layers"]
  assert {x.dtype for x in jax.tree.leaves(layers)} == {jnp.dtype(jnp.bfloat16)}  # it does cast
  assert_trees_equal(jax.jit(jax.grad(lambda p: loss(p, True)))(state.params),
                     jax.jit(jax.grad(lambda p: loss(p, False)))(state.params))

  def two_steps():
    _, _, _, state, steps = setup(mode="full", mesh_cfg=(1, 1, 1), devices=jax.devices()[:1],
                                  compute_dtype="bfloat16")
    metrics = []
    for i in range(2):
      state, m = steps.train_step(state, make_batch(20 + i))
      metrics.append((float(m["loss"]), float(m["grad_norm"])))
    return metrics, snapshot(state.params)

  cast_metrics, cast_params = two_steps()
  monkeypatch.setattr(sp, "cast_layer_weights", lambda trainable, dtype: trainable)
  plain_metrics, plain_params = two_steps()
  assert cast_metrics == plain_metrics
  for x, y in zip(jax.tree.leaves(cast_params), jax.tree.leaves(plain_params), strict=True):
    np.testing.assert_allclose(x, y, atol=1e-7, rtol=1e-6)


def test_grad_accumulation_matches_one_big_batch():
  results = []
  for k in (1, 4):
    _, _, _, state, steps = setup(mode="full", k=k, mesh_cfg=(2, 1, 1), devices=jax.devices()[:2])
    losses = []
    for i in range(2):
      state, m = steps.train_step(state, make_batch(10 + i, rows=8))
      losses.append(float(m["loss"]))
    results.append((losses, snapshot(state.params)))
  np.testing.assert_allclose(results[0][0], results[1][0], atol=1e-5, rtol=0)
  for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1]), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_sharded_losses_equal_single_device_losses():
  runs = []
  for mesh_cfg, devices in (((2, 2, 2), None), ((1, 1, 1), jax.devices()[:1])):
    _, _, _, state, steps = setup(mode="full", k=2, mesh_cfg=mesh_cfg, devices=devices)
    losses = []
    for i in range(10):
      state, m = steps.train_step(state, make_batch(20 + i, rows=8))
      losses.append(float(m["loss"]))
    runs.append(losses)
  np.testing.assert_allclose(runs[0], runs[1], atol=1e-5, rtol=0)
  assert runs[0][-1] < runs[0][0]  # it learns


def test_nan_target_is_skipped_without_touching_state():
  _, _, _, state, steps = setup(mode="full", nan_policy="skip")
  state, _ = steps.train_step(state, make_batch(0))
  before = snapshot(state)
  bad = make_batch(1)
  bad["targets"][0, 0] = np.nan  # slot (0, 0) is always supervised
  state, m = steps.train_step(state, bad)
  assert not bool(m["finite"]) and not np.isfinite(float(m["loss"]))
  assert_trees_equal(before, snapshot(state))
  state, m = steps.train_step(state, make_batch(2))
  assert bool(m["finite"]) and int(state.step) == 2
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(snapshot(state.params)))


def test_a_non_finite_gradient_under_a_finite_loss_is_skipped_too(monkeypatch):
  """Gradients can overflow or turn NaN in the backward pass while the loss stays finite (bf16,
  a sqrt at 0); such a step must not reach params or moments either."""
  real = sp.masked_loss_sum
  # + sqrt(0 * |sum logits|): the value is unchanged, its gradient is NaN (inf * 0)
  monkeypatch.setattr(sp, "masked_loss_sum", lambda logits, *rest: real(logits, *rest)
                      + jnp.sqrt(jnp.abs(jnp.sum(logits)) * 0.0))
  _, _, _, state, steps = setup(mode="full", nan_policy="skip")
  before = snapshot(state)
  state, m = steps.train_step(state, make_batch(0))
  assert np.isfinite(float(m["loss"])) and not bool(m["finite"])
  assert_trees_equal(before, snapshot(state))


@pytest.mark.parametrize("finite", [True, False])
def test_both_forms_of_the_guard_agree(finite):
  """The CPU runs the guard as a conditional, other platforms as a select; the suite only runs
  on a CPU, so the select form is checked here against the conditional, leaf for leaf."""
  tx = optim.make_optimizer(optim.OptimConfig(lr=0.1, warmup_steps=0, schedule="constant"))
  params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
  grads = jax.tree.map(lambda x: 0.5 * x + 1.0, params)
  opt_state = tx.init(params)
  norm = optax.tree.norm(grads)
  forms = [jax.jit(lambda p, o, f=f: f(tx, grads, norm, jnp.asarray(finite), p, o))(params, opt_state)
           for f in (sp.update_by_branch, sp.update_by_select)]
  assert_trees_equal(*forms)
  if not finite:
    assert_trees_equal(forms[0], (params, opt_state))
  else:
    assert not np.array_equal(forms[0][0]["w"], params["w"])


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


def test_nan_in_unsupervised_slot_is_ignored():
  _, _, _, state, steps = setup(mode="full")
  batch = make_batch(4)
  empty = np.argwhere(batch["target_mask"] == 0)[0]
  batch["targets"][tuple(empty)] = np.nan
  _, m = steps.train_step(state, batch)
  assert bool(m["finite"])


def test_batch_layout_errors_and_device_batch():
  mesh = shd.make_mesh(shd.MeshConfig(2, 2, 2))
  assert sp.check_batch_layout(16, 4, mesh) == 4
  with pytest.raises(ValueError, match="not divisible by grad_accum_steps"):
    sp.check_batch_layout(10, 4, mesh)
  with pytest.raises(ValueError, match="micro-batch 2 .* 4 data x fsdp shards"):
    sp.check_batch_layout(8, 4, mesh)
  batch = make_batch(0) | {"example_ids": np.array(["a"] * 8)}
  arrays = sp.device_batch(batch, mesh)
  assert set(arrays) == set(sp.TRAIN_KEYS)
  assert arrays["input_ids"].sharding.spec == P(("data", "fsdp"))


# -- optimizer-state dtype (Adam moments) -------------------------------------------------------
def _adam_run(tx, params, grads_seq):
  state = tx.init(params)
  out = []
  for g in grads_seq:
    upd, state = tx.update(g, state, params)
    out.append(upd)
  return out, state


def test_adam_moments_in_float32_equal_optax_scale_by_adam():
  """Our low-precision-capable Adam at float32 is optax's scale_by_adam (the reference)."""
  import optax
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)}
  grads = [{"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)} for _ in range(4)]
  ours, _ = _adam_run(optim.scale_by_adam_in("float32", 0.9, 0.999, 1e-8), params, grads)
  ref, _ = _adam_run(optax.scale_by_adam(0.9, 0.999, 1e-8), params, grads)
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(np.asarray(a["w"]), np.asarray(b["w"]), rtol=1e-6, atol=1e-7)


def test_bfloat16_moments_are_stored_in_bfloat16_and_track_float32():
  import optax
  rng = np.random.default_rng(1)
  params = {"w": jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)}
  grads = [{"w": jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)} for _ in range(5)]
  ours, state = _adam_run(optim.scale_by_adam_in("bfloat16", 0.9, 0.999, 1e-8), params, grads)
  ref, _ = _adam_run(optax.scale_by_adam(0.9, 0.999, 1e-8), params, grads)
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


# -- host-to-device prefetch ---------------------------------------------------------------------
def _grain_iter(n: int = 10):
  import grain
  return iter(grain.MapDataset.range(n).map(lambda i: {"x": np.full((8, 2), i, np.int32)}).to_iter_dataset())


def test_prefetch_yields_the_same_batches_on_device_in_order():
  from rmjax.train.prefetch import DevicePrefetcher
  mesh = shd.make_mesh(shd.MeshConfig(2, 2, 2))
  place = lambda b: sp.device_batch(b, mesh, keys=("x",))
  got = list(DevicePrefetcher(_grain_iter(), place, depth=2))
  assert [int(p.host["x"][0, 0]) for p in got] == list(range(10))
  for i, p in enumerate(got):
    assert p.device["x"].sharding == shd.batch_sharding(mesh)
    np.testing.assert_array_equal(np.asarray(p.device["x"]), np.full((8, 2), i))


def test_prefetch_state_is_the_consumed_position_not_the_thread_position():
  import time
  from rmjax.train.prefetch import DevicePrefetcher
  pre = DevicePrefetcher(_grain_iter(), lambda b: b, depth=2)
  taken = [int(next(pre).host["x"][0, 0]) for _ in range(3)]
  time.sleep(0.2)  # let the thread run ahead by `depth` batches
  state = pre.get_state()
  pre.close()
  fresh = DevicePrefetcher(_grain_iter(), lambda b: b, depth=2)
  fresh.set_state(json.dumps(state).encode())  # as grain's checkpoint handler passes it
  rest = [int(p.host["x"][0, 0]) for p in fresh]
  assert taken == [0, 1, 2] and rest == list(range(3, 10))
  # set_state on a running prefetcher drops what it prefetched
  pre2 = DevicePrefetcher(_grain_iter(), lambda b: b, depth=3)
  next(pre2), next(pre2)
  pre2.set_state(state)
  assert int(next(pre2).host["x"][0, 0]) == 3


def test_prefetch_reraises_pipeline_errors_and_rejects_bad_depth():
  from rmjax.train.prefetch import DevicePrefetcher

  def broken():
    yield {"x": np.zeros((8, 2))}
    raise KeyError("bad record")

  pre = DevicePrefetcher(broken(), lambda b: b)
  next(pre)
  with pytest.raises(KeyError, match="bad record"):
    next(pre)
  with pytest.raises(ValueError, match="depth"):
    DevicePrefetcher(iter([]), lambda b: b, depth=0)
