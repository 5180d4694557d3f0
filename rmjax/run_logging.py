"""The run directory's logs: train.log, metrics.jsonl, config.json, final_results.json, TensorBoard.

Why this module exists: a training run must leave behind records a person (train.log), a script
(metrics.jsonl, final_results.json) and TensorBoard can all read, written by process 0 only, and
a resumed run must continue them without duplicated steps. Layout (see the spec contract):

  <run_dir>/logs/train.log            timestamped human-readable lines (also echoed to stderr)
  <run_dir>/logs/metrics.jsonl        {"step", "timestamp", "<tag>": value, ...} per line, NaN -> null
  <run_dir>/logs/config.json          the resolved spec
  <run_dir>/logs/final_results.json   final metrics
  <run_dir>/tensorboard/              tensorboardX event files, same tags as metrics.jsonl

`read_tensorboard_scalars` parses event files back (tensorboardX has no reader) so tests can prove
the files hold what was logged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import struct
import sys
import time
from typing import Any, Mapping

import numpy as np

LOGGER_NAME = "rmjax"  # train.log receives this logger's records, so every rmjax.* module lands there
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _tensorboardx() -> Any:
  """The tensorboardX package, imported without torch.

  tensorboardX's writer module imports torch where it is installed, only to name torch.Tensor in
  type hints; rmjax logs Python and numpy values, and importing torch costs about a second of a
  run's start-up (with the [torch] extra installed). Where torch is not loaded yet, the import is
  hidden from tensorboardX's (a None entry in sys.modules makes `import torch` raise the
  ImportError that module expects), then restored for everything else.
  """
  if "tensorboardX" in sys.modules or "torch" in sys.modules:
    import tensorboardX
    return tensorboardX
  sys.modules["torch"] = None  # type: ignore[assignment]
  try:
    import tensorboardX
  finally:
    del sys.modules["torch"]
  return tensorboardX


def to_jsonable(value: Any) -> Any:
  """JSON-safe copy: numpy/jax scalars -> python, NaN/inf -> None, tuples -> lists."""
  if value is None or isinstance(value, (str, bool)):
    return value
  if isinstance(value, Mapping):
    return {str(k): to_jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple, set, frozenset)):
    return [to_jsonable(v) for v in value]
  if hasattr(value, "to_dict"):  # ml_collections.ConfigDict
    return to_jsonable(value.to_dict())
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return to_jsonable(dataclasses.asdict(value))
  if isinstance(value, (int, np.integer)):
    return int(value)
  if isinstance(value, np.bool_):
    return bool(value)
  try:
    arr = np.asarray(value)
  except Exception:  # noqa: BLE001 - anything exotic is stored as its text
    return str(value)
  if arr.dtype.kind in "fc" and arr.ndim == 0:
    f = float(arr.real)
    return f if math.isfinite(f) else None
  if arr.dtype.kind in "iub" and arr.ndim == 0:
    return arr.item()
  if arr.dtype.kind in "iufb":
    return to_jsonable(arr.tolist())
  return str(value)


def _scalar_or_none(value: Any) -> float | None:
  """The float TensorBoard should get (NaN kept: a diverging loss should show), or None to skip."""
  if value is None or isinstance(value, str):
    return None
  try:
    arr = np.asarray(value)
  except Exception:  # noqa: BLE001
    return None
  if arr.ndim != 0 or arr.dtype.kind not in "iufb":
    return None
  return float(arr)


class RunLogger:
  """Writes the run directory's logs; on non-main processes every method is a no-op.

  resume_step: when continuing a run, metrics.jsonl lines with step > resume_step are dropped
  and TensorBoard is told (SessionLog.START at resume_step + 1) to discard its later events.
  """

  def __init__(self, run_dir: str | os.PathLike, is_main_process: bool = True,
               resume_step: int | None = None, echo_stderr: bool = True, flush_secs: int = 30):
    self.run_dir = pathlib.Path(run_dir)
    self.logs_dir = self.run_dir / "logs"
    self.tb_dir = self.run_dir / "tensorboard"
    self.metrics_path = self.logs_dir / "metrics.jsonl"
    self.enabled = is_main_process
    self._resuming = resume_step is not None
    self._closed = False
    self._handlers: list[logging.Handler] = []
    self.logger = logging.getLogger(LOGGER_NAME)
    if not self.enabled:
      return
    self.logs_dir.mkdir(parents=True, exist_ok=True)
    self.tb_dir.mkdir(parents=True, exist_ok=True)
    self._attach_handlers(echo_stderr)
    if resume_step is not None:
      self.truncate_after(resume_step)
    self._metrics_file = open(self.metrics_path, "a", encoding="utf-8")
    self._flush_secs = flush_secs
    self._tb = self._open_tensorboard(purge_step=None if resume_step is None else resume_step + 1)

  def _open_tensorboard(self, purge_step: int | None) -> Any:
    SummaryWriter = _tensorboardx().SummaryWriter  # deferred: only process 0 needs it
    # A unique suffix: two writers opened in the same second would otherwise share a file name.
    return SummaryWriter(str(self.tb_dir), flush_secs=self._flush_secs, purge_step=purge_step,
                         filename_suffix=f".{os.getpid()}.{time.time_ns()}")

  def rewind_to(self, step: int) -> None:
    """A resume that went back further than `resume_step` said (a corrupt newer checkpoint):
    drops metrics.jsonl lines after `step`, and TensorBoard's events after it (a new event file
    that starts with a purge at step + 1)."""
    if not self.enabled:
      return
    self.truncate_after(step)
    self._tb.close()
    self._tb = self._open_tensorboard(purge_step=step + 1)

  def has_scalar(self, step: int, key: str) -> bool:
    """Whether metrics.jsonl already has a line for `step` holding `key`."""
    if not self.enabled or not self.metrics_path.exists():
      return False
    self._metrics_file.flush()
    for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(row, dict) and row.get("step") == step and key in row:
        return True
    return False

  def _attach_handlers(self, echo_stderr: bool) -> None:
    formatter = logging.Formatter(_FORMAT)
    file_handler = logging.FileHandler(self.logs_dir / "train.log", encoding="utf-8")
    self._handlers.append(file_handler)
    if echo_stderr:
      self._handlers.append(logging.StreamHandler(sys.stderr))
    for h in self._handlers:
      h.setFormatter(formatter)
      self.logger.addHandler(h)
    self._old_level, self._old_propagate = self.logger.level, self.logger.propagate
    if self.logger.level == logging.NOTSET or self.logger.level > logging.INFO:
      self.logger.setLevel(logging.INFO)
    self.logger.propagate = False  # our stderr handler already prints; avoid root duplicates

  def log(self, msg: str, level: int = logging.INFO) -> None:
    """One timestamped line in train.log (and on stderr)."""
    if self.enabled:
      self.logger.log(level, msg)

  def log_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Appends one metrics.jsonl line and writes the numeric values to TensorBoard."""
    if not self.enabled:
      return
    row = {"step": int(step), "timestamp": round(time.time(), 3)}
    row.update({str(k): to_jsonable(v) for k, v in scalars.items()})
    self._metrics_file.write(json.dumps(row, allow_nan=False) + "\n")
    self._metrics_file.flush()
    for tag, value in scalars.items():
      v = _scalar_or_none(value)
      if v is not None:
        self._tb.add_scalar(str(tag), v, int(step))

  def best(self, val_loss: float, step: int) -> None:
    self.log(f"New best validation loss: {float(val_loss):.6f} (step {int(step)})")

  def write_config(self, config: Mapping[str, Any] | Any, hparam_metrics: tuple[str, ...] = ("val/loss",)) -> None:
    """logs/config.json, plus the spec as TensorBoard text and its flat simple fields as hparams."""
    if not self.enabled:
      return
    cfg = to_jsonable(config)
    text = json.dumps(cfg, indent=2, allow_nan=False)
    _write_json_atomic(self.logs_dir / "config.json", text)
    # Four leading spaces make TensorBoard's markdown render the JSON as a code block.
    self._tb.add_text("config", "\n".join("    " + line for line in text.splitlines()), 0)
    hparams = {k: v for k, v in _flatten(cfg).items() if isinstance(v, (bool, int, float, str))}
    if hparams:
      from tensorboardX.summary import hparams as hparams_summary
      for summary in hparams_summary(hparams, {m: 0.0 for m in hparam_metrics}):
        self._tb.file_writer.add_summary(summary)
    self.flush()

  def warn_of_changes(self, config: Mapping[str, Any] | Any) -> list[str]:
    """When resuming: the differences of `config` from the run's config.json, said once as a
    warning and returned. A resume under another spec continues as asked (config.json is replaced
    once the run restores and trains on); a changed model shape that then cannot restore is not
    mistaken for a bad checkpoint."""
    if not (self.enabled and self._resuming):
      return []
    cfg = to_jsonable(config)
    try:
      previous = json.loads((self.logs_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
      return []
    if not isinstance(previous, dict) or not isinstance(cfg, dict):
      return []
    old, new = _flatten(previous), _flatten(cfg)
    changes = [f"{k}: {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}"
               for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if changes:
      more = f" (and {len(changes) - 8} more)" if len(changes) > 8 else ""
      self.log(f"Resuming under a spec that differs from this run's config.json: {'; '.join(changes[:8])}{more}",
               logging.WARNING)
    return changes

  def write_final(self, results: Mapping[str, Any]) -> None:
    if self.enabled:
      _write_json_atomic(self.logs_dir / "final_results.json",
                         json.dumps(to_jsonable(results), indent=2, allow_nan=False))

  def truncate_after(self, step: int) -> int:
    """Drops metrics.jsonl lines with step > `step` (and a torn last line); returns lines dropped."""
    if not self.enabled or not self.metrics_path.exists():
      return 0
    kept, dropped = [], 0
    for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
      try:
        row_step = json.loads(line).get("step")
      except (json.JSONDecodeError, AttributeError):
        dropped += 1  # a line torn by a crash mid-write
        continue
      if row_step is not None and row_step > step:
        dropped += 1
      else:
        kept.append(line)
    reopen = hasattr(self, "_metrics_file") and not self._metrics_file.closed
    if reopen:
      self._metrics_file.close()
    _write_json_atomic(self.metrics_path, "".join(line + "\n" for line in kept))
    if reopen:
      self._metrics_file = open(self.metrics_path, "a", encoding="utf-8")
    if dropped:
      self.log(f"Resuming at step {step}: dropped {dropped} metrics.jsonl lines after it")
    return dropped

  def flush(self) -> None:
    if self.enabled and not self._closed:
      self._metrics_file.flush()
      self._tb.flush()
      for h in self._handlers:
        h.flush()

  def close(self) -> None:
    """Closes every file, each even when another fails (a full disk); then raises the first
    failure. A TensorBoard writer that failed to close is marked closed, so that tensorboardX's
    own exit hook does not try again and print a traceback after the run's one error line."""
    if not self.enabled or self._closed:
      return
    self._closed = True
    failures = []
    for close in (self._metrics_file.close, self._tb.close):
      try:
        close()
      except OSError as e:
        failures.append(e)
    event_writer = getattr(getattr(self._tb, "file_writer", None), "event_writer", None)
    if failures and hasattr(event_writer, "_closed"):
      event_writer._closed = True
    for h in self._handlers:
      self.logger.removeHandler(h)
      h.close()
    self.logger.setLevel(self._old_level)
    self.logger.propagate = self._old_propagate
    if failures:
      raise failures[0]

  def __enter__(self) -> "RunLogger":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  if not isinstance(d, dict):
    return {prefix: d}
  out: dict[str, Any] = {}
  for k, v in d.items():
    out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
  return out


def _write_json_atomic(path: pathlib.Path, text: str) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text, encoding="utf-8")
  os.replace(tmp, path)


# ----------------------------------------------------------------------------- reading back


def _read_records(path: pathlib.Path) -> list[bytes]:
  """TFRecord payloads: uint64 length, uint32 crc(length), data, uint32 crc(data); stops at a torn tail."""
  _tensorboardx()
  from tensorboardX.record_writer import masked_crc32c
  data = path.read_bytes()
  records, pos = [], 0
  while pos + 12 <= len(data):
    header = data[pos:pos + 8]
    (length,) = struct.unpack("<Q", header)
    (header_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
    end = pos + 12 + length + 4
    if header_crc != masked_crc32c(header) or end > len(data):
      break
    payload = data[pos + 12:pos + 12 + length]
    (payload_crc,) = struct.unpack("<I", data[end - 4:end])
    if payload_crc != masked_crc32c(payload):
      break
    records.append(payload)
    pos = end
  return records


def read_tensorboard_scalars(logdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...]} from the event files directly in `logdir`, in write order.

  Applies TensorBoard's restart rule: a SessionLog.START at step S discards earlier events with
  step >= S (this is how a resumed run hides the steps it redoes).
  """
  _tensorboardx()
  from tensorboardX.proto import event_pb2
  files = []
  for path in pathlib.Path(logdir).glob("events.out.tfevents.*"):
    events = [event_pb2.Event.FromString(r) for r in _read_records(path)]
    if events:
      files.append((events[0].wall_time, str(path), events))
  scalars: dict[str, list[tuple[int, float]]] = {}
  for _, _, events in sorted(files):
    for ev in events:
      if ev.HasField("session_log") and ev.session_log.status == event_pb2.SessionLog.START:
        scalars = {t: [(s, v) for s, v in pts if s < ev.step] for t, pts in scalars.items()}
      for value in ev.summary.value:
        if value.WhichOneof("value") == "simple_value":
          scalars.setdefault(value.tag, []).append((int(ev.step), float(value.simple_value)))
  return scalars
