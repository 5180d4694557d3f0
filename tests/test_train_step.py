"""TrainState and the jitted train/eval steps on a tiny ConfidenceModel.

Runs on the 8 fake CPU devices set up by conftest.py, compute in float32."""

import math
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
from rmjax.model.head import HeadConfig
from rmjax.train import optim
from rmjax.train import state as st
from rmjax.train import step as sp

from _jaxpr import equations
from _tiny_train import assert_trees_equal, make_batch, setup, snapshot, tiny_model


warnings.filterwarnings("ignore", message="Some donated buffers were not usable")


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
  return [(eqn.primitive.name, tuple(v.aval.shape)) for eqn in equations(jax.make_jaxpr(fn)(key).jaxpr)
          for v in eqn.outvars if getattr(v.aval, "dtype", None) == jnp.float32 and v.aval.size >= min_size]


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
  assert (steps.traces["train"], steps.traces["eval"]) == (1, 1)
  state, _ = steps.train_step(state, make_batch(4, seq=32))  # a new bucket length compiles once more
  assert (steps.traces["train"], steps.traces["eval"]) == (2, 1)
  assert steps.train_traces([batch["input_ids"].shape, (8, 32)]) == 2  # once for each length


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
