"""A checkpoint failure is one line: tensorstore's OS error codes are named, orbax's background
records lose their tracebacks (rmjax/checkpoint/errors.py, rmjax/background_errors.py)."""

import logging
import sys

from rmjax import background_errors as be
from rmjax.checkpoint.errors import one_line


def test_write_error_line_names_the_os_reason_when_tensorstore_only_gives_its_code():
  long_message = "OUT_OF_RANGE: Error writing \"opt_state/mu\" " + "{...}" * 200 + " [os_error_code='27']"
  line = one_line(ValueError(long_message + "\nsecond line"))
  assert line.startswith("ValueError: OUT_OF_RANGE") and len(line) < 500 and "\n" not in line
  assert line.endswith("[os_error_code='27'] (File too large)")  # EFBIG on Linux
  assert one_line(ValueError("File too large [os_error_code='27']")).count("File too large") == 1


def test_background_error_filters_touch_only_orbax_and_tensorstore():
  """rmjax/background_errors.py: orbax records lose their traceback, asyncio's abandoned-task
  records from orbax/tensorstore code are dropped; records from anywhere else pass unchanged."""
  def exc_from(filename):
    try:
      exec(compile("raise ValueError('OUT_OF_RANGE: write failed')", filename, "exec"))
    except ValueError:
      return sys.exc_info()

  def record(name, pathname, msg, exc_info):
    return logging.LogRecord(name, logging.ERROR, pathname, 1, msg, None, exc_info)

  orbax_exc, user_exc = exc_from("/site-packages/orbax/checkpoint/x.py"), exc_from("/home/me/train.py")
  kept = record("absl", "/site-packages/orbax/checkpoint/future.py", "raised an exception", orbax_exc)
  assert be._OrbaxOneLine().filter(kept) and kept.exc_info is None
  other = record("absl", "/home/me/train.py", "boom", user_exc)
  assert be._OrbaxOneLine().filter(other) and other.exc_info is user_exc
  abandoned = be._AbandonedWrites()
  assert not abandoned.filter(record("asyncio", "base_events.py", "Task exception was never retrieved", orbax_exc))
  assert not abandoned.filter(record("asyncio", "base_events.py", "Future exception was never retrieved",
                                     (ValueError, ValueError("x"), None)))
  assert abandoned.filter(record("asyncio", "base_events.py", "Task exception was never retrieved", user_exc))
  assert abandoned.filter(record("asyncio", "base_events.py", "Executing <Task> took 0.2 seconds", None))


def test_abandoned_task_awaiting_tensorstores_future_is_dropped():
  """A restore that fails on one array leaves asyncio tasks that awaited tensorstore's futures
  (C++: the traceback holds asyncio's frames only) with their reads' errors unretrieved: dropped.
  The same task failing with another library's error is kept."""
  import asyncio

  class ForeignAwaitable:  # awaits a C-implemented future, as a tensorstore future is awaited
    def __init__(self, message):
      self.message = message

    def __await__(self):
      future = asyncio.get_running_loop().create_future()
      future.set_exception(ValueError(self.message))
      return future.__await__()

  async def failed(message):
    task = asyncio.ensure_future(ForeignAwaitable(message))
    await asyncio.wait([task])
    return task.exception()

  def record(exc):
    return logging.LogRecord("asyncio", logging.ERROR, "base_events.py", 1, "Task exception was never retrieved",
                             None, (type(exc), exc, exc.__traceback__))

  store = asyncio.run(failed('OUT_OF_RANGE: Error opening "zarr" driver: Requested byte range [0, 8312) is not '
                             "valid [tensorstore_spec='{\"driver\":\"zarr\"}']"))
  assert store.__traceback__ is not None and {"tasks.py"} >= {
    f.filename.rsplit("/", 1)[-1] for f in __import__("traceback").extract_tb(store.__traceback__)}
  assert not be._AbandonedWrites().filter(record(store))
  assert be._AbandonedWrites().filter(record(asyncio.run(failed("connection reset by peer"))))


def test_read_error_line_is_tensorstores_cause_not_orbaxs_wrapper():
  """orbax wraps a failed array read in an Exception carrying the store's whole spec; the line
  says tensorstore's error instead, which names the array and the file."""
  cause = ValueError('OUT_OF_RANGE: Error reading "params.head.kernel/0.0" in OCDBT database at local file '
                     '"/runs/x/checkpoints/checkpoint_step_7/state/": Requested byte range [10, 20) is not valid')
  wrapper = Exception("Encountered error while reading array index: (slice(0, 2, 1),). See full TensorStore "
                      "details: <bound method spec of TensorStore({\n  'base': {\n")
  wrapper.__cause__ = cause
  assert one_line(wrapper) == f"ValueError: {cause}"
  plain = Exception("Encountered error while reading array index: (slice(0, 2, 1),). See full ...")
  assert one_line(plain) == f"Exception: {plain}"  # no cause: the message as it is


def test_unraisable_filter_drops_orbaxs_abandoned_work_only():
  """After a failed restore, orbax's collected read coroutines and tensorstore's callbacks into
  the closed loop are unraisable: dropped; an unraisable exception from other code is kept."""
  class Unraisable:
    def __init__(self, exc_info):
      _, self.exc_value, self.exc_traceback = exc_info

  def exc_from(filename, message):
    try:
      exec(compile(f"raise RuntimeError({message!r})", filename, "exec"))
    except RuntimeError:
      return sys.exc_info()

  assert be._abandoned_work(Unraisable(exc_from("/site-packages/orbax/checkpoint/serialization.py", "read failed")))
  assert be._abandoned_work(Unraisable(exc_from("/lib/python3.11/asyncio/base_events.py", "Event loop is closed")))
  assert not be._abandoned_work(Unraisable(exc_from("/lib/python3.11/asyncio/base_events.py", "other")))
  assert not be._abandoned_work(Unraisable(exc_from("/home/me/train.py", "Event loop is closed")))


def test_error_line_leaves_out_tensorstores_store_spec():
  message = ('OUT_OF_RANGE: Error reading "layers.scale/.zarray" in OCDBT database at local file "/m/params/": '
             'Requested byte range [0, 2465) is not valid [source locations=\'tensorstore/kvstore.cc:12\'] '
             '[tensorstore_spec=\'{\\"context\\":{\\"cache_pool\\":{}},\\"driver\\":\\"zarr\\"}\']')
  assert one_line(ValueError(message)) == ('ValueError: OUT_OF_RANGE: Error reading "layers.scale/.zarray" in OCDBT '
                                           'database at local file "/m/params/": Requested byte range [0, 2465) is not valid')


def test_a_store_spec_spanning_lines_or_cut_off_is_left_out_too():
  head = 'OUT_OF_RANGE: Error reading "step/.zarray" in OCDBT database at local file "/r/state/"'
  spanning = ValueError(head + " [tensorstore_spec='{\"context\":\n{\"cache_pool\":{}}}'] [os_error_code='5']\nmore")
  assert one_line(spanning) == f"ValueError: {head} [os_error_code='5'] (Input/output error)"
  cut_off = ValueError(head + " [tensorstore_spec='{\"context\":\n{\"cache_pool\":{}}")
  assert one_line(cut_off) == f"ValueError: {head}"


def test_after_orbax_failed_pending_coroutines_are_not_warned_of():
  """orbax's abandoned reads are coroutines never awaited; Python warns of each, naming only the
  coroutine. Once rmjax has reported orbax's failure (orbax_failed) those warnings are not shown."""
  import gc
  import warnings

  async def pending():
    pass

  def warned(after_failure: bool) -> bool:
    with warnings.catch_warnings(record=True) as seen:
      warnings.simplefilter("always")
      if after_failure:
        be.orbax_failed()
      pending()  # created, never awaited, collected at once
      gc.collect()
    return any("was never awaited" in str(w.message) for w in seen)
  assert warned(after_failure=False) and not warned(after_failure=True)
