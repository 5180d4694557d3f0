"""Host-to-device prefetch: the next batches are read, placed and sharded while the device works.

Why it exists: the train step is dispatched asynchronously, so the host is free while the
device computes; without prefetch it still waits for the data pipeline and the host-to-device
copy of each batch before dispatching the next step. `DevicePrefetcher` runs the pipeline and
`place` (e.g. `step.device_batch` with the mesh's batch sharding) in a background thread,
`depth` batches ahead (default DEPTH).

Checkpoints stay exact: the wrapped iterator runs ahead of training, so saving its own state
would skip the prefetched batches on resume. The prefetcher remembers the pipeline state
after each batch it produced and `get_state()` returns the state after the last batch the
TRAINING LOOP took; `set_state()` stops the thread, drops what was prefetched and restores the
pipeline. It therefore stands in for the grain iterator in `Checkpointer.save/restore`.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from typing import Any, Callable, Iterator, NamedTuple


DEPTH = 2  # batches read ahead by default


class Prefetched(NamedTuple):
  host: dict[str, Any]  # the numpy batch (shapes, token counts, eval metadata)
  device: dict[str, Any]  # `place(host)`: jax arrays with their shardings
  read_s: float = 0.0  # seconds the pipeline took to produce `host` (in the prefetch thread)
  place_s: float = 0.0  # seconds `place(host)` took to return (in the prefetch thread)


class _End(NamedTuple):
  error: BaseException | None


class DevicePrefetcher:
  """Iterator of `Prefetched(host, device)` over `iterator`, `depth` batches ahead."""

  def __init__(self, iterator: Iterator[dict[str, Any]], place: Callable[[dict[str, Any]], Any], depth: int = DEPTH):
    if depth < 1:
      raise ValueError(f"prefetch depth must be >= 1, got {depth}")
    self._it, self._place, self._depth = iterator, place, depth
    self._queue: queue.Queue | None = None
    self._thread: threading.Thread | None = None
    self._stop = threading.Event()
    self._state = self._parent_state()  # pipeline state after the last batch handed out
    self._done = False

  def _parent_state(self) -> Any:
    get = getattr(self._it, "get_state", None)
    return get() if get is not None else None

  def _worker(self, q: queue.Queue, stop: threading.Event) -> None:
    try:
      while not stop.is_set():
        t0 = time.perf_counter()
        try:
          host = next(self._it)
        except StopIteration:
          q.put(_End(None))
          return
        t1 = time.perf_counter()
        device = self._place(host)
        item = (Prefetched(host, device, t1 - t0, time.perf_counter() - t1), self._parent_state())
        while not stop.is_set():
          try:
            q.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
    except BaseException as e:  # surfaced in the training thread by __next__
      q.put(_End(e))

  def _start(self) -> None:
    self._stop = threading.Event()
    self._queue = queue.Queue(maxsize=self._depth)
    self._thread = threading.Thread(target=self._worker, args=(self._queue, self._stop),
                                    name="rmjax-prefetch", daemon=True)
    self._thread.start()

  def __iter__(self) -> "DevicePrefetcher":
    return self

  def __next__(self) -> Prefetched:
    if self._done:
      raise StopIteration
    if self._thread is None:
      self._start()
    item = self._queue.get()
    if isinstance(item, _End):
      self._done = True
      self.close()
      if item.error is not None:
        raise item.error
      raise StopIteration
    batch, self._state = item
    return batch

  def close(self) -> None:
    """Stops the thread and drops prefetched batches (the pipeline stays where the thread left it)."""
    if self._thread is None:
      return
    self._stop.set()
    while self._thread.is_alive():
      try:
        self._queue.get(timeout=0.05)  # unblock a worker waiting to put
      except queue.Empty:
        pass
    self._thread.join()
    self._thread, self._queue = None, None

  def start_prefetch(self) -> None:
    """Starts the thread now (grain's checkpoint handler calls this after set_state)."""
    if self._thread is None and not self._done:
      self._start()

  def get_state(self) -> Any:
    """Pipeline state after the last batch returned by `__next__` (what a resume must see next)."""
    return self._state

  def set_state(self, state: Any) -> None:
    """Restores the pipeline to `state` (grain's checkpoint handler passes JSON bytes to
    iterators it does not know; they are decoded when the pipeline's own state is not bytes)."""
    self.close()
    if isinstance(state, (bytes, bytearray, str)) and not isinstance(self._parent_state(), (bytes, str)):
      state = json.loads(state)
    self._it.set_state(state)
    self._state, self._done = self._parent_state(), False
