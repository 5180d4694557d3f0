"""The training state pytree and its creation, already sharded on the mesh.

Why this module exists: a state must be born with its final shardings (eval_shape ->
shardings -> jitted init with out_shardings), never materialised on one device and resharded;
for a 4B-parameter model the unsharded copy alone would not fit. Imported weights (HF) are
placed with device_put straight onto the same shardings. The state keeps the trainable and
frozen halves apart so only the trainable half is differentiated and has optimizer state.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct, traverse_util
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rmjax import sharding as shd
from rmjax.train import optim


@struct.dataclass
class TrainState:
  """step = optimizer updates applied; params = trainable subtree; frozen = the rest."""
  step: jax.Array
  params: Any
  frozen: Any
  opt_state: Any
  rng: jax.Array  # raw uint32[2] key data (checkpoints as a plain array)


def merged_params(state: TrainState) -> dict:
  """The full {"decoder": ..., "head": ...} tree (eval, export, checkpoints of weights)."""
  return optim.merge_params(state.params, state.frozen)


def dummy_inputs(seq_len: int = 8, num_markers: int = 1) -> tuple[jax.Array, ...]:
  """Smallest valid ConfidenceModel inputs; param shapes do not depend on them."""
  ids = jnp.zeros((1, seq_len), jnp.int32)
  return ids, ids, ids + 1, jnp.zeros((1, num_markers), jnp.int32)


def check_same_tree(given: Any, expected: Any) -> None:
  """One-line error naming the first missing / unexpected / mis-shaped parameter."""
  got = traverse_util.flatten_dict(given, sep="/")
  want = traverse_util.flatten_dict(expected, sep="/")
  missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
  if missing or extra:
    raise ValueError(f"parameters do not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
  for k, v in want.items():
    if tuple(got[k].shape) != tuple(v.shape):
      raise ValueError(f"parameter {k}: shape {tuple(got[k].shape)} != model {tuple(v.shape)}")


def _split_and_cast(params: Any, labels: Any, frozen_dtype: str) -> tuple[dict, dict]:
  trainable, frozen = optim.split_params(params, labels)
  dt = jnp.dtype(frozen_dtype)
  frozen = jax.tree.map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x, frozen)
  return trainable, frozen


def opt_state_shardings(tx: optax.GradientTransformation, abstract_trainable: Any,
                        trainable_shardings: Any, mesh: Mesh) -> Any:
  """Adam moments follow their parameter's sharding; counters are replicated."""
  abstract_opt = jax.eval_shape(tx.init, abstract_trainable)
  return optax.tree_map_params(
    tx, lambda _, s: s, abstract_opt, trainable_shardings,
    transform_non_params=lambda _: shd.replicated(mesh),
    is_leaf=lambda x: isinstance(x, NamedSharding))


def create_train_state(model: nn.Module, optim_cfg: optim.OptimConfig, mesh: Mesh,
                       rng: jax.Array, rules: Sequence[tuple[str, P]] = shd.DEFAULT_RULES,
                       init_params: Any = None) -> tuple[TrainState, TrainState]:
  """A sharded TrainState and the matching tree of shardings (for jit in/out shardings).

  `model` is a ConfidenceModel (its model_cfg is used to build it); with `init_params` (a
  full param tree, e.g. imported from HF) those weights are placed instead of random ones.
  """
  init_key, state_key = jax.random.split(rng)
  dummy = dummy_inputs()

  def init_fn(key):
    return model.init({"params": key}, *dummy, deterministic=True)["params"]

  abstract = jax.eval_shape(init_fn, init_key)
  labels = optim.trainable_labels(abstract, optim_cfg.mode)
  full_shardings = shd.param_shardings(abstract, mesh, rules)
  tr_shardings, fr_shardings = optim.split_params(full_shardings, labels)

  if init_params is None:
    make = jax.jit(lambda k: _split_and_cast(init_fn(k), labels, optim_cfg.frozen_dtype),
                   out_shardings=(tr_shardings, fr_shardings))
    trainable, frozen = make(init_key)
  else:
    check_same_tree(init_params, abstract)
    placed = jax.device_put(init_params, full_shardings)
    # Host (numpy) weights were just copied: their device copy can be donated to save memory.
    # Device arrays may come back from device_put unchanged, so they must not be donated.
    on_host = not any(isinstance(x, jax.Array) for x in jax.tree.leaves(init_params))
    cast = jax.jit(lambda p: _split_and_cast(p, labels, optim_cfg.frozen_dtype),
                   out_shardings=(tr_shardings, fr_shardings), donate_argnums=0 if on_host else ())
    trainable, frozen = cast(placed)

  tx = optim.make_optimizer(optim_cfg)
  opt_shardings = opt_state_shardings(tx, jax.eval_shape(lambda: trainable), tr_shardings, mesh)
  with jax.set_mesh(mesh):
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(trainable)
  rep = shd.replicated(mesh)
  state = TrainState(
    step=jax.device_put(jnp.zeros((), jnp.int32), rep),
    params=trainable, frozen=frozen, opt_state=opt_state,
    rng=jax.device_put(jax.random.key_data(state_key) if _is_typed_key(state_key) else state_key, rep))
  shardings = TrainState(step=rep, params=tr_shardings, frozen=fr_shardings,
                         opt_state=opt_shardings, rng=rep)
  return state, shardings


def abstract_train_state(model: nn.Module, optim_cfg: optim.OptimConfig, mesh: Mesh,
                         rules: Sequence[tuple[str, P]] = shd.DEFAULT_RULES) -> tuple[TrainState, TrainState]:
  """(state of jax.ShapeDtypeStruct with shardings, shardings) as create_train_state makes them.

  Nothing is allocated: for compiling (and reading XLA's memory analysis) the step of a model
  that may not fit next to its own state.
  """
  def init_fn(key):
    return model.init({"params": key}, *dummy_inputs(), deterministic=True)["params"]

  abstract = jax.eval_shape(init_fn, jax.random.key(0))
  labels = optim.trainable_labels(abstract, optim_cfg.mode)
  tr_shardings, fr_shardings = optim.split_params(shd.param_shardings(abstract, mesh, rules), labels)
  trainable, frozen = jax.eval_shape(lambda p: _split_and_cast(p, labels, optim_cfg.frozen_dtype), abstract)
  tx = optim.make_optimizer(optim_cfg)
  opt_shardings = opt_state_shardings(tx, trainable, tr_shardings, mesh)
  opt = jax.eval_shape(tx.init, trainable)
  rep = shd.replicated(mesh)
  shardings = TrainState(step=rep, params=tr_shardings, frozen=fr_shardings, opt_state=opt_shardings, rng=rep)
  shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=trainable, frozen=frozen, opt_state=opt,
                      rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
  with_sharding = lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)
  return jax.tree.map(with_sharding, shapes, shardings), shardings


def _is_typed_key(key: jax.Array) -> bool:
  return jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
