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
#   5. the training loop on a Qwen3-4B-shaped random backbone (the demo's synthetic PRM800K data,
#      packed rows of 2048): train/data_wait_frac, the share of step time spent waiting for data
# Usage (repository root, jax[cuda12] + the project installed or on PYTHONPATH):
#   OUT=/tmp/gpu-out bash rmjax/bench/gpu_checks.sh
# Step 5 needs grain, ml-collections and tensorboardX. A GPU machine without them and without
# PyPI gets them from a .wheels/ folder (git-ignored) prepared beforehand on a machine with PyPI:
#   for v in 3.10 3.11 3.12; do pip download grain ml-collections tensorboardX -d .wheels --only-binary=:all: \
#     --python-version $v --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64; done
#   rm .wheels/numpy-*    # numpy comes with jax; the rest is about 15 MB
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if ! python -c "import grain, ml_collections, tensorboardX" 2>/dev/null && [ -d .wheels ]; then
  pip install -q --no-index --find-links .wheels grain ml-collections tensorboardX
fi
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
SHAPE=(--spec.model.demo.hidden_size=2560 --spec.model.demo.num_layers=36 --spec.model.demo.num_heads=32
       --spec.model.demo.num_kv_heads=8 --spec.model.demo.head_dim=128 --spec.model.demo.intermediate_size=9728)
run loop_4b_shape 240 python -m rmjax.launch --spec specs/demo.py:lora --spec.output_dir="$OUT/run" "${SHAPE[@]}" \
  --spec.model.compute_dtype=bfloat16 --spec.model.frozen_dtype=bfloat16 --spec.model.remat=full \
  --spec.batch_size=4 --spec.grad_accum_steps=1 --spec.data.max_length=2048 "--spec.data.length_buckets=(1024, 2048)" \
  --spec.data.pack=True --spec.max_steps=60 --spec.eval_steps=0 --spec.save_steps=0 --spec.logging_steps=10 \
  "--spec.head.hidden_dims=(1024, 256)" --spec.lr=1e-4
python - "$OUT/run" > "$OUT/data_wait.json" <<'PY'
import json, pathlib, sys
rows = [json.loads(l) for l in (pathlib.Path(sys.argv[1]) / "demo-lora/logs/metrics.jsonl").read_text().splitlines()]
rows = [r for r in rows if "train/data_wait_frac" in r][1:]  # the first window includes compilation
print(json.dumps({"steps": [r["step"] for r in rows], "data_wait_frac": [r["train/data_wait_frac"] for r in rows],
                  "tokens_per_s": [r["train/tokens_per_s"] for r in rows]}))
PY
rm -rf "$OUT/run/demo-lora/checkpoints"
