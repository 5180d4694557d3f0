"""What every process of a multi-process run must agree on before a collective restore.

Why it exists: orbax's restore is collective. A process that fails inside it, or falls back to
an older step while another goes on, leaves the others waiting forever; so what can be found
wrong is found from the files first, and every process takes the branch any of them took.
"""

from __future__ import annotations

import pathlib
import re

import jax
import numpy as np

from rmjax.checkpoint.errors import CheckpointCorrupt, CheckpointProcessMismatch

_DATA_STATE_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


def check_process_count(path: pathlib.Path) -> None:
  """Each process saved its own data position (grain's `data/process_<i>-of-<N>.json`), for its
  own shard of every source; with another process count those shards differ, so the positions
  cannot be carried over. That is a relaunch with the wrong layout, not a corrupt checkpoint."""
  counts = {int(m.group(2)) for f in (path / "data").iterdir() if (m := _DATA_STATE_FILE.fullmatch(f.name))}
  now, mine = jax.process_count(), path / "data" / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
  if now in counts and not mine.is_file():  # said before orbax's collective restore, which would wait for us
    raise CheckpointCorrupt(path, f"no data position of this process ({mine.name})")
  if counts and now not in counts:
    written = "/".join(str(n) for n in sorted(counts))
    raise CheckpointProcessMismatch(
      f"checkpoint {path} was written by {written} process(es) and this run has {now}: each process's "
      f"data position belongs to its own shard; resume with {written} process(es), or start a new run "
      f"with --spec.init_from={path} (its weights, a fresh optimizer and data order)")


def failed_on_processes(failed: bool) -> list[int]:
  """The processes whose restore of the same step failed (one small all-gather when several)."""
  if jax.process_count() == 1:
    return [0] if failed else []
  from jax.experimental import multihost_utils
  flags = np.asarray(multihost_utils.process_allgather(np.int32(failed))).reshape(-1)
  return [int(i) for i in np.flatnonzero(flags)]


def agreed_error(error: CheckpointCorrupt | None, path: pathlib.Path) -> CheckpointCorrupt | None:
  """This process's restore error, or one for a step that failed on another process."""
  failed = failed_on_processes(error is not None)
  if error is None and failed:
    return CheckpointCorrupt(path, f"unreadable on process(es) {', '.join(map(str, failed))}")
  return error


def sync(name: str) -> None:
  """Every process waits here for the others (no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
