"""The Checkpointer: saves and restores train states with their data position and metadata.

Why it exists: a run must survive preemption (resume exactly: weights, optimizer state, rng,
and the position of the grain data iterator), must not fill the disk (retention: config.py),
and must never lose the checkpoint with the best validation loss. orbax does the atomic, async,
multi-host writes; this class reports its failures as one line, checks a step before orbax's
collective restore (agreement.py), and sets unreadable steps aside. Layout: layout.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from flax import serialization

from rmjax import background_errors
from rmjax.checkpoint import agreement
from rmjax.checkpoint.config import CheckpointConfig, manager_options
from rmjax.checkpoint.errors import (CheckpointCorrupt, CheckpointError, CheckpointMismatch, CheckpointNotFound,
                                     CheckpointWriteError, one_line)
from rmjax.checkpoint.layout import (BEST_FILE, CORRUPT_DIR, METRIC, STEP_PREFIX, probe_writable, read_best_file,
                                     shape_mismatch, shapes_by_path, stored_shapes, write_json_atomic)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Restored:
  """What a restore gives back; the data iterator (if passed) is restored in place."""

  step: int
  state: Any
  metadata: dict


def _finite(value: float | None) -> float | None:
  """The value as a float if it is a finite number, else None (NaN/Inf never count)."""
  if value is None:
    return None
  value = float(value)
  return value if math.isfinite(value) else None


class _IteratorSnapshot:
  """The iterator's state frozen at save time. The async save may run after the training
  loop has advanced the real iterator, so grain's handler is given this stand-in; it
  writes `get_state().decode()`, and its restore path json-loads that text for dataset
  iterators (and passes bytes for DataLoader iterators), matching both kinds."""

  def __init__(self, iterator: Any):
    state = iterator.get_state()
    self._state = state if isinstance(state, bytes) else json.dumps(state).encode()

  def get_state(self) -> bytes:
    return self._state


class Checkpointer:
  """Saves and restores `checkpoint_step_<N>` folders; see the module docstring."""

  def __init__(self, directory: os.PathLike | str, config: CheckpointConfig | None = None):
    self.directory = pathlib.Path(directory).absolute()
    self.config = config or CheckpointConfig()
    if self.directory.exists() and not self.directory.is_dir():
      raise CheckpointWriteError(self.directory, "path exists and is not a directory")
    if self.config.read_only and not self.directory.is_dir():
      raise CheckpointNotFound(f"checkpoint directory {self.directory} does not exist")
    background_errors.install()  # a failed async write: rmjax's one line, not orbax's tracebacks
    self._mgr = self._open_manager()
    self._closed = False

  def _open_manager(self) -> ocp.CheckpointManager:
    try:
      return ocp.CheckpointManager(self.directory, options=manager_options(self.config))
    except OSError as e:
      raise CheckpointWriteError(self.directory, one_line(e)) from e

  def _write_failed(self, reason: str, cause: BaseException) -> CheckpointWriteError:
    """After a failed write orbax re-raises the same error on every later call, so the
    manager is replaced (its leftover tmp folder is removed on reopen) and training can
    go on; the committed steps were never touched."""
    background_errors.orbax_failed()
    try:
      self._mgr.close()
    except Exception:  # noqa: BLE001 -- the old manager only re-raises the same failure
      log.debug("ignoring error while closing a failed checkpoint manager", exc_info=True)
    self._mgr = self._open_manager()
    err = CheckpointWriteError(self.directory, reason)
    err.__cause__ = cause
    return err

  # ---- queries -------------------------------------------------------------------------

  def all_steps(self) -> list[int]:
    return sorted(self._mgr.all_steps())

  def latest_step(self) -> int | None:
    return self._mgr.latest_step()

  def best_step(self) -> int | None:
    """Step with the lowest finite validation loss among kept steps (None if none)."""
    return self._mgr.best_step() if self.config.keep_best else None

  def step_path(self, step: int) -> pathlib.Path:
    return self.directory / f"{STEP_PREFIX}_{step}"

  # ---- saving --------------------------------------------------------------------------

  def save(self, step: int, state: Any, *, iterator: Any = None, val_loss: float | None = None,
           metadata: dict | None = None) -> bool:
    """Starts saving `state` (+ iterator state, metadata) as step `step`.

    Returns False if that step is already saved. The arrays are copied to host before this
    returns, so the caller may donate/overwrite them; the write itself may still be in
    flight (see `wait_until_finished`). `val_loss` is the validation loss of this state;
    NaN/Inf are recorded as null and never make it the best.
    """
    self._check_open()
    self.wait_until_finished()  # surfaces a failed previous write before starting a new one
    step = int(step)
    if step in self._mgr.all_steps():
      log.info("checkpoint step %d already exists in %s; not saving again", step, self.directory)
      return False
    probe_writable(self.directory, step)
    loss = _finite(val_loss)
    meta = {**(metadata or {}), "step": step, METRIC: loss}
    if val_loss is not None and loss is None:
      meta["val_loss_raw"] = str(val_loss)
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(iterator))
    metrics = {METRIC: loss} if (self.config.keep_best and loss is not None) else None
    try:
      self._mgr.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
    except Exception as e:  # noqa: BLE001 -- any failure here is a write failure
      raise self._write_failed(f"step {step}: {one_line(e)}", e) from e
    if not self.config.async_save:
      self.wait_until_finished()
    return True

  def wait_until_finished(self) -> None:
    """Blocks until the in-flight save is committed, then refreshes best.json."""
    try:
      self._mgr.wait_until_finished()
    except Exception as e:  # noqa: BLE001 -- the background write failed
      raise self._write_failed(one_line(e), e) from e
    self._write_best_file()

  def _write_best_file(self) -> None:
    """Records the best (step, val loss) in best.json; process 0 only (shared filesystem)."""
    if not self.config.keep_best or self.config.read_only or jax.process_index() != 0:
      return
    best = self._mgr.best_step()
    if best is None:
      return
    payload = {"step": int(best), METRIC: float(self._mgr.metrics(best)[METRIC]),
               "path": self.step_path(best).name}
    path = self.directory / BEST_FILE
    if path.exists() and read_best_file(self.directory) == payload:
      return
    write_json_atomic(path, payload)

  # ---- restoring -----------------------------------------------------------------------

  def restore(self, step: int, abstract_state: Any, iterator: Any = None) -> Restored:
    """Restores step `step` into the shardings/structure of `abstract_state` (see
    `abstract_like`); the grain `iterator`, if given, is set to the saved position."""
    self._check_before_restore(step, abstract_state, iterator)
    return self._restore_checked(int(step), abstract_state, iterator)

  def _check_before_restore(self, step: int, abstract_state: Any, iterator: Any) -> None:
    """What can be found wrong with a step from its files alone, before orbax's restore, which is
    collective: a process that failed inside it would leave the others waiting there."""
    self._check_open()
    self.wait_until_finished()
    step = int(step)
    path = self.step_path(step)
    if step not in self._mgr.all_steps():
      raise CheckpointNotFound(
        f"no checkpoint for step {step} in {self.directory} (have {self.all_steps()})")
    self._check_shapes(step, abstract_state)
    if iterator is not None:
      if not (path / "data").is_dir():
        raise CheckpointCorrupt(path, "no data-iterator state in this checkpoint")
      agreement.check_process_count(path)

  def _restore_checked(self, step: int, abstract_state: Any, iterator: Any) -> Restored:
    path = self.step_path(step)
    items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    if iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(iterator)
    try:
      out = self._mgr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001 -- orbax/tensorstore raise many types for bad files
      background_errors.orbax_failed()
      raise CheckpointCorrupt(path, one_line(e)) from e
    return Restored(step=step, state=out["state"], metadata=dict(out["meta"] or {}))

  def _check_shapes(self, step: int, abstract_state: Any) -> None:
    """A checkpoint of another model shape (a spec changed between launch and relaunch) is a
    mismatch, said as such, not corruption: it is never set aside, and orbax is not left to fail
    halfway through its reads. Unreadable metadata is left for the restore to report."""
    stored = stored_shapes(self.step_path(step) / "state")
    if stored is None:
      return
    problem = shape_mismatch(stored, shapes_by_path(serialization.to_state_dict(abstract_state)))
    if problem:
      raise CheckpointMismatch(f"checkpoint {self.step_path(step)} does not fit the model this spec builds "
                               f"({problem}); relaunch with the run's settings (logs/config.json) or give "
                               f"another experiment_name")

  def restore_latest(self, abstract_state: Any, iterator: Any = None,
                     fallback_to_previous: bool = False) -> Restored | None:
    """Restores the newest step (None if there is none). With `fallback_to_previous`, a
    corrupt step is logged and the next older one is tried; if all fail, the error for
    the newest is raised. The corrupt steps newer than the one restored are then set aside
    (`set_aside`): training will reach those step numbers again and must save them."""
    first_error: CheckpointCorrupt | None = None
    corrupt: list[int] = []
    for step in reversed(self.all_steps()):
      error: CheckpointCorrupt | None = None
      try:  # agreed twice: on what the files show, then on orbax's (collective) restore
        self._check_before_restore(step, abstract_state, iterator)
      except CheckpointCorrupt as e:
        error = e
      error = agreement.agreed_error(error, self.step_path(step))
      if error is None:
        try:
          restored = self._restore_checked(step, abstract_state, iterator)
        except CheckpointCorrupt as e:
          error = e
        error = agreement.agreed_error(error, self.step_path(step))
      if error is not None:
        if not fallback_to_previous:
          raise error
        log.warning("%s; trying the previous checkpoint", error)
        first_error = first_error or error
        corrupt.append(step)
        continue
      if corrupt:
        self.set_aside(corrupt)
      return restored
    if first_error is not None:
      raise first_error
    return None

  def set_aside(self, steps: list[int]) -> pathlib.Path:
    """Moves the given step folders into `<directory>/corrupt/` (kept for inspection, out of
    orbax's sight), and best.json off them; returns that folder. Process 0 moves, every process
    then sees the same steps."""
    self._check_open()
    aside = self.directory / CORRUPT_DIR
    if jax.process_index() == 0:
      aside.mkdir(exist_ok=True)
      for step in steps:
        source, target = self.step_path(step), aside / self.step_path(step).name
        n = 1
        while target.exists():
          target, n = aside / f"{source.name}.{n}", n + 1
        os.replace(source, target)
      best = read_best_file(self.directory)
      if best is not None and int(best["step"]) in steps:
        (self.directory / BEST_FILE).unlink()
    agreement.sync("rmjax_checkpoints_set_aside")
    self._mgr.reload()
    self._write_best_file()
    return aside

  # ---- lifecycle -----------------------------------------------------------------------

  def _check_open(self) -> None:
    if self._closed:
      raise CheckpointError(f"checkpointer for {self.directory} is closed")

  def close(self) -> None:
    """Waits for the last save and releases orbax's threads (idempotent)."""
    if self._closed:
      return
    try:
      self.wait_until_finished()
    finally:
      self._closed = True
      self._mgr.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
