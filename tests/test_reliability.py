"""Faults at the launch level: SIGKILL at three moments (one during an asynchronous save), then a
relaunch with bit-identical weights and exactly the uninterrupted run's metrics; a checkpoint
write that fails mid-run (full disk, read-only directory); a corrupt latest checkpoint (error by
path, or fallback when the spec allows). SIGTERM and NaN injection are in tests/test_loop.py
(test_sigterm_saves_a_checkpoint_and_exits_zero, test_nan_loss_stops_with_clear_message_and_no_bad_checkpoint,
test_nan_policy_skip_keeps_training)."""

import collections
import contextlib
import hashlib
import json
import os
import pathlib
import random
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest

import _run_helpers as R
from test_loop import ONE_BUCKET, TIMING_KEYS, _env, _launch_cmd, checkpoint_steps, read_jsonl

STEPS = 12
EXTRA = ("--spec.eval_steps=0", "--spec.save_steps=3", "--spec.checkpoint.async_save=True", ONE_BUCKET)


def _start(out, steps=STEPS, *extra, **popen):
  return subprocess.Popen(_launch_cmd(out, steps, *EXTRA, *extra), cwd=R.ROOT, env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen)


def _finish(proc, timeout=240):
  try:
    _, err = proc.communicate(timeout=timeout)
  finally:
    if proc.poll() is None:
      proc.kill()
  return proc.returncode, err


def _kill_when(out, predicate, what):
  proc = _start(out)
  try:
    assert R.wait_for(predicate, proc, poll=0.003), f"{what}: never seen (rc {proc.poll()})"
    R.kill9(proc)
  finally:
    if proc.poll() is None:
      proc.kill()


def _metric_rows(run_dir):
  return {(r["step"], k): v for r in read_jsonl(run_dir / "logs" / "metrics.jsonl")
          for k, v in r.items() if k != "timestamp"}


def _logged_steps(run):
  path = run / "logs" / "metrics.jsonl"
  if not path.exists():
    return []
  return [r["step"] for r in read_jsonl(path) if "train/loss" in r]


@pytest.mark.slow
def test_three_sigkills_then_relaunch_give_bit_identical_params(tmp_path):
  proc = _start(tmp_path / "ref")
  assert _finish(proc)[0] == 0
  ref = tmp_path / "ref" / "demo-full"

  out = tmp_path / "killed"
  run = out / "demo-full"
  ckpts = run / "checkpoints"
  seen_tmp = []

  def saving():  # 1. an asynchronous save is in flight (orbax's uncommitted tmp folder exists)
    names = [p.name for p in ckpts.iterdir()] if ckpts.is_dir() else []
    seen_tmp.extend(n for n in names if "orbax-checkpoint-tmp" in n)
    return bool(seen_tmp)

  _kill_when(out, saving, "an in-flight save")
  assert seen_tmp and all(s < STEPS for s in checkpoint_steps(run))

  # 2. between saves: a checkpoint is committed and training has gone past it
  def between():
    done = checkpoint_steps(run) if ckpts.is_dir() else []
    return bool(done) and any(s > max(done) and s % 3 for s in _logged_steps(run))

  _kill_when(out, between, "a step after a committed checkpoint")
  # 3. after the last step, during the final evaluation, before the final checkpoint
  _kill_when(out, lambda: STEPS in _logged_steps(run), "the last step")
  assert STEPS not in checkpoint_steps(run)

  rc, err = _finish(_start(out))
  assert rc == 0, err[-3000:]
  final = json.loads((run / "logs" / "final_results.json").read_text())
  assert final["total_steps"] == STEPS and 0 < final["resumed_from_step"] < STEPS
  assert not [p for p in ckpts.iterdir() if "tmp" in p.name]  # leftovers cleaned on reopen
  # The relaunch logs exactly the uninterrupted run's metrics after the step it resumed from.
  resumed, reference = _metric_rows(run), _metric_rows(ref)
  assert resumed.keys() == reference.keys()
  after = {k for k in reference if k[0] > final["resumed_from_step"] and k[1] not in TIMING_KEYS}
  assert any(k[1] == "train/loss" for k in after) and any(k[1].startswith("val/") for k in after)
  assert {k: resumed[k] for k in after} == {k: reference[k] for k in after}  # exact, not approx
  got = R.flat(R.checkpoint_params(ckpts / f"checkpoint_step_{STEPS}"))
  want = R.flat(R.checkpoint_params(ref / "checkpoints" / f"checkpoint_step_{STEPS}"))
  assert got.keys() == want.keys() and len(got) > 5
  assert all(np.array_equal(got[k], want[k]) for k in got), [k for k in got if not np.array_equal(got[k], want[k])]


def _tree_digest(path):
  return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def six_step_run(tmp_path_factory):
  """A finished 6-step run with checkpoints at steps 3 and 6 (copied by each test)."""
  out = tmp_path_factory.mktemp("base")
  rc, err = _finish(_start(out, 6))
  assert rc == 0, err[-3000:]
  return out


def _copy(src, dst):
  shutil.copytree(src, dst)
  return dst / "demo-full"


def _error_lines(err):
  """rmjax's one-line errors (orbax/tensorstore threads may interleave their own stderr output
  with it, so the line is cut at the next line break or at a traceback start)."""
  tag = "rmjax.launch: error:"
  return [tag + part.split("\n")[0].split("Traceback (most recent")[0] for part in err.split(tag)[1:]]


@pytest.mark.slow
def test_failed_checkpoint_write_stops_with_one_line_and_keeps_previous(tmp_path, six_step_run):
  run = _copy(six_step_run, tmp_path / "out")
  before = {s: _tree_digest(run / "checkpoints" / f"checkpoint_step_{s}") for s in (3, 6)}
  # Run as root, chmod does not stop writes; a file-size limit does: a later checkpoint (~470 kB
  # of arrays) fails with EFBIG ("disk full"), logs and metrics (small) still write. Which save
  # fails first depends on how tensorstore happens to split the arrays into files (step 9 or 12).
  cmd = " ".join(shlex.quote(a) for a in _launch_cmd(tmp_path / "out", STEPS, *EXTRA))
  proc = subprocess.Popen(["bash", "-c", f'trap "" XFSZ; ulimit -f 256; exec {cmd}'], cwd=R.ROOT, env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  rc, err = _finish(proc)
  assert rc == 2, err[-3000:]
  errors = _error_lines(err)
  assert len(errors) == 1 and errors[0].startswith(
    f"rmjax.launch: error: CheckpointWriteError: cannot write checkpoint in {run / 'checkpoints'}: "), err[-3000:]
  assert "File too large" in errors[0]
  # orbax, asyncio and tensorstore would print dozens of tracebacks (rmjax/background_errors.py):
  # none is left, and rmjax's line is the last one.
  assert "Traceback" not in err, err[-3000:]
  assert err.strip().splitlines()[-1].startswith("rmjax.launch: error: CheckpointWriteError"), err[-3000:]
  steps = checkpoint_steps(run)
  assert steps in ([3, 6], [3, 6, 9]), steps  # the save that failed was not committed
  assert {s: _tree_digest(run / "checkpoints" / f"checkpoint_step_{s}") for s in (3, 6)} == before
  for s in steps[2:]:  # a save that completed before the failing one restores
    assert R.flat(R.checkpoint_params(run / "checkpoints" / f"checkpoint_step_{s}"))
  assert max(_logged_steps(run)) > 6  # it did train on before the write failed
  assert not (run / "logs" / "final_results.json").read_text().count('"total_steps": 12')


@contextlib.contextmanager
def _read_only(directory):
  """Makes `directory` unwritable for this test's processes: chmod for a normal user; as root
  (CI) permissions do not stop writes, so the immutable attribute (chattr +i) is used."""
  if os.geteuid() != 0:
    mode = directory.stat().st_mode
    directory.chmod(0o555)
    undo = lambda: directory.chmod(mode)
  else:
    if not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(directory)],
                                                    capture_output=True).returncode:
      pytest.skip("running as root and this filesystem has no immutable attribute (chattr +i)")
    undo = lambda: subprocess.run(["chattr", "-i", str(directory)], check=True)
  try:
    yield
  finally:
    undo()


@pytest.mark.slow
def test_read_only_checkpoint_directory_stops_with_one_line_and_keeps_previous(tmp_path, six_step_run):
  run = _copy(six_step_run, tmp_path / "out")
  ckpts = run / "checkpoints"
  before = {s: _tree_digest(ckpts / f"checkpoint_step_{s}") for s in (3, 6)}
  with _read_only(ckpts):
    rc, err = _finish(_start(tmp_path / "out"), timeout=180)
    after = sorted(p.name for p in ckpts.iterdir())
  assert rc == 2, err[-3000:]
  errors = _error_lines(err)
  assert len(errors) == 1 and errors[0].startswith(
    f"rmjax.launch: error: CheckpointWriteError: cannot write checkpoint in {ckpts}: step 9: "), err[-3000:]
  assert "Traceback" not in err, err[-3000:]
  assert after == ["best.json", "checkpoint_step_3", "checkpoint_step_6"]
  assert {s: _tree_digest(ckpts / f"checkpoint_step_{s}") for s in (3, 6)} == before
  assert max(_logged_steps(run)) == 9  # trained up to the failed save, then stopped


_RACE_CHILD = r"""
import contextlib, hashlib, json, pathlib, sys
import jax.numpy as jnp
sys.path.insert(0, {tests!r})
from test_reliability import _read_only, _tree_digest
from rmjax import checkpoint as ck, runtime
from rmjax.checkpoint import manager
d = pathlib.Path({directory!r})
c = ck.Checkpointer(d, ck.CheckpointConfig())
save = lambda step: (c.save(step, {{"w": jnp.arange(3.0) + step}}), c.wait_until_finished())
save(1)
before = _tree_digest(d / "checkpoint_step_1")
probe, error = manager.probe_writable, None
with contextlib.ExitStack() as frozen:
  def probe_then_freeze(directory, step):
    probe(directory, step)
    frozen.enter_context(_read_only(d))
  manager.probe_writable = probe_then_freeze
  try:
    save(2)
  except ck.CheckpointWriteError as e:
    error = str(e)
manager.probe_writable = probe
after_failure = (c.all_steps(), _tree_digest(d / "checkpoint_step_1") == before)
save(3)
print(json.dumps({{"error": error, "after_failure": after_failure, "finally": c.all_steps()}}), flush=True)
c.close()
runtime.exit_process(0)  # orbax's threads of the failed write are still waiting: leave anyway
"""


def test_directory_turning_read_only_after_the_probe_is_one_error_and_the_process_still_exits(tmp_path):
  """The probe cannot see a directory that turns read-only just after it: orbax's own write then
  fails. That must also end as one CheckpointWriteError, with the saved step untouched and the
  checkpointer usable once the directory is writable again. orbax leaves non-daemon threads
  waiting 300 s for signals of the failed write; `runtime.exit_process` (how the launchers
  leave) must not wait for them: the child is given 120 s."""
  if os.geteuid() == 0 and (not shutil.which("chattr") or subprocess.run(
      ["chattr", "+i", str(tmp_path)], capture_output=True).returncode):
    pytest.skip("running as root and this filesystem has no immutable attribute (chattr +i)")
  subprocess.run(["chattr", "-i", str(tmp_path)], capture_output=True)
  d = tmp_path / "ckpts"
  code = _RACE_CHILD.format(tests=str(pathlib.Path(__file__).parent), directory=str(d))
  proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["error"].startswith(f"cannot write checkpoint in {d}: "), result
  assert result["after_failure"] == [[1], True] and result["finally"] == [1, 3]


def _corrupt(step_dir):
  """Truncates every array-data file of the saved state to half its size."""
  data = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "ocdbt.process" in str(p.parent.parent)
          or p.is_file() and p.parent.name == "d"]
  assert data
  for p in data:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


@pytest.mark.slow
def test_corrupt_latest_checkpoint_is_named_and_fallback_only_when_asked(tmp_path, six_step_run):
  run = _copy(six_step_run, tmp_path / "out")
  bad = run / "checkpoints" / "checkpoint_step_6"
  _corrupt(bad)
  rc, err = _finish(_start(tmp_path / "out", 8))
  assert rc == 2, err[-3000:]
  errors = _error_lines(err)
  assert len(errors) == 1 and errors[0].startswith(
    f"rmjax.launch: error: CheckpointCorrupt: corrupt or unreadable checkpoint {bad}: "), err[-3000:]
  assert "--spec.checkpoint.fallback_to_previous=True resumes from the newest readable older step (3" in errors[0]
  # orbax's abandoned reads print nothing of their own (rmjax/background_errors.py)
  assert "Traceback" not in err and "never awaited" not in err, err[-3000:]

  rc, err = _finish(_start(tmp_path / "out", 8, "--spec.checkpoint.fallback_to_previous=True"))
  assert rc == 0, err[-3000:]
  final = json.loads((run / "logs" / "final_results.json").read_text())
  assert final["total_steps"] == 8 and final["resumed_from_step"] == 3
  log = (run / "logs" / "train.log").read_text()
  assert f"Checkpoint {bad} is corrupt; fell back to step 3" in log
  # step 6 is trained and saved again (the unreadable folder set aside), and the logs hold each
  # step once, as an uninterrupted run's would: they were cut back to step 3
  assert {3, 6, 8} <= set(checkpoint_steps(run)) and (run / "checkpoints" / "corrupt" / "checkpoint_step_6").is_dir()
  assert any(line.startswith("Sav") and line.endswith(str(bad)) for line in
             (part.split("rmjax: ")[-1] for part in log.split("fell back")[1].splitlines())), log
  rows = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
  train_steps = [r["step"] for r in rows if "train/loss" in r]
  assert train_steps == list(range(1, 9)), train_steps


# ----------------------------------------------------------------- hostile input: rmjax.score

def _score_lines(n: int, seed: int = 0) -> list[bytes]:
  """n mutated score-input lines: tree mutations (deleted keys, wrong types), byte damage
  (truncation, non-UTF-8, random bytes), lone-surrogate escapes, empty and huge steps."""
  from test_readers_fuzz import mutate_bytes, mutate_tree
  rng = random.Random(seed)
  base = {"problem": "What is 2 + 3 * 4?", "steps": ["3 * 4 = 12.", "2 + 12 = 14.", "The answer is 14."],
          "id": "q1", "meta": {"source": "fuzz", "tags": ["a", "b"]}}
  lines = []
  for i in range(n):
    kind = i % 6
    if kind == 0:
      obj = mutate_tree(base, rng)
    elif kind == 1:
      obj = dict(base, steps=[] if rng.random() < 0.5 else [""] * rng.randrange(1, 4))
    elif kind == 2:
      obj = dict(base, steps=["x " * rng.choice([2000, 20000])] + base["steps"][:rng.randrange(3)])
    elif kind == 3:
      obj = dict(base, steps=[f"step {j}" for j in range(rng.choice([1, 17, 60]))])
    else:
      obj = None
    data = json.dumps(obj if obj is not None else base).encode()
    if kind == 4:
      data = mutate_bytes(data, rng)
    elif kind == 5:
      data = data.replace(b"3 * 4", rng.choice([b"\\ud800", b"\\udfff x", b"\\u0000", b"\\\\ud800"]))
    lines.append(data.replace(b"\n", b" "))
  return lines


def test_score_input_fuzz_every_line_parsed_or_skipped_with_its_line_number(tmp_path, capsys):
  from rmjax import score
  lines = _score_lines(6000)
  path = tmp_path / "in.jsonl"
  path.write_bytes(b"\n".join(lines) + b"\n")
  warnings = []
  records = list(score.read_records(path, warnings.append))
  nonblank = [i + 1 for i, line in enumerate(lines) if line.strip()]
  assert len(records) + len(warnings) == len(nonblank)
  assert sorted([r.line for r in records] + [int(w.split(":")[1]) for w in warnings]) == nonblank
  assert all(isinstance(r.problem, str) and all(isinstance(s, str) for s in r.steps) for r in records)
  for r in records:  # everything that got through can reach a tokenizer
    "".join((r.problem, *r.steps)).encode("utf-8")
  assert all(len(w.splitlines()) == 1 and ": skipped: " in w for w in warnings)
  reasons = collections.Counter(w.split(": skipped: ")[1].split(" (")[0] for w in warnings)
  assert len(reasons) >= 5 and len(records) > 1000, reasons
  with capsys.disabled():
    print(f"\nscore input fuzz: {len(lines)} lines tried, {len(records)} parsed, {len(warnings)} skipped: "
          f"{dict(reasons.most_common(8))}")


@pytest.fixture(scope="module")
def score_run(tmp_path_factory):
  import _tiny_run
  d = tmp_path_factory.mktemp("score")
  _tiny_run.make_run(d / "run", _tiny_run.make_base(d / "base"), mode="lora")
  return d / "run"


@pytest.mark.slow
def test_score_command_on_hostile_input_scores_or_skips_every_line(tmp_path, score_run, capsys):
  from rmjax import score
  lines = _score_lines(600, seed=1)
  inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  inp.write_bytes(b"\n".join(lines) + b"\n")
  rc = score.main(["--checkpoint", str(score_run), "--input", str(inp), "--output", str(out), "--batch-size", "16"])
  err = capsys.readouterr().err
  assert rc == 0, err[-3000:]
  assert "Traceback" not in err
  rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
  skipped = err.count(": skipped: ")
  assert len(rows) + skipped == sum(1 for line in lines if line.strip())
  for row in rows:
    assert len(row["step_scores"]) == len(row["steps"])
    assert all(s is None or 0.0 <= s <= 1.0 for s in row["step_scores"])
  assert any(len(r["steps"]) == 0 for r in rows) and any(None in r["step_scores"] for r in rows)
  with capsys.disabled():
    print(f"\nscore command fuzz: {len(lines)} lines tried, {len(rows)} scored, {skipped} skipped")


# -------------------------------------------------------- no unpickling, no unasked remote code

def _sources():
  return {p: p.read_text() for p in (R.ROOT / "rmjax").rglob("*.py")}


def test_nothing_in_rmjax_unpickles_or_trusts_remote_code_by_itself():
  bad = []
  for path, text in _sources().items():
    for pattern in (r"\bimport (c?pickle|dill|cloudpickle|joblib|shelve|marshal)\b", r"\bpickle\.loads?\(",
                    r"\bfrom (c?pickle|dill|cloudpickle|joblib|shelve|marshal) import (?!UnpicklingError\b)",
                    r"allow_pickle\s*=\s*True", r"trust_remote_code\s*=\s*True", r"(?<![.\w])eval\(", r"(?<![.\w])exec\("):
      bad += [f"{path.name}: {m.group(0)}" for m in re.finditer(pattern, text)]
    for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
      if "weights_only=True" not in call.group(1):
        bad.append(f"{path.name}: {call.group(0)}")
  assert bad == []
  # The spec's switch is the one way in: build passes it to the tokenizer loader.
  build_src = (R.ROOT / "rmjax" / "train" / "build.py").read_text()
  assert "trust_remote_code=bool(spec.model.trust_remote_code)" in build_src
