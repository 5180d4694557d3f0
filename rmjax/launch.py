r"""Entry point: python -m rmjax.launch --spec specs/lora.py [--spec.key=value ...].

Why it exists: the one thin place that turns a command line into a run. It parses the spec with
ml-collections' config_flags (locked, type-checked overrides), turns every command-line mistake
into one line on stderr (config_flags itself raises raw tracebacks for unknown keys), validates
the whole spec against the devices before anything compiles, starts jax.distributed when the
run has several processes, and hands over to rmjax.train.loop.train_and_evaluate.

  python -m rmjax.launch --spec specs/demo.py
  python -m rmjax.launch --spec specs/lora.py --spec.lr=2e-4 --spec.data.reveal.use=False
  python -m rmjax.launch --spec specs/demo.py --dry_run     # validate and print the spec

Exit status: 0 when the run finishes; 2 (cli.EXIT_USER_ERROR, as every rmjax tool) for any error
reported in one line, from a mistyped flag to a spec the devices cannot run, a bad data file, a
damaged checkpoint, a non-finite loss or a device out of memory; `--spec.stop_exit_code` for a run
stopped by SIGTERM with its checkpoint saved; 130 for Ctrl-C (the first, in the training loop,
saves a checkpoint and stops; another stops at once); 1 only with a traceback, a bug in rmjax.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from rmjax import cli, runtime, spec as spec_lib

_SPEC = config_flags.DEFINE_config_file("spec", None, "spec file, optionally file.py:arg", lock_config=True)
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "validate the spec, print it as JSON and exit")
_USAGE = "usage: python -m rmjax.launch --spec FILE [--spec.key=value ...] [--dry_run]"
_HELP = ("-h", "--help", "-help", "--helpshort", "--helpfull", "--helpxml")


def _fail(message: str) -> None:
  raise SystemExit(cli.report("rmjax.launch", message))


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl flag parsing that reports every user error as one line (no traceback)."""
  if not any(a in _HELP for a in argv[1:]):
    path = spec_lib.find_flag_value(argv[1:], "spec")
    if not path:
      _fail(f"--spec FILE is required (e.g. --spec specs/demo.py); {_USAGE}")
    try:
      spec_lib.check_overrides(spec_lib.load_spec_file(path), argv[1:])
    except spec_lib.SpecError as e:
      _fail(str(e))
  try:
    return flags.FLAGS(list(argv))
  except flags.IllegalFlagValueError as e:
    _fail(_value_error(str(e), argv))
  except Exception as e:  # noqa: BLE001  every other parse error: one line, no traceback
    _fail(f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}")
  return []  # unreachable


def _value_error(message: str, argv: Sequence[str]) -> str:
  """'flag --spec.lr=abc: could not convert ...' -> names the key and its expected type."""
  message = message.strip().splitlines()[0]
  if message.startswith("flag --spec."):
    key = message[len("flag --spec."):].split("=", 1)[0]
    path = spec_lib.find_flag_value(argv[1:], "spec") or ""
    expected = spec_lib.describe_type(spec_lib.load_spec_file(path), key)
    return f"bad value for spec key '{key}' (expected {expected}): {message}"
  return message


def run(spec: Any, dry_run: bool = False) -> Any:
  """Validates `spec` against the devices, then trains and evaluates (shared with launch/)."""
  runtime.quiet_library_logs()
  runtime.default_gpu_memory_fraction()
  runtime.enable_compilation_cache()
  try:
    runtime.init_distributed(spec.distributed)
  except ValueError as e:  # a malformed JAX_NUM_PROCESSES / JAX_PROCESS_ID / SLURM_NTASKS
    _fail(str(e))
  import jax  # after jax.distributed: the device count must see every process
  runtime.reuse_host_memory(jax.default_backend())
  spec_lib.expand_home(spec)
  try:
    warnings = spec_lib.validate(spec, jax.device_count(), jax.process_count())
  except spec_lib.SpecError as e:
    _fail(str(e))
  for w in warnings:
    logging.warning("spec: %s", w)
  if dry_run:
    mesh = spec_lib.resolve_mesh(spec.mesh, jax.device_count())
    print(json.dumps({"spec": spec_lib.spec_to_dict(spec), "mesh": mesh,
                      "micro_batch_size": spec_lib.micro_batch_size(spec)}, indent=1))
    return None
  from rmjax.train.loop import train_and_evaluate  # heavy: imported only when training
  try:
    results = train_and_evaluate(spec)
  except KeyboardInterrupt:  # a second Ctrl-C in the loop, or one before it (reading, compiling)
    if os.environ.get("RMJAX_DEBUG"):
      raise
    cli.report("rmjax.launch", "interrupted (Ctrl-C) before a checkpoint was saved; the run's earlier checkpoints "
                               "are kept, and relaunching the same command resumes from the latest")
    raise SystemExit(cli.EXIT_INTERRUPTED) from None
  except _user_facing_errors() as e:  # a bad input or a stopped run: one line, no traceback
    if os.environ.get("RMJAX_DEBUG"):
      raise
    _fail(f"{type(e).__name__}: {e}")
  except (jax.errors.JaxRuntimeError, MemoryError) as e:  # MemoryError: a host array, e.g. eval_batch_size's
    if os.environ.get("RMJAX_DEBUG") or not (cli.is_out_of_memory(e) or isinstance(e, MemoryError)):
      raise
    _fail(out_of_memory_message(e, spec))
  if results.get("interrupted") and results.get("stopped_by") == "SIGINT":
    raise SystemExit(cli.EXIT_INTERRUPTED)  # Ctrl-C, checkpoint saved: not finished, as a shell counts it
  if results.get("interrupted") and int(spec.stop_exit_code):
    raise SystemExit(int(spec.stop_exit_code))  # stopped by SIGTERM, checkpoint saved: not finished
  return results


def out_of_memory_message(error: BaseException, spec: Any) -> str:
  """One line for a run that does not fit its devices: what failed, and what makes it smaller."""
  if isinstance(error, MemoryError):  # the host's arrays: batches as the pipeline builds them
    return cli.out_of_memory_line(error, "a smaller --spec.data.eval_batch_size, --spec.batch_size or "
                                         "--spec.data.max_length")
  full = spec.mode == "full"
  smaller = ["--spec.model.remat=full" if str(spec.model.remat) != "full" else None,
             "--spec.opt_state_dtype=bfloat16" if full and spec.opt_state_dtype == "float32" else None,
             # accumulating full fine-tuning keeps a float32 gradient sum beside each micro-batch's
             # gradients, which costs more than the activations smaller micro-batches save
             "--spec.grad_accum_steps=1 (the same rows in one pass)" if full and int(spec.grad_accum_steps) > 1 else None,
             None if full else "more --spec.grad_accum_steps (smaller micro-batches)",
             "a smaller --spec.batch_size or --spec.data.max_length",
             "more devices (--spec.mesh.fsdp shards weights and optimizer state)"]
  return cli.out_of_memory_line(error, "; ".join(x for x in smaller if x))


def _user_facing_errors() -> tuple[type[BaseException], ...]:
  """Errors that describe the user's input or the run's state (set RMJAX_DEBUG=1 for a traceback)."""
  from rmjax.checkpoint import CheckpointError
  from rmjax.data.example import BadRecord
  from rmjax.train.loop import NonFiniteLoss
  # ValueError: readers and builders check what the spec cannot know before reading (a split
  # missing from a directory, a file of the wrong shape) and say it in one line, as other tools do.
  # OSError: a file the run cannot read or write (a full disk, a read-only folder), named in its message.
  return (NonFiniteLoss, CheckpointError, BadRecord, OSError, ValueError, spec_lib.SpecError)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    _fail(f"unexpected arguments {list(argv[1:])}; {_USAGE}")
  try:
    run(_SPEC.value, dry_run=_DRY_RUN.value)
  except SystemExit as e:  # the error is reported; library threads must not hold the process
    runtime.exit_process(e.code)


if __name__ == "__main__":
  runtime.restart_with_huge_page_malloc()
  app.run(main, flags_parser=parse_flags)
