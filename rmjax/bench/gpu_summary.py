"""`python -m rmjax.bench.gpu_summary gpu_checks.tgz`: #7's GPU targets read from one gpu_checks.sh tarball.

Why it exists: a lent GPU command returns one tarball of benchmark records (bench/gpu_checks.sh),
and the figures the performance issue asks for are ratios and maxima across several of its
checks, all of which must come from that same command (same machine, same session). Reading
them by hand after a short loan is where mistakes happen, so this reads the records and prints
one JSON line per target: the figure, where it came from, the target, and whether it holds
(null when the checks it needs are missing or failed). Targets (issue 7, GPU part):
  full_mfu             best full fine-tuning step's MFU >= 0.45
  full_over_torch      that step's tokens/s over the torch reference's (torch_full) > 1
  lora_over_full       best LoRA step's tokens/s over the best full step's >= 1.4
  lora_peak_mb         LoRA with full remat (lora_remat): peak device memory <= 16 GB at batch 4
  full_fits            a full fine-tuning step ran at batch 4 (its peak and Adam moment dtype)
  packing              packed over unpacked supervised markers/s >= 2, per segment attention
  device_idle          mean train/device_idle_frac of the loop (first window dropped) < 0.05
  packed_attention     cuDNN's packed layout against the masked call: max abs differences, ms
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tarfile
from typing import Any, Sequence

from rmjax.cli import first_line

FULL_CHECKS = ("full_dots", "full_unrolled", "full_dots_cublas")
LORA_CHECKS = ("lora_dots_attn", "lora_unrolled", "lora_proj_attn", "lora_dots_attn_dsf")
LORA_PEAK_LIMIT_MB = 16e9 / 2**20  # 16 GB; the bench reports MiB


def read_tarball(path: str) -> dict[str, Any]:
  """{check name: its JSON records (list)} and {"data_wait": the loop's data_wait.json}."""
  out: dict[str, Any] = {}
  with tarfile.open(path) as tar:
    for member in tar.getmembers():
      name = member.name.removeprefix("./")
      stream = tar.extractfile(member) if member.isfile() else None
      if stream is None:
        continue
      text = stream.read().decode(errors="replace")
      if name.endswith(".jsonl"):
        out[name[:-len(".jsonl")]] = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
      elif name == "data_wait.json" and text.strip():
        out["data_wait"] = json.loads(text)
  return out


def _run_record(records: dict[str, Any], check: str) -> dict[str, Any] | None:
  """The check's benchmark record, if it ran without error."""
  rows = [r for r in records.get(check, []) if "tokens_per_s" in r and "error" not in r]
  return rows[-1] if rows else None


def _best(records: dict[str, Any], checks: Sequence[str]) -> tuple[str | None, dict[str, Any] | None]:
  found = [(c, r) for c in checks if (r := _run_record(records, c))]
  return max(found, key=lambda cr: cr[1]["tokens_per_s"]) if found else (None, None)


def _target(name: str, value: Any, target: str, held: bool | None, **source: Any) -> dict[str, Any]:
  return {"target": name, "value": value, "wanted": target, "held": held, **source}


def summarise(records: dict[str, Any]) -> list[dict[str, Any]]:
  rows = []
  full_check, full = _best(records, FULL_CHECKS)
  lora_check, lora = _best(records, LORA_CHECKS)
  torch = _run_record(records, "torch_full")
  device = next((r["device"] for rs in records.values() if isinstance(rs, list) for r in rs if r.get("device")),
                None)
  mfu = full and full.get("mfu")
  rows.append(_target("full_mfu", mfu, ">= 0.45", None if mfu is None else mfu >= 0.45, check=full_check))
  ratio = full["tokens_per_s"] / torch["tokens_per_s"] if full and torch else None
  rows.append(_target("full_over_torch", ratio, "> 1", None if ratio is None else ratio > 1,
                      checks=[full_check, "torch_full"]))
  ratio = lora["tokens_per_s"] / full["tokens_per_s"] if full and lora else None
  rows.append(_target("lora_over_full", ratio, ">= 1.4", None if ratio is None else ratio >= 1.4,
                      checks=[lora_check, full_check]))
  remat = _run_record(records, "lora_remat")
  peak = remat and remat.get("peak_mem_mb")
  rows.append(_target("lora_peak_mb", peak, f"<= {LORA_PEAK_LIMIT_MB:.0f} (16 GB)",
                      None if peak is None else peak <= LORA_PEAK_LIMIT_MB, check="lora_remat",
                      batch=remat and remat.get("batch")))
  fits = [(c, r) for c in FULL_CHECKS if (r := _run_record(records, c)) and r.get("batch") == 4]
  rows.append(_target("full_fits", [{"check": c, "peak_mem_mb": r.get("peak_mem_mb"),
                                     "opt_state_dtype": r.get("opt_state_dtype")} for c, r in fits],
                      "a full step at batch 4", bool(fits) or None))
  ratios = next((r for r in records.get("packing", []) if any(k.endswith("_over_unpacked_markers_per_s") for k in r)),
                {})
  for key, value in ratios.items():
    rows.append(_target(f"packing:{key.removesuffix('_over_unpacked_markers_per_s')}", value, ">= 2", value >= 2,
                        check="packing"))
  if not ratios:
    rows.append(_target("packing", None, ">= 2", None, check="packing"))
  idle = [x for x in records.get("data_wait", {}).get("device_idle_frac", []) if x is not None]
  mean = statistics.mean(idle) if idle else None
  rows.append(_target("device_idle", mean, "< 0.05", None if mean is None else mean < 0.05, check="loop",
                      windows=len(idle)))
  attention = {r.get("variant"): r for r in records.get("attention", []) if "variant" in r}
  for variant in ("segments_cudnn_packed", "segments_cudnn_packed_tight"):
    r = attention.get(variant)
    diffs = {k: v for k, v in (r or {}).items() if k.startswith("max_abs_diff_")}
    masked_ms = attention.get("segments", {}).get("ms")
    ms = r and r.get("ms")
    rows.append(_target(f"packed_attention:{variant}", ms, "equal to bf16 rounding (judge the diffs), faster",
                        None, check="attention", ms_masked=masked_ms,
                        faster_than_mask=ms < masked_ms if ms and masked_ms else None,
                        unavailable=(r or {}).get("unavailable"), **diffs))
  return [r | {"device": device} for r in rows]


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m rmjax.bench.gpu_summary", description=__doc__.split("\n\n")[0])
  p.add_argument("tarball", help="gpu_checks.tgz as gpu_checks.sh writes it")
  args = p.parse_args(argv)
  try:
    records = read_tarball(args.tarball)
  except (OSError, tarfile.TarError, json.JSONDecodeError, UnicodeDecodeError) as e:
    print(f"error: cannot read {args.tarball}: {first_line(e)}", file=sys.stderr)
    return 2
  for row in summarise(records):
    print(json.dumps(row), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
