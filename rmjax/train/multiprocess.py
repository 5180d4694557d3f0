"""What a multi-process run exchanges between its processes, outside the jitted steps.

Why it exists: each process reads and buckets its own rows, so the processes must agree on a
batch's length before it becomes one global array; evaluation needs every process's rows on
every host; the run's skip counts are summed over processes. Each helper is a collective (every
process calls it at the same point) and a no-op with one process.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from rmjax import sharding as shd
from rmjax.data.example import SkipCounter


def any_process(flag: bool, process_count: int) -> bool:
  """True when `flag` is set on any process."""
  if process_count == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def pad_to_longest(batch: dict[str, np.ndarray], pad_token: int, process_count: int) -> dict[str, np.ndarray]:
  """This process's rows padded to the longest bucket any process chose for this batch.

  Every process must run the same program on one global (B, T) array, so T is agreed here (one
  tiny all-gather per batch). Extra columns are padding (segment 0)."""
  if process_count == 1:
    return batch
  t = batch["input_ids"].shape[1]
  longest = int(np.max(multihost_utils.process_allgather(np.asarray([t], np.int32))))
  if longest == t:
    return batch
  out = dict(batch)
  for key, fill in (("input_ids", pad_token), ("positions", 0), ("segment_ids", 0)):
    out[key] = np.pad(batch[key], ((0, 0), (0, longest - t)), constant_values=fill)
  return out


def host_rows(batch: dict[str, np.ndarray], probs: jax.Array, mesh: Mesh, batch_block: int,
              process_count: int) -> dict[str, np.ndarray]:
  """Every process's rows of one eval batch, on every host (rows of process p after p-1's).

  Each process's probabilities are taken from its own rows of the global array (the inverse of
  `step.device_batch`) and gathered together with its targets, so the two stay aligned whatever
  order the mesh puts the processes' devices in."""
  rows = batch["input_ids"].shape[0]
  local = {"probs": None, "targets": batch["targets"], "target_mask": batch["target_mask"],
           "step_index": batch["step_index"], "example_index": batch["example_index"] + batch_block * rows}
  if process_count == 1:
    local["probs"] = np.asarray(probs)
    return local
  local["probs"] = np.asarray(multihost_utils.global_array_to_host_local_array(
    probs, mesh, shd.batch_sharding(mesh).spec))
  gathered = multihost_utils.process_allgather(local, tiled=True)
  return {k: np.asarray(v) for k, v in gathered.items()}


def allgather_json(value: Any, process_count: int) -> list[Any]:
  """Every process's JSON-able `value`, in process order. The collectives move arrays only, so
  each value travels as its UTF-8 bytes, zero-padded to the longest (whose length is gathered
  first)."""
  if process_count == 1:
    return [value]
  mine = np.frombuffer(json.dumps(value).encode(), np.uint8)
  longest = int(np.max(multihost_utils.process_allgather(np.asarray([mine.size], np.int32))))
  padded = np.zeros(longest, np.uint8)
  padded[:mine.size] = mine
  rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(-1, longest)
  return [json.loads(row.tobytes().rstrip(b"\0")) for row in rows]


def skipped_records(file_skips: SkipCounter, shard_skips: SkipCounter, process_count: int) -> dict[str, dict[str, int]]:
  """Skipped records of the whole run: the whole-file counts (alike on every process) once, plus
  every process's shard counts (rendering, readers that parse on access). Source and reason are
  free-form names, hence the JSON exchange."""
  total = SkipCounter()
  total.add_all(file_skips)
  for counts in allgather_json(shard_skips.as_dict(), process_count):
    total.add_all(counts)
  return total.as_dict()
