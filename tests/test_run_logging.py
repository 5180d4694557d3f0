"""Tests for rmjax.run_logging and rmjax.progress: files written, resume, TensorBoard round trip."""

import io
import json
import logging
import math
import re

import jax.numpy as jnp
import numpy as np
import pytest

from rmjax.progress import Progress
from rmjax.run_logging import LOGGER_NAME, RunLogger, read_tensorboard_scalars


def read_jsonl(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_scalars_reach_jsonl_and_tensorboard(tmp_path):
  with RunLogger(tmp_path, echo_stderr=False) as run:
    run.log_scalars(10, {"train/loss": np.float32(0.5), "train/learning_rate": 1e-4, "train/grad_norm": jnp.asarray(2.0),
                         "val/prm800k/auroc": None, "val/mse": float("nan"), "train/num_markers": np.int32(7)})
    run.log_scalars(20, {"train/loss": 0.25})
  rows = read_jsonl(tmp_path / "logs" / "metrics.jsonl")
  assert [r["step"] for r in rows] == [10, 20]
  assert list(rows[0])[:2] == ["step", "timestamp"] and isinstance(rows[0]["timestamp"], float)
  assert rows[0]["train/loss"] == 0.5 and rows[0]["train/num_markers"] == 7
  assert rows[0]["val/prm800k/auroc"] is None and rows[0]["val/mse"] is None  # null, not NaN
  assert "NaN" not in (tmp_path / "logs" / "metrics.jsonl").read_text()
  tb = read_tensorboard_scalars(tmp_path / "tensorboard")
  assert tb["train/loss"] == [(10, 0.5), (20, 0.25)]
  assert tb["train/learning_rate"][0][1] == pytest.approx(1e-4, rel=1e-6)  # stored as float32
  assert tb["train/num_markers"] == [(10, 7.0)] and tb["train/grad_norm"] == [(10, 2.0)]
  assert rows[0]["train/grad_norm"] == 2.0
  assert math.isnan(tb["val/mse"][0][1])  # a NaN loss stays visible in TensorBoard
  assert "val/prm800k/auroc" not in tb  # None has no value to plot


def test_train_log_config_and_final(tmp_path):
  spec = {"lr": 2e-5, "mode": "full", "model": {"path": "demo", "hidden_dims": (8, 4)}, "init_from": None}
  with RunLogger(tmp_path, echo_stderr=False) as run:
    run.log("hello from the loop")
    logging.getLogger("rmjax.data.prm800k").warning("a module warning")
    run.best(0.1234567, 300)
    run.write_config(spec)
    run.write_final({"val/auroc": np.float64(0.8), "val/r2": float("nan")})
  lines = (tmp_path / "logs" / "train.log").read_text().splitlines()
  stamp = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} "
  assert re.match(stamp + r"INFO .*hello from the loop$", lines[0])
  assert re.match(stamp + r"WARNING rmjax\.data\.prm800k: a module warning$", lines[1])
  assert "New best validation loss: 0.123457" in lines[2]
  config = json.loads((tmp_path / "logs" / "config.json").read_text())
  assert config == {"lr": 2e-5, "mode": "full", "model": {"path": "demo", "hidden_dims": [8, 4]},
                    "init_from": None}
  assert json.loads((tmp_path / "logs" / "final_results.json").read_text()) == {"val/auroc": 0.8, "val/r2": None}
  events = b"".join(p.read_bytes() for p in (tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert b'"hidden_dims"' in events  # the spec text
  assert b"model.path" in events and b"hparams" in events  # flattened hparams summary


def test_logger_handlers_are_removed_on_close(tmp_path):
  logger = logging.getLogger(LOGGER_NAME)
  before = list(logger.handlers), logger.propagate
  run = RunLogger(tmp_path, echo_stderr=True)
  assert len(logger.handlers) == len(before[0]) + 2
  run.close()
  run.close()  # idempotent
  assert (list(logger.handlers), logger.propagate) == before


def test_a_full_disk_at_close_closes_everything_then_raises_once(tmp_path, monkeypatch):
  """A disk that fills up: the TensorBoard writer fails to flush at close. Every file and handler
  is still closed, the failure is raised once, and the writer is marked closed, so tensorboardX's
  exit hook does not retry and print "Exception ignored in atexit callback" with a traceback."""
  import errno
  logger = logging.getLogger(LOGGER_NAME)
  before = list(logger.handlers)
  run = RunLogger(tmp_path, echo_stderr=False)
  writer = run._tb.file_writer.event_writer

  def full(*_):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(writer._ev_writer, "flush", full)
  with pytest.raises(OSError, match="No space left on device"):
    run.close()
  assert writer._closed and run._metrics_file.closed and list(logger.handlers) == before
  run.close()  # closed: nothing raised again
  writer._worker.stop()


def test_non_main_process_writes_nothing(tmp_path):
  run_dir = tmp_path / "run"
  with RunLogger(run_dir, is_main_process=False, resume_step=5) as run:
    run.log("x")
    run.log_scalars(1, {"train/loss": 1.0})
    run.write_config({"a": 1})
    run.write_final({"a": 1})
    run.best(1.0, 1)
  assert not run_dir.exists()


def test_resume_drops_later_steps_everywhere(tmp_path):
  with RunLogger(tmp_path, echo_stderr=False) as run:
    for step in range(1, 6):
      run.log_scalars(step, {"train/loss": float(step)})
  with open(tmp_path / "logs" / "metrics.jsonl", "a") as f:
    f.write('{"step": 6, "train/lo')  # a line torn by a crash
  with RunLogger(tmp_path, resume_step=3, echo_stderr=False) as run:
    for step in range(4, 7):
      run.log_scalars(step, {"train/loss": 10.0 * step})
  rows = read_jsonl(tmp_path / "logs" / "metrics.jsonl")
  assert [(r["step"], r["train/loss"]) for r in rows] == [(1, 1), (2, 2), (3, 3), (4, 40), (5, 50), (6, 60)]
  tb = read_tensorboard_scalars(tmp_path / "tensorboard")
  assert tb["train/loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]
  assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2
  assert "dropped 3 metrics.jsonl lines" in (tmp_path / "logs" / "train.log").read_text()


def test_rewind_after_a_resume_drops_the_steps_after_it_everywhere(tmp_path):
  """A resume that falls back past a corrupt checkpoint rewinds further than it opened at."""
  with RunLogger(tmp_path, echo_stderr=False) as run:
    for step in range(1, 7):
      run.log_scalars(step, {"train/loss": float(step)})
  with RunLogger(tmp_path, resume_step=6, echo_stderr=False) as run:
    run.rewind_to(3)
    for step in range(4, 6):
      run.log_scalars(step, {"train/loss": 10.0 * step})
  assert [(r["step"], r["train/loss"]) for r in read_jsonl(tmp_path / "logs" / "metrics.jsonl")] == [
    (1, 1), (2, 2), (3, 3), (4, 40), (5, 50)]
  tb = read_tensorboard_scalars(tmp_path / "tensorboard")
  assert tb["train/loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]


def test_resuming_under_a_changed_spec_says_what_changed(tmp_path):
  with RunLogger(tmp_path, echo_stderr=False) as run:
    run.write_config({"lr": 1e-4, "model": {"remat": "full"}, "seed": 0})
  changed = {"lr": 0.1, "model": {"remat": "full"}, "seed": 0, "new_key": 1}
  with RunLogger(tmp_path, resume_step=2, echo_stderr=False) as run:
    assert run.warn_of_changes(changed) == ["lr: 0.0001 -> 0.1", "new_key: '(unset)' -> 1"]
    assert json.loads((tmp_path / "logs" / "config.json").read_text())["lr"] == 1e-4  # not yet replaced
    run.write_config(changed)
  with RunLogger(tmp_path, resume_step=2, echo_stderr=False) as run:
    assert run.warn_of_changes(changed) == []  # unchanged: silent
  warnings = [line for line in (tmp_path / "logs" / "train.log").read_text().splitlines() if "differs" in line]
  assert len(warnings) == 1 and warnings[0].endswith(
    "Resuming under a spec that differs from this run's config.json: lr: 0.0001 -> 0.1; new_key: '(unset)' -> 1")


def test_reader_stops_at_torn_tail(tmp_path):
  with RunLogger(tmp_path, echo_stderr=False) as run:
    run.log_scalars(1, {"a": 1.0})
    run.log_scalars(2, {"a": 2.0})
  (path,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
  with open(path, "ab") as f:
    f.write(b"\x20\x00\x00\x00\x00\x00\x00\x00garbage")  # a header whose crc is wrong
  assert read_tensorboard_scalars(tmp_path / "tensorboard") == {"a": [(1, 1.0), (2, 2.0)]}


def test_progress_silent_without_tty_and_shows_rate_when_enabled():
  quiet = io.StringIO()
  with Progress(total=10, stream=quiet) as bar:  # StringIO is not a tty
    bar.update(5, loss=0.3)
  assert quiet.getvalue() == "" and not bar.enabled
  loud = io.StringIO()
  with Progress(total=10, initial=2, stream=loud, enabled=True) as bar:
    bar.update(4, loss=0.123456)
    bar.update(6, loss=0.1)
  out = loud.getvalue()
  assert "6/10" in out and re.search(r"step/s|s/step", out) and "loss=0.1" in out
  assert Progress(total=10, is_main_process=False, stream=loud).enabled is False


def test_tensorboard_writer_opens_without_importing_torch_and_torch_still_imports_after(tmp_path):
  """tensorboardX's writer imports torch where installed (type hints only): a run's start-up must
  not pay for it, and the hiding must not outlive the import."""
  import subprocess
  import sys
  pytest.importorskip("torch")  # where torch is absent there is nothing to hide
  code = (f"import sys; from rmjax.run_logging import RunLogger\n"
          f"log = RunLogger({str(tmp_path)!r}); log.log_scalars(1, {{'a': 1.0}}); log.close()\n"
          f"print('torch' in sys.modules)\n"
          f"import torch; print(torch.ones(2).sum().item())\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split() == ["False", "2.0"]
  assert read_tensorboard_scalars(tmp_path / "tensorboard") == {"a": [(1, 1.0)]}
