"""Builds what a run needs from its spec: tokenizer, model configs, initial weights, data sources.

Why it exists: the training loop should read as a loop. Everything that turns spec keys into
objects (the demo backbone or an imported one with its marker, LoRA settings, the synthetic
PRM800K files of the demo, one reader per enabled source and split) lives here, each piece a
small function a test can call on its own.

Weights: a real backbone comes from `rmjax.convert.load_backbone` (HF dir, hub id or converted
dir; marker placed there). The parameters it does not hold (the head, and LoRA adapters) are
initialised by a jitted `model.init` whose output is cut down to those leaves, so XLA drops the
random init of the big matrices instead of materialising a second copy of the backbone.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
from typing import Any

import jax
from flax import traverse_util

from rmjax import spec as spec_lib
from rmjax.data.example import SkipCounter
from rmjax.data.render import RenderConfig, require_chat_template
from rmjax.data.sources import SKIPS_COUNTED_ON_ACCESS, build_source, reader_kind
from rmjax.data import synthetic
from rmjax.data.synthetic import SyntheticConfig, write_synthetic_prm800k
from rmjax.model import cudnn_attention
from rmjax.model.config import ModelConfig
from rmjax.model.head import HeadConfig
from rmjax.model.transformer import auto_attention_impl, uses_packed_layout
from rmjax.tokenizer import build_demo_tokenizer, load_tokenizer, marker_id
from rmjax.train.state import dummy_inputs

log = logging.getLogger("rmjax.train")

SYNTHETIC_SETTINGS = "synthetic.json"  # beside the synthetic records: what wrote them


@dataclasses.dataclass(frozen=True)
class ModelParts:
  """The tokenizer, both model configs and (for a real backbone) its numpy decoder params."""
  tokenizer: Any
  model_cfg: ModelConfig
  head_cfg: HeadConfig
  backbone: dict | None  # None = random init of everything (demo)


def head_config(spec: Any) -> HeadConfig:
  h = spec.head
  return HeadConfig(hidden_dims=tuple(int(d) for d in h.hidden_dims), activation=str(h.activation),
                    dropout=float(h.dropout))


def model_overrides(spec: Any) -> dict[str, Any]:
  """ModelConfig fields the spec controls on top of the backbone's own architecture.

  An "auto" remat or scan_unroll becomes its fallback (spec.AUTO_FALLBACK) here: the training
  loop replaces it with what rmjax.train.auto_settings chose; "auto" never reaches ModelConfig.
  """
  m = spec.model
  lora = spec.mode == "lora"
  performance = {k: spec_lib.AUTO_FALLBACK[k] if v == spec_lib.AUTO else v
                 for k, v in spec_lib.performance_settings(spec).items()}
  # Unpacked rows hold one example from position 0, padded at the end: causal attention alone is
  # exact there and runs cuDNN's plain causal kernel (faster: BUILD.md).
  # Packed rows need the segment mask. Scoring and evaluation rows are unpacked either way.
  return dict(param_dtype=str(m.param_dtype), compute_dtype=str(m.compute_dtype), **performance,
              attention_query_block=int(m.attention_query_block), cpu_dot_library=str(m.cpu_dot_library),
              attention_impl=str(m.attention_impl) or None,
              attention_mask="segments" if bool(spec.data.pack) else "causal",
              segment_attention=str(m.segment_attention), max_segments=int(spec.data.max_segments_per_row),
              lora_rank=int(spec.lora.rank) if lora else 0, lora_alpha=float(spec.lora.alpha),
              lora_targets=tuple(spec.lora.targets))


def demo_model_config(spec: Any, tokenizer: Any) -> ModelConfig:
  """The tiny random backbone of `model.path == "demo"`: Qwen3 layout, spec.model.demo shape."""
  d = spec.model.demo
  if 0 < int(d.vocab_size) < len(tokenizer):
    raise spec_lib.SpecError(f"invalid spec: model.demo.vocab_size={d.vocab_size} is below the demo "
                             f"tokenizer's {len(tokenizer)} tokens; use 0 or at least {len(tokenizer)}")
  try:
    return ModelConfig.tiny(
      "qwen3", vocab_size=int(d.vocab_size) or len(tokenizer), hidden_size=int(d.hidden_size),
      num_layers=int(d.num_layers), num_heads=int(d.num_heads), num_kv_heads=int(d.num_kv_heads), head_dim=int(d.head_dim),
      intermediate_size=int(d.intermediate_size), max_position_embeddings=int(spec.data.max_length),
      marker_id=marker_id(tokenizer), **model_overrides(spec))
  except ValueError as e:  # a shape the config refuses (e.g. an odd head_dim): the user's spec
    raise spec_lib.SpecError(f"invalid spec: model.demo: {e}") from None


def check_on_this_device(cfg: ModelConfig) -> None:
  """Model settings only the device can judge, refused before anything compiles (SpecError: one
  line): cuDNN's packed layout, asked for by name, needs a jax that offers it and a Hopper or
  later GPU. "auto" is never refused; for packed rows an info line says what it picked."""
  if cfg.attention_mask != "segments" or cfg.segment_attention == "mask":
    return
  choice = f"model.segment_attention='{cfg.segment_attention}'"
  reason = cudnn_attention.packed_unsupported_reason()
  if uses_packed_layout(cfg):  # under "auto" only where `reason` is None
    if reason:
      raise spec_lib.SpecError(f"{choice}: {reason}; use 'auto' or 'mask'")
    log.info(f"{choice}: packed rows go to cuDNN as its packed layout, each example a sequence of its own")
  elif (cfg.attention_impl or auto_attention_impl(cfg, cfg.compute_dtype)) != "cudnn":
    log.info(f"{choice} applies to cuDNN attention only; packed rows use the segment mask here")
  else:
    log.info(f"{choice}: packed rows use the segment mask here ({reason})")


def check_template(spec: Any, tokenizer: Any) -> None:
  """data.template="chat" needs a tokenizer with a chat template (SpecError: one line, before
  the data pipeline's threads would meet it)."""
  try:
    require_chat_template(tokenizer, str(spec.data.template))
  except ValueError:
    raise spec_lib.SpecError(f"invalid spec: data.template='chat' but the tokenizer of model.path "
                             f"{spec.model.path} has no chat template; use 'default'") from None


def build_model_parts(spec: Any) -> ModelParts:
  if spec.model.path == spec_lib.DEMO_MODEL:
    tokenizer = build_demo_tokenizer()
    check_template(spec, tokenizer)
    cfg = demo_model_config(spec, tokenizer)
    check_on_this_device(cfg)
    return ModelParts(tokenizer, cfg, head_config(spec), None)
  from rmjax.convert import load_backbone  # heavy (safetensors, transformers): only when used
  path, overrides = str(spec.model.path), model_overrides(spec)
  dtype = overrides.pop("param_dtype")
  backbone, cfg = load_backbone(path, dtype=dtype, **overrides)
  check_on_this_device(cfg)
  tokenizer = load_tokenizer(path, trust_remote_code=bool(spec.model.trust_remote_code))
  check_template(spec, tokenizer)
  if cfg.marker_id != marker_id(tokenizer):
    raise spec_lib.SpecError(f"model.path {path}: the backbone's marker id {cfg.marker_id} differs from the "
                     f"tokenizer's {marker_id(tokenizer)}")
  return ModelParts(tokenizer, cfg, head_config(spec), backbone)


def complete_params(model: Any, backbone: dict, rng: jax.Array) -> dict:
  """{"decoder": backbone + fresh LoRA leaves, "head": fresh} as a full param tree (numpy/jax).

  Raises a one-line ValueError if the backbone lacks a non-LoRA decoder weight or has extras.
  """
  def init_fn(key):
    return model.init({"params": key}, *dummy_inputs(), deterministic=True)["params"]

  abstract = traverse_util.flatten_dict(jax.eval_shape(init_fn, rng))
  given = {("decoder",) + k: v for k, v in traverse_util.flatten_dict(backbone).items()}
  missing = [k for k in abstract if k not in given]
  bad = [k for k in missing if k[0] != "head" and k[-1] not in ("lora_a", "lora_b")]
  extra = [k for k in given if k not in abstract]
  if bad or extra:
    raise ValueError(f"backbone does not match the model: missing {['/'.join(k) for k in bad[:3]]}, "
                     f"unexpected {['/'.join(k) for k in extra[:3]]}")
  fresh = jax.jit(lambda key: {"/".join(k): v for k, v in
                               traverse_util.flatten_dict(init_fn(key)).items() if k in set(missing)})(rng)
  flat = dict(given)
  flat.update({tuple(k.split("/")): v for k, v in fresh.items()})
  return traverse_util.unflatten_dict(flat)


# ------------------------------------------------------------------------------------ data


def synthetic_config(spec: Any) -> tuple[SyntheticConfig, int, int]:
  """(generator settings, train records, test records) from the `data.synthetic` block."""
  cfg, n_train, n_test, problems = synthetic.settings(spec.data.synthetic.to_dict())
  if problems:
    raise spec_lib.SpecError("invalid spec: data.synthetic: " + "; ".join(problems))
  return cfg, n_train, n_test


def ensure_synthetic_prm800k(data_dir: pathlib.Path, seed: int, cfg: SyntheticConfig = SyntheticConfig(),
                             n_train: int = synthetic.DEFAULT_TRAIN_RECORDS,
                             n_test: int = synthetic.DEFAULT_TEST_RECORDS) -> pathlib.Path:
  """phase2_{train,test}.jsonl of SYNTHETIC records under data_dir (written only if missing).

  Each file is written to a temporary name and renamed, so concurrent processes (multi-host on
  a shared filesystem) or a kill mid-write never leave a half file behind; contents depend only
  on the seed and the settings, so whichever process wins writes the same bytes. The settings
  are kept beside the records (SYNTHETIC_SETTINGS): a run resumed with other `data.synthetic`
  settings or seed stops with one line instead of training on records its spec does not describe.
  """
  data_dir.mkdir(parents=True, exist_ok=True)
  settings = {"seed": seed, "train_records": n_train, "test_records": n_test, **dataclasses.asdict(cfg)}
  stamp = data_dir / SYNTHETIC_SETTINGS
  splits = (("train", n_train, seed), ("test", n_test, seed + synthetic.TEST_SEED_OFFSET))
  paths = {split: data_dir / f"phase2_{split}.jsonl" for split, _, _ in splits}
  found = any(p.exists() for p in paths.values())  # records found without the file are read unchecked
  if found and stamp.exists():
    _check_synthetic_settings(stamp, settings)
  for split, n, s in splits:
    if paths[split].exists():
      continue
    tmp = data_dir / f".phase2_{split}.{os.getpid()}.tmp"
    try:
      write_synthetic_prm800k(str(tmp), n, s, cfg)
    except OSError as e:  # a full disk: name the folder (a write error names no file)
      tmp.unlink(missing_ok=True)
      raise OSError(e.errno, f"{e.strerror} (writing the synthetic demo data)", str(data_dir)) from None
    os.replace(tmp, paths[split])
  if not found:
    tmp = data_dir / f".{SYNTHETIC_SETTINGS}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(settings, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, stamp)
  return data_dir


def _check_synthetic_settings(stamp: pathlib.Path, settings: dict[str, Any]) -> None:
  try:
    written = json.loads(stamp.read_text(encoding="utf-8"))
  except (OSError, ValueError) as e:
    raise spec_lib.SpecError(f"data.synthetic: cannot read {stamp} ({e}); delete the run's data/ folder to "
                             "write the records again") from None
  key = lambda name: name if name == "seed" else f"data.synthetic.{name}"
  differ = [f"{key(k)} {written.get(k)!r} (this spec: {v!r})" for k, v in settings.items() if written.get(k) != v]
  if differ:
    raise spec_lib.SpecError(f"{stamp.parent} holds synthetic records written with other settings: "
                             f"{', '.join(differ)}; resume with those, or use a new output_dir")


def source_config(spec: Any, name: str, run_dir: pathlib.Path) -> dict[str, Any]:
  """The reader config of one source: the spec's block plus data-level options, path resolved."""
  cfg = dict(spec.data[name].to_dict())
  cfg["neutral_target"] = float(spec.data.neutral_target)
  if spec_lib.is_synthetic(spec, name):
    cfg["path"] = str(ensure_synthetic_prm800k(run_dir / "data", int(spec.seed), *synthetic_config(spec)))
    cfg["phase"] = 2
  return cfg


def train_split(spec: Any, name: str) -> str:
  src = spec.data[name]
  return str(src.train_split) if "train_split" in src else str(src.eval_split)  # REVEAL: eval only


def build_sources(spec: Any, run_dir: pathlib.Path, skips: SkipCounter, shard_skips: SkipCounter
                  ) -> tuple[dict[str, tuple[Any, float]], dict[str, Any]]:
  """(training {name: (reader, weight)}, evaluation {name: reader}) for the enabled sources.

  Readers that count skips as records are read (`SKIPS_COUNTED_ON_ACCESS`) count into
  `shard_skips` (in a multi-process run each reads only its own shard), the others into `skips`."""
  def build(name: str, split: str):
    cfg = source_config(spec, name, run_dir)
    per_shard = reader_kind(name, cfg) in SKIPS_COUNTED_ON_ACCESS
    return build_source(name, cfg, split=split, skips=shard_skips if per_shard else skips)

  train, evals = {}, {}
  for name, weight in spec_lib.training_sources(spec).items():
    if name == "reveal":
      log.warning("REVEAL is in the training mix (data.allow_reveal_training): its terms allow it "
                  "as a test set only, and its eval numbers are no longer held out")
    train[name] = (build(name, train_split(spec, name)), weight)
  for name in spec_lib.eval_sources(spec):
    evals[name] = build(name, str(spec.data[name].eval_split))
    path = getattr(evals[name], "path", None)
    if name in train and path is not None and os.path.isfile(path) and path == getattr(train[name][0], "path", None):
      log.warning(f"data.{name}.path is the file {path}: a file serves every split, so training and "
                  f"evaluation both read it and its val numbers are not held out; give the directory "
                  f"holding its split files instead")
  return train, evals


def render_config(spec: Any) -> RenderConfig:
  return RenderConfig.from_spec(spec.data)
