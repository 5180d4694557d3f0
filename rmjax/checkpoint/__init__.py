"""Orbax checkpoints of a training run: resumable, bounded on disk, the best step always kept.

  manager.py    Checkpointer: save / restore / restore_latest (with fallback) / set_aside
  config.py     CheckpointConfig: retention (latest N + best) as orbax preservation policies
  layout.py     the folder layout, best.json, write probing, stored shapes, restore_subtree
  agreement.py  what every process must agree on before orbax's collective restore
  errors.py     the one-line errors
"""

from rmjax.checkpoint.config import CheckpointConfig
from rmjax.checkpoint.errors import (CheckpointCorrupt, CheckpointError, CheckpointMismatch, CheckpointNotFound,
                                     CheckpointProcessMismatch, CheckpointWriteError)
from rmjax.checkpoint.layout import (BEST_FILE, CORRUPT_DIR, STEP_PREFIX, abstract_like, config_hash, read_best_file,
                                     restore_subtree)
from rmjax.checkpoint.manager import Checkpointer, Restored

__all__ = ["BEST_FILE", "CORRUPT_DIR", "STEP_PREFIX", "CheckpointConfig", "CheckpointCorrupt", "CheckpointError",
           "CheckpointMismatch", "CheckpointNotFound", "CheckpointProcessMismatch", "CheckpointWriteError",
           "Checkpointer", "Restored", "abstract_like", "config_hash", "read_best_file", "restore_subtree"]
