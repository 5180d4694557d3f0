"""Checkpoint retention and write mode, and the orbax options that implement them.

Why it exists: orbax's built-in `max_to_keep` + `best_fn` keeps the N *best* steps and deletes
the newest, so the two retention rules a run needs (the latest N, and the best one) are combined
explicitly with orbax preservation policies: `LatestN(max_to_keep)` OR `BestN(1)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_managers

from rmjax.checkpoint.layout import METRIC, STEP_PREFIX


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """Retention and write mode."""

  max_to_keep: int | None = 3  # latest steps kept; None = keep every step
  keep_best: bool = True  # also keep the step with the lowest finite val loss
  async_save: bool = True  # write in a background thread after the device->host copy
  read_only: bool = False  # open an existing directory for restore only

  def __post_init__(self):
    if self.max_to_keep is not None and self.max_to_keep < 1:
      raise ValueError(f"checkpoint.max_to_keep must be >= 1 or None, got {self.max_to_keep}")

  @classmethod
  def from_spec(cls, spec: Any) -> CheckpointConfig:
    """Reads the `checkpoint` sub-config of a run spec (keys max_to_keep, keep_best, async_save)."""
    c = spec.checkpoint
    return cls(max_to_keep=int(c.max_to_keep), keep_best=bool(c.keep_best), async_save=bool(c.async_save))


def manager_options(cfg: CheckpointConfig) -> ocp.CheckpointManagerOptions:
  """orbax's options for these retention rules (module docstring)."""
  policies = [ocp_managers.LatestN(n=cfg.max_to_keep)]
  if cfg.keep_best:
    policies.append(ocp_managers.BestN(
      get_metric_fn=lambda m: m[METRIC], reverse=True, n=1,  # reverse: lowest loss is best
      keep_checkpoints_without_metrics=False))
  return ocp.CheckpointManagerOptions(
    step_prefix=STEP_PREFIX,
    preservation_policy=ocp_managers.AnyPreservationPolicy(policies),
    # best_fn makes orbax store each step's metrics and drives best_step(); deletion
    # is decided by the preservation policy alone.
    best_fn=(lambda m: m[METRIC]) if cfg.keep_best else None,
    best_mode="min",
    enable_async_checkpointing=cfg.async_save,
    cleanup_tmp_directories=not cfg.read_only,
    create=not cfg.read_only,
    read_only=cfg.read_only,
  )
