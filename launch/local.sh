#!/usr/bin/env bash
# Multi-process rmjax run on ONE machine (jax.distributed with a local coordinator).
#
# Usage:
#   launch/local.sh NUM_PROCESSES [rmjax.launch arguments...]
#   launch/local.sh 2 --spec specs/demo.py --spec.output_dir=runs
#
# Starts NUM_PROCESSES copies of `python -m rmjax.launch ARGS`, each with
#   JAX_COORDINATOR_ADDRESS=localhost:$PORT  JAX_NUM_PROCESSES=N  JAX_PROCESS_ID=i
# which rmjax.runtime passes to jax.distributed.initialize. Process 0 writes logs, metrics and
# exports; all processes write checkpoints together (orbax). Which devices each process sees is
# up to you: e.g. CUDA_VISIBLE_DEVICES per process (set RMJAX_GPUS_PER_PROCESS=k to give process
# i GPUs i*k..i*k+k-1), or on CPU XLA_FLAGS=--xla_force_host_platform_device_count=1.
# Environment: PORT (default: a free port), PYTHON (default: python). Output of process i > 0
# goes to $RMJAX_LOG_DIR/process_<i>.log (default: a temp dir, printed). If one process fails,
# the others are stopped (SIGTERM, then SIGKILL after RMJAX_KILL_AFTER=10 s) and the script exits
# with the first non-zero status.
set -euo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "local.sh: error: the first argument is the number of processes (1 or more), got '${1:-}'; usage:" \
    "launch/local.sh NUM_PROCESSES [rmjax.launch arguments...]" >&2
  exit 2
fi
N=$1; shift
PYTHON=${PYTHON:-python}
PORT=${PORT:-$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("localhost",0)); print(s.getsockname()[1])')}
LOG_DIR=${RMJAX_LOG_DIR:-$(mktemp -d -t rmjax-local-XXXXXX)}
mkdir -p "$LOG_DIR"
echo "local.sh: $N processes, coordinator localhost:$PORT, logs of processes 1.. in $LOG_DIR" >&2

pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; }
trap cleanup INT TERM

for ((i = 0; i < N; i++)); do
  env_extra=()
  if [[ -n "${RMJAX_GPUS_PER_PROCESS:-}" ]]; then
    k=$RMJAX_GPUS_PER_PROCESS
    env_extra+=("CUDA_VISIBLE_DEVICES=$(seq -s, $((i * k)) $((i * k + k - 1)))")
  fi
  if ((i == 0)); then
    env "${env_extra[@]}" JAX_COORDINATOR_ADDRESS="localhost:$PORT" JAX_NUM_PROCESSES="$N" \
      JAX_PROCESS_ID="$i" "$PYTHON" -m rmjax.launch "$@" &
  else
    env "${env_extra[@]}" JAX_COORDINATOR_ADDRESS="localhost:$PORT" JAX_NUM_PROCESSES="$N" \
      JAX_PROCESS_ID="$i" "$PYTHON" -m rmjax.launch "$@" >"$LOG_DIR/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done

# Processes are reaped in the order they finish (wait -n): a failed process 1 must stop process 0
# even while 0 is still blocked in a collective waiting for it. Such a process cannot act on
# SIGTERM (its handler runs between steps), so RMJAX_KILL_AFTER seconds (default 10) later the
# survivors get SIGKILL.
status=0
killer=
for ((i = 0; i < N; i++)); do
  if wait -n; then
    :
  else
    rc=$?
    if ((status == 0)); then
      status=$rc
      cleanup
      (sleep "${RMJAX_KILL_AFTER:-10}"; for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done) &
      killer=$!
    fi
  fi
done
if [[ -n "$killer" ]]; then kill "$killer" 2>/dev/null || true; fi
exit $status
