#!/usr/bin/env bash
# The GPU figures BUILD.md's Results still lacks, prepared to run inside one lent command.
#
# Why it exists: GPU time is lent in short slots (15 minutes a session, the machine's start
# included; at most 10 minutes a command), so the open measurements of the performance issue are
# prepared here as named checks, run in the order given, each bounded by `timeout` and by the
# command's deadline (DEADLINE_S seconds after the script starts: a check that would not finish
# in time is cut short, one that cannot start with 30 s left is skipped), each writing the
# benchmark's own JSON lines (NAME.jsonl, stderr in NAME.err) into $WORK (default
# $OUT/../gpu-checks-work), which starts empty: an earlier run's files are deleted (a folder
# with files this script did not write, no .gpu-checks-work mark, is refused instead), and so is
# an earlier $OUT/gpu_checks.tgz. After every check, $WORK is packed into $OUT/gpu_checks.tgz
# (written as gpu_checks.tgz.partial, then renamed, so a killed run leaves the last whole one
# and, at most, a .partial to ignore): one file, since a lent command brings back at most 8,
# and a cut-off call still brings back the checks that finished, so give them in order of
# value: `all` runs first what the targets of gpu_summary.py need. Checks:
#   full_dots        full fine-tuning, best known setting (bf16 Adam moments,
#                    dots_with_no_batch_dims_saveable), with a profile summary of the step (where
#                    the GPU time goes); MFU target 45% (session 4: 0.443)
#   lora_dots_attn   LoRA saving dots and cuDNN attention outputs (the speed setting): tokens/s vs
#                    full_dots (target 1.4x; session 4: 1.39x)
#   full_remat       full fine-tuning with torch_full's settings (full remat, float32 Adam moments):
#                    rmjax over torch like for like (target > 1)
#   full_unrolled    full fine-tuning with the layer loop unrolled (--scan-unroll 0), saving dots and
#                    cuDNN attention outputs: inside the loop XLA copies each layer's weights and
#                    saved activations out of their stacks and zero-fills the stacks; unrolled, the
#                    GEMM fusions read them in place, and saving attention no longer makes XLA
#                    duplicate ops. Compiled for an H100: 392 GB moved per step instead of 500
#                    (full_dots), 36 attention forwards instead of 72, peak 60 GB. Longer compile.
#   lora_unrolled    LoRA with the layer loop unrolled and no remat: 282 GB moved instead of 400
#                    (dots_and_attention_saveable in the loop; session 4's profile: 936 device
#                    copies, 27.5 ms), peak 32 GB; tokens/s vs full_unrolled and full_dots
#   attention        packed rows' attention on one layer of the 4B shape, forward + backward: causal
#                    only, the segment mask (public API), the segment mask without its unused
#                    gradient (compiled for an H100, the public call's backward also writes a
#                    bf16[4,1,2048,2048] mask gradient), and cuDNN's packed layout, each example
#                    its own sequence (model.segment_attention="cudnn_packed"; never yet run on a
#                    GPU), with 40 segment slots per row and with as few as the rows
#                    need (what empty slots cost); model/cudnn_attention.py. ms each, and max abs differences from the
#                    public masked call over real tokens (the segment variants' must be bf16
#                    rounding)
#   lora_proj_attn   LoRA saving each projection's output and cuDNN attention's (not every dot's):
#                    compiled for an H100, 410 GB moved instead of 426, peak 28 GB instead of 33
#   lora_dots_attn_dsf  lora_dots_attn with XLA's dynamic-slice fusion (XLA_FLAGS; in no group): the
#                    H100 profile shows 936 device copies per LoRA step (27.5 ms), slices of the
#                    saved layer stacks copied out for cuBLAS; the flag may let GEMMs read them in place
#   lora_remat       LoRA with full remat: peak device memory at batch 4 (target 16 GB; session 4:
#                    10,659 MB)
#   full_dots_cublas full_dots with cuBLAS for every GEMM (XLA_FLAGS; session 4: slower)
#   full_spec        specs/full.py's step: 16 rows of 2048 in one pass, full remat, float32 Adam
#                    moments, under the 0.9 memory fraction rmjax's launcher sets (compiled for an
#                    H100: 69,985 MiB of the 72,938 it leaves; never yet run on a GPU)
#   torch_full       the torch reference, full fine-tuning with remat (gradient checkpointing, float32
#                    Adam moments), for the same-session ratio with full_remat
#   packing          packing vs padded rows on the 4B shape (target 2x supervised markers/s;
#                    session 4: 2.21x while both layouts ran the segment mask); the packed rows
#                    run twice, with the segment mask and with cuDNN's packed layout (16 segment
#                    slots: --max-segments 16, which rows of this length distribution never reach)
#   loop             the training loop on a Qwen3-4B-shaped random backbone (the demo's synthetic
#                    PRM800K data, packed rows of 2048): train/data_wait_frac, the share of step
#                    time the host spent waiting for data, train/device_idle_frac, the share the
#                    device had no step queued (target < 5%), and the prefetch thread's read and
#                    place times, into data_wait.json (session 4, host wait only: 6.2% on one
#                    machine, 0.03% on the next, at the same tokens/s; session 9: 0.013% host wait,
#                    28% device idle measured to the step call's return, which the meter now
#                    separates from idle for certain, to the call's start, and train/dispatch_ms)
# The rmjax bench rows hold one example each, so they run causal attention alone (the bench's
# default --attention-mask, as training does for unpacked rows).
# Groups: bench = full_dots lora_dots_attn full_remat full_unrolled lora_unrolled attention lora_proj_attn
# lora_remat full_dots_cublas; data = packing loop; all = first what is open (loop: device idle;
# full_spec: the full spec fits), then what re-measures the met targets (full_unrolled
# lora_unrolled: MFU and LoRA / full; packing; full_remat torch_full: rmjax over torch like for
# like; lora_remat: LoRA's peak), then full_dots lora_dots_attn attention lora_proj_attn
# full_dots_cublas.
# Usage (repository root, jax with CUDA + the project installed or on PYTHONPATH):
#   OUT=/tmp/gpu-out DEADLINE_S=540 bash rmjax/bench/gpu_checks.sh all
#   python -m rmjax.bench.gpu_summary /tmp/gpu-out/gpu_checks.tgz   # the targets, one JSON line each
#   SMOKE=1 OUT=/tmp/smoke bash rmjax/bench/gpu_checks.sh all   # tiny shapes, any CPU: checks the script
# The compilation cache (JAX_COMPILATION_CACHE_DIR, default $OUT/../jax-cache-gpu-checks) lets
# the checks share compiles of the same init. "loop" and "packing" need grain, ml-collections
# and tensorboardX. A GPU machine without them and without PyPI gets them from a .wheels/ folder
# (git-ignored; carry it) prepared on a machine with PyPI for the device's Python (3.12 here):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .wheels \
#     grain ml-collections tensorboardX array-record portpicker     # about 4.5 MB
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
  PRESET=tiny SEQ=64 EXAMPLES=16 LOOP_STEPS=6 LOOP_SHAPE=() LOOP_LEN=128 LOOP_BUCKETS="(64, 128)"
  ATTN_SHAPE=(--seq-len 64 --heads 4 --kv-heads 2 --head-dim 16 --median 20 --steps 2)
else
  PRESET=qwen3-4b SEQ=2048 EXAMPLES=96 LOOP_STEPS=40 LOOP_LEN=2048 LOOP_BUCKETS="(1024, 2048)"
  ATTN_SHAPE=()
  LOOP_SHAPE=(--spec.model.demo.hidden_size=2560 --spec.model.demo.num_layers=36 --spec.model.demo.num_heads=32
              --spec.model.demo.num_kv_heads=8 --spec.model.demo.head_dim=128 --spec.model.demo.intermediate_size=9728)
fi
BASE=(--preset "$PRESET" --seq-len "$SEQ" --batch 4 --steps 5 --warmup 2 --no-flops)
FULL_BEST=(--mode full --opt-state-dtype bfloat16 --remat-policy dots_with_no_batch_dims_saveable)

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

data_packages() {  # grain, ml-collections, tensorboardX from .wheels/ where they are missing
  if ! python -c "import grain, ml_collections, tensorboardX" 2>/dev/null && [ -d .wheels ]; then
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
      run attention 90 python -m rmjax.bench.attention "${ATTN_SHAPE[@]}" ;;
    lora_proj_attn)
      run lora_proj_attn 120 python -m rmjax.bench "${BASE[@]}" --impl rmjax --mode lora \
        --remat-policy projections_and_attention_saveable ;;
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
      run packing 280 python -m rmjax.bench.packing --preset "$PRESET" --row "$SEQ" --examples "$EXAMPLES" \
        --batch 4 --mode lora --segment-attention both --max-segments 16 ;;
    loop)
      data_packages
      rm -rf "$WORK/run"  # the loop would resume an earlier run found there and append to its metrics
      run loop 200 python -m rmjax.launch --spec specs/demo.py:lora --spec.output_dir="$WORK/run" "${LOOP_SHAPE[@]}" \
        --spec.model.compute_dtype=bfloat16 --spec.model.frozen_dtype=bfloat16 --spec.model.remat=full \
        --spec.batch_size=4 --spec.grad_accum_steps=1 --spec.data.max_length="$LOOP_LEN" \
        "--spec.data.length_buckets=$LOOP_BUCKETS" --spec.data.pack=True --spec.max_steps="$LOOP_STEPS" \
        --spec.warmup_steps=4 --spec.eval_steps=0 --spec.save_steps=0 --spec.max_eval_batches=2 --spec.logging_steps=2 \
        "--spec.head.hidden_dims=(1024, 256)" --spec.lr=1e-4
      python -c 'import json, sys; from rmjax.bench.gpu_summary import data_wait; print(json.dumps(data_wait(sys.argv[1])))' \
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
    all) names="loop full_spec full_unrolled lora_unrolled packing full_remat torch_full lora_remat full_dots
                lora_dots_attn attention lora_proj_attn full_dots_cublas" ;;
    *) names=$arg ;;
  esac
  for name in $names; do check "$name"; pack; done
done
echo "== done at $((SECONDS - START))s" >&2
