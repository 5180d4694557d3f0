"""The pure, sharded train and eval steps.

Why this module exists: the whole optimizer step (micro-batch gradient accumulation, loss
normalisation, clipping, AdamW, the non-finite guard) must be one jitted function
`train_step(state, batch) -> (state, metrics)`, compiled once with explicit shardings and the
state donated, so the host only dispatches.

Design points:
* Only `state.params` (the trainable subtree) is differentiated; `state.frozen` is a constant,
  so frozen weights cost no weight-gradient matmuls and own no optimizer state.
* Accumulation: the global batch (B = k * micro rows) is viewed as (micro, k) and swapped to
  (k, micro), so each device keeps its own rows (no communication: micro-batch j is rows
  j, j+k, ...). Gradient SUMS are accumulated with lax.scan and the loss is divided by the
  number of supervised markers in the WHOLE batch, so k micro-batches of b rows equal one
  batch of k*b rows.
* Non-finite guard: when the loss or the gradient norm is not finite, the whole state is kept
  (params, opt_state and step: `step` counts applied updates). `nan_policy="skip"` therefore
  just continues; "stop" is the caller reading `metrics["finite"]`. No NaN ever reaches params.
* Dropout keys are `fold_in(fold_in(state.rng, step), micro_index)`: deterministic on resume.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import optax
from jax.sharding import Mesh

from rmjax import sharding as shd
from rmjax.model import cpu_dots
from rmjax.train import optim
from rmjax.train.state import TrainState

TRAIN_KEYS = ("input_ids", "positions", "segment_ids", "marker_positions", "targets", "target_mask")
EVAL_KEYS = ("input_ids", "positions", "segment_ids", "marker_positions")


def check_batch_layout(batch_size: int, grad_accum_steps: int, mesh: Mesh) -> int:
  """Micro-batch size, or a one-line ValueError when the batch cannot be split evenly."""
  if batch_size % grad_accum_steps:
    raise ValueError(f"batch_size {batch_size} is not divisible by grad_accum_steps {grad_accum_steps}")
  micro, shards = batch_size // grad_accum_steps, shd.batch_shards(mesh)
  if micro % shards:
    raise ValueError(f"micro-batch {micro} (batch_size {batch_size} / grad_accum_steps {grad_accum_steps}) "
                     f"is not divisible by the {shards} data x fsdp shards of the mesh")
  return micro


def device_batch(batch: dict[str, Any], mesh: Mesh, keys: tuple[str, ...] = TRAIN_KEYS) -> dict[str, jax.Array]:
  """Global jax arrays from this process's numpy rows; drops non-numeric keys."""
  sharding = shd.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k])) for k in keys}


def marker_losses(logits_BM: jax.Array, targets_BM: jax.Array, kind: str) -> jax.Array:
  """Per-slot loss (unmasked): MSE on sigmoid probabilities or BCE on logits."""
  logits_BM = logits_BM.astype(jnp.float32)
  if kind == "mse":
    return jnp.square(jax.nn.sigmoid(logits_BM) - targets_BM)
  return optax.sigmoid_binary_cross_entropy(logits_BM, targets_BM)


def masked_loss_sum(logits_BM: jax.Array, targets_BM: jax.Array, mask_BM: jax.Array, kind: str) -> jax.Array:
  """Sum of per-marker losses over supervised slots (NaN targets in empty slots are ignored)."""
  per_slot = marker_losses(logits_BM, jnp.where(mask_BM > 0, targets_BM, 0.0), kind)
  return jnp.sum(jnp.where(mask_BM > 0, per_slot * mask_BM, 0.0))


def _to_micro(x: jax.Array, k: int) -> jax.Array:
  """(B, ...) -> (k, B // k, ...), micro-batch j = rows j, j + k, ... (device-local)."""
  return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)


def accumulate_grads(grad_fn: Any, micro_batches: dict[str, jax.Array], k: int) -> tuple[jax.Array, Any]:
  """Sums of (loss, grads) of `grad_fn(micro, index)` over k micro-batches, one compiled body."""
  def body(carry, xs):
    index, micro = xs
    return jax.tree.map(jnp.add, carry, grad_fn(micro, index)), None

  shapes = jax.eval_shape(grad_fn, jax.tree.map(lambda x: x[0], micro_batches), 0)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  total, _ = jax.lax.scan(body, zeros, (jnp.arange(k), micro_batches))
  return total


def cast_layer_weights(trainable: dict, dtype: Any) -> dict:
  """`trainable` with the scanned decoder layers' float weights in `dtype` (the compute dtype).

  Why: the layers compute in `dtype` either way (each casts its kernels at use), so casting the
  stacked weights once, before the layer scan, gives the same values and the same float32
  gradients (the cast's transpose); but inside the scan every kernel is cast again wherever
  remat recomputes it, and its gradient goes through a float32 stack. Full fine-tuning moves
  fewer bytes at the same peak memory (BUILD.md). Little changes for LoRA (its trainable layer
  weights are the small adapters) and nothing for float32 compute.
  """
  layers = trainable.get("decoder", {}).get("layers") if isinstance(trainable, dict) else None
  if layers is None or jnp.dtype(dtype) == jnp.float32:
    return trainable
  cast = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, layers)
  return {**trainable, "decoder": {**trainable["decoder"], "layers": cast}}


def apply_update(tx: optax.GradientTransformation, grads: Any, grad_norm: jax.Array, params: Any,
                 opt_state: Any) -> tuple[Any, Any]:
  """One optimizer update; `grad_norm` (the norm of `grads`) reaches the clipping, which would
  otherwise compute it again (optim.clip_by_global_norm)."""
  updates, new_opt_state = optax.with_extra_args_support(tx).update(
    grads, opt_state, params, global_norm=grad_norm)
  return optax.apply_updates(params, updates), new_opt_state


def update_by_branch(tx, grads, grad_norm, finite, params, opt_state):
  """The non-finite guard as a conditional: the update runs only when `finite`. On a CPU this is
  the cheaper form: XLA's CPU backend has no multi-output fusion, so selecting between new and
  old state would re-read every moment and copy the donated ones (BUILD.md, optimizer row)."""
  return lax.cond(finite, functools.partial(apply_update, tx, grads, grad_norm), lambda p, o: (p, o), params, opt_state)


def update_by_select(tx, grads, grad_norm, finite, params, opt_state):
  """The non-finite guard as a select: on a GPU the selects fuse into the update's kernels, and
  a conditional would make the device wait for its predicate before the update launches."""
  new_params, new_opt_state = apply_update(tx, grads, grad_norm, params, opt_state)
  keep_if_bad = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  return keep_if_bad(new_params, params), keep_if_bad(new_opt_state, opt_state)


def _train_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module,
                cfg: optim.OptimConfig, tx: optax.GradientTransformation,
                traces: collections.Counter) -> tuple[TrainState, dict[str, jax.Array]]:
  traces["train"] += 1  # Python side effects: run only while tracing
  traces["train", batch["input_ids"].shape[-1]] += 1  # by row length: the buckets differ in it only
  k = cfg.grad_accum_steps
  num_markers = jnp.sum(batch["target_mask"] > 0).astype(jnp.float32)
  denom = jnp.maximum(num_markers, 1.0)
  step_key = jax.random.fold_in(state.rng, state.step)

  def loss_fn(trainable, micro, key):
    trainable = cast_layer_weights(trainable, model.model_cfg.compute_dtype)
    params = optim.merge_params(trainable, state.frozen)
    logits = model.apply({"params": params}, micro["input_ids"], micro["positions"],
                         micro["segment_ids"], micro["marker_positions"],
                         deterministic=False, rngs={"dropout": key})
    return masked_loss_sum(logits, micro["targets"], micro["target_mask"], cfg.loss) / denom

  grad_fn = jax.value_and_grad(loss_fn)
  micro_batches = {name: _to_micro(x, k) for name, x in batch.items()}
  loss, grads = accumulate_grads(
    lambda micro, i: grad_fn(state.params, micro, jax.random.fold_in(step_key, i)), micro_batches, k)
  grad_norm = optax.tree.norm(grads)
  # Finite loss and gradient norm imply finite updates (clipping and Adam keep them finite),
  # so checking the new params themselves would only cost a pass over memory.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new_params, new_opt_state = lax.platform_dependent(
    state.params, state.opt_state, cpu=functools.partial(update_by_branch, tx, grads, grad_norm, finite),
    default=functools.partial(update_by_select, tx, grads, grad_norm, finite))
  new_state = state.replace(step=state.step + finite.astype(state.step.dtype),
                            params=new_params, opt_state=new_opt_state)
  metrics = {"loss": loss, "grad_norm": grad_norm,
             "learning_rate": optim.make_schedule(cfg)(state.step),
             "num_markers": num_markers, "finite": finite}
  return new_state, metrics


def _eval_step(params: Any, frozen: Any, batch: dict[str, jax.Array], *, model: nn.Module,
               traces: collections.Counter) -> jax.Array:
  traces["eval"] += 1
  logits = model.apply({"params": optim.merge_params(params, frozen)}, batch["input_ids"],
                       batch["positions"], batch["segment_ids"], batch["marker_positions"],
                       deterministic=True)
  return jax.nn.sigmoid(logits.astype(jnp.float32))


class Steps:
  """The jitted train and eval steps of one run, plus how many times each was traced."""

  def __init__(self, model: nn.Module, cfg: optim.OptimConfig, mesh: Mesh, state_shardings: TrainState):
    self.mesh, self.grad_accum_steps, self.state_shardings = mesh, cfg.grad_accum_steps, state_shardings
    self.traces: collections.Counter = collections.Counter()
    rep, data = shd.replicated(mesh), shd.batch_sharding(mesh)
    tx = optim.make_optimizer(cfg)
    # which library runs the dots on a CPU (model/cpu_dots.py)
    options = cpu_dots.compiler_options(mesh.devices.flat[0].platform, model.model_cfg.cpu_dot_library)
    self._train = jax.jit(
      functools.partial(_train_step, model=model, cfg=cfg, tx=tx, traces=self.traces),
      in_shardings=(state_shardings, data), out_shardings=(state_shardings, rep), donate_argnums=0,
      compiler_options=options)
    self._eval = jax.jit(
      functools.partial(_eval_step, model=model, traces=self.traces),
      in_shardings=(state_shardings.params, state_shardings.frozen, data), out_shardings=data,
      compiler_options=options)

  def train_step(self, state: TrainState, batch: dict[str, Any]) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a global batch holding exactly TRAIN_KEYS (state is donated)."""
    check_batch_layout(batch["input_ids"].shape[0], self.grad_accum_steps, self.mesh)
    with jax.set_mesh(self.mesh):
      return self._train(state, {k: batch[k] for k in TRAIN_KEYS})

  def train_traces(self, shapes: Iterable[tuple[int, ...]]) -> int:
    """How many times the train step was traced for batches of these input_ids shapes (a
    process's own rows or the global batch: counted by row length): one each unless something
    retraced it. A trace made ahead for a length never trained, as auto's for the run's largest,
    is not counted."""
    return sum(self.traces["train", length] for length in {s[-1] for s in shapes})

  def eval_step(self, params: Any, frozen: Any, batch: dict[str, Any]) -> jax.Array:
    """Probabilities (B, M) for an eval batch (extra keys are ignored)."""
    check_batch_layout(batch["input_ids"].shape[0], 1, self.mesh)
    with jax.set_mesh(self.mesh):
      return self._eval(params, frozen, {k: batch[k] for k in EVAL_KEYS})


def make_steps(model: nn.Module, cfg: optim.OptimConfig, mesh: Mesh, state_shardings: TrainState) -> Steps:
  return Steps(model, cfg, mesh, state_shardings)

