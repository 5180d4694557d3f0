#!/usr/bin/env bash
# The GPU figures BUILD.md's Results still lacks, in two parts that each fit one lent command
# (about 10 minutes on an H100 80GB). A session's device time (15 minutes with the machine's
# start) may not hold both: run "bench" first, "data" with what is left.
#
# Why it exists: GPU time is lent in short slots, so the open measurements of the performance
# issue are prepared here, each bounded by `timeout`, each writing the benchmark's own JSON lines
# into $OUT (default ./gpu-out):
#   part "bench" (in order of value, so a cut-off call still brings back the first ones):
#     1. full fine-tuning, best known setting (bf16 Adam moments, dots_with_no_batch_dims_saveable),
#        with a profile summary of the step (where the GPU time goes)
#     2. LoRA saving dots and cuDNN attention outputs (the speed setting): LoRA tokens/s vs full
#        (target 1.4x). Compiled for an H100 it recomputes no matmul and no attention forward and
#        moves 431 GB per step (no remat: 522 GB; python -m rmjax.bench.traffic); peak 33 GB
#     3. LoRA with full remat: peak device memory at batch 4 (target 16 GB; compiled peak 10.4 GB
#        since the init draws the frozen base in bf16; 18.0 GB was measured before, the init's peak)
#     4. 1. with cuBLAS instead of XLA's Triton GEMM fusions (XLA_FLAGS). At 0.37 MFU (0.52 s per
#        step) the 545 GB the step moves would take about 0.16 s at full HBM bandwidth, so the
#        matmuls hold most of the step; the deviceless compile made them all Triton fusions (a
#        real GPU autotunes that choice, so this shows whether cuBLAS would do better)
#   part "data":
#     5. packing vs padded rows on the 4B shape (target 2x supervised markers/s)
#     6. the training loop on a Qwen3-4B-shaped random backbone (the demo's synthetic PRM800K data,
#        packed rows of 2048): train/data_wait_frac, the share of step time spent waiting for data
# Usage (repository root, jax[cuda12] + the project installed or on PYTHONPATH):
#   OUT=/tmp/gpu-out bash rmjax/bench/gpu_checks.sh bench
#   OUT=/tmp/gpu-out bash rmjax/bench/gpu_checks.sh data
#   SMOKE=1 OUT=/tmp/smoke bash rmjax/bench/gpu_checks.sh bench data   # tiny shapes, any CPU: checks the script
# Part "data" needs grain, ml-collections and tensorboardX. A GPU machine without them and
# without PyPI gets them from a .wheels/ folder (git-ignored) prepared on a machine with PyPI:
#   for v in 3.10 3.11 3.12; do pip download grain ml-collections tensorboardX -d .wheels --only-binary=:all: \
#     --python-version $v --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64; done
#   rm .wheels/numpy-*    # numpy comes with jax; the rest is about 15 MB
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
if [ "${SMOKE:-0}" = 1 ]; then
  PRESET=tiny SEQ=64 EXAMPLES=16 LOOP_STEPS=6 LOOP_SHAPE=() LOOP_LEN=128 LOOP_BUCKETS="(64, 128)"
else
  PRESET=qwen3-4b SEQ=2048 EXAMPLES=96 LOOP_STEPS=60 LOOP_LEN=2048 LOOP_BUCKETS="(1024, 2048)"
  LOOP_SHAPE=(--spec.model.demo.hidden_size=2560 --spec.model.demo.num_layers=36 --spec.model.demo.num_heads=32
              --spec.model.demo.num_kv_heads=8 --spec.model.demo.head_dim=128 --spec.model.demo.intermediate_size=9728)
fi
BASE=(--preset "$PRESET" --seq-len "$SEQ" --batch 4 --impl rmjax --steps 5 --warmup 2 --no-flops)

run() {  # run NAME SECONDS COMMAND...: stdout to $OUT/NAME.jsonl, stderr to $OUT/NAME.err
  local name=$1 limit=$2; shift 2
  echo "== $name: $*" >&2
  timeout "$limit" "$@" > "$OUT/$name.jsonl" 2> "$OUT/$name.err"
  echo "   rc=$? $(grep -c '^{' "$OUT/$name.jsonl") records" >&2
}

part_bench() {
  run full_dots 150 python -m rmjax.bench "${BASE[@]}" --mode full --opt-state-dtype bfloat16 \
    --remat-policy dots_with_no_batch_dims_saveable --profile "$OUT/trace"
  rm -rf "$OUT/trace"  # the summary is in full_dots.jsonl; the raw trace is large
  run lora_dots_attn 120 python -m rmjax.bench "${BASE[@]}" --mode lora --remat-policy dots_and_attention_saveable
  run lora_remat 120 python -m rmjax.bench "${BASE[@]}" --mode lora --remat
  XLA_FLAGS="--xla_gpu_enable_triton_gemm=false" run full_dots_cublas 150 python -m rmjax.bench "${BASE[@]}" \
    --mode full --opt-state-dtype bfloat16 --remat-policy dots_with_no_batch_dims_saveable
}

part_data() {
  if ! python -c "import grain, ml_collections, tensorboardX" 2>/dev/null && [ -d .wheels ]; then
    pip install -q --no-index --find-links .wheels grain ml-collections tensorboardX
  fi
  run packing 200 python -m rmjax.bench.packing --preset "$PRESET" --row "$SEQ" --examples "$EXAMPLES" --batch 4 --mode lora
  run loop 300 python -m rmjax.launch --spec specs/demo.py:lora --spec.output_dir="$OUT/run" "${LOOP_SHAPE[@]}" \
    --spec.model.compute_dtype=bfloat16 --spec.model.frozen_dtype=bfloat16 --spec.model.remat=full \
    --spec.batch_size=4 --spec.grad_accum_steps=1 --spec.data.max_length="$LOOP_LEN" \
    "--spec.data.length_buckets=$LOOP_BUCKETS" --spec.data.pack=True --spec.max_steps="$LOOP_STEPS" \
    --spec.eval_steps=0 --spec.save_steps=0 --spec.logging_steps=2 "--spec.head.hidden_dims=(1024, 256)" --spec.lr=1e-4
  python - "$OUT/run" > "$OUT/data_wait.json" <<'PY'
import json, pathlib, sys
rows = [json.loads(l) for l in (pathlib.Path(sys.argv[1]) / "demo-lora/logs/metrics.jsonl").read_text().splitlines()]
rows = [r for r in rows if "train/data_wait_frac" in r][1:]  # the first window includes compilation
print(json.dumps({"steps": [r["step"] for r in rows], "data_wait_frac": [r["train/data_wait_frac"] for r in rows],
                  "tokens_per_s": [r["train/tokens_per_s"] for r in rows]}))
PY
  rm -rf "$OUT/run/demo-lora/checkpoints"
}

for part in "$@"; do
  case "$part" in
    bench) part_bench ;;
    data) part_data ;;
    *) echo "gpu_checks.sh: unknown part '$part' (bench, data)" >&2; exit 2 ;;
  esac
done
