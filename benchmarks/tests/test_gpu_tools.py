"""Tests of the GPU measurement tools: `benchmarks/gpu_checks.sh` and `python -m benchmarks.gpu_summary`."""

import json
import pathlib
import subprocess

import pytest

from benchmarks.tests import json_lines


ROOT = pathlib.Path(__file__).resolve().parents[2]


def _gpu_checks_env(tmp_path: pathlib.Path) -> dict[str, str]:
  """The suite's environment less its fake device count (one CPU device, as a user has)."""
  import os
  from _xla_env import subprocess_flags
  return dict(os.environ) | {"XLA_FLAGS": subprocess_flags(None),
    "SMOKE": "1", "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"),
    "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}


def test_gpu_checks_refuses_a_work_folder_it_did_not_make(tmp_path):
  """gpu_checks.sh empties $WORK before its checks; a folder holding files it did not write (no
  mark of an earlier run) is refused in one line, untouched, before any check runs."""
  (tmp_path / "work").mkdir()
  (tmp_path / "work" / "notes.txt").write_text("mine")
  proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_checks.sh"), "full_dots"], cwd=ROOT,
                        env=_gpu_checks_env(tmp_path), capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "holds files this script did not write" in proc.stderr
  assert (tmp_path / "work" / "notes.txt").read_text() == "mine" and not (tmp_path / "out" / "gpu_checks.tgz").exists()


@pytest.mark.slow
def test_prepared_gpu_checks_run_end_to_end_on_tiny_shapes(tmp_path):
  """A check that breaks on the GPU wastes scarce device time, so SMOKE=1 runs the checks on tiny
  shapes: one of each kind of command (the bench with a profile, like torch's settings; torch;
  packing; attention; the loop; a shipped spec's loop with auto timing and one without, as the
  prepared GPU command runs them; the other checks differ from these only in bench flags,
  spec keys or XLA_FLAGS). Each must leave its JSON records (the loop its data_wait.json) in the
  one tarball, and nothing of an earlier run in its work folder (a stale record, a loop run to
  resume) may reach it."""
  import tarfile
  env = _gpu_checks_env(tmp_path)
  work = tmp_path / "work"
  (work / "run" / "demo-lora" / "logs").mkdir(parents=True)
  (work / "run" / "demo-lora" / "logs" / "metrics.jsonl").write_text('{"step": 40, "train/data_wait_frac": 0.5}\n')
  (work / "stale_check.jsonl").write_text('{"impl": "rmjax", "tokens_per_s": 1.0}\n')
  (work / ".gpu-checks-work").touch()  # an earlier run's folder, as the script marks it
  checks = ("loop", "full_spec_loop_timed", "lora_spec_loop", "packing", "full_remat", "torch_full", "full_dots",
            "attention")
  proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_checks.sh"), *checks], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  started = [line.split()[1] for line in proc.stderr.splitlines() if line.startswith("== ") and "(at " in line]
  assert started == list(checks)
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_checks.tgz"]  # no .partial left
  with tarfile.open(tmp_path / "out" / "gpu_checks.tgz") as tar:
    names = set(tar.getnames())
    assert "./stale_check.jsonl" not in names and "./.gpu-checks-work" not in names
    for check in checks[1:]:  # the loop leaves data_wait.json
      assert f"./{check}.jsonl" in names, check
      records = [json.loads(line) for line in tar.extractfile(f"./{check}.jsonl").read().decode().splitlines()
                 if line.startswith("{")]
      assert records and not any("error" in r for r in records), (check, records)
    waits = json.loads(tar.extractfile("./data_wait.json").read())
  assert waits["steps"] and len(waits["device_idle_frac"]) == len(waits["steps"]) and waits["skipped_lines"] == 0
  assert all(x is not None for x in waits["device_idle_max_frac"] + waits["dispatch_ms"])  # the meter's both ends
  assert 40 not in waits["steps"]  # the stale run's metrics were not appended to
  assert "skipped" not in proc.stderr
  # the summary reads this tarball's real records (on a CPU: no MFU, no verdicts)
  from benchmarks import gpu_summary
  rows = {r["target"]: r for r in gpu_summary.summarise(gpu_summary.read_tarball(str(tmp_path / "out" / "gpu_checks.tgz")))}
  assert rows["full_mfu"]["check"] in gpu_summary.FULL_CHECKS and all(r["held"] is None for r in rows.values())
  assert rows["full_over_torch"]["rmjax"] == {"remat_policy": "full", "opt_state_dtype": "float32"}
  assert rows["full_over_torch"]["value"] > 0 and rows["full_fastest_over_torch"]["value"] > 0
  assert rows["device_idle"]["windows"] == len([x for x in waits["device_idle_frac"] if x is not None])
  assert {"packing:packed", "packing:packed_cudnn_packed"} <= set(rows)
  assert rows["data_wait"]["windows"] == len(waits["steps"])
  # the spec loops: each loop's ratio to its bare step, and auto's pick timed against the old default
  assert rows["spec_loop:lora_spec_loop"]["value"] > 0 and rows["spec_loop:full_spec_loop_timed"]["value"] > 0
  assert all(v > 0 for v in rows["spec_loop:lora_spec_loop"]["seconds_per_step"].values())  # read from the real record
  assert rows["spec_auto_order"]["value"] > 0 and rows["spec_auto_order"]["old_default"] == {"remat": "full", "scan_unroll": 1}



def _write_tarball(path: pathlib.Path, files: dict[str, str]) -> str:
  """A gpu_checks.sh-like tarball ("./NAME" members) holding these texts."""
  import io
  import tarfile
  with tarfile.open(path, "w:gz") as tar:
    for name, text in files.items():
      data = text.encode()
      info = tarfile.TarInfo(f"./{name}")
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return str(path)


def _summary_files(device: str) -> dict[str, str]:
  """Hand-written records of the checks (numbers chosen here, not measured), as JSON lines."""
  full = {"impl": "rmjax", "mode": "full", "batch": 4, "device": device, "opt_state_dtype": "bfloat16"}
  records = {
    "full_dots": [full | {"tokens_per_s": 15000.0, "mfu": 0.44, "peak_mem_mb": 62000.0}],
    "full_unrolled": [full | {"tokens_per_s": 16000.0, "mfu": 0.47, "peak_mem_mb": 60000.0}],
    "full_remat": [full | {"tokens_per_s": 12000.0, "mfu": 0.35, "opt_state_dtype": "float32",
                           "remat_policy": "full"}],
    "full_dots_cublas": [{"impl": "rmjax", "mode": "full", "error": "RuntimeError: out of memory"}],
    "lora_dots_attn": [{"impl": "rmjax", "mode": "lora", "batch": 4, "tokens_per_s": 21000.0}],
    "lora_unrolled": [{"impl": "rmjax", "mode": "lora", "batch": 4, "tokens_per_s": 23000.0}],
    "lora_remat": [{"impl": "rmjax", "mode": "lora", "batch": 4, "tokens_per_s": 17000.0, "peak_mem_mb": 10659.0}],
    "torch_full": [{"impl": "torch", "mode": "full", "batch": 4, "tokens_per_s": 8000.0}, {"ratios": {}}],
    "full_spec": [full | {"batch": 16, "tokens_per_s": 11000.0, "peak_mem_mb": 69000.0, "opt_state_dtype": "float32"}],
    "packing": [{"layout": "unpacked"}, {"packed_over_unpacked_markers_per_s": 2.1,
                                         "packed_cudnn_packed_over_unpacked_markers_per_s": 1.9}],
    "attention": [{"variant": "segments", "ms": 3.0},
                  {"variant": "segments_cudnn_packed", "ms": 1.5, "max_abs_diff_out": 0.0078}],
  }
  return ({f"{name}.jsonl": "\n".join(map(json.dumps, rs)) for name, rs in records.items()}
          | {"data_wait.json": json.dumps({"data_wait_frac": [0.001, 0.003, None], "device_idle_frac": [0.01, 0.03, None],
                                           "device_idle_max_frac": [0.02, 0.3, None], "dispatch_ms": [5.0, 7.0, None]})})


def test_gpu_summary_reads_the_targets_from_one_tarball(tmp_path, capsys):
  """The best full and LoRA checks are picked by tokens/s, failed checks are left out, rmjax is
  compared with torch at torch's settings (full_remat), and each target says what it was computed
  from and whether it holds. A line cut short (a killed run) is skipped and counted, and the
  loop's run/ folder is not read (its metrics.jsonl is no check's records)."""
  from benchmarks import gpu_summary
  files = _summary_files("NVIDIA H100 80GB HBM3")
  files["lora_unrolled.jsonl"] += '\n{"impl": "rmjax", "mode": "lo'
  files["run/demo-lora/logs/metrics.jsonl"] = '{"step": 2, "train/loss": 0.2}\n{"step": 4, "tra'
  assert gpu_summary.main([_write_tarball(tmp_path / "gpu_checks.tgz", files)]) == 0
  out, err = capsys.readouterr()
  rows = {r["target"]: r for r in json_lines(out)}
  assert "lora_unrolled.jsonl: 1 record line(s) that are not JSON skipped" in err and "not judged" not in err
  assert (rows["full_mfu"]["value"], rows["full_mfu"]["held"], rows["full_mfu"]["check"]) == (0.47, True, "full_unrolled")
  like = rows["full_over_torch"]
  assert like["value"] == pytest.approx(1.5) and like["held"] and like["checks"] == ["full_remat", "torch_full"]
  assert like["rmjax"] == {"remat_policy": "full", "opt_state_dtype": "float32"}
  fastest = rows["full_fastest_over_torch"]
  assert fastest["value"] == pytest.approx(2.0) and fastest["held"] is None
  assert fastest["checks"] == ["full_unrolled", "torch_full"]
  assert rows["lora_over_full"]["value"] == pytest.approx(23000 / 16000) and rows["lora_over_full"]["held"]
  assert rows["lora_over_full"]["checks"] == ["lora_unrolled", "full_unrolled"]
  assert (rows["lora_peak_mb"]["value"], rows["lora_peak_mb"]["held"]) == (10659.0, True)
  assert [f["check"] for f in rows["full_fits"]["value"]] == ["full_dots", "full_unrolled", "full_remat"]
  assert (rows["packing:packed"]["held"], rows["packing:packed_cudnn_packed"]["held"]) == (True, False)
  assert (rows["full_spec_fits"]["value"], rows["full_spec_fits"]["held"]) == (69000.0, True)
  assert (rows["data_wait"]["value"], rows["data_wait"]["held"]) == (pytest.approx(0.002), True)
  idle = rows["device_idle"]  # idle for certain under 5%, at most over it: not settled
  assert (idle["value"], idle["max"], idle["dispatch_ms"], idle["held"], idle["windows"]) == (
    pytest.approx(0.02), pytest.approx(0.16), pytest.approx(6.0), None, 2)
  packed = rows["packed_attention:segments_cudnn_packed"]
  assert (packed["value"], packed["ms_masked"], packed["faster_than_mask"], packed["max_abs_diff_out"]) == (
    1.5, 3.0, True, 0.0078)
  assert {r["device"] for r in rows.values()} == {"NVIDIA H100 80GB HBM3"}
  assert all(r["skipped_lines"] == {"lora_unrolled.jsonl": 1} and "not_judged" not in r for r in rows.values())
  assert gpu_summary.main([str(tmp_path / "missing.tgz")]) == 2


@pytest.mark.parametrize("device", ["NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA A100-SXM4-80GB", "cpu"])
def test_gpu_summary_judges_the_targets_on_an_h100_sxm_only(tmp_path, capsys, device):
  """The benchmark targets are an H100 SXM's: the same records from another device give the
  figures with no verdict, and say why. The shipped specs' rows are judged on an H200 too."""
  from benchmarks import gpu_summary
  assert gpu_summary.judged_device("NVIDIA H100 80GB HBM3") and not gpu_summary.judged_device(None)
  files = _summary_files(device) | {"full_spec_loop.jsonl": json.dumps(
    {"bench": "loop", "device": device, "step_tokens_per_s": 16000.0, "loop_over_step": 0.99, "step_mfu": 0.46})}
  assert gpu_summary.main([_write_tarball(tmp_path / "gpu_checks.tgz", files)]) == 0
  out, err = capsys.readouterr()
  rows = {r["target"]: r for r in json_lines(out)}
  assert rows["full_mfu"]["value"] == 0.47 and rows["full_over_torch"]["value"] == pytest.approx(1.5)
  bench_rows = [r for name, r in rows.items() if not name.startswith("spec_")]
  assert all(r["held"] is None and device in r["not_judged"] for r in bench_rows)
  assert err.startswith("note: not judged") and "the targets are an H100 SXM's" in err and len(err.splitlines()) == 1
  spec = (rows["spec_full_mfu"], rows["spec_loop:full_spec_loop"])
  if device == "NVIDIA H200":
    assert [(r["value"], r["held"], "not_judged" in r) for r in spec] == [(0.46, True, False), (0.99, True, False)]
  else:
    assert all(r["held"] is None and device in r["not_judged"] and "H200" in r["not_judged"] for r in spec)


@pytest.mark.parametrize("loop, held", [
  ({"device_idle_frac": [0.01, 0.02], "device_idle_max_frac": [0.03, 0.04]}, True),  # at most under 5%
  ({"device_idle_frac": [0.06, 0.08], "device_idle_max_frac": [0.2, 0.3]}, False),  # for certain over it
])
def test_gpu_summary_judges_device_idle_by_its_bounds(tmp_path, loop, held):
  assert _loop_summary(tmp_path, loop)["device_idle"]["held"] is held


def _loop_summary(tmp_path: pathlib.Path, loop: dict) -> dict[str, dict]:
  """gpu_summary's rows for a tarball of this data_wait.json and one H100 record (the device)."""
  from benchmarks import gpu_summary
  files = {"data_wait.json": json.dumps(loop),
           "full_dots.jsonl": json.dumps({"impl": "rmjax", "mode": "full", "device": "NVIDIA H100 80GB HBM3"})}
  rows = gpu_summary.summarise(gpu_summary.read_tarball(_write_tarball(tmp_path / "gpu_checks.tgz", files)))
  return {r["target"]: r for r in rows}


def test_gpu_summary_full_spec_out_of_memory_is_not_held(tmp_path):
  from benchmarks import gpu_summary
  oom = {"impl": "rmjax", "mode": "full", "device": "NVIDIA H100 80GB HBM3",
         "error": "XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17.60GiB."}
  rows = gpu_summary.summarise(gpu_summary.read_tarball(_write_tarball(
    tmp_path / "gpu_checks.tgz", {"full_spec.jsonl": json.dumps(oom)})))
  spec = next(r for r in rows if r["target"] == "full_spec_fits")
  assert (spec["value"], spec["held"]) == (None, False)


def test_gpu_summary_packing_ratios_from_the_layout_lines_when_the_ratio_line_is_missing(tmp_path):
  """A packing run cut off (or failing) after some layouts still gives the ratios it measured."""
  from benchmarks import gpu_summary
  lines = [{"layout": "unpacked", "markers_per_s": 100.0}, {"layout": "packed", "markers_per_s": 230.0},
           {"layout": "packed_cudnn_packed", "error": "RuntimeError: cuDNN refused"}]
  files = {"packing.jsonl": "\n".join(map(json.dumps, lines))}
  rows = gpu_summary.summarise(gpu_summary.read_tarball(_write_tarball(tmp_path / "gpu_checks.tgz", files)))
  packing = [r for r in rows if r["target"].startswith("packing")]
  assert [(r["target"], r["value"]) for r in packing] == [("packing:packed", pytest.approx(2.3))]


def test_data_wait_skips_lines_that_are_not_json(tmp_path):
  """gpu_checks.sh loop reads the loop's metrics.jsonl through gpu_summary.data_wait: a line cut
  short by a killed run is skipped and counted, the first window (compilation) dropped."""
  from benchmarks import gpu_summary
  rows = [{"step": s, "train/data_wait_frac": 0.01 * s, "train/device_idle_frac": 0.02} for s in (2, 4, 6)]
  path = tmp_path / "metrics.jsonl"
  path.write_text("\n".join(map(json.dumps, [{"step": 1, "eval/mse": 0.3}, *rows])) + '\n{"step": 8, "train/da')
  waits = gpu_summary.data_wait(path)
  assert waits["steps"] == [4, 6] and waits["data_wait_frac"] == [0.04, 0.06] and waits["skipped_lines"] == 1
  assert gpu_summary.data_wait(tmp_path / "missing.jsonl")["steps"] == []


def test_gpu_summary_reads_the_shipped_specs_loops(tmp_path):
  """The spec loop checks give the shipped specs' figures: full's bare-step MFU, LoRA over full
  on the bare steps, and each loop's ratio to its bare step judged within 3% either way."""
  from benchmarks import gpu_summary
  device = "NVIDIA H100 80GB HBM3"
  segments = [{"loop_seconds_per_step_median": loop_s, "step_seconds_per_step_median": step_s}
              for loop_s, step_s in ((1.2, 1.0), (1.4, 1.1), (1.1, 1.3))]  # as bench --loop writes them
  loop = lambda step, ratio, mfu: {"bench": "loop", "device": device, "step_tokens_per_s": step,
                                   "loop_over_step": ratio, "step_mfu": mfu, "chosen": {"remat": "full"},
                                   "segments": segments}
  mlp, full = {"remat": "mlp_projections_saveable", "scan_unroll": 1}, {"remat": "full", "scan_unroll": 1}
  timed = loop(17000.0, 1.0, 0.46) | {"auto": {  # the order's pick 1.5 s a step, the old default 1.8 s
    "timed": True, "chosen": mlp, "order_pick": mlp, "old_default": full,
    "trials": [{"remat": "dots_with_no_batch_dims_saveable", "scan_unroll": 1, "fits": False},
               mlp | {"fits": True, "step_s": 1.5}, full | {"fits": True, "step_s": 1.8}]}}
  files = {"full_spec_loop.jsonl": json.dumps(loop(16000.0, 0.99, 0.44)),
           "lora_spec_loop.jsonl": json.dumps(loop(24000.0, 1.05, 0.41)),
           "full_spec_loop_bf16.jsonl": json.dumps({"bench": "loop", "error": "SpecError: x"}),
           "full_spec_loop_timed.jsonl": json.dumps(timed)}
  rows = {r["target"]: r for r in gpu_summary.summarise(gpu_summary.read_tarball(
    _write_tarball(tmp_path / "gpu_checks.tgz", files)))}
  assert (rows["spec_full_mfu"]["value"], rows["spec_full_mfu"]["held"]) == (0.44, False)
  assert rows["spec_full_mfu"]["chosen"] == {"remat": "full"}
  assert (rows["spec_lora_over_full"]["value"], rows["spec_lora_over_full"]["held"]) == (1.5, True)
  assert (rows["spec_loop:full_spec_loop"]["held"], rows["spec_loop:lora_spec_loop"]["held"]) == (True, False)
  assert rows["spec_loop:lora_spec_loop"]["seconds_per_step"] == {"loop": 1.2, "step": 1.1}
  assert (rows["spec_loop:full_spec_loop_bf16"]["value"], rows["spec_loop:full_spec_loop_bf16"]["held"]) == (None, None)
  order = rows["spec_auto_order"]
  assert (order["value"], order["held"], order["order_pick"], order["old_default"]) == (pytest.approx(1.2), True, mlp, full)
  untimed = {k: v for k, v in files.items() if k != "full_spec_loop_timed.jsonl"}
  rows = {r["target"]: r for r in gpu_summary.summarise(gpu_summary.read_tarball(
    _write_tarball(tmp_path / "untimed.tgz", untimed)))}
  assert (rows["spec_auto_order"]["value"], rows["spec_auto_order"]["held"]) == (None, None)
