"""Checkpoint retention: the latest N and the best step by val loss, as orbax keeps them and as
best.json and the run's record name them."""

import json
import math

from rmjax import checkpoint as ck
from test_checkpoint import _dirs, _tiny


def test_retention_keeps_latest_three_and_older_best(tmp_path):
  d = tmp_path / "checkpoints"
  losses = {1: 5.0, 2: 1.0, 3: 4.0, 4: float("nan"), 5: 3.0, 6: None, 7: 2.0}
  with ck.Checkpointer(d, ck.CheckpointConfig(max_to_keep=3, keep_best=True)) as c:
    for step, loss in losses.items():
      c.save(step, _tiny(), val_loss=loss)
    c.wait_until_finished()
    assert c.all_steps() == [2, 5, 6, 7]
    assert (c.best_step(), c.latest_step()) == (2, 7)
  assert _dirs(d) == ["checkpoint_step_2", "checkpoint_step_5", "checkpoint_step_6", "checkpoint_step_7"]
  assert json.loads((d / "best.json").read_text()) == {"step": 2, "val_loss": 1.0, "path": "checkpoint_step_2"}
  # A relaunch over the same directory still knows step 2 is best and keeps it.
  with ck.Checkpointer(d) as c:
    assert c.best_step() == 2
    for step in (8, 9, 10):
      c.save(step, _tiny(), val_loss=10.0 + step)
  assert _dirs(d) == ["checkpoint_step_10", "checkpoint_step_2", "checkpoint_step_8", "checkpoint_step_9"]
  # A new best among the latest replaces the old one, which then goes.
  with ck.Checkpointer(d) as c:
    c.save(11, _tiny(), val_loss=0.25)
  assert _dirs(d) == ["checkpoint_step_10", "checkpoint_step_11", "checkpoint_step_9"]
  assert ck.read_best_file(d) == {"step": 11, "val_loss": 0.25, "path": "checkpoint_step_11"}
  # A damaged best.json reads as none and is written again from the checkpoints' metrics.
  for step, damage in enumerate((b"garbage{", b"\xff\xfe", b"[1, 2]", b'{"step": "11"}'), start=12):
    (d / "best.json").write_bytes(damage)
    assert ck.read_best_file(d) is None
    with ck.Checkpointer(d) as c:
      assert c.best_step() == 11
      c.save(step, _tiny(), val_loss=9.0)
    assert ck.read_best_file(d) == {"step": 11, "val_loss": 0.25, "path": "checkpoint_step_11"}, damage


def test_equal_losses_make_the_later_step_best_in_orbax_and_in_the_runs_record(tmp_path):
  """Two evaluations with the same val loss: orbax's best step, the best checkpoint it keeps and
  best.json are the later step. The run's record (the log's "best at step", final_results.json)
  named the earlier one, which evaluate/export then did not use, and retention could delete."""
  from rmjax.train.record import RunRecord
  d = tmp_path / "checkpoints"
  with ck.Checkpointer(d, ck.CheckpointConfig(max_to_keep=1, async_save=False)) as c:
    for step, loss in ((20, 0.5), (40, 0.7), (60, 0.5), (80, 0.9)):
      c.save(step, _tiny(), val_loss=loss)
    assert c.best_step() == 60 and c.all_steps() == [60, 80]
  assert ck.read_best_file(d)["step"] == 60
  record = RunRecord()
  assert [record.note_eval(step, {"val/loss": loss}) for step, loss in ((20, 0.5), (40, 0.7), (60, 0.5))] == \
      [True, False, True]
  assert (record.best_step, record.best_val_loss) == (60, 0.5)


def test_nan_and_inf_val_loss_never_best(tmp_path):
  d = tmp_path / "checkpoints"
  with ck.Checkpointer(d, ck.CheckpointConfig(max_to_keep=2, async_save=False)) as c:
    c.save(1, _tiny(), val_loss=float("nan"))
    c.save(2, _tiny(), val_loss=float("inf"))
    assert c.best_step() is None
    assert ck.read_best_file(d) is None
    c.save(3, _tiny(), val_loss=7.0)
    c.save(4, _tiny(), val_loss=float("-inf"))
    c.save(5, _tiny(), val_loss=float("nan"))
    assert c.best_step() == 3
    assert c.all_steps() == [3, 4, 5]
    meta = c.restore(5, ck.abstract_like(_tiny())).metadata
  assert meta["val_loss"] is None and meta["val_loss_raw"] == "nan"
  assert ck.read_best_file(d)["step"] == 3
  assert not any(math.isnan(v) for v in ck.read_best_file(d).values() if isinstance(v, float))


def test_keep_best_off_keeps_only_latest(tmp_path):
  d = tmp_path / "checkpoints"
  with ck.Checkpointer(d, ck.CheckpointConfig(max_to_keep=2, keep_best=False)) as c:
    for step, loss in [(1, 0.1), (2, 5.0), (3, 6.0)]:
      c.save(step, _tiny(), val_loss=loss)
    c.wait_until_finished()
    assert c.best_step() is None
  assert _dirs(d) == ["checkpoint_step_2", "checkpoint_step_3"]
  assert not (d / "best.json").exists()
