"""Orbax checkpoints that make a training run resumable and keep its best model.

Why this module exists: a run must survive preemption (resume exactly: weights,
optimizer state, rng, and the position of the grain data iterator), must not fill the
disk, and must never lose the checkpoint with the best validation loss. orbax gives
atomic, async, multi-host saves, but its built-in `max_to_keep` + `best_fn` keeps the
N *best* steps and deletes the newest, so here the two retention rules are combined
explicitly with orbax preservation policies: `LatestN(max_to_keep)` OR `BestN(1)`.

Layout under `directory` (normally `<run_dir>/checkpoints`):

  checkpoint_step_<N>/state/    the train-state pytree (StandardSave, sharded arrays)
  checkpoint_step_<N>/data/     grain iterator state, one JSON file per process
  checkpoint_step_<N>/meta/     small JSON: step, val_loss, user metadata (config hash)
  checkpoint_step_<N>/metrics/  orbax's copy of {"val_loss": ...} (only finite values)
  best.json                     {"step", "val_loss", "path"} of the best kept step
  corrupt/                      steps a resume with fallback_to_previous could not read, moved aside

A save in progress lives in `checkpoint_step_<N>.orbax-checkpoint-tmp*` and is renamed
only when complete, so a kill mid-save leaves the previous steps restorable; leftover
tmp folders are ignored and removed when the directory is reopened.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import pathlib
import re
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization
from orbax.checkpoint import checkpoint_managers as ocp_managers

from rmjax import background_errors
from rmjax.cli import first_line

log = logging.getLogger(__name__)

STEP_PREFIX = "checkpoint_step"
BEST_FILE = "best.json"
CORRUPT_DIR = "corrupt"  # steps a resume found unreadable, set aside
_METRIC = "val_loss"


class CheckpointError(RuntimeError):
  """Base class: every checkpoint failure is reported as one clear line."""


class CheckpointNotFound(CheckpointError):
  """The requested step does not exist in the checkpoint directory."""


class CheckpointCorrupt(CheckpointError):
  """A committed checkpoint folder cannot be restored (truncated, files missing, or
  not matching the restore target)."""

  def __init__(self, path: os.PathLike | str, reason: str):
    self.path = pathlib.Path(path)
    super().__init__(f"corrupt or unreadable checkpoint {self.path}: {reason}")


class CheckpointProcessMismatch(CheckpointError):
  """The checkpoint's data positions were written by another number of processes."""


class CheckpointMismatch(CheckpointError):
  """A readable checkpoint whose arrays do not fit the model this spec builds."""


class CheckpointWriteError(CheckpointError):
  """A save could not be written; the previously committed steps are untouched."""

  def __init__(self, directory: os.PathLike | str, reason: str):
    self.directory = pathlib.Path(directory)
    super().__init__(f"cannot write checkpoint in {self.directory}: {reason}")


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
    return cls(max_to_keep=c.get("max_to_keep", 3), keep_best=bool(c.get("keep_best", True)),
               async_save=bool(c.get("async_save", True)))


@dataclasses.dataclass(frozen=True)
class Restored:
  """What a restore gives back; the data iterator (if passed) is restored in place."""

  step: int
  state: Any
  metadata: dict


def abstract_like(tree: Any) -> Any:
  """Restore target from a live (possibly sharded) pytree: shape, dtype and sharding."""
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def config_hash(config: Any) -> str:
  """Short stable hash of a JSON-able config (e.g. `spec.to_dict()`), for metadata."""
  text = json.dumps(config, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _finite(value: float | None) -> float | None:
  """The value as a float if it is a finite number, else None (NaN/Inf never count)."""
  if value is None:
    return None
  value = float(value)
  return value if math.isfinite(value) else None


def _one_line(exc: BaseException) -> str:
  """First line of an exception message, bounded, prefixed with its type, ending with the OS
  reason when tensorstore only gives its code (`[os_error_code='27']` -> "File too large")."""
  text = first_line(exc) if str(exc).strip() else ""
  code = re.search(r"os_error_code='?(\d+)", text)
  if len(text) > 400:  # keep the end too: tensorstore puts the OS reason last
    text = f"{text[:220]} ... {text[-170:]}"
  reason = os.strerror(int(code.group(1))) if code else ""
  return f"{type(exc).__name__}: {text}" + (f" ({reason})" if reason and reason not in text else "")


_DATA_STATE_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


def _check_process_count(path: pathlib.Path) -> None:
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


def _shapes_by_path(tree: Any, prefix: str = "") -> dict[str, tuple[int, ...]]:
  """'a/b/c' -> shape for every array (or array metadata) leaf of nested dicts and lists."""
  if isinstance(tree, dict):
    items = tree.items()
  elif isinstance(tree, (list, tuple)):
    items = enumerate(tree)
  else:
    shape, dtype = getattr(tree, "shape", None), getattr(tree, "dtype", None)
    if shape is None:
      return {}
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):  # stored as its key data
      shape = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(shape, dtype)).shape
    return {prefix: tuple(int(d) for d in shape)}
  out: dict[str, tuple[int, ...]] = {}
  for key, value in items:
    out.update(_shapes_by_path(value, f"{prefix}/{key}" if prefix else str(key)))
  return out


def shape_mismatch(stored: dict[str, tuple[int, ...]], wanted: dict[str, tuple[int, ...]]) -> str | None:
  """The first difference between a checkpoint's array shapes and the restore target's, or None."""
  weights_first = lambda path: (not path.startswith(("params", "frozen")), path)  # noqa: E731
  differ = sorted((p for p in set(stored) & set(wanted) if stored[p] != wanted[p]), key=weights_first)
  if differ:
    more = f"; {len(differ) - 1} more array(s) differ" if len(differ) > 1 else ""
    return f"{differ[0]}: stored {stored[differ[0]]}, this model {wanted[differ[0]]}{more}"
  missing, extra = sorted(set(wanted) - set(stored)), sorted(set(stored) - set(wanted))
  if missing:
    return f"{len(missing)} array(s) of this model not in the checkpoint, e.g. {missing[0]}"
  if extra:
    return f"{len(extra)} array(s) in the checkpoint not in this model, e.g. {extra[0]}"
  return None


def _failed_on_processes(failed: bool) -> list[int]:
  """The processes whose restore of the same step failed (one small all-gather when several)."""
  if jax.process_count() == 1:
    return [0] if failed else []
  from jax.experimental import multihost_utils
  flags = np.asarray(multihost_utils.process_allgather(np.int32(failed))).reshape(-1)
  return [int(i) for i in np.flatnonzero(flags)]


def _agreed_error(error: CheckpointCorrupt | None, path: pathlib.Path) -> CheckpointCorrupt | None:
  """This process's restore error, or one for a step that failed on another process. Every
  process must take the same branch (restoring is collective: a process that went on while
  another fell back to an older step would wait for it forever)."""
  failed = _failed_on_processes(error is not None)
  if error is None and failed:
    return CheckpointCorrupt(path, f"unreadable on process(es) {', '.join(map(str, failed))}")
  return error


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


def _write_json_atomic(path: pathlib.Path, payload: dict) -> None:
  """Write-then-rename so a reader never sees a half-written file."""
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(json.dumps(payload, indent=2) + "\n")
  os.replace(tmp, path)


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
      return ocp.CheckpointManager(self.directory, options=self._options())
    except OSError as e:
      raise CheckpointWriteError(self.directory, _one_line(e)) from e

  def _write_failed(self, reason: str, cause: BaseException) -> CheckpointWriteError:
    """After a failed write orbax re-raises the same error on every later call, so the
    manager is replaced (its leftover tmp folder is removed on reopen) and training can
    go on; the committed steps were never touched."""
    try:
      self._mgr.close()
    except Exception:  # noqa: BLE001 -- the old manager only re-raises the same failure
      log.debug("ignoring error while closing a failed checkpoint manager", exc_info=True)
    self._mgr = self._open_manager()
    err = CheckpointWriteError(self.directory, reason)
    err.__cause__ = cause
    return err

  def _options(self) -> ocp.CheckpointManagerOptions:
    cfg = self.config
    policies = [ocp_managers.LatestN(n=cfg.max_to_keep)]
    if cfg.keep_best:
      policies.append(ocp_managers.BestN(
        get_metric_fn=lambda m: m[_METRIC], reverse=True, n=1,  # reverse: lowest loss is best
        keep_checkpoints_without_metrics=False))
    return ocp.CheckpointManagerOptions(
      step_prefix=STEP_PREFIX,
      preservation_policy=ocp_managers.AnyPreservationPolicy(policies),
      # best_fn makes orbax store each step's metrics and drives best_step(); deletion
      # is decided by the preservation policy alone.
      best_fn=(lambda m: m[_METRIC]) if cfg.keep_best else None,
      best_mode="min",
      enable_async_checkpointing=cfg.async_save,
      cleanup_tmp_directories=not cfg.read_only,
      create=not cfg.read_only,
      read_only=cfg.read_only,
    )

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
    self._check_writable(step)
    loss = _finite(val_loss)
    meta = {**(metadata or {}), "step": step, _METRIC: loss}
    if val_loss is not None and loss is None:
      meta["val_loss_raw"] = str(val_loss)
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(iterator))
    metrics = {_METRIC: loss} if (self.config.keep_best and loss is not None) else None
    try:
      self._mgr.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
    except Exception as e:  # noqa: BLE001 -- any failure here is a write failure
      raise self._write_failed(f"step {step}: {_one_line(e)}", e) from e
    if not self.config.async_save:
      self.wait_until_finished()
    return True

  def _check_writable(self, step: int) -> None:
    """Creates and removes a probe folder where orbax will put its tmp folder. orbax
    (0.12) waits forever for a commit signal when creating that folder fails (read-only
    or immutable directory, exhausted inodes), so such a directory is reported here, as
    one line, before orbax is involved. A directory that turns read-only between this
    probe and the write fails in orbax's background write, which `wait_until_finished`
    turns into the same error; orbax's signal threads of that write then wait up to 300 s,
    which is why the launchers leave through `runtime.exit_process` (tested)."""
    probe = self.directory / f".{STEP_PREFIX}_{step}.rmjax-probe-{jax.process_index()}-{os.getpid()}"
    try:
      probe.mkdir()
      probe.rmdir()
    except OSError as e:
      raise CheckpointWriteError(self.directory, f"step {step}: {_one_line(e)}") from e

  def wait_until_finished(self) -> None:
    """Blocks until the in-flight save is committed, then refreshes best.json."""
    try:
      self._mgr.wait_until_finished()
    except Exception as e:  # noqa: BLE001 -- the background write failed
      raise self._write_failed(_one_line(e), e) from e
    self._write_best_file()

  def _write_best_file(self) -> None:
    """Records the best (step, val loss) in best.json; process 0 only (shared filesystem)."""
    if not self.config.keep_best or self.config.read_only or jax.process_index() != 0:
      return
    best = self._mgr.best_step()
    if best is None:
      return
    payload = {"step": int(best), _METRIC: float(self._mgr.metrics(best)[_METRIC]),
               "path": self.step_path(best).name}
    path = self.directory / BEST_FILE
    if path.exists() and read_best_file(self.directory) == payload:
      return
    _write_json_atomic(path, payload)

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
      _check_process_count(path)

  def _restore_checked(self, step: int, abstract_state: Any, iterator: Any) -> Restored:
    path = self.step_path(step)
    items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    if iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(iterator)
    try:
      out = self._mgr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001 -- orbax/tensorstore raise many types for bad files
      raise CheckpointCorrupt(path, _one_line(e)) from e
    return Restored(step=step, state=out["state"], metadata=dict(out["meta"] or {}))

  def _check_shapes(self, step: int, abstract_state: Any) -> None:
    """A checkpoint of another model shape (a spec changed between launch and relaunch) is a
    mismatch, said as such, not corruption: it is never set aside, and orbax is not left to fail
    halfway through its reads. Unreadable metadata is left for the restore to report."""
    handler = ocp.StandardCheckpointHandler()
    try:
      stored = handler.metadata(self.step_path(step) / "state").tree
    except Exception:  # noqa: BLE001 -- a damaged checkpoint: the restore names the problem
      return
    finally:
      handler.close()  # its thread would outlive an error exit (runtime.exit_process)
    if not stored:
      return
    problem = shape_mismatch(_shapes_by_path(stored), _shapes_by_path(serialization.to_state_dict(abstract_state)))
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
      error = _agreed_error(error, self.step_path(step))
      if error is None:
        try:
          restored = self._restore_checked(step, abstract_state, iterator)
        except CheckpointCorrupt as e:
          error = e
        error = _agreed_error(error, self.step_path(step))
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
      if best is not None and int(best.get("step", -1)) in steps:
        (self.directory / BEST_FILE).unlink()
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("rmjax_checkpoints_set_aside")
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


def read_best_file(directory: os.PathLike | str) -> dict | None:
  """Contents of `<directory>/best.json`, or None if there is none yet."""
  path = pathlib.Path(directory) / BEST_FILE
  if not path.exists():
    return None
  return json.loads(path.read_text())


def restore_subtree(step_dir: os.PathLike | str, abstract_subtree: dict) -> dict:
  """Restores only some top-level fields of a saved state, e.g. weights for `init_from`:
  `restore_subtree(".../checkpoint_step_500", {"params": ..., "frozen": ...})` (keys are the
  saved state's field names; leaves ShapeDtypeStructs with the target shardings). The
  optimizer state and the rest are not read."""
  step_dir = pathlib.Path(step_dir).absolute()
  if not (step_dir / "state").is_dir():
    raise CheckpointNotFound(f"{step_dir} is not a checkpoint_step_<N> folder (no state/ inside)")
  args = ocp.args.PyTreeRestore(
    item=abstract_subtree, partial_restore=True,
    restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_subtree))
  try:
    with ocp.PyTreeCheckpointer() as pc:
      return pc.restore(step_dir / "state", args=args)
  except Exception as e:  # noqa: BLE001 -- orbax/tensorstore raise many types for bad files
    raise CheckpointCorrupt(step_dir, _one_line(e)) from e
