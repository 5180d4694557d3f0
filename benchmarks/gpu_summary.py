"""`python -m benchmarks.gpu_summary gpu_checks.tgz`: the GPU figures read from one gpu_checks.sh tarball.

Why it exists: the GPU figures of BUILD.md's results table are ratios and maxima across several
checks of one gpu_checks.sh run, which must all come from that run (same machine). Reading them
by hand is where mistakes happen, so this reads the records and prints one JSON line per
figure: its value, the checks it came from, the target, and whether it holds (null when the
checks it needs are missing or failed). Figures:
  full_mfu             best full fine-tuning step's MFU >= 0.45
  full_over_torch      rmjax full fine-tuning with the reference's settings (full_remat: full
                       remat, float32 Adam moments) over the torch reference (torch_full) > 1
  lora_over_full       best LoRA step's tokens/s over the best full step's >= 1.4
  lora_peak_mb         LoRA with full remat (lora_remat): peak device memory <= 16 GB at batch 4
  full_fits            a full fine-tuning step ran at batch 4, no accumulation (its peak and Adam
                       moment dtype)
  full_spec_fits       specs/full.py's step (full_spec: 16 rows in one pass, float32 moments, full
                       remat) ran under the launcher's 0.9 memory fraction: its peak; false when it
                       ran out of memory
  packing              packed over unpacked supervised markers/s >= 2, per segment attention
  data_wait            mean train/data_wait_frac of the loop (first window dropped) < 0.05: the
                       host's time blocked on the next batch, which bounds the device's wait for
                       data from above (a batch ready when asked for delays no step)
  device_idle          the loop's device idle for any reason (train/device_idle.py), certain
                       (train/device_idle_frac) and at most (train/device_idle_max_frac) < 0.05
  packed_attention     cuDNN's packed layout against the masked call: max abs differences, ms
  spec_full_mfu        specs/full.py as a user runs it (full_spec_loop: bench --loop --spec): its
                       bare step's MFU on real tokens >= 0.45
  spec_lora_over_full  lora_spec_loop's bare step tokens/s over full_spec_loop's >= 1.4
  spec_loop:CHECK      each spec loop's loop_over_step within 3% of 1 (0.97 to 1.03), with the
                       loop's and the bare step's seconds a step: the median over the record's
                       segments of each segment's median time between step completions
  spec_auto_order      full_spec_loop_timed (auto timing one step of each candidate that fits):
                       the old default's step seconds over those of the cost order's pick, what
                       a run without auto_time takes, >= 1
and, not a target: full_fastest_over_torch, the best full step (bf16 moments, lighter remat)
over the same torch run, which is not like for like.
The targets are an H100 SXM's: on any other device (H100 PCIe or NVL included) a row's `held`
is null and `not_judged` says why; the spec_* rows are judged on an H200 as well
(judged_device). Only the tarball's top-level files are read (not the loop's run/ folder); a
record line that is not JSON (a run killed mid-line) is skipped and counted, on stderr and in
the rows' `skipped_lines`.
"""

from __future__ import annotations

import json
import pathlib
import statistics
import sys
import tarfile
from typing import Any, Sequence

from rmjax import cli

FULL_CHECKS = ("full_dots", "full_unrolled", "full_dots_cublas")
LORA_CHECKS = ("lora_dots_attn", "lora_unrolled", "lora_proj_attn", "lora_dots_attn_dsf")
LIKE_TORCH_CHECK = "full_remat"  # rmjax with torch_full's settings: full remat, float32 Adam moments
LORA_PEAK_LIMIT_MB = 16e9 / 2**20  # 16 GB; the bench reports MiB
PACKING_RATIO = "_over_unpacked_markers_per_s"
SPEC_LOOP_CHECKS = ("full_spec_loop", "lora_spec_loop", "full_spec_loop_bf16", "full_spec_loop_timed")
AUTO_TIMED_CHECK = "full_spec_loop_timed"  # full_spec_loop with model.auto_time: every fitting candidate timed


def parse_jsonl(text: str) -> tuple[list[dict[str, Any]], int]:
  """The records of the lines that start with "{", and how many of those are not JSON."""
  records, bad = [], 0
  for line in text.splitlines():
    if line.startswith("{"):
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        bad += 1
  return records, bad


def data_wait(metrics_path: str | pathlib.Path) -> dict[str, Any]:
  """The loop's data wait and device idle per logging window, from its metrics.jsonl (what
  gpu_checks.sh loop writes as data_wait.json); the first window, which includes compilation, is dropped."""
  path = pathlib.Path(metrics_path)
  records, bad = parse_jsonl(path.read_text()) if path.exists() else ([], 0)
  rows = [r for r in records if "train/data_wait_frac" in r][1:]
  return ({key: [r.get(f"train/{key}") for r in rows]
           for key in ("data_wait_frac", "device_idle_frac", "device_idle_max_frac", "dispatch_ms", "data_read_ms",
                       "data_place_ms", "tokens_per_s")}
          | {"steps": [r.get("step") for r in rows], "skipped_lines": bad})


def _present(values: list[Any] | None) -> list[Any]:
  """The values that are not None (a logging window that lacked the metric gives None)."""
  return [x for x in values or [] if x is not None]


def _mean_of(values: list[Any] | None) -> float | None:
  """The mean of the values that are not None (None when there are none)."""
  present = _present(values)
  return statistics.mean(present) if present else None


def read_tarball(path: str) -> dict[str, Any]:
  """{check name: its JSON records (list)}, {"data_wait": the loop's data_wait.json} and
  {"skipped_lines": {file: lines that are not JSON}}, from the tarball's top-level files only."""
  out: dict[str, Any] = {}
  skipped: dict[str, int] = {}
  with tarfile.open(path) as tar:
    for member in tar.getmembers():
      name = member.name.removeprefix("./")
      stream = tar.extractfile(member) if member.isfile() and "/" not in name else None
      if stream is None:
        continue
      text = stream.read().decode(errors="replace")
      if name.endswith(".jsonl"):
        out[name[:-len(".jsonl")]], bad = parse_jsonl(text)
      elif name == "data_wait.json" and text.strip():
        records, bad = parse_jsonl(text.strip())
        if records:
          out["data_wait"] = records[0]
      else:
        continue
      if bad:
        skipped[name] = bad
  return out | ({"skipped_lines": skipped} if skipped else {})


def judged_device(device: str | None, spec_loops: bool = False) -> bool:
  """Whether the targets apply to this device. The benchmark rows' targets were set for an H100
  SXM: an H100, not PCIe or NVL. The shipped specs' rows (`spec_loops`) are MFU against the
  device's own peak and ratios of runs on it: they are judged on an H200 too, whose dense bf16
  peak is the H100 SXM's (rmjax.bench.common.peak_flops); every row names its device."""
  name = (device or "").upper()
  h100_sxm = "H100" in name and "PCIE" not in name and "NVL" not in name
  return h100_sxm or (spec_loops and "H200" in name)


def _run_record(records: dict[str, Any], check: str) -> dict[str, Any] | None:
  """The check's benchmark record, if it ran without error."""
  rows = [r for r in records.get(check, []) if "tokens_per_s" in r and "error" not in r]
  return rows[-1] if rows else None


def _best(records: dict[str, Any], checks: Sequence[str]) -> tuple[str | None, dict[str, Any] | None]:
  found = [(c, r) for c in checks if (r := _run_record(records, c))]
  return max(found, key=lambda cr: cr[1]["tokens_per_s"]) if found else (None, None)


def _loop_record(records: dict[str, Any], check: str) -> dict[str, Any] | None:
  """The check's `bench --loop` record, if it ran without error."""
  rows = [r for r in records.get(check, []) if "loop_over_step" in r and "error" not in r]
  return rows[-1] if rows else None


def _seconds_per_step(record: dict[str, Any] | None) -> dict[str, float] | None:
  """{"loop", "step"}: the median over a loop record's segments of each one's median seconds a step."""
  segments = (record or {}).get("segments") or []
  if not segments:
    return None
  return {side: statistics.median(s[f"{side}_seconds_per_step_median"] for s in segments) for side in ("loop", "step")}


def _spec_rows(records: dict[str, Any]) -> list[dict[str, Any]]:
  """The shipped specs' figures from the spec loop checks (bench --loop --spec)."""
  full, lora = _loop_record(records, "full_spec_loop"), _loop_record(records, "lora_spec_loop")
  mfu = full and full.get("step_mfu")
  rows = [_target("spec_full_mfu", mfu, ">= 0.45", None if mfu is None else mfu >= 0.45, check="full_spec_loop",
                  chosen=full and full.get("chosen"))]
  ratio = lora["step_tokens_per_s"] / full["step_tokens_per_s"] if full and lora else None
  rows.append(_target("spec_lora_over_full", ratio, ">= 1.4", None if ratio is None else ratio >= 1.4,
                      checks=["lora_spec_loop", "full_spec_loop"]))
  for check in SPEC_LOOP_CHECKS:
    r = _loop_record(records, check)
    value = r and r["loop_over_step"]
    rows.append(_target(f"spec_loop:{check}", value, "0.97 to 1.03",
                        None if value is None else 0.97 <= value <= 1.03, check=check,
                        seconds_per_step=_seconds_per_step(r)))
  timed = _loop_record(records, AUTO_TIMED_CHECK)
  value = _order_pick_speedup(timed)
  rows.append(_target("spec_auto_order", value, ">= 1 (the cost order's pick no slower than the old default)",
                      None if value is None else value >= 1, check=AUTO_TIMED_CHECK,
                      **{k: timed and (timed.get("auto") or {}).get(k) for k in ("order_pick", "old_default", "chosen")}))
  return rows


def _order_pick_speedup(record: dict[str, Any] | None) -> float | None:
  """The old default's step seconds over those of auto's cost-order pick, from a loop record
  whose auto settings were timed (`model.auto_time`); None where either was not timed."""
  auto = (record or {}).get("auto") or {}
  if not auto.get("timed"):
    return None
  seconds = {(t["remat"], t["scan_unroll"]): t.get("step_s") for t in auto["trials"]}
  key = lambda c: (c["remat"], c["scan_unroll"])
  pick, old = seconds.get(key(auto["order_pick"])), seconds.get(key(auto["old_default"]))
  return old / pick if pick and old else None


def _target(name: str, value: Any, target: str, held: bool | None, **source: Any) -> dict[str, Any]:
  return {"target": name, "value": value, "wanted": target, "held": held, **source}


def _packing_ratios(records: list[dict[str, Any]]) -> dict[str, float]:
  """{packed layout: markers/s over the unpacked layout's}: the bench's ratio lines, else (a run
  cut off before its ratio line) computed from the per-layout lines."""
  by_layout = {r["layout"]: r["markers_per_s"] for r in records if r.get("markers_per_s") and "layout" in r}
  unpacked = by_layout.pop("unpacked", None)
  ratios = {name: value / unpacked for name, value in by_layout.items()} if unpacked else {}
  for r in records:
    ratios |= {k.removesuffix(PACKING_RATIO): v for k, v in r.items() if k.endswith(PACKING_RATIO)}
  return ratios


def summarise(records: dict[str, Any]) -> list[dict[str, Any]]:
  rows = []
  full_check, full = _best(records, FULL_CHECKS)
  lora_check, lora = _best(records, LORA_CHECKS)
  like_torch = _run_record(records, LIKE_TORCH_CHECK)
  torch = _run_record(records, "torch_full")
  device = next((r["device"] for rs in records.values() if isinstance(rs, list) for r in rs if r.get("device")),
                None)
  mfu = full and full.get("mfu")
  rows.append(_target("full_mfu", mfu, ">= 0.45", None if mfu is None else mfu >= 0.45, check=full_check))
  ratio = like_torch["tokens_per_s"] / torch["tokens_per_s"] if like_torch and torch else None
  rows.append(_target("full_over_torch", ratio, "> 1", None if ratio is None else ratio > 1,
                      checks=[LIKE_TORCH_CHECK, "torch_full"],
                      rmjax={k: like_torch.get(k) for k in ("remat_policy", "opt_state_dtype")} if like_torch else None))
  ratio = full["tokens_per_s"] / torch["tokens_per_s"] if full and torch else None
  rows.append(_target("full_fastest_over_torch", ratio,
                      "not a target: rmjax's fastest full step against torch with full remat and float32 moments",
                      None, checks=[full_check, "torch_full"]))
  ratio = lora["tokens_per_s"] / full["tokens_per_s"] if full and lora else None
  rows.append(_target("lora_over_full", ratio, ">= 1.4", None if ratio is None else ratio >= 1.4,
                      checks=[lora_check, full_check]))
  remat = _run_record(records, "lora_remat")
  peak = remat and remat.get("peak_mem_mb")
  rows.append(_target("lora_peak_mb", peak, f"<= {LORA_PEAK_LIMIT_MB:.0f} (16 GB)",
                      None if peak is None else peak <= LORA_PEAK_LIMIT_MB, check="lora_remat",
                      batch=remat and remat.get("batch")))
  fits = [(c, r) for c in (*FULL_CHECKS, LIKE_TORCH_CHECK)
          if (r := _run_record(records, c)) and r.get("batch") == 4 and r.get("grad_accum", 1) == 1]
  rows.append(_target("full_fits", [{"check": c, "peak_mem_mb": r.get("peak_mem_mb"),
                                     "opt_state_dtype": r.get("opt_state_dtype")} for c, r in fits],
                      "a full step at batch 4", bool(fits) or None))
  spec_run, spec_lines = _run_record(records, "full_spec"), records.get("full_spec", [])
  spec_oom = any("RESOURCE_EXHAUSTED" in str(r.get("error", "")) for r in spec_lines)
  rows.append(_target("full_spec_fits", spec_run and spec_run.get("peak_mem_mb"), "specs/full.py's step runs",
                      True if spec_run else False if spec_oom else None, check="full_spec"))
  ratios = _packing_ratios(records.get("packing", []))
  for key, value in ratios.items():
    rows.append(_target(f"packing:{key}", value, ">= 2", value >= 2, check="packing"))
  if not ratios:
    rows.append(_target("packing", None, ">= 2", None, check="packing"))
  loop = records.get("data_wait", {})
  wait = _mean_of(loop.get("data_wait_frac"))
  rows.append(_target("data_wait", wait, "< 0.05", None if wait is None else wait < 0.05, check="loop",
                      windows=len(_present(loop.get("data_wait_frac")))))
  idle, idle_max = _mean_of(loop.get("device_idle_frac")), _mean_of(loop.get("device_idle_max_frac"))
  held = True if idle_max is not None and idle_max < 0.05 else False if idle is not None and idle >= 0.05 else None
  rows.append(_target("device_idle", idle, "< 0.05", held, check="loop", max=idle_max,
                      dispatch_ms=_mean_of(loop.get("dispatch_ms")),
                      windows=len(_present(loop.get("device_idle_frac")))))
  spec_rows = _spec_rows(records)
  attention = {r.get("variant"): r for r in records.get("attention", []) if "variant" in r}
  for variant in ("segments_cudnn_packed", "segments_cudnn_packed_tight"):
    r = attention.get(variant)
    diffs = {k: v for k, v in (r or {}).items() if k.startswith("max_abs_diff_")}
    masked_ms = attention.get("segments", {}).get("ms")
    ms = r and r.get("ms")
    rows.append(_target(f"packed_attention:{variant}", ms, "equal to bf16 rounding (judge the diffs), faster",
                        None, check="attention", ms_masked=masked_ms,
                        faster_than_mask=ms < masked_ms if ms and masked_ms else None,
                        unavailable=(r or {}).get("unavailable"), error=(r or {}).get("error"), **diffs))
  shared = {"device": device} | ({"skipped_lines": records["skipped_lines"]} if "skipped_lines" in records else {})
  def verdict(spec_loops: bool) -> dict[str, Any]:
    if judged_device(device, spec_loops):
      return {}
    whose = "an H100 SXM's or an H200's" if spec_loops else "an H100 SXM's"
    return {"held": None, "not_judged": f"the targets are {whose}; these records' device is {device!r}"}
  return [r | shared | verdict(False) for r in rows] + [r | shared | verdict(True) for r in spec_rows]


def main(argv: Sequence[str] | None = None) -> int:
  p = cli.ArgumentParser(prog="python -m benchmarks.gpu_summary", description=__doc__.split("\n\n")[0])
  p.add_argument("tarball", help="gpu_checks.tgz as gpu_checks.sh writes it")
  args = p.parse_args(argv)
  try:
    records = read_tarball(args.tarball)
  except (OSError, tarfile.TarError) as e:
    return cli.report("benchmarks.gpu_summary", f"cannot read {args.tarball}: {cli.first_line(e)}")
  for name, count in records.get("skipped_lines", {}).items():
    print(f"warning: {args.tarball}: {name}: {count} record line(s) that are not JSON skipped", file=sys.stderr)
  rows = summarise(records)
  unjudged = [r for r in rows if "not_judged" in r]
  if unjudged:
    which = "" if len(unjudged) == len(rows) else f" ({len(unjudged)} of {len(rows)} rows)"
    print(f"note: not judged{which}: {unjudged[0]['not_judged']}", file=sys.stderr)
  for row in rows:
    print(json.dumps(row), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
