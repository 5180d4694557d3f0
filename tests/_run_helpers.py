"""Helpers shared by the multi-process and fault-injection tests (launch subprocesses, watch run
directories, read checkpoint params).

Why it exists: tests/test_multihost.py and tests/test_reliability.py both start real
`python -m rmjax.launch` processes and compare what they leave on disk; the basic launch
helpers of tests/test_loop.py are reused from there, the rest lives here.

Run as a script it is the single-process reference of the multi-host test:
  python tests/_run_helpers.py merged OUT_DIR MAX_STEPS KEY=VALUE...
trains the demo spec in ONE process on the global batches a 2-process run sees (process 0's
rows, then process 1's), so the two runs can be compared number for number.
"""

from __future__ import annotations

import ast
import json
import pathlib
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Callable

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO = ROOT / "specs" / "demo.py"
PAD_KEYS = ("input_ids", "positions", "segment_ids")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def train_losses(run_dir: pathlib.Path) -> dict[int, float]:
  rows = [json.loads(x) for x in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def checkpoint_params(step_dir: pathlib.Path) -> dict:
  """The `params` subtree of a saved train state as numpy arrays, restored in THIS process."""
  import jax
  import orbax.checkpoint as ocp
  meta = ocp.PyTreeCheckpointer().metadata(step_dir / "state")
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  target = {"params": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree["params"])}
  from rmjax.checkpoint import restore_subtree
  return jax.tree.map(np.asarray, restore_subtree(step_dir, target)["params"])


def flat(tree: Any) -> dict[str, np.ndarray]:
  import jax
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def wait_for(predicate: Callable[[], bool], proc: subprocess.Popen, timeout: float = 180.0,
             poll: float = 0.02) -> bool:
  """True once `predicate()` holds; False if the process ended first or time ran out."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if predicate():
      return True
    if proc.poll() is not None:
      return False
    time.sleep(poll)
  return False


def finish_all(procs: list[subprocess.Popen], timeout: float = 240.0) -> list[str]:
  """Waits for every process (killing stragglers) and asserts they all exited 0; returns stderrs."""
  try:
    errs = [p.communicate(timeout=timeout)[1] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert [p.returncode for p in procs] == [0] * len(procs), "".join(e[-2000:] for e in errs)
  return errs


def kill9(proc: subprocess.Popen) -> None:
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=30)
  assert proc.returncode == -signal.SIGKILL, proc.returncode


# ------------------------------------------------------------------- single-process reference

def pad_concat(parts: list[dict[str, np.ndarray]], pad_id: int) -> dict[str, np.ndarray]:
  """Rows of several processes' batches as one global batch, padded to the longest T."""
  t = max(p["input_ids"].shape[1] for p in parts)
  out = {}
  for key in parts[0]:
    arrays = []
    for p in parts:
      a = p[key]
      if key in PAD_KEYS and a.shape[1] < t:
        fill = pad_id if key == "input_ids" else 0
        a = np.pad(a, ((0, 0), (0, t - a.shape[1])), constant_values=fill)
      arrays.append(a)
    out[key] = np.concatenate(arrays)
  return out


class MergedShards:
  """A train dataset whose batches are the concatenation of N per-process datasets' batches."""

  def __init__(self, datasets: list, pad_id: int, lengths_log: pathlib.Path | None = None):
    self._datasets, self._pad_id, self._log = datasets, pad_id, lengths_log

  def __iter__(self):
    return _MergedIter([iter(d) for d in self._datasets], self._pad_id, self._log)


class _MergedIter:
  def __init__(self, iters: list, pad_id: int, lengths_log: pathlib.Path | None):
    self._iters, self._pad_id, self._log = iters, pad_id, lengths_log

  def __iter__(self):
    return self

  def __next__(self):
    parts = [next(it) for it in self._iters]
    if self._log is not None:  # each shard's own bucket length, one JSON list per batch
      with open(self._log, "a") as fh:
        fh.write(json.dumps([p["input_ids"].shape[1] for p in parts]) + "\n")
    return pad_concat(parts, self._pad_id)

  def get_state(self):
    return {"shards": [it.get_state() for it in self._iters]}

  def set_state(self, state):
    for it, s in zip(self._iters, state["shards"]):
      it.set_state(s)


def run_merged(out_dir: str, max_steps: int, overrides: list[str], processes: int = 2) -> None:
  from rmjax import spec as spec_lib
  from rmjax.data.pipeline import pad_id
  from rmjax.train import loop
  spec = spec_lib.load_spec_file(str(DEMO))
  for item in [f"output_dir={out_dir}", f"max_steps={max_steps}", *overrides]:
    key, value = item.split("=", 1)
    *parents, leaf = key.split(".")
    node = spec
    for p in parents:
      node = node[p]
    node[leaf] = type(node[leaf])(value) if not isinstance(node[leaf], (tuple, bool)) else ast.literal_eval(value)
  real = loop.train_dataset

  def merged(sources, render_cfg, tokenizer, cfg, **kw):
    kw = {k: v for k, v in kw.items() if k not in ("process_index", "process_count")}
    return MergedShards([real(sources, render_cfg, tokenizer, cfg, process_index=i, process_count=processes, **kw)
                         for i in range(processes)], pad_id(tokenizer), pathlib.Path(out_dir) / "shard_lengths.jsonl")

  loop.train_dataset = merged
  loop.train_and_evaluate(spec)


if __name__ == "__main__":
  if len(sys.argv) < 4 or sys.argv[1] != "merged":
    raise SystemExit(__doc__)
  run_merged(sys.argv[2], int(sys.argv[3]), sys.argv[4:])
