"""The training state pytree and its creation, already sharded on the mesh.

Why this module exists: a state must be born with its final shardings (eval_shape ->
shardings -> jitted init with out_shardings), never materialised on one device and resharded;
for a 4B-parameter model the unsharded copy alone would not fit. Imported weights (HF) are
placed with device_put straight onto the same shardings. The state keeps the trainable and
frozen halves apart so only the trainable half is differentiated and has optimizer state.

Frozen weights reach the device already in `frozen_dtype` (bf16 for LoRA on a GPU): random ones
are drawn in that dtype, imported ones are cast on the host before placement. Casting on the
device would hold a float32 copy of the whole base at once, raising the init's peak memory above
the train step's own (BUILD.md).
"""

from __future__ import annotations

import dataclasses
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


def cast_floats(tree: Any, dtype: str) -> Any:
  """Floating leaves cast to `dtype`; numpy leaves are cast on the host (ml_dtypes rounds to
  nearest even, bit-identical to XLA's convert), jax arrays where they live."""
  dt = jnp.dtype(dtype)
  return jax.tree.map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dt else x,
                      tree)


def _split_and_cast(params: Any, labels: Any, frozen_dtype: str, trainable_like: Any) -> tuple[dict, dict]:
  """(trainable in the dtypes of `trainable_like`, frozen in `frozen_dtype`)."""
  trainable, frozen = optim.split_params(params, labels)
  trainable = jax.tree.map(lambda x, like: x.astype(like.dtype), trainable, trainable_like)
  return trainable, cast_floats(frozen, frozen_dtype)


def _born_frozen(model: nn.Module, frozen_dtype: str, labels: Any) -> nn.Module:
  """The model to draw random weights from: frozen leaves are created in `frozen_dtype` (the
  decoder's param_dtype decides the base weights' dtype; LoRA, marker and head leaves are float32
  whatever it is, and trainable leaves are cast back to the model's dtypes anyway)."""
  has_frozen = any(label == "freeze" for label in jax.tree.leaves(labels))
  cfg = model.model_cfg
  if not has_frozen or cfg.param_dtype == frozen_dtype:
    return model
  return model.clone(model_cfg=cfg.replace(param_dtype=frozen_dtype))


def _param_init(model: nn.Module):
  """key -> params. The layer loop stays rolled here: unrolling it (model_cfg.scan_unroll) does
  not change the weights, but an unrolled init compiles every layer's init and then stacks them,
  a higher peak memory (BUILD.md)."""
  cfg = model.model_cfg
  model = model.clone(model_cfg=cfg.replace(scan_unroll=1)) if cfg.scan_unroll != 1 else model
  return lambda key: model.init({"params": key}, *dummy_inputs(), deterministic=True)["params"]


def opt_state_shardings(tx: optax.GradientTransformation, abstract_trainable: Any,
                        trainable_shardings: Any, mesh: Mesh) -> Any:
  """Adam moments follow their parameter's sharding; counters are replicated."""
  abstract_opt = jax.eval_shape(tx.init, abstract_trainable)
  return optax.tree_map_params(
    tx, lambda _, s: s, abstract_opt, trainable_shardings,
    transform_non_params=lambda _: shd.replicated(mesh),
    is_leaf=lambda x: isinstance(x, NamedSharding))


@dataclasses.dataclass(frozen=True)
class ParamLayout:
  """The parameter tree's shapes, trainable/frozen labels and shardings, known before any init."""
  abstract: Any  # full tree of ShapeDtypeStruct in the model's dtypes
  labels: Any  # "train" / "freeze" per leaf
  abstract_trainable: Any
  trainable_shardings: Any
  frozen_shardings: Any


def param_layout(model: nn.Module, optim_cfg: optim.OptimConfig, mesh: Mesh,
                 rules: Sequence[tuple[str, P]] = shd.DEFAULT_RULES) -> ParamLayout:
  abstract = jax.eval_shape(_param_init(model), jax.ShapeDtypeStruct((2,), jnp.uint32))  # runs nothing
  labels = optim.trainable_labels(abstract, optim_cfg.mode)
  tr_shardings, fr_shardings = optim.split_params(shd.param_shardings(abstract, mesh, rules), labels)
  return ParamLayout(abstract, labels, optim.split_params(abstract, labels)[0], tr_shardings, fr_shardings)


def random_init(model: nn.Module, optim_cfg: optim.OptimConfig, layout: ParamLayout) -> Any:
  """The jitted key -> (trainable, frozen) random init, frozen leaves born in their dtype."""
  born = _param_init(_born_frozen(model, optim_cfg.frozen_dtype, layout.labels))
  split = lambda k: _split_and_cast(born(k), layout.labels, optim_cfg.frozen_dtype, layout.abstract_trainable)
  return jax.jit(split, out_shardings=(layout.trainable_shardings, layout.frozen_shardings))


def create_train_state(model: nn.Module, optim_cfg: optim.OptimConfig, mesh: Mesh,
                       rng: jax.Array, rules: Sequence[tuple[str, P]] = shd.DEFAULT_RULES,
                       init_params: Any = None) -> tuple[TrainState, TrainState]:
  """A sharded TrainState and the matching tree of shardings (for jit in/out shardings).

  `model` is a ConfidenceModel (its model_cfg is used to build it); with `init_params` (a
  full param tree, e.g. imported from HF) those weights are placed instead of random ones.
  """
  init_key, state_key = jax.random.split(rng)
  layout = param_layout(model, optim_cfg, mesh, rules)
  tr_shardings, fr_shardings = layout.trainable_shardings, layout.frozen_shardings
  if init_params is None:
    trainable, frozen = random_init(model, optim_cfg, layout)(init_key)
  else:
    check_same_tree(init_params, layout.abstract)
    trainable, frozen = optim.split_params(init_params, layout.labels)
    frozen = cast_floats(frozen, optim_cfg.frozen_dtype)  # before placement (module docstring)
    # may_alias=False: the train step donates the state, and the caller's arrays must survive it.
    trainable, frozen = jax.device_put((trainable, frozen), (tr_shardings, fr_shardings), may_alias=False)
    trainable = jax.tree.map(lambda x, like: x.astype(like.dtype), trainable, layout.abstract_trainable)

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
  layout = param_layout(model, optim_cfg, mesh, rules)
  tr_shardings, fr_shardings = layout.trainable_shardings, layout.frozen_shardings
  trainable, frozen = jax.eval_shape(
    lambda p: _split_and_cast(p, layout.labels, optim_cfg.frozen_dtype, layout.abstract_trainable),
    layout.abstract)
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
