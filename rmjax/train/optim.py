"""Optimizer, learning-rate schedule, and the trainable/frozen split of the parameters.

Why this module exists: fine-tuning mode (full or LoRA) must decide, by parameter path, what is
trained. We express that as a label tree ("train" / "freeze") built from regex rules, and then
go one step further than `optax.multi_transform(..., set_to_zero)`: the parameters are split
into a trainable and a frozen subtree, only the trainable one is differentiated and owns
optimizer state, and the frozen base may be stored in bf16. `multi_transform` is still offered
(`masked_optimizer`) for callers that want one tree.

Weight decay applies to matrices only (`kernel`, `lora_a`, `lora_b`): never to norm scales,
biases, the vocabulary embedding or the `<CONFIDENCE>` marker row, whose zero point is not a
meaningful prior.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

SCHEDULES = ("cosine", "linear", "constant")
LOSSES = ("mse", "bce")
MODES = ("full", "lora")
NAN_POLICIES = ("stop", "skip")

# Label rules per mode: (regex on the "/"-joined path, label); first match wins.
LABEL_RULES: dict[str, tuple[tuple[str, str], ...]] = {
  "full": ((r".*", "train"),),
  "lora": (
    (r"(^|/)lora_[ab]$", "train"),
    (r"^head/", "train"),
    (r"^decoder/embed/marker($|/)", "train"),
    (r".*", "freeze"),
  ),
}
DECAY_PATTERN = r"(^|/)(kernel|lora_a|lora_b)$"


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Everything the optimizer and the train step need, validated at construction."""
  lr: float = 1e-4
  schedule: str = "cosine"
  warmup_steps: int = 0
  max_steps: int = 1000
  weight_decay: float = 0.01
  max_grad_norm: float = 1.0  # <= 0 disables clipping
  grad_accum_steps: int = 1
  loss: str = "mse"
  mode: str = "full"
  frozen_dtype: str = "float32"
  opt_state_dtype: str = "float32"  # Adam moments mu and nu ("bfloat16" halves optimizer memory)
  nan_policy: str = "stop"
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8

  def __post_init__(self):
    checks = [
      (self.schedule in SCHEDULES, f"schedule {self.schedule!r} must be one of {SCHEDULES}"),
      (self.loss in LOSSES, f"loss {self.loss!r} must be one of {LOSSES}"),
      (self.mode in MODES, f"mode {self.mode!r} must be one of {MODES}"),
      (self.nan_policy in NAN_POLICIES, f"nan_policy {self.nan_policy!r} must be one of {NAN_POLICIES}"),
      (self.frozen_dtype in ("float32", "bfloat16"), f"frozen_dtype {self.frozen_dtype!r} must be float32 or bfloat16"),
      (self.opt_state_dtype in ("float32", "bfloat16"),
       f"opt_state_dtype {self.opt_state_dtype!r} must be float32 or bfloat16"),
      (self.lr > 0, f"lr must be > 0, got {self.lr}"),
      (self.max_steps > 0, f"max_steps must be > 0, got {self.max_steps}"),
      (0 <= self.warmup_steps <= self.max_steps, f"warmup_steps {self.warmup_steps} must be in [0, max_steps={self.max_steps}]"),
      (self.grad_accum_steps >= 1, f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}"),
      (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
    ]
    for ok, msg in checks:
      if not ok:
        raise ValueError(msg)

  @classmethod
  def from_spec(cls, spec: Any) -> OptimConfig:
    """Read the top-level training keys (and model.frozen_dtype) of an rmjax spec. Warmup is
    capped at max_steps: spec validation only warns when it is longer."""
    return cls(
      lr=float(spec.lr), schedule=str(spec.schedule), warmup_steps=min(int(spec.warmup_steps), int(spec.max_steps)),
      max_steps=int(spec.max_steps), weight_decay=float(spec.weight_decay),
      max_grad_norm=float(spec.max_grad_norm), grad_accum_steps=int(spec.grad_accum_steps),
      loss=str(spec.loss), mode=str(spec.mode), nan_policy=str(spec.nan_policy),
      frozen_dtype=str(spec.model.frozen_dtype), opt_state_dtype=str(spec.opt_state_dtype),
    )


def make_schedule(cfg: OptimConfig) -> Callable[[Any], jax.Array]:
  """lr(count), count = optimizer updates already applied (0 on the first step).

  Linear warmup reaches `lr` at the end of step `warmup_steps` starting from lr/warmup_steps
  (never 0 on the first step); then cosine/linear decay towards 0 at `max_steps` (the last
  executed step still has a positive lr) or constant.
  """
  warmup = cfg.warmup_steps
  decay_steps = max(cfg.max_steps - warmup, 1)

  def schedule(count):
    count = jnp.asarray(count, jnp.float32)
    warm = jnp.minimum((count + 1.0) / max(warmup, 1), 1.0)
    progress = jnp.clip((count - warmup) / decay_steps, 0.0, 1.0)
    if cfg.schedule == "cosine":
      decay = 0.5 * (1.0 + jnp.cos(math.pi * progress))
    elif cfg.schedule == "linear":
      decay = 1.0 - progress
    else:
      decay = jnp.ones_like(progress)
    return cfg.lr * jnp.where(count < warmup, warm, decay)

  return schedule


def decay_mask(params: Any) -> Any:
  """True where weight decay applies (matrices only; see module docstring)."""
  flat = traverse_util.flatten_dict(params, sep="/")
  return traverse_util.unflatten_dict({k: bool(re.search(DECAY_PATTERN, k)) for k in flat}, sep="/")


def scale_by_adam_in(dtype: str, b1: float, b2: float, eps: float) -> optax.GradientTransformation:
  """Adam's scaling with BOTH moments stored in `dtype` (optax's mu_dtype covers mu only).

  The arithmetic is float32: the moments are read, updated and bias-corrected in float32 and
  only the stored copies are rounded to `dtype`. With bfloat16 the optimizer state of a
  4B-parameter model drops from 32 GB to 16 GB. The state is optax's ScaleByAdamState, so
  sharding rules and checkpoints treat it like optax's own.
  """
  store = jnp.dtype(dtype)

  def init(params):
    zeros = lambda p: jnp.zeros(jnp.shape(p), store)
    return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=jax.tree.map(zeros, params),
                                  nu=jax.tree.map(zeros, params))

  def update(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    c = count.astype(jnp.float32)
    bc1, bc2 = 1.0 - b1 ** c, 1.0 - b2 ** c

    def leaf(g, mu, nu):
      g32 = g.astype(jnp.float32)
      mu32 = b1 * mu.astype(jnp.float32) + (1.0 - b1) * g32
      nu32 = b2 * nu.astype(jnp.float32) + (1.0 - b2) * g32 * g32
      step = (mu32 / bc1) / (jnp.sqrt(nu32 / bc2) + eps)
      return step.astype(g.dtype), mu32.astype(store), nu32.astype(store)

    out = jax.tree.map(leaf, updates, state.mu, state.nu)
    pick = lambda i: jax.tree.map(lambda _, o: o[i], updates, out)
    return pick(0), optax.ScaleByAdamState(count=count, mu=pick(1), nu=pick(2))

  return optax.GradientTransformation(init, update)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
  """Scale the updates by min(1, max_norm / global norm): optax's clipping by one multiply.

  optax selects between each gradient and its divided copy; XLA will not duplicate a division
  into the two moments' fusions that read it, so on a CPU (no multi-output fusion) it writes
  that copy out: a pass over every gradient and its write-back for nothing (BUILD.md, optimizer
  row). A multiply by a scalar fuses into each reader. Below the threshold the factor is 1.0 and
  the updates are unchanged bit for bit; above it they differ from optax's by rounding. A
  non-finite norm gives non-finite updates, which the train step's guard never applies.

  A caller that already holds the updates' global norm passes it as the extra argument
  `global_norm` (an optax chain forwards it): the train step does, because inside its CPU
  conditional XLA cannot reuse the norm computed outside, and would read every gradient again."""

  def update(updates, state, params=None, *, global_norm=None, **extra_args):
    del params, extra_args
    norm = optax.tree.norm(updates) if global_norm is None else global_norm
    factor = jnp.minimum(1.0, max_norm / norm)
    return jax.tree.map(lambda t: t * factor.astype(t.dtype), updates), state

  return optax.GradientTransformationExtraArgs(optax.init_empty_state, update)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  """Global-norm clipping then AdamW on the (trainable) parameters it is initialised with."""
  if cfg.opt_state_dtype == "float32":
    adamw = optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=decay_mask)
  else:  # same chain as optax.adamw, with the low-precision moments
    adamw = optax.chain(scale_by_adam_in(cfg.opt_state_dtype, cfg.b1, cfg.b2, cfg.eps),
                        optax.add_decayed_weights(cfg.weight_decay, decay_mask),
                        optax.scale_by_learning_rate(make_schedule(cfg)))
  if cfg.max_grad_norm > 0:
    return optax.chain(clip_by_global_norm(cfg.max_grad_norm), adamw)
  return adamw


def trainable_labels(params: Any, mode: str) -> Any:
  """Tree of "train"/"freeze" by path. Raises if a path matches no rule or LoRA has no adapters."""
  if mode not in LABEL_RULES:
    raise ValueError(f"mode {mode!r} must be one of {tuple(LABEL_RULES)}")
  flat = traverse_util.flatten_dict(params, sep="/")
  labels = {}
  for path in flat:
    label = next((lab for pat, lab in LABEL_RULES[mode] if re.search(pat, path)), None)
    if label is None:
      raise ValueError(f"parameter {path!r} matches no {mode} label rule")
    labels[path] = label
  if mode == "lora" and not any(re.search(r"(^|/)lora_[ab]$", p) for p in flat):
    raise ValueError("mode 'lora' but the model has no lora_a/lora_b parameters: set lora rank > 0")
  if not any(lab == "train" for lab in labels.values()):
    raise ValueError(f"mode {mode!r} leaves no trainable parameter")
  return traverse_util.unflatten_dict(labels, sep="/")


def split_params(params: Any, labels: Any) -> tuple[dict, dict]:
  """(trainable, frozen) nested dicts holding the leaves labelled "train" / "freeze"."""
  flat = traverse_util.flatten_dict(params)
  flat_labels = traverse_util.flatten_dict(labels)
  if flat.keys() != flat_labels.keys():
    raise ValueError("label tree does not match the parameter tree")
  train = {k: v for k, v in flat.items() if flat_labels[k] == "train"}
  frozen = {k: v for k, v in flat.items() if flat_labels[k] == "freeze"}
  return traverse_util.unflatten_dict(train), traverse_util.unflatten_dict(frozen)


def merge_params(trainable: Any, frozen: Any) -> dict:
  """The full parameter tree back from its two halves (works on traced values too)."""
  flat = dict(traverse_util.flatten_dict(frozen))
  for k, v in traverse_util.flatten_dict(trainable).items():
    if k in flat:
      raise ValueError(f"parameter {'/'.join(k)} is both trainable and frozen")
    flat[k] = v
  return traverse_util.unflatten_dict(flat)


def masked_optimizer(cfg: OptimConfig, labels: Any) -> optax.GradientTransformation:
  """One-tree alternative: frozen leaves get `set_to_zero` (EmptyState, no Adam moments)."""
  return optax.multi_transform({"train": make_optimizer(cfg), "freeze": optax.set_to_zero()}, labels)


def param_counts(trainable: Any, frozen: Any) -> dict[str, float]:
  """Parameter counts for logging: trainable, frozen, total and the trainable fraction."""
  n_train = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(trainable))
  n_frozen = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(frozen))
  total = n_train + n_frozen
  return {"trainable": n_train, "frozen": n_frozen, "total": total,
          "trainable_fraction": n_train / total if total else 0.0}
