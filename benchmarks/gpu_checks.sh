#!/usr/bin/env bash
# The GPU measurements of BUILD.md's results table, as named checks under one deadline.
#
# Why it exists: GPU time comes in short slots, so the checks run in the order given, each
# bounded by `timeout` and by DEADLINE_S seconds from the start (a check that cannot start with
# 30 s left is skipped). Each writes the benchmark's own JSON lines (NAME.jsonl, stderr in
# NAME.err) into $WORK (default $OUT/../gpu-checks-work), which starts empty: an earlier run's
# files are deleted, and a folder holding files this script did not write (no .gpu-checks-work
# mark) is refused. After every check $WORK is packed into $OUT/gpu_checks.tgz (written as
# .partial, then renamed), so a run cut short still returns one whole tarball of what finished;
# `all` therefore runs first what gpu_summary.py reads. Checks (options below; figures in BUILD.md):
#   full_dots        full fine-tuning, bf16 Adam moments, dots_with_no_batch_dims_saveable, with a
#                    profile summary of the step (where the GPU time goes)
#   lora_dots_attn   LoRA saving dots and cuDNN attention outputs, in the layer loop
#   full_remat       full fine-tuning with torch_full's settings (full remat, float32 Adam moments):
#                    rmjax over torch like for like
#   full_unrolled    full fine-tuning, layer loop unrolled (--scan-unroll 0), dots and attention saved
#   lora_unrolled    LoRA, layer loop unrolled, no remat
#   attention        one layer of packed rows' attention, forward + backward: causal only, the
#                    segment mask, the mask without its unused gradient, cuDNN's packed layout
#                    with 40 slots and with as few as the rows need; ms and max abs differences
#   lora_proj_attn   LoRA saving each projection's output and cuDNN attention's
#   lora_dots_attn_dsf  lora_dots_attn with XLA's dynamic-slice fusion (XLA_FLAGS; in no group)
#   lora_remat       LoRA with full remat: peak device memory at batch 4
#   full_dots_cublas full_dots with cuBLAS for every GEMM (XLA_FLAGS)
#   full_spec        specs/full.py's step: 16 rows of 2048 in one pass, full remat, float32 Adam
#                    moments, under the 0.9 memory fraction rmjax's launcher sets
#   torch_full       the torch reference, full fine-tuning with gradient checkpointing
#   packing          packed vs padded rows on the 4B shape, the packed rows with the segment mask
#                    and with cuDNN's packed layout (--max-segments 16)
#   full_spec_loop   specs/full.py as a user runs it (its "auto" settings, float32 moments, 16 rows in one
#                    pass) on a Qwen3-4B-shaped random backbone and the demo's synthetic data with
#                    PRM800K-like step lengths, packed rows of 2048: the loop's tokens/s and MFU against
#                    its bare step's (`bench --loop --spec`)
#   lora_spec_loop   the same for specs/lora.py (16 rows as 4 micro-batches)
#   full_spec_loop_bf16  full_spec_loop with bfloat16 Adam moments, the opt-in that frees memory for "auto"
#   full_spec_loop_timed full_spec_loop with model.auto_time: one step of each candidate that fits
#                    timed, so the cost order's pick is measured against the old default
#   loop             the training loop on a Qwen3-4B-shaped random backbone (the demo's synthetic
#                    PRM800K data, packed rows of 2048): host wait, device idle and the prefetch
#                    thread's times per window, into data_wait.json
# The rmjax bench rows hold one example each, so they run causal attention alone (the bench's
# default --attention-mask, as training does for unpacked rows).
# Groups: specs = full_spec_loop lora_spec_loop full_spec_loop_bf16 full_spec_loop_timed; bench = full_dots
# lora_dots_attn full_remat full_unrolled lora_unrolled attention lora_proj_attn lora_remat full_dots_cublas; data = packing loop; all = loop full_spec, then
# full_unrolled lora_unrolled packing full_remat torch_full lora_remat, then full_dots
# lora_dots_attn attention lora_proj_attn full_dots_cublas.
# Usage (repository root, jax with CUDA + the project installed or on PYTHONPATH):
#   OUT=/tmp/gpu-out DEADLINE_S=540 bash benchmarks/gpu_checks.sh all
#   python -m benchmarks.gpu_summary /tmp/gpu-out/gpu_checks.tgz   # one JSON line per figure
#   SMOKE=1 OUT=/tmp/smoke bash benchmarks/gpu_checks.sh all   # tiny shapes, any CPU: checks the script
# (SMOKE runs each bench in the bench's own process, --no-isolate: what the run in a child
# process adds is the same for every check, and tests/test_bench.py covers it.)
# The compilation cache (JAX_COMPILATION_CACHE_DIR, default $OUT/../jax-cache-gpu-checks) lets
# the checks share compiles of the same init. "loop" and "packing" need grain, ml-collections
# and tensorboardX; a GPU machine without PyPI gets them from a git-ignored .wheels/ folder
# prepared on a machine with PyPI for the device's Python:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .wheels \
#     grain ml-collections tensorboardX array-record portpicker
set -u
OUT=${OUT:-gpu-out}
WORK=${WORK:-$(dirname "$OUT")/gpu-checks-work}
MARK=.gpu-checks-work  # marks $WORK as this script's: only such a folder is emptied
mkdir -p "$OUT" "$WORK"
if [ -n "$(ls -A "$WORK")" ] && [ ! -e "$WORK/$MARK" ]; then
  echo "gpu_checks.sh: WORK=$WORK holds files this script did not write; empty it or set WORK to another folder" >&2
  exit 2
fi
find "$WORK" -mindepth 1 -delete && touch "$WORK/$MARK" && rm -f "$OUT/gpu_checks.tgz" "$OUT/gpu_checks.tgz.partial" ||
  exit 2
START=$SECONDS
DEADLINE_S=${DEADLINE_S:-100000}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$(dirname "$OUT")/jax-cache-gpu-checks}
export PYTHONUNBUFFERED=1
if [ "${SMOKE:-0}" = 1 ]; then
  PRESET=tiny SEQ=64 EXAMPLES=16 LOOP_STEPS=6 LOOP_SHAPE=() LOOP_LEN=128 LOOP_BUCKETS="(64, 128)" ISOLATE=(--no-isolate)
  ATTN_SHAPE=(--seq-len 64 --heads 4 --kv-heads 2 --head-dim 16 --median 20 --steps 2)
  SPEC_LOOP=(--preset tiny --seq-len 128 --batch 8 --dtype float32 --set data.synthetic.train_records=256)
else
  PRESET=qwen3-4b SEQ=2048 EXAMPLES=96 LOOP_STEPS=40 LOOP_LEN=2048 LOOP_BUCKETS="(1024, 2048)" ISOLATE=()
  ATTN_SHAPE=()
  SPEC_LOOP=(--preset qwen3-4b --layers 0)
  LOOP_SHAPE=(--spec.model.demo.hidden_size=2560 --spec.model.demo.num_layers=36 --spec.model.demo.num_heads=32
              --spec.model.demo.num_kv_heads=8 --spec.model.demo.head_dim=128 --spec.model.demo.intermediate_size=9728)
fi
BASE=(--preset "$PRESET" --seq-len "$SEQ" --batch 4 --steps 5 --warmup 2 --no-flops "${ISOLATE[@]}")
FULL_BEST=(--mode full --opt-state-dtype bfloat16 --remat-policy dots_with_no_batch_dims_saveable)
# The spec loops' synthetic steps made PRM800K-like: about 40 tokens a step (the bare arithmetic
# is about 13, and a packed row's 128 marker slots then fill before its tokens do), 2 to 20 steps
REAL_LENGTH_STEPS=(--set data.synthetic.max_ops=20
                   "--set=data.synthetic.step_padding=, so this is the running total after this operation.")

run() {  # run NAME SECONDS COMMAND...: stdout to $WORK/NAME.jsonl, stderr to $WORK/NAME.err
  local name=$1 limit=$2; shift 2
  local left=$((DEADLINE_S - (SECONDS - START) - 5))
  if [ "$left" -lt 30 ]; then echo "== $name: skipped, ${left}s left before the deadline" >&2; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (at $((SECONDS - START))s, limit ${limit}s): $*" >&2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$WORK/$name.jsonl" 2> "$WORK/$name.err"
  echo "   rc=$? $(grep -c '^{' "$WORK/$name.jsonl") records in $((SECONDS - t0))s" >&2
}

pack() {  # $WORK into $OUT/gpu_checks.tgz, replaced whole (never left half-written)
  tar -czf "$OUT/gpu_checks.tgz.partial" --exclude="./$MARK" -C "$WORK" . &&
    mv -f "$OUT/gpu_checks.tgz.partial" "$OUT/gpu_checks.tgz"
}

DATA_PACKAGES_CHECKED=0
data_packages() {  # grain, ml-collections, tensorboardX from .wheels/ where they are missing (looked up once,
  # without importing them: that takes seconds)
  [ "$DATA_PACKAGES_CHECKED" = 1 ] && return
  DATA_PACKAGES_CHECKED=1
  if ! python -c "import importlib.util as u, sys
sys.exit(not all(u.find_spec(m) for m in ('grain', 'ml_collections', 'tensorboardX')))" && [ -d .wheels ]; then
    python -m pip install -q --no-index --no-deps --target /tmp/rmjax-wheels .wheels/*.whl &&
      export PYTHONPATH=/tmp/rmjax-wheels${PYTHONPATH:+:$PYTHONPATH}
  fi
}

check() {
  case "$1" in
    full_dots)
      run full_dots 150 python -m rmjax.bench "${BASE[@]}" --impl rmjax "${FULL_BEST[@]}" --profile "$WORK/trace"
      rm -rf "$WORK/trace" ;;  # the summary is in full_dots.jsonl; the raw trace is large
    lora_dots_attn)
      run lora_dots_attn 120 python -m rmjax.bench "${BASE[@]}" --impl rmjax --mode lora \
        --remat-policy dots_and_attention_saveable ;;
    full_remat)
      run full_remat 150 python -m rmjax.bench "${BASE[@]}" --impl rmjax --mode full --remat --opt-state-dtype float32 ;;
    full_unrolled)
      run full_unrolled 240 python -m rmjax.bench "${BASE[@]}" --impl rmjax --mode full --opt-state-dtype bfloat16 \
        --remat-policy dots_and_attention_saveable --scan-unroll 0 ;;
    lora_unrolled)
      run lora_unrolled 240 python -m rmjax.bench "${BASE[@]}" --impl rmjax --mode lora --remat-policy none \
        --scan-unroll 0 ;;
    attention)
      run attention 90 python -m benchmarks.attention "${ATTN_SHAPE[@]}" ;;
    lora_proj_attn)
      run lora_proj_attn 120 python -m rmjax.bench "${BASE[@]}" --impl rmjax --mode lora \
        --remat-policy projections_and_attention_saveable --scan-unroll 1 ;;
    lora_dots_attn_dsf)
      XLA_FLAGS="--xla_gpu_enable_dynamic_slice_fusion=true" run lora_dots_attn_dsf 120 \
        python -m rmjax.bench "${BASE[@]}" --impl rmjax --mode lora --remat-policy dots_and_attention_saveable ;;
    lora_remat)
      run lora_remat 120 python -m rmjax.bench "${BASE[@]}" --impl rmjax --mode lora --remat ;;
    full_dots_cublas)
      XLA_FLAGS="--xla_gpu_enable_triton_gemm=false" run full_dots_cublas 150 \
        python -m rmjax.bench "${BASE[@]}" --impl rmjax "${FULL_BEST[@]}" ;;
    full_spec)
      # --batch 16 after BASE's --batch 4: the later flag wins
      XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 run full_spec 150 python -m rmjax.bench "${BASE[@]}" --impl rmjax \
        --mode full --remat --opt-state-dtype float32 --batch 16 ;;
    torch_full)
      run torch_full 120 python -m rmjax.bench "${BASE[@]}" --impl torch --mode full --remat ;;
    packing)
      data_packages
      run packing 280 python -m benchmarks.packing --preset "$PRESET" --row "$SEQ" --examples "$EXAMPLES" \
        --batch 4 --mode lora --segment-attention both --max-segments 16 ;;
    full_spec_loop | lora_spec_loop | full_spec_loop_bf16 | full_spec_loop_timed)
      data_packages  # the launcher's memory fraction; examples of 2 to 20 real-length steps fill packed rows
      local extra=(); [ "$1" = full_spec_loop_bf16 ] && extra=(--set opt_state_dtype=bfloat16)
      [ "$1" = full_spec_loop_timed ] && extra=(--set model.auto_time=true)
      XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 run "$1" 300 python -m rmjax.bench --loop --spec "specs/${1%%_*}.py" \
        "${SPEC_LOOP[@]}" --windows 2 --set logging_steps=4 --set data.pack=true "${REAL_LENGTH_STEPS[@]}" \
        "${extra[@]}" ;;
    loop)
      data_packages
      rm -rf "$WORK/run"  # the loop would resume an earlier run found there and append to its metrics
      run loop 200 python -m rmjax.launch --spec specs/demo.py:lora --spec.output_dir="$WORK/run" "${LOOP_SHAPE[@]}" \
        --spec.model.compute_dtype=bfloat16 --spec.model.frozen_dtype=bfloat16 --spec.model.remat=full \
        --spec.batch_size=4 --spec.grad_accum_steps=1 --spec.data.max_length="$LOOP_LEN" \
        "--spec.data.length_buckets=$LOOP_BUCKETS" --spec.data.pack=True --spec.max_steps="$LOOP_STEPS" \
        --spec.warmup_steps=4 --spec.eval_steps=0 --spec.save_steps=0 --spec.max_eval_batches=2 --spec.logging_steps=2 \
        --spec.perf_metrics=True \
        "--spec.head.hidden_dims=(1024, 256)" --spec.lr=1e-4
      python -c 'import json, sys; from benchmarks.gpu_summary import data_wait; print(json.dumps(data_wait(sys.argv[1])))' \
        "$WORK/run/demo-lora/logs/metrics.jsonl" > "$WORK/data_wait.json"
      rm -rf "$WORK/run/demo-lora/checkpoints" ;;
    *) echo "gpu_checks.sh: unknown check '$1'" >&2; exit 2 ;;
  esac
}

for arg in "$@"; do
  case "$arg" in
    bench) names="full_dots lora_dots_attn full_remat full_unrolled lora_unrolled attention lora_proj_attn lora_remat
                  full_dots_cublas" ;;
    data) names="packing loop" ;;
    specs) names="full_spec_loop lora_spec_loop full_spec_loop_bf16 full_spec_loop_timed" ;;
    all) names="loop full_spec full_unrolled lora_unrolled packing full_remat torch_full lora_remat full_dots
                lora_dots_attn attention lora_proj_attn full_dots_cublas" ;;
    *) names=$arg ;;
  esac
  for name in $names; do check "$name"; pack; done
done
echo "== done at $((SECONDS - START))s" >&2
