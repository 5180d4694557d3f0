"""Spec (ml-collections ConfigDict) validation and the quantities derived from a spec.

Why it exists: a bad spec must fail in the first second, with every problem listed at once,
never after minutes of compilation or with a raw traceback from deep inside flag parsing.
`validate` checks the whole spec against the device count before anything is built. Loading,
`--spec.key=value` overrides and the JSON form live in `rmjax.spec_io` and are re-exported
here. Library modules do not read the ConfigDict deep inside: each converts its own sub-config
into a frozen dataclass at its boundary, using the small helpers here (`resolve_mesh`, ...).

Data sources: the built-in blocks data.prm800k, data.eqasc and data.reveal, plus any other
data.<name> block that names a `reader` (one of `rmjax.data.sources.READERS`); such a block
holds use, weight, path, train_split, eval_split, test_only and its reader's options (specs/
common.py's `source_block` makes one with the defaults). Two blocks may use the same reader.

This module must stay light (no jax/flax import): the launcher imports it before jax starts.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Iterable, Mapping

from rmjax.data import defaults as data_defaults, eqasc, prm800k, reveal, synthetic
from rmjax.model.config import CPU_DOT_LIBRARIES, DTYPES, LORA_TARGETS, REMAT_POLICIES, SEGMENT_ATTENTION
from rmjax.spec_io import (AUTO, AUTO_OR_INT_KEYS, ConfigDict, SpecError, apply_overrides, check_overrides, closest_keys,  # noqa: F401
                           describe_type, dotted_items, dotted_keys, expand_home, find_flag_value, get_dotted,
                           load_sibling, load_spec_file, override_keys, parse_set_item, spec_to_dict)
from rmjax.spec_sources import (SOURCES, check_sources, eval_sources, is_synthetic, source_names,  # noqa: F401
                                test_only_sources, training_sources)

MESH_AXES = ("data", "fsdp", "tensor")
ENUMS: Mapping[str, tuple[Any, ...]] = {
  "mode": ("full", "lora"),
  "schedule": ("cosine", "linear", "constant"),
  "loss": ("mse", "bce"),
  "nan_policy": ("stop", "skip"),
  "opt_state_dtype": ("float32", "bfloat16"),
  "model.param_dtype": DTYPES,
  "model.compute_dtype": DTYPES,
  "model.frozen_dtype": ("float32", "bfloat16"),
  "model.remat": (AUTO, *REMAT_POLICIES),
  "model.attention_impl": ("", "xla", "cudnn"),
  "data.prm800k.phase": prm800k.PHASES,
  "data.prm800k.train_split": prm800k.SPLITS,
  "data.prm800k.eval_split": prm800k.SPLITS,
  "data.eqasc.train_split": eqasc.SPLITS,
  "data.eqasc.eval_split": eqasc.SPLITS,
  "data.reveal.eval_split": reveal.SPLITS,
  "model.segment_attention": SEGMENT_ATTENTION,
  "model.cpu_dot_library": tuple(CPU_DOT_LIBRARIES),
  "head.activation": ("gelu", "gelu_tanh", "relu", "silu", "tanh"),
  "data.template": ("default", "chat"),
  "data.reveal.label": ("correctness",),
}
DEMO_MODEL = "demo"
# The keys "auto" resolves per run (rmjax.train.auto_settings), as ModelConfig fields, and the
# value each takes where nothing resolved it: the old defaults, the last candidate auto tries.
AUTO_FALLBACK: Mapping[str, Any] = {"remat": "full", "scan_unroll": 1}


# ---------------------------------------------------------------------------------------------
# Derived quantities (pure; used by validate and by the modules that build things).

def resolve_mesh(mesh: ConfigDict | Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Mesh axis sizes with the (at most one) -1 axis resolved so the product is num_devices."""
  sizes = {axis: int(mesh[axis]) for axis in MESH_AXES}
  free = [a for a, s in sizes.items() if s == -1]
  bad = [f"{a}={s}" for a, s in sizes.items() if s == 0 or s < -1]
  if bad or len(free) > 1:
    raise SpecError(f"mesh axes must be >= 1 with at most one -1, got {_fmt_mesh(sizes)}")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if num_devices % fixed:
      raise SpecError(f"mesh {_fmt_mesh(sizes)}: the fixed axes multiply to {fixed}, which does not "
                      f"divide the {num_devices} devices")
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise SpecError(f"mesh {_fmt_mesh(sizes)} has {fixed} devices but {num_devices} are available")
  return sizes


def _fmt_mesh(sizes: Mapping[str, int]) -> str:
  return "(" + ", ".join(f"{a}={s}" for a, s in sizes.items()) + ")"


def scan_unroll_setting(value: Any) -> int | str:
  """model.scan_unroll as the model takes it: "auto", or the whole number >= 0 that an int or
  its text gives (the key is a str field: rmjax.spec_io.AUTO_OR_INT_KEYS). SpecError otherwise."""
  if value == AUTO:
    return AUTO
  text = str(value).strip()
  if isinstance(value, bool) or not isinstance(value, (int, str)) or not re.fullmatch(r"[0-9]+", text):
    raise SpecError(f"model.scan_unroll must be 'auto' or an integer >= 0, got {value}")
  return int(text)


def performance_settings(spec: ConfigDict) -> dict[str, Any]:
  """{"remat": ..., "scan_unroll": ...} as the spec says them ("auto" kept; ints as ints)."""
  return {"remat": str(spec.model.remat), "scan_unroll": scan_unroll_setting(spec.model.scan_unroll)}


def micro_batch_size(spec: ConfigDict) -> int:
  """Global rows per micro-batch (one forward/backward): batch_size // grad_accum_steps."""
  return int(spec.batch_size) // int(spec.grad_accum_steps)


# ---------------------------------------------------------------------------------------------
# Validation.

def validate(spec: ConfigDict, num_devices: int, process_count: int = 1,
             check_paths: bool = True) -> list[str]:
  """Checks the whole spec before anything is built.

  Raises SpecError listing every problem found; returns warnings (strings) otherwise.
  """
  problems: list[str] = []
  warnings: list[str] = []
  _check_leaves(spec, problems)
  _check_enums(spec, problems)
  _check_numbers(spec, problems, warnings)
  _check_batch_and_mesh(spec, num_devices, process_count, problems)
  _check_data(spec, problems, warnings, check_paths)
  name = str(spec.experiment_name)
  if not name or name in (".", "..") or "/" in name or os.sep in name:
    problems.append(f"experiment_name={name!r} must be one folder name (the run is <output_dir>/<experiment_name>)")
  if check_paths and spec.init_from and "://" not in spec.init_from and not os.path.exists(spec.init_from):
    problems.append(f"init_from: checkpoint path not found: {spec.init_from}")
  if check_paths and spec.model.path != DEMO_MODEL and _looks_local(spec.model.path) \
      and not os.path.isdir(spec.model.path):
    problems.append(f"model.path: local directory not found: {spec.model.path}")
  if problems:
    if len(problems) == 1:
      raise SpecError(f"invalid spec: {problems[0]}")
    raise SpecError(f"invalid spec ({len(problems)} problems):\n" + "\n".join(f"  - {p}" for p in problems))
  return warnings


def _looks_local(path: str) -> bool:
  """Hub ids look like `org/name`; local paths start with / . ~ or exist."""
  return path.startswith(("/", ".", "~")) or os.path.exists(path)


def _check_enums(spec: ConfigDict, problems: list[str]) -> None:
  for key, allowed in ENUMS.items():
    value = get_dotted(spec, key)
    if value not in allowed:
      problems.append(f"{key}={value!r}; choose from {', '.join(repr(a) for a in allowed)}")


# Float keys where inf has a meaning (no clipping); NaN is refused everywhere.
_INF_ALLOWED = {"max_grad_norm"}
_INT64_MAX = 2**63 - 1
# Upper bounds: beyond them a run only fills memory (examples buffered per source).
_AT_MOST = {"data.prefetch": 100_000}


def _check_leaves(spec: ConfigDict, problems: list[str]) -> None:
  """Numbers no key can take: NaN, inf (but where it means something), integers past int64."""
  for key, value in dotted_items(spec):
    for v in (value if isinstance(value, (tuple, list)) else (value,)):
      if isinstance(v, float) and (math.isnan(v) or (math.isinf(v) and key not in _INF_ALLOWED)):
        problems.append(f"{key} must be a finite number, got {value}")
        break
      if isinstance(v, int) and not isinstance(v, bool) and abs(v) > _INT64_MAX:
        problems.append(f"{key}={value} is too large")
        break
  for key, limit in _AT_MOST.items():
    if get_dotted(spec, key) > limit:
      problems.append(f"{key} must be <= {limit}, got {get_dotted(spec, key)}")


def _check_numbers(spec: ConfigDict, problems: list[str], warnings: list[str]) -> None:
  positive = ["lr", "max_steps", "batch_size", "grad_accum_steps", "logging_steps",
              "data.max_length", "data.max_steps_per_example", "data.eval_batch_size", "checkpoint.max_to_keep"]
  non_negative = ["warmup_steps", "weight_decay", "max_grad_norm", "eval_steps", "save_steps",
                  "max_eval_batches", "data.num_workers", "data.prefetch", "data.pack_lookahead",
                  "data.max_segments_per_row", "model.attention_query_block"]
  for key in positive:
    if not get_dotted(spec, key) > 0:
      problems.append(f"{key} must be > 0, got {get_dotted(spec, key)}")
  for key in non_negative:
    if not get_dotted(spec, key) >= 0:
      problems.append(f"{key} must be >= 0, got {get_dotted(spec, key)}")
  try:
    scan_unroll_setting(spec.model.scan_unroll)
  except SpecError as e:
    problems.append(str(e))
  if spec.data.max_length == 1:
    problems.append("data.max_length must be >= 2 (a marker and the text before it), got 1")
  dist = spec.distributed
  if dist.num_processes < 0:
    problems.append(f"distributed.num_processes must be >= 0 (0 = from the environment), got {dist.num_processes}")
  if dist.process_id < -1 or (dist.num_processes > 0 and dist.process_id >= dist.num_processes):
    problems.append(f"distributed.process_id must be -1 (from the environment) or in [0, num_processes), "
                    f"got {dist.process_id}")
  if not 0 <= spec.stop_exit_code <= 255:
    problems.append(f"stop_exit_code must be in [0, 255], got {spec.stop_exit_code}")
  if not 0 <= spec.head.dropout < 1:
    problems.append(f"head.dropout must be in [0, 1), got {spec.head.dropout}")
  if not _positive_ints(spec.head.hidden_dims):
    problems.append(f"head.hidden_dims must be positive integers, got {tuple(spec.head.hidden_dims)}")
  try:  # the reader's own check, named by its spec key
    prm800k.Prm800kOptions(neutral_target=spec.data.neutral_target)
  except ValueError as e:
    problems.append(f"data.{e}")
  if spec.mode == "lora":
    if spec.lora.rank <= 0:
      problems.append(f"lora.rank must be > 0 in mode 'lora', got {spec.lora.rank}")
    if not spec.lora.alpha > 0:
      problems.append(f"lora.alpha must be > 0 in mode 'lora', got {spec.lora.alpha}")
    if not spec.lora.targets or not all(isinstance(t, str) and t in LORA_TARGETS for t in spec.lora.targets):
      problems.append(f"lora.targets must be among {', '.join(LORA_TARGETS)}, got {tuple(spec.lora.targets)}")
  if 0 < spec.max_steps <= spec.warmup_steps:
    warnings.append(f"warmup_steps ({spec.warmup_steps}) >= max_steps ({spec.max_steps}): "
                    "the learning rate never reaches its peak")
  if spec.data.pack and spec.model.segment_attention != "mask" and not spec.data.max_segments_per_row:
    slots = data_defaults.PACKED_MARKER_FACTOR * int(spec.data.max_steps_per_example) + 1
    where = " on a Hopper GPU" if spec.model.segment_attention == "auto" else ""
    warnings.append(f"model.segment_attention='{spec.model.segment_attention}' with data.max_segments_per_row=0 "
                    f"gives cuDNN{where} {slots} segment slots per row (one softmax statistic each, mostly empty); "
                    "set data.max_segments_per_row (e.g. 16)")
  if spec.model.path == DEMO_MODEL:
    for key in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size"):
      if not spec.model.demo[key] > 0:
        problems.append(f"model.demo.{key} must be > 0, got {spec.model.demo[key]}")
    if spec.model.demo.vocab_size < 0:
      problems.append("model.demo.vocab_size must be >= 0 (0 = the demo tokenizer's), "
                      f"got {spec.model.demo.vocab_size}")
    if spec.model.demo.num_kv_heads > 0 and spec.model.demo.num_heads % spec.model.demo.num_kv_heads:
      problems.append(f"model.demo.num_heads ({spec.model.demo.num_heads}) must be a multiple of "
                      f"model.demo.num_kv_heads ({spec.model.demo.num_kv_heads})")


def _positive_ints(values: Iterable[Any]) -> bool:
  return all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)


def _check_batch_and_mesh(spec: ConfigDict, num_devices: int, process_count: int,
                          problems: list[str]) -> None:
  batch, accum = int(spec.batch_size), int(spec.grad_accum_steps)
  try:
    sizes = resolve_mesh(spec.mesh, num_devices)
  except SpecError as e:
    problems.append(str(e))
    sizes = None
  if batch <= 0 or accum <= 0:
    return  # already reported
  if batch % accum:
    problems.append(f"batch_size ({batch}) is not divisible by grad_accum_steps ({accum})")
    return
  micro = batch // accum
  if sizes is not None:
    dp = sizes["data"] * sizes["fsdp"]
    if micro % dp:
      problems.append(f"micro-batch batch_size // grad_accum_steps = {batch} // {accum} = {micro} is not "
                      f"divisible by the data-parallel size data*fsdp = {dp}")
    eval_batch = int(spec.data.eval_batch_size)
    if eval_batch > 0 and eval_batch % dp:
      problems.append(f"data.eval_batch_size ({eval_batch}) is not divisible by the data-parallel "
                      f"size data*fsdp = {dp}")
  if process_count > 1 and micro % process_count:
    problems.append(f"micro-batch ({micro}) is not divisible by the {process_count} processes")
  if process_count > 1 and int(spec.data.eval_batch_size) % process_count:
    problems.append(f"data.eval_batch_size ({spec.data.eval_batch_size}) is not divisible by the "
                    f"{process_count} processes")


def _check_data(spec: ConfigDict, problems: list[str], warnings: list[str], check_paths: bool) -> None:
  data = spec.data
  buckets = list(data.length_buckets)
  if not buckets or not _positive_ints(buckets) or buckets != sorted(set(buckets)):
    problems.append(f"data.length_buckets must be positive integers, strictly increasing, got {tuple(buckets)}")
  elif max(buckets) < data.max_length:
    problems.append(f"data.length_buckets {tuple(buckets)}: the largest bucket is below "
                    f"data.max_length ({data.max_length})")
  sources_readable = check_sources(spec, problems, check_paths)
  if is_synthetic(spec, "prm800k") and data.prm800k.use:
    problems.extend(f"data.synthetic: {p}" for p in synthetic.settings(data.synthetic.to_dict())[-1])
  if data.template == "chat" and spec.model.path == DEMO_MODEL:
    problems.append(f"data.template='chat' but the tokenizer of model.path {DEMO_MODEL} has no chat template")
  if sources_readable and not training_sources(spec):
    problems.append("no training source: enable one with weight > 0 (data.<source>.use / .weight; "
                    "REVEAL trains only with data.allow_reveal_training)")
  if data.allow_reveal_training and data.reveal.use:
    warnings.append("data.allow_reveal_training is set: REVEAL's terms allow it as a test set only, "
                    "and its eval numbers are no longer held-out")
