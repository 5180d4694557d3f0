"""Garbage directories through every command-line tool that reads one: one error line, never a traceback.

Each tool gets copies of one valid directory, each broken by one seeded mutation: a file or
folder deleted, a file truncated (to 0 bytes and to half), overwritten with random bytes, a JSON
file made invalid or of the wrong shape (a list for an object, numbers as strings, a key
deleted or given a value of the wrong type), a folder replaced by a file or a file by a
folder, a folder emptied, the path missing or a file where the directory is expected. The
tool's main() runs in-process and must either

  * return 0 with exactly the output of the intact directory (the mutation did not matter,
    e.g. a deleted generation_config.json; changed weights must never be accepted), or
  * return non-zero with exactly one line on stderr, starting "rmjax.<tool>: error:" and
    naming the path (the directory or the file in it that is broken),

and nothing may say "Traceback" or escape main(). Each test prints (pytest -s) and puts in its
assertion message how many mutations it tried and how many gave errors or were harmless.

RMJAX_DIR_FUZZ_SEED and RMJAX_DIR_FUZZ_SCALE (environment) change the seeds and the number of
cases, to search further than the default run.

The valid directories are built once per module with the helpers of tests/_tiny_run.py: an HF
model (convert), a finished tiny LoRA run on the "demo" base (score, export, evaluate) and its
export, which holds every file a torch user needs (backbone_base/, lora_adapter/, head).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import pathlib
import random
import shutil
import subprocess
import sys
import traceback
from typing import Any, Callable

import numpy as np
import pytest
from safetensors.numpy import load_file

import _tiny_run as R
from rmjax import convert, evaluate, export, score
from rmjax.spec import load_spec_file, spec_to_dict
from rmjax.train.build import source_config
from test_readers_fuzz import mutate_tree

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEP = "checkpoints/checkpoint_step_7"
INPUT = [{"problem": "Compute 3 + 4 * 2.", "steps": ["4 * 2 = 8", "3 + 8 = 11", "The answer is 11."]},
         {"problem": "Compute 12 * 12.", "steps": ["12 * 12 = 144", "# Answer 144"]}]
COUNTS: dict[str, collections.Counter] = {}
# An exception raised where nothing can catch it (orbax's abandoned reads, collected after a
# failed restore) prints a traceback on the user's terminal after main() returned: here it fails
# the test.
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")]
# More or other cases on demand: RMJAX_DIR_FUZZ_SEED=5 RMJAX_DIR_FUZZ_SCALE=4 pytest tests/test_dir_fuzz.py
SEED = int(os.environ.get("RMJAX_DIR_FUZZ_SEED", "0"))
SCALE = float(os.environ.get("RMJAX_DIR_FUZZ_SCALE", "1"))


# -- mutations --------------------------------------------------------------------------------------
def _files(root: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in root.rglob("*") if p.is_file())


def _dirs(root: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in root.rglob("*") if p.is_dir())


def _json_files(root: pathlib.Path) -> list[tuple[pathlib.Path, Any]]:
  """Files (any name: orbax writes JSON without an extension) that hold a JSON object or list."""
  out = []
  for p in _files(root):
    try:
      obj = json.loads(p.read_bytes())
    except ValueError:
      continue
    if isinstance(obj, (dict, list)):
      out.append((p, obj))
  return out


def _strings_for_numbers(obj: Any) -> Any:
  if isinstance(obj, dict):
    return {k: _strings_for_numbers(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return [_strings_for_numbers(v) for v in obj]
  return str(obj) if isinstance(obj, (int, float)) and not isinstance(obj, bool) else obj


def _drop_key(obj: Any, rng: random.Random) -> Any:
  """obj without one key of one of its (possibly nested) objects."""
  holders = []

  def walk(node):
    if isinstance(node, dict):
      if node:
        holders.append(node)
      for v in node.values():
        walk(v)
    elif isinstance(node, list):
      for v in node:
        walk(v)
  walk(obj)
  if holders:
    node = rng.choice(holders)
    del node[rng.choice(sorted(node))]
  return obj


def _rel(p: pathlib.Path, root: pathlib.Path) -> str:
  return str(p.relative_to(root)) or "."


def _write_json(path: pathlib.Path, obj: Any) -> None:
  path.write_text(json.dumps(obj))


def mutate(root: pathlib.Path, kind: str, rng: random.Random) -> str | None:
  """Apply one mutation of `kind` inside `root`; a description, or None if it does not apply."""
  files, dirs, jsons = _files(root), _dirs(root), _json_files(root)
  if kind in ("delete_file", "truncate_zero", "truncate_half", "random_bytes", "file_to_dir") and not files:
    return None
  if kind in ("delete_dir", "dir_to_file", "empty_subdir") and not dirs:
    return None
  if kind.startswith("json_") and not jsons:
    return None
  if kind == "delete_file":
    f = rng.choice(files)
    f.unlink()
    return f"deleted {_rel(f, root)}"
  if kind in ("truncate_zero", "truncate_half"):
    f = rng.choice(files)
    data = f.read_bytes()
    f.write_bytes(b"" if kind == "truncate_zero" else data[: len(data) // 2])
    return f"{kind} {_rel(f, root)}"
  if kind == "random_bytes":
    f = rng.choice(files)
    size = f.stat().st_size or 64
    f.write_bytes(rng.randbytes(rng.choice([size, rng.randint(1, 4 * size)])))
    return f"random bytes in {_rel(f, root)}"
  if kind == "file_to_dir":
    f = rng.choice(files)
    f.unlink()
    f.mkdir()
    return f"directory instead of file {_rel(f, root)}"
  if kind == "delete_dir":
    d = rng.choice(dirs)
    shutil.rmtree(d)
    return f"deleted folder {_rel(d, root)}"
  if kind == "dir_to_file":
    d = rng.choice(dirs)
    shutil.rmtree(d)
    d.write_bytes(rng.randbytes(32))
    return f"file instead of folder {_rel(d, root)}"
  if kind == "empty_subdir":
    d = rng.choice(dirs)
    shutil.rmtree(d)
    d.mkdir()
    return f"emptied folder {_rel(d, root)}"
  f, obj = rng.choice(jsons)
  if kind == "json_invalid":
    text = f.read_text()
    f.write_text(rng.choice([text[: len(text) // 2], "{not json", "", "\x00\xff"]))
  elif kind == "json_list":
    _write_json(f, [obj])
  elif kind == "json_strings":
    _write_json(f, _strings_for_numbers(obj))
  elif kind == "json_missing_key":
    _write_json(f, _drop_key(obj, rng))
  elif kind == "json_wrong_type":
    _write_json(f, mutate_tree(obj, rng))
  else:
    raise AssertionError(kind)
  return f"{kind} {_rel(f, root)}"


IN_TREE = ("delete_file", "delete_dir", "truncate_zero", "truncate_half", "random_bytes", "json_invalid",
           "json_list", "json_strings", "json_missing_key", "json_wrong_type", "dir_to_file", "file_to_dir",
           "empty_subdir")
WHOLE = ("empty_dir", "missing_path", "file_not_dir")
# Cases per tool: every kind of mutation is the first tried on two copies (a kind that finds
# nothing to change falls through to the others); RMJAX_DIR_FUZZ_SCALE runs more.
CASES = 2 * len(IN_TREE + WHOLE)


def mutate_target(target: pathlib.Path, kind: str, rng: random.Random) -> str | None:
  if kind == "empty_dir":
    shutil.rmtree(target)
    target.mkdir()
    return "emptied the directory"
  if kind == "missing_path":
    shutil.rmtree(target)
    return "path does not exist"
  if kind == "file_not_dir":
    shutil.rmtree(target)
    target.write_text('{"format": "not a directory"}\n')
    return "a file where the directory is expected"
  return mutate(target, kind, rng)


# -- running one tool on many mutated copies ---------------------------------------------------------
@dataclasses.dataclass
class Tool:
  name: str  # the tool's "rmjax.<name>: error:" prefix
  source: pathlib.Path  # the valid directory, copied for each case
  target: str  # the path given to the tool, relative to the copy
  run: Callable[[pathlib.Path, pathlib.Path], int]  # (target, scratch dir) -> exit code
  output: Callable[[pathlib.Path], Any]  # scratch dir -> comparable output of a successful run
  same: Callable[[Any, Any], bool]
  may_change: tuple[str, ...] = ()  # files whose mutation may validly change the output (a spec)


def fuzz(tool: Tool, cases: int, seed: int, workdir: pathlib.Path, capfd) -> collections.Counter:
  """Run `cases` mutated copies; returns counts, fails with every broken case listed."""
  baseline_dir = workdir / "baseline"
  baseline_dir.mkdir()
  assert tool.run(tool.source / tool.target, baseline_dir) == 0, capfd.readouterr().err[-3000:]
  capfd.readouterr()
  expected = tool.output(baseline_dir)
  kinds = IN_TREE + WHOLE
  counts, problems = collections.Counter(), []
  for i in range(round(cases * SCALE)):
    rng = random.Random((seed + 1000 * SEED) * 100_003 + i)
    case = workdir / f"case{i}"
    copy = case / "copy"
    shutil.copytree(tool.source, copy, symlinks=True)
    what = None
    for kind in (kinds[i % len(kinds)], *rng.sample(IN_TREE, len(IN_TREE))):
      what = mutate_target(copy / tool.target, kind, rng)
      if what:
        break
    scratch = case / "out"
    scratch.mkdir()
    try:
      rc = tool.run(copy / tool.target, scratch)
    except BaseException as e:  # noqa: BLE001 -- anything escaping main() is a finding
      rc = None
      escaped = "".join(traceback.format_exception_only(type(e), e)).strip().splitlines()[-1]
      tb = traceback.extract_tb(e.__traceback__)[-1]
      escaped += f" at {pathlib.Path(tb.filename).name}:{tb.lineno}"
    out, err = capfd.readouterr()
    label = f"case {i} ({what})"
    counts["tried"] += 1
    if rc is None:
      problems.append(f"{label}: exception escaped main(): {escaped}")
    elif "Traceback" in out + err:
      problems.append(f"{label}: 'Traceback' in output: {err[-500:]!r}")
    elif rc == 0:
      if tool.same(tool.output(scratch), expected):
        counts["harmless"] += 1
      elif any(what.endswith(" " + f) for f in tool.may_change):
        counts["harmless"] += 1
        counts["valid_variant"] += 1
      else:
        problems.append(f"{label}: exit 0 but the output differs from the intact directory's")
    else:
      lines = err.splitlines()
      if len(lines) == 1 and lines[0].startswith(f"rmjax.{tool.name}: error: ") and str(copy) in lines[0]:
        counts["errors"] += 1
      else:
        problems.append(f"{label}: exit {rc} with stderr {err[-600:]!r}")
    shutil.rmtree(case)
  counts["broken"] = len(problems)
  where = f"{tool.source.name}/{tool.target}"
  COUNTS[f"{tool.name} {where}"] = counts
  summary = (f"{tool.name} on {where}: {counts['tried']} mutations, "
             f"{counts['errors']} one-line errors, {counts['harmless']} harmless, {len(problems)} broken")
  print("\n" + summary)
  assert not problems, summary + "\n" + "\n".join(problems)
  assert counts["errors"] > counts["tried"] // 3, summary  # most mutations must matter
  return counts


@pytest.fixture(scope="module", autouse=True)
def _report():
  yield
  total = sum(COUNTS.values(), collections.Counter())
  print(f"\ndirectory fuzz: {total['tried']} mutated directories, {total['errors']} one-line errors, "
        f"{total['harmless']} harmless, {total['broken']} broken")


# -- the valid directories --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
  d = tmp_path_factory.mktemp("dirfuzz")
  base = R.make_base(d / "base")
  R.make_run(d / "run", base, mode="lora", base_name="demo", seed=3)  # export holds its own base
  spec = load_spec_file(str(ROOT / "specs" / "demo.py"))
  spec.data.eval_batch_size = 8
  spec.data.synthetic.train_records, spec.data.synthetic.test_records = 8, 16
  spec.data.prm800k.path = source_config(spec, "prm800k", d / "prm")["path"]  # outside the run dir
  (d / "run" / "logs").mkdir()
  (d / "run" / "logs" / "config.json").write_text(json.dumps(spec_to_dict(spec)))
  export.export(d / "run", d / "export")
  inp = d / "in.jsonl"
  inp.write_text("".join(json.dumps(r) + "\n" for r in INPUT))
  return d, inp


def _scores(scratch: pathlib.Path) -> list:
  return [json.loads(x)["step_scores"] for x in (scratch / "out.jsonl").read_text().splitlines()]


def _close(a: list, b: list) -> bool:
  return len(a) == len(b) and all(np.allclose(x, y, rtol=0, atol=1e-6) for x, y in zip(a, b))


def _score_tool(world, source: pathlib.Path, target: str) -> Tool:
  _, inp = world
  return Tool("score", source, target,
              lambda t, s: score.main(["--checkpoint", str(t), "--input", str(inp), "--output", str(s / "out.jsonl")]),
              _scores, _close)


def _tensors(export_dir: pathlib.Path) -> dict[str, np.ndarray]:
  out = {}
  for f in sorted(export_dir.rglob("*.safetensors")):
    out |= {f"{f.relative_to(export_dir)}:{k}": v for k, v in load_file(str(f)).items()}
  return out


def _same_tensors(a: dict, b: dict) -> bool:
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_score_run_dir(world, tmp_path, capfd):
  d, _ = world
  fuzz(_score_tool(world, d / "run", ""), CASES, 1, tmp_path, capfd)


def test_score_checkpoint_step_dir(world, tmp_path, capfd):
  d, _ = world
  fuzz(_score_tool(world, d / "run", STEP), CASES, 2, tmp_path, capfd)


def test_score_export_dir_in_torch(world, tmp_path, capfd):
  d, _ = world
  fuzz(_score_tool(world, d / "export", ""), CASES, 3, tmp_path, capfd)


@pytest.mark.parametrize("target", ["", STEP])
def test_export(world, tmp_path, capfd, target):
  d, _ = world
  tool = Tool("export", d / "run", target,
              lambda t, s: export.main(["--checkpoint", str(t), "--output", str(s / "ex")]),
              lambda s: _tensors(s / "ex"), _same_tensors)
  fuzz(tool, CASES, 4 + bool(target), tmp_path, capfd)


def test_evaluate(world, tmp_path, capfd):
  d, _ = world

  def metrics(scratch):
    return json.loads((scratch / "ev" / "eval_metrics.json").read_text())["overall"]
  tool = Tool("evaluate", d / "run", "",
              lambda t, s: evaluate.main(["--checkpoint", str(t), "--output", str(s / "ev"), "--max-eval-batches", "1"]),
              metrics, lambda a, b: a == b, may_change=("logs/config.json",))
  fuzz(tool, CASES, 6, tmp_path, capfd)


def test_convert(world, tmp_path, capfd):
  d, _ = world

  def params(scratch):
    return convert.load_converted(scratch / "conv")[0]

  def same(a, b):
    from flax import traverse_util
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    return fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)
  tool = Tool("convert", d / "base", "",
              lambda t, s: convert.main(["--model", str(t), "--output", str(s / "conv")]), params, same)
  fuzz(tool, CASES, 7, tmp_path, capfd)


@pytest.mark.parametrize("tool", ["export", "score"])
def test_a_damaged_array_file_is_one_line_from_the_process(world, tmp_path, tool):
  """The whole process's stderr, exit included: orbax leaves the other arrays' reads and
  tensorstore's callbacks behind when an array's file is cut short; they must print nothing
  after rmjax's line (rmjax/background_errors.py). Every data file is cut, so reads fail while
  others are still pending. export restores the weights alone, score through the run's
  Checkpointer."""
  d, inp = world
  run = tmp_path / "run"
  shutil.copytree(d / "run", run)
  for data in (run / STEP / "state").glob("ocdbt.process_*/d/*"):
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
  args = {"export": ["--output", str(tmp_path / "ex")],
          "score": ["--input", str(inp), "--output", str(tmp_path / "out.jsonl")]}[tool]
  proc = subprocess.run([sys.executable, "-m", f"rmjax.{tool}", "--checkpoint", str(run), *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  lines = proc.stderr.splitlines()
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
  assert lines[0].startswith(f"rmjax.{tool}: error: corrupt or unreadable checkpoint {run / STEP}: "), lines[0]
  assert "Error reading" in lines[0] and "TensorStore({" not in lines[0], lines[0]


def test_a_checkpoint_without_its_tree_metadata_is_one_line_from_the_process(world, tmp_path):
  """state/ without its manifest: the metadata read fails while tensorstore still has callbacks
  for orbax's event loop, which printed "Event loop is closed" tracebacks after rmjax's line in
  most runs until the read went through rmjax/background_errors.py like every other."""
  d, inp = world
  run = tmp_path / "run"
  shutil.copytree(d / "run", run)
  (run / STEP / "state" / "manifest.ocdbt").unlink()
  proc = subprocess.run([sys.executable, "-m", "rmjax.score", "--checkpoint", str(run), "--input", str(inp),
                         "--output", str(tmp_path / "out.jsonl")], cwd=ROOT, capture_output=True, text=True, timeout=300)
  lines = proc.stderr.splitlines()
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
  assert lines[0] == (f"rmjax.score: error: corrupt or unreadable checkpoint {run / STEP}: state/ has no readable "
                      "tree metadata (_METADATA missing or broken)"), lines[0]
