r"""Seed-compatible launcher: the seed project's train.py flags, run by rmjax.

Why it exists: scripts and notes written for the seed project keep working. This maps the
seed's flags and its JSON config onto specs/full.py (train.py) or specs/lora.py
(train_lora.py), then runs exactly what `python -m rmjax.launch --spec ...` runs. New work
should use rmjax.launch directly.

  python launch/train.py --config seed_config.json --experiment_name prm-full --max_steps 2000
  python launch/train_lora.py --config seed_config.json --lora_r 16 --lora_alpha 32
  python launch/train.py ... --dry_run       # print the mapped spec and exit

Precedence: spec defaults < --config JSON < command-line flags. Unknown JSON keys are not
silently dropped: one warning line lists them.

Mapping (seed -> spec key):

  seed key / flag                                   spec key
  ------------------------------------------------  ------------------------------------------
  model_name_or_path, model_name, model_path        model.path
  learning_rate, --learning_rate                    lr
  max_steps, num_train_steps, --max_steps           max_steps
  batch_size, per_device_train_batch_size,          batch_size = per-device x grad_accum_steps
    --batch_size  (PER DEVICE, as in the seed)        x devices (GLOBAL in rmjax)
  gradient_accumulation_steps, grad_accum_steps     grad_accum_steps
  per_device_eval_batch_size                        data.eval_batch_size = per-device x devices
  warmup_steps, weight_decay, max_grad_norm, seed   same name
  lr_scheduler_type (cosine / linear / constant)    schedule
  logging_steps, eval_steps, save_steps,            same name (flags too)
    max_eval_batches
  output_dir, experiment_name (--experiment_name)   output_dir, experiment_name
  max_length, max_seq_length                        data.max_length
  max_steps_per_example                             data.max_steps_per_example
  neutral_target                                    data.neutral_target
  loss, loss_type                                   loss
  bf16 (true / false)                               model.compute_dtype bfloat16 / float32
  gradient_checkpointing (true / false)             model.remat full / none
  trust_remote_code                                 model.trust_remote_code
  head_hidden_dims, head_dropout, head_activation   head.hidden_dims, head.dropout, head.activation
  lora_r, lora_rank, --lora_r                       lora.rank
  lora_alpha, --lora_alpha                          lora.alpha
  lora_target_modules, target_modules               lora.targets
  <source>_path, <source>_weight                    data.<source>.path, data.<source>.weight
    (source = prm800k | eqasc | reveal)               (an empty or null path: data.<source>.use=False)
  dataset_weights {source: w}                       data.<source>.weight
  datasets [{name, path, weight}] or                data.<source>.{path, weight}, use=True;
    {source: {path, weight} | path}                   sources not listed get use=False
  allow_reveal_training                             data.allow_reveal_training
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
from typing import Any, Mapping, Sequence

from rmjax import cli, spec as spec_lib

SPECS_DIR = pathlib.Path(__file__).resolve().parents[1] / "specs"
SEED_PER_DEVICE_BATCH = 4  # the seed's per-device batch when none is given
SEED_GRAD_ACCUM = 4  # the seed's accumulation steps when none are given (specs/full.py runs 1)

_DIRECT = {
  "model_name_or_path": "model.path", "model_name": "model.path", "model_path": "model.path",
  "learning_rate": "lr", "max_steps": "max_steps", "num_train_steps": "max_steps",
  "gradient_accumulation_steps": "grad_accum_steps", "grad_accum_steps": "grad_accum_steps",
  "warmup_steps": "warmup_steps", "weight_decay": "weight_decay", "max_grad_norm": "max_grad_norm",
  "seed": "seed", "lr_scheduler_type": "schedule", "logging_steps": "logging_steps",
  "eval_steps": "eval_steps", "save_steps": "save_steps", "max_eval_batches": "max_eval_batches",
  "output_dir": "output_dir", "experiment_name": "experiment_name",
  "max_length": "data.max_length", "max_seq_length": "data.max_length",
  "max_steps_per_example": "data.max_steps_per_example", "neutral_target": "data.neutral_target",
  "loss": "loss", "loss_type": "loss", "trust_remote_code": "model.trust_remote_code",
  "head_hidden_dims": "head.hidden_dims", "head_dropout": "head.dropout",
  "head_activation": "head.activation", "lora_r": "lora.rank", "lora_rank": "lora.rank",
  "lora_alpha": "lora.alpha", "lora_target_modules": "lora.targets", "target_modules": "lora.targets",
  "allow_reveal_training": "data.allow_reveal_training",
}
_PER_DEVICE_BATCH_KEYS = ("batch_size", "per_device_train_batch_size")
_FLAG_KEYS = ("max_steps", "learning_rate", "logging_steps", "eval_steps", "save_steps",
              "max_eval_batches", "experiment_name", "lora_r", "lora_alpha")


def build_parser(mode: str) -> argparse.ArgumentParser:
  p = cli.ArgumentParser(prog=f"launch/{'train_lora' if mode == 'lora' else 'train'}.py",
                              description=f"seed-compatible {mode} training launcher (rmjax)")
  p.add_argument("--config", help="seed-style JSON config file")
  p.add_argument("--experiment_name")
  p.add_argument("--max_steps", type=int)
  p.add_argument("--learning_rate", type=float)
  p.add_argument("--batch_size", type=int, help="PER-DEVICE micro-batch rows, as in the seed")
  p.add_argument("--logging_steps", type=int)
  p.add_argument("--eval_steps", type=int)
  p.add_argument("--save_steps", type=int)
  p.add_argument("--max_eval_batches", type=int)
  if mode == "lora":
    p.add_argument("--lora_r", type=int)
    p.add_argument("--lora_alpha", type=float)
  p.add_argument("--dry_run", action="store_true", help="print the mapped spec and exit")
  return p


def _set(spec: Any, key: str, value: Any) -> None:
  """Sets a dotted key, with ConfigDict's type checks turned into SpecError."""
  *parents, leaf = key.split(".")
  node = spec
  for part in parents:
    node = node[part]
  if isinstance(node[leaf], tuple) and isinstance(value, (list, tuple)):
    value = tuple(value)
  try:
    node[leaf] = value
  except (TypeError, ValueError) as e:
    raise spec_lib.SpecError(f"seed value {value!r} does not fit spec key {key} "
                             f"({type(node[leaf]).__name__})") from e


def _number(config: Mapping[str, Any], key: str, kind: type = int) -> Any:
  """config[key] as an int (or float), or a SpecError naming the seed key and its value."""
  value = config[key]
  try:
    if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
      raise ValueError
    return kind(value)
  except (TypeError, ValueError):
    raise spec_lib.SpecError(f"seed config key {key!r} must be a{'n integer' if kind is int else ' number'}, "
                             f"got {value!r}") from None


def _dataset_overrides(config: Mapping[str, Any], used: set[str]) -> tuple[dict[str, Any], list[str]]:
  """data.<source>.* overrides from the seed's several ways of naming datasets."""
  out: dict[str, Any] = {}
  bad: list[str] = []
  for name in spec_lib.SOURCES:
    for field in ("path", "weight"):
      if f"{name}_{field}" in config:
        used.add(f"{name}_{field}")
        out[f"data.{name}.{field}"] = config[f"{name}_{field}"]
    if config.get(f"{name}_path") in ("", None) and f"{name}_path" in config:
      out[f"data.{name}.use"] = False  # the seed's way to switch a source off
      out.pop(f"data.{name}.path")
  if "dataset_weights" in config:
    used.add("dataset_weights")
    weights = config["dataset_weights"]
    if not isinstance(weights, Mapping):
      raise spec_lib.SpecError(f"seed config key 'dataset_weights' must map dataset names to weights, got {weights!r}")
    for name in weights:
      if name in spec_lib.SOURCES:
        out[f"data.{name}.weight"] = _number(weights, name, float)
      else:
        bad.append(f"dataset_weights.{name}")
  if "datasets" in config:
    used.add("datasets")
    entries = config["datasets"]
    if isinstance(entries, Mapping):
      entries = [{"name": k, **(v if isinstance(v, Mapping) else {"path": v})} for k, v in entries.items()]
    if not isinstance(entries, list) or not all(isinstance(e, Mapping) for e in entries):
      raise spec_lib.SpecError("seed config key 'datasets' must be a list of objects with name (or type), path "
                               f"and weight, or an object of name: path; got {entries!r}")
    listed = set()
    for entry in entries:
      name = str(entry.get("name", entry.get("type", "")))
      if name not in spec_lib.SOURCES:
        bad.append(f"datasets.{name or '?'}")
        continue
      listed.add(name)
      out[f"data.{name}.use"] = True
      for field in ("path", "weight"):
        if field in entry:
          out[f"data.{name}.{field}"] = _number(entry, field, float) if field == "weight" else str(entry[field])
      bad.extend(f"datasets.{name}.{k}" for k in entry if k not in ("name", "type", "path", "weight"))
    for name in spec_lib.SOURCES:
      if name not in listed:
        out[f"data.{name}.use"] = False
  return out, bad


def map_seed(mode: str, args: argparse.Namespace, config: Mapping[str, Any],
             num_devices: int) -> tuple[Any, list[str]]:
  """(spec, warnings): specs/<mode>.py with the seed JSON config, then the flags, applied."""
  spec = spec_lib.load_spec_file(str(SPECS_DIR / f"{mode}.py"))
  spec.grad_accum_steps = SEED_GRAD_ACCUM  # the seed's batch arithmetic; its config or flags may say otherwise
  used: set[str] = set()
  overrides: dict[str, Any] = {}
  for key, value in config.items():
    if key in _DIRECT:
      used.add(key)
      overrides[_DIRECT[key]] = value
  data_overrides, bad = _dataset_overrides(config, used)
  overrides.update(data_overrides)
  special = {"bf16": ("model.compute_dtype", "bfloat16", "float32"),
             "gradient_checkpointing": ("model.remat", "full", "none")}
  for key, (target, on, off) in special.items():
    if key in config:
      used.add(key)
      if not isinstance(config[key], bool):  # "false" is truthy: it turned bf16 on
        raise spec_lib.SpecError(f"seed config key {key!r} must be true or false, got {config[key]!r}")
      overrides[target] = on if config[key] else off
  for key in _FLAG_KEYS:  # flags beat the JSON config
    value = getattr(args, key, None)
    if value is not None:
      overrides[_DIRECT.get(key, key)] = value
  for key, value in overrides.items():
    _set(spec, key, value)

  per_device = getattr(args, "batch_size", None)  # the flag beats the JSON config
  for key in _PER_DEVICE_BATCH_KEYS:
    if key in config:
      used.add(key)
      per_device = _number(config, key) if per_device is None else per_device
  per_device = SEED_PER_DEVICE_BATCH if per_device is None else per_device
  spec.batch_size = per_device * int(spec.grad_accum_steps) * num_devices
  if "per_device_eval_batch_size" in config:
    used.add("per_device_eval_batch_size")
    spec.data.eval_batch_size = _number(config, "per_device_eval_batch_size") * num_devices
  else:
    spec.data.eval_batch_size = max(1, spec.data.eval_batch_size // num_devices) * num_devices

  warnings = []
  unknown = sorted(set(config) - used) + bad
  if unknown:
    warnings.append(f"ignored seed config keys (no rmjax equivalent): {', '.join(unknown)}")
  return spec, warnings


def seed_hints(message: str) -> str:
  """Validation names rmjax.launch's flags; these launchers take the seed's config keys instead."""
  message = re.sub(r"--spec\.data\.(\w+)\.path=DIR", r'"\1_path": DIR in --config', message)
  return re.sub(r"--spec\.data\.(\w+)\.use=False", r'"\1_path": "" in --config', message)


def read_config(path: str | None) -> dict[str, Any]:
  if not path:
    return {}
  try:
    return cli.read_json_object(path)
  except FileNotFoundError:
    raise spec_lib.SpecError(f"config file not found: {path}") from None
  except (OSError, ValueError) as e:  # a directory, unreadable, not UTF-8 JSON, not an object
    raise spec_lib.SpecError(f"config file {cli.first_line(e)}" if isinstance(e, ValueError)
                             else f"config file {path}: {e.strerror or e}") from None


def main(mode: str, argv: Sequence[str] | None = None) -> Any:
  args = build_parser(mode).parse_args(argv)
  from rmjax import launch, runtime  # absl/jax only once the arguments are known good
  if argv is None:  # the program itself, not a call: as rmjax.launch does
    runtime.restart_with_huge_page_malloc()
  prog = f"launch/{'train_lora' if mode == 'lora' else 'train'}.py"
  try:
    config = read_config(args.config)
    base = spec_lib.load_spec_file(str(SPECS_DIR / f"{mode}.py"))
    try:
      runtime.init_distributed(base.distributed)
    except ValueError as e:  # a malformed JAX_NUM_PROCESSES, several processes without an address
      raise spec_lib.SpecError(str(e)) from None
    import jax
    spec, warnings = map_seed(mode, args, config, jax.device_count())
    spec_lib.validate(spec, jax.device_count(), jax.process_count())
  except spec_lib.SpecError as e:
    print(f"{prog}: error: {seed_hints(str(e))}", file=sys.stderr)
    raise SystemExit(cli.EXIT_USER_ERROR)
  for w in warnings:
    print(f"{prog}: warning: {w}", file=sys.stderr)
  spec.lock()
  try:
    return launch.run(spec, dry_run=args.dry_run)
  except SystemExit as e:  # the error is reported; library threads must not hold the process
    runtime.exit_process(e.code)


if __name__ == "__main__":
  main("full")
