#!/usr/bin/env bash
# The GPU figures BUILD.md's Results still lacks, in one run on one GPU (H100 80GB in mind).
#
# Why it exists: GPU time is lent in short slots (about 10 minutes per command), so the open
# measurements of the performance issue are prepared here, each bounded by `timeout`, each
# printing the benchmark's own JSON lines into $OUT (default ./gpu-out):
#   1. full fine-tuning, best known setting (bf16 Adam moments, dots_with_no_batch_dims_saveable)
#   2. LoRA without remat, and with the same lighter policy: LoRA tokens/s vs full (target 1.4x)
#      and LoRA peak device memory (target 16 GB at batch 4, full remat measured 18.0 GB before)
#   3. packing vs padded rows on the 4B shape (target 2x supervised markers/s)
#   4. a profile summary of the full step (where the GPU time goes)
# Usage (repository root, jax[cuda12] + the project installed or on PYTHONPATH):
#   OUT=/tmp/gpu-out bash rmjax/bench/gpu_checks.sh
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
BASE=(--preset qwen3-4b --seq-len 2048 --batch 4 --impl rmjax --steps 5 --warmup 2 --no-flops)
run() {  # run NAME SECONDS COMMAND...: JSON lines to $OUT/NAME.jsonl, stderr tail to $OUT/NAME.err
  local name=$1 limit=$2; shift 2
  echo "== $name: $*" >&2
  timeout "$limit" "$@" > "$OUT/$name.jsonl" 2> "$OUT/$name.err"
  echo "   rc=$? $(grep -c '^{' "$OUT/$name.jsonl") records" >&2
}
run full_dots 150 python -m rmjax.bench "${BASE[@]}" --mode full --opt-state-dtype bfloat16 \
  --remat-policy dots_with_no_batch_dims_saveable --profile "$OUT/trace"
run lora_none 120 python -m rmjax.bench "${BASE[@]}" --mode lora --remat-policy none
run lora_dots 120 python -m rmjax.bench "${BASE[@]}" --mode lora --remat-policy dots_with_no_batch_dims_saveable
run packing 150 python -m rmjax.bench.packing --preset qwen3-4b --row 2048 --examples 96 --batch 4 --mode lora
rm -rf "$OUT/trace"  # the summary is in full_dots.jsonl; the raw trace is large
