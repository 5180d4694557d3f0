"""The checkpoint directory on disk: names, best.json, write probing, and reading stored shapes.

Layout under a checkpoint directory (normally `<run_dir>/checkpoints`):

  checkpoint_step_<N>/state/    the train-state pytree (StandardSave, sharded arrays)
  checkpoint_step_<N>/data/     grain iterator state, one JSON file per process
  checkpoint_step_<N>/meta/     small JSON: step, val_loss, user metadata (config hash)
  checkpoint_step_<N>/metrics/  orbax's copy of {"val_loss": ...} (only finite values)
  best.json                     {"step", "val_loss", "path"} of the best kept step
  corrupt/                      steps a resume with fallback_to_previous could not read, moved aside

A save in progress lives in `checkpoint_step_<N>.orbax-checkpoint-tmp*` and is renamed only when
complete, so a kill mid-save leaves the previous steps restorable; leftover tmp folders are
ignored and removed when the directory is reopened.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from rmjax import background_errors
from rmjax.checkpoint.errors import (CheckpointCorrupt, CheckpointMismatch, CheckpointNotFound, CheckpointWriteError,
                                     one_line)

STEP_PREFIX = "checkpoint_step"
BEST_FILE = "best.json"
CORRUPT_DIR = "corrupt"  # steps a resume found unreadable, set aside
METRIC = "val_loss"


def abstract_like(tree: Any) -> Any:
  """Restore target from a live (possibly sharded) pytree: shape, dtype and sharding."""
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def config_hash(config: Any) -> str:
  """Short stable hash of a JSON-able config (e.g. `spec.to_dict()`), for metadata."""
  text = json.dumps(config, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_best_file(directory: os.PathLike | str) -> dict | None:
  """Contents of `<directory>/best.json`, or None if there is none yet or it is damaged (not a
  JSON object with an integer step): the file only mirrors the checkpoints' own metrics, and the
  next save writes it again from them."""
  path = pathlib.Path(directory) / BEST_FILE
  if not path.exists():
    return None
  try:
    best = json.loads(path.read_bytes())
  except (ValueError, RecursionError):  # bad JSON or UTF-8, deep nesting
    return None
  return best if isinstance(best, dict) and isinstance(best.get("step"), int) else None


def write_json_atomic(path: pathlib.Path, payload: dict) -> None:
  """Write-then-rename so a reader never sees a half-written file."""
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(json.dumps(payload, indent=2) + "\n")
  os.replace(tmp, path)


def probe_writable(directory: pathlib.Path, step: int) -> None:
  """Creates and removes a probe folder where orbax will put its tmp folder. orbax waits forever
  for a commit signal when creating that folder fails (read-only or immutable directory,
  exhausted inodes), so such a directory is reported here, as one line, before orbax is
  involved. A directory that turns read-only between this probe and the write fails in orbax's
  background write, which `Checkpointer.wait_until_finished` turns into the same error; orbax's
  signal threads of that write then wait up to 300 s, which is why the launchers leave through
  `runtime.exit_process` (tested)."""
  probe = directory / f".{STEP_PREFIX}_{step}.rmjax-probe-{jax.process_index()}-{os.getpid()}"
  try:
    probe.mkdir()
    probe.rmdir()
  except OSError as e:
    raise CheckpointWriteError(directory, f"step {step}: {one_line(e)}") from e


def shapes_by_path(tree: Any, prefix: str = "") -> dict[str, tuple[int, ...]]:
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
    out.update(shapes_by_path(value, f"{prefix}/{key}" if prefix else str(key)))
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


def stored_shapes(state_dir: pathlib.Path) -> dict[str, tuple[int, ...]] | None:
  """The array shapes a step's state/ folder holds, from its metadata; None when unreadable (a
  damaged checkpoint: the restore names the problem)."""
  handler = ocp.StandardCheckpointHandler()
  try:
    tree = handler.metadata(state_dir).tree
  except Exception:  # noqa: BLE001 -- orbax raises many types for damaged metadata
    return None
  finally:
    handler.close()  # its thread would outlive an error exit (runtime.exit_process)
  return shapes_by_path(tree) if tree else None


def restore_subtree(step_dir: os.PathLike | str, abstract_subtree: dict) -> dict:
  """Restores only some top-level fields of a saved state, e.g. weights for `init_from`:
  `restore_subtree(".../checkpoint_step_500", {"params": ..., "frozen": ...})` (keys are the
  saved state's field names; leaves ShapeDtypeStructs with the target shardings). The
  optimizer state and the rest are not read."""
  step_dir = pathlib.Path(step_dir).absolute()
  if not (step_dir / "state").is_dir():
    raise CheckpointNotFound(f"{step_dir} is not a checkpoint_step_<N> folder (no state/ inside)")
  stored = stored_shapes(step_dir / "state")
  if stored is not None:  # another model's checkpoint is a mismatch, said as such, not corruption
    stored = {p: shape for p, shape in stored.items() if p.split("/")[0] in abstract_subtree}
    problem = shape_mismatch(stored, shapes_by_path(dict(abstract_subtree)))
    if problem:
      raise CheckpointMismatch(f"checkpoint {step_dir} does not fit the model this spec builds ({problem}); "
                               f"it takes a checkpoint of the same model shape, mode and head")
  args = ocp.args.PyTreeRestore(
    item=abstract_subtree, partial_restore=True,
    restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_subtree))
  background_errors.install()
  try:
    with ocp.PyTreeCheckpointer() as pc:
      return pc.restore(step_dir / "state", args=args)
  except Exception as e:  # noqa: BLE001 -- orbax/tensorstore raise many types for bad files
    background_errors.orbax_failed()
    raise CheckpointCorrupt(step_dir, one_line(e)) from e
