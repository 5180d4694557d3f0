"""What a run directory holds besides checkpoints, so a checkpoint can be used on its own.

Why it exists: an orbax checkpoint stores arrays only. Export, scoring and evaluation need
everything else that defines the model: the decoder config, the head, how prompts were
rendered, the tokenizer with its `<CONFIDENCE>` marker, the base model it started from and the
fine-tuning mode. The training loop writes those once into `<run_dir>/model/`
(`save_run_model`); `load_run_model` turns a run directory or one
`checkpoints/checkpoint_step_<N>` directory back into a ready-to-use model (numpy params).

  <run_dir>/model/rmjax_model.json   model / head / render configs, base model, mode, marker
  <run_dir>/model/tokenizer*         tokenizer files (the marker is a special token)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import re
from typing import Any

import numpy as np

from rmjax.cli import first_line, read_json_object
from rmjax.model.config import ModelConfig
from rmjax.model.head import HeadConfig
from rmjax.data.render import RenderConfig
from rmjax.tokenizer import MARKER, marker_id

MODEL_DIR = "model"
MODEL_FILE = "rmjax_model.json"
FORMAT = "rmjax-run-model-v1"
_STEP_DIR = re.compile(r"^checkpoint_step_(\d+)$")


class RunArtifactError(ValueError):
  """A run / checkpoint path that cannot be resolved; the message is one line."""


@dataclasses.dataclass(frozen=True)
class RunModel:
  """A restored model: configs, tokenizer and the full merged param tree (numpy)."""
  model_cfg: ModelConfig
  head_cfg: HeadConfig
  render_cfg: RenderConfig
  tokenizer: Any
  params: dict  # {"decoder": ..., "head": ...}, numpy arrays
  mode: str  # "full" | "lora"
  base_model_path: str
  step: int
  run_dir: pathlib.Path
  checkpoint_dir: pathlib.Path


def render_cfg_to_dict(cfg: RenderConfig) -> dict[str, Any]:
  d = dataclasses.asdict(cfg)
  d["length_buckets"] = list(cfg.length_buckets)
  return d


def head_cfg_to_dict(cfg: HeadConfig) -> dict[str, Any]:
  d = dataclasses.asdict(cfg)
  d["hidden_dims"] = list(cfg.hidden_dims)
  return d


def save_run_model(run_dir: str | os.PathLike, model_cfg: ModelConfig, head_cfg: HeadConfig,
                   render_cfg: RenderConfig, tokenizer: Any, base_model_path: str, mode: str) -> pathlib.Path:
  """Write `<run_dir>/model/` (tokenizer files + rmjax_model.json); returns that directory."""
  if mode not in ("full", "lora"):
    raise ValueError(f"mode must be 'full' or 'lora', got {mode!r}")
  mid = marker_id(tokenizer)
  if model_cfg.marker_id is not None and model_cfg.marker_id != mid:
    raise ValueError(f"model marker_id {model_cfg.marker_id} != tokenizer's {MARKER} id {mid}")
  out = pathlib.Path(run_dir) / MODEL_DIR
  out.mkdir(parents=True, exist_ok=True)
  tokenizer.save_pretrained(str(out))
  meta = {
    "format": FORMAT,
    "model": model_cfg.to_dict(),
    "head": head_cfg_to_dict(head_cfg),
    "render": render_cfg_to_dict(render_cfg),
    "base_model": str(base_model_path),
    "mode": mode,
    "marker_token": MARKER,
    "marker_id": mid,
  }
  tmp = out / f".{MODEL_FILE}.tmp"
  tmp.write_text(json.dumps(meta, indent=2) + "\n")
  os.replace(tmp, out / MODEL_FILE)
  return out


# -- resolving paths ------------------------------------------------------------------------------
def _step_dirs(ckpt_dir: pathlib.Path) -> dict[int, pathlib.Path]:
  if not ckpt_dir.is_dir():
    return {}
  found = {}
  for p in ckpt_dir.iterdir():
    m = _STEP_DIR.match(p.name)
    if m and (p / "state").is_dir():
      found[int(m.group(1))] = p
  return found


def resolve_checkpoint(path: str | os.PathLike) -> tuple[pathlib.Path, pathlib.Path, int]:
  """(run_dir, checkpoint_step_<N> dir, N) for a run directory or a step directory.

  A run directory resolves to its best checkpoint (checkpoints/best.json) if that still
  exists, else to its latest one.
  """
  p = pathlib.Path(path).expanduser().absolute()
  if not p.exists():
    raise RunArtifactError(f"checkpoint path not found: {p}")
  m = _STEP_DIR.match(p.name)
  if m and p.is_dir():
    if not (p / "state").is_dir():
      raise RunArtifactError(f"{p} has no state/ folder (incomplete or not an rmjax checkpoint)")
    return p.parent.parent, p, int(m.group(1))
  ckpt_dir = p / "checkpoints"
  steps = _step_dirs(ckpt_dir)
  if not steps:
    raise RunArtifactError(f"{p} is neither a run directory with checkpoints/checkpoint_step_<N> "
                           f"nor a checkpoint_step_<N> directory")
  best_file = ckpt_dir / "best.json"
  if best_file.is_file():
    try:
      best = int(json.loads(best_file.read_text())["step"])
    except (ValueError, KeyError, TypeError):
      best = None
    if best in steps:
      return p, steps[best], best
  last = max(steps)
  return p, steps[last], last


def read_run_meta(run_dir: pathlib.Path) -> dict[str, Any]:
  f = run_dir / MODEL_DIR / MODEL_FILE
  if not f.is_file():
    raise RunArtifactError(f"{f} not found: this run was not written by rmjax training "
                           f"(or the model/ folder was removed)")
  meta = read_json_object(f)
  if meta.get("format") != FORMAT:
    raise RunArtifactError(f"{f} has format {meta.get('format')!r}, expected {FORMAT!r}")
  return meta


def configs_from_meta(meta: dict[str, Any]) -> tuple[ModelConfig, HeadConfig, RenderConfig]:
  return (ModelConfig.from_dict(meta["model"]), HeadConfig(**meta["head"]),
          RenderConfig(**{**meta["render"], "length_buckets": tuple(meta["render"]["length_buckets"])}))


def _checked_meta(run_dir: pathlib.Path, meta: dict[str, Any]) -> tuple[ModelConfig, HeadConfig, RenderConfig, int]:
  """configs_from_meta and the marker id, with a missing key or a value of the wrong type named
  with the file. Every config field must be present (save_run_model writes them all): a default
  filled in for a lost field would silently score with another model."""
  f = run_dir / MODEL_DIR / MODEL_FILE
  try:
    for key, cls in (("model", ModelConfig), ("head", HeadConfig), ("render", RenderConfig)):
      if not isinstance(meta[key], dict):
        raise TypeError(f"'{key}' is a {type(meta[key]).__name__}, expected an object")
      missing = sorted({field.name for field in dataclasses.fields(cls)} - set(meta[key]))
      if missing:
        raise KeyError(f"{key}.{missing[0]}")
    configs = configs_from_meta(meta)
    if meta["mode"] not in ("full", "lora") or not isinstance(meta["base_model"], str):
      raise ValueError(f"bad mode {meta['mode']!r} or base_model {meta['base_model']!r}")
    return (*configs, int(meta["marker_id"]))
  except KeyError as e:
    raise RunArtifactError(f"{f} has no key {e}") from None
  except (TypeError, ValueError, AttributeError) as e:  # a value of the wrong type or range
    raise RunArtifactError(f"{f} is malformed: {type(e).__name__}: {first_line(e)}") from None


def load_run_tokenizer(run_dir: pathlib.Path, expected_marker_id: int) -> Any:
  from rmjax.tokenizer import load_tokenizer_dir
  tok = load_tokenizer_dir(run_dir / MODEL_DIR)
  if marker_id(tok) != expected_marker_id:
    raise RunArtifactError(f"tokenizer in {run_dir / MODEL_DIR} gives {MARKER} id {marker_id(tok)}, "
                           f"rmjax_model.json says {expected_marker_id}")
  return tok


# -- restoring params -----------------------------------------------------------------------------
def _abstract_state(step_dir: pathlib.Path) -> dict[str, Any]:
  """ShapeDtypeStruct tree of the saved "params" and "frozen" fields, read from orbax metadata."""
  import jax
  import orbax.checkpoint as ocp
  from rmjax.checkpoint import CheckpointCorrupt
  from rmjax import background_errors
  background_errors.install()
  absl_log = logging.getLogger("absl")  # orbax warns about a metadata file it does not need
  level = absl_log.level
  absl_log.setLevel(logging.ERROR)
  try:
    with ocp.PyTreeCheckpointer() as pc:
      metadata = pc.metadata(step_dir / "state")
    tree = getattr(getattr(metadata, "item_metadata", None), "tree", None)
  except Exception as e:  # noqa: BLE001 -- orbax/tensorstore raise many types for bad files
    raise CheckpointCorrupt(step_dir, f"{type(e).__name__}: {first_line(e)}") from e
  finally:
    absl_log.setLevel(level)
  if not isinstance(tree, dict):
    raise CheckpointCorrupt(step_dir, "state/ has no readable tree metadata (_METADATA missing or broken)")
  dev = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  to_abstract = lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=dev)
  out = {}
  for key in ("params", "frozen"):
    if key not in tree:
      raise RunArtifactError(f"{step_dir} has no '{key}' field in its state")
    sub = tree[key]
    out[key] = jax.tree.map(to_abstract, sub, is_leaf=lambda x: hasattr(x, "shape")) if sub else {}
  return out


def restore_params(step_dir: pathlib.Path) -> dict:
  """The full param tree of one checkpoint step, as numpy arrays (params + frozen merged)."""
  import jax
  from rmjax.checkpoint import restore_subtree
  from rmjax.train.optim import merge_params
  abstract = _abstract_state(step_dir)
  restored = restore_subtree(step_dir, abstract)
  full = merge_params(restored["params"] or {}, restored["frozen"] or {})
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), full)


def _check_params_match(params: dict, model_cfg: ModelConfig, head_cfg: HeadConfig, step_dir: pathlib.Path,
                        meta_file: pathlib.Path) -> None:
  """The restored tree must be exactly the one the configs describe (names and shapes)."""
  import jax
  from rmjax.model.confidence import ConfidenceModel
  from rmjax.train.state import check_same_tree, dummy_inputs
  try:
    model = ConfidenceModel(model_cfg, head_cfg)
    expected = jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0)}, *dummy_inputs()))["params"]
    check_same_tree(params, expected)
  except (TypeError, ValueError) as e:  # a config value of the wrong type, or another model's tree
    raise RunArtifactError(f"{step_dir} does not match {meta_file}: {first_line(e)}") from None


def load_run_model(path: str | os.PathLike) -> RunModel:
  """A run directory (best, else latest checkpoint) or a checkpoint_step_<N> directory -> RunModel."""
  run_dir, step_dir, step = resolve_checkpoint(path)
  meta = read_run_meta(run_dir)
  model_cfg, head_cfg, render_cfg, mid = _checked_meta(run_dir, meta)
  tok = load_run_tokenizer(run_dir, mid)
  params = restore_params(step_dir)
  for key in ("decoder", "head"):
    if key not in params:
      raise RunArtifactError(f"{step_dir}: restored params have no '{key}' subtree")
  _check_params_match(params, model_cfg, head_cfg, step_dir, run_dir / MODEL_DIR / MODEL_FILE)
  return RunModel(model_cfg=model_cfg, head_cfg=head_cfg, render_cfg=render_cfg, tokenizer=tok,
                  params=params, mode=meta["mode"], base_model_path=meta["base_model"], step=step,
                  run_dir=run_dir, checkpoint_dir=step_dir)
