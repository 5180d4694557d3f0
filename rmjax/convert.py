"""Convert an HF checkpoint once into rmjax's own format, and load either kind.

Why it exists: reading a safetensors checkpoint, transposing, stacking layers and placing the
marker costs time and host memory at every launch; a converted directory (orbax params +
`rmjax_model.json` + tokenizer with the marker; an untied model's lm_head in its own file, which
training never reads and export copies into HF checkpoints) restores directly. `load_backbone`
hides the difference so specs can point at a hub id, an HF directory or a converted directory.

  python -m rmjax.convert --model Qwen/Qwen3-4B --output /data/qwen3-4b-rmjax [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from typing import Any

import ml_dtypes
import numpy as np

from rmjax import background_errors, cli
from rmjax.model.config import ModelConfig
from rmjax.model.hf import hf_model_config, load_hf_params, read_tensor, resolve_model_dir
from rmjax.model.marker import add_marker

CONFIG_FILE = "rmjax_model.json"
PARAMS_DIR = "params"
# An untied model's lm_head.weight (rows grown with the marker), kept beside the params: training
# never computes vocabulary logits so never loads it, but an exported HF checkpoint needs it.
LM_HEAD_FILE = "lm_head.safetensors"
FORMAT = "rmjax-backbone-v1"


def is_converted(path: str | os.PathLike) -> bool:
  return (pathlib.Path(path) / CONFIG_FILE).is_file()


def _np_dtype(name: str) -> np.dtype:
  return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def _tokenizer_with_marker(model_dir: pathlib.Path) -> tuple[Any, int, int]:
  """(tokenizer with marker, marker id, token count before the marker was added)."""
  from rmjax.tokenizer import ensure_marker, load_tokenizer_dir, marker_id
  tok = load_tokenizer_dir(model_dir, marker=False)
  before = len(tok)
  try:
    tok = ensure_marker(tok)
  except ValueError as e:
    raise ValueError(f"tokenizer in {model_dir}: {e}") from None
  return tok, marker_id(tok), before


def load_hf_backbone(path_or_id: str | os.PathLike, dtype: str | None = None, marker: bool = True,
                     keep_lm_head: bool = False, **overrides: Any) -> tuple[dict, ModelConfig, Any]:
  """(params, cfg, tokenizer or None) from an HF directory or hub id, marker placed."""
  model_dir = resolve_model_dir(path_or_id)
  cfg = hf_model_config(model_dir, **overrides)
  if dtype:
    cfg = cfg.replace(param_dtype=dtype)
  params = load_hf_params(model_dir, cfg, cfg.param_dtype, keep_lm_head=keep_lm_head)
  tok = None
  if marker:
    tok, mid, before = _tokenizer_with_marker(model_dir)
    params, cfg = add_marker(params, cfg, mid, before)
  return params, cfg, tok


def _empty_output(out_dir: str | os.PathLike) -> pathlib.Path:
  """`out_dir` resolved, if it is new or an empty folder: a converted directory's config and
  tokenizer files would replace another's (a run's model/ folder has the same file names)."""
  out = pathlib.Path(out_dir).resolve()
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise FileExistsError(f"{out} is {'not empty' if out.is_dir() else 'a file'}; choose a new or empty output directory")
  return out


def save_converted(params: dict, cfg: ModelConfig, out_dir: str | os.PathLike, tokenizer: Any = None) -> pathlib.Path:
  """Write a converted directory; an "lm_head" entry of `params` goes to its own file."""
  import orbax.checkpoint as ocp
  from safetensors.numpy import save_file
  out = _empty_output(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  params = dict(params)
  lm_head = params.pop("lm_head", None)
  background_errors.install()
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(out / PARAMS_DIR, params)
    ckpt.wait_until_finished()
  if lm_head is not None:
    save_file({"lm_head.weight": np.ascontiguousarray(lm_head["embedding"])}, str(out / LM_HEAD_FILE),
              metadata={"format": "pt"})
  (out / CONFIG_FILE).write_text(json.dumps({"format": FORMAT, "model": cfg.to_dict()}, indent=2) + "\n")
  if tokenizer is not None:
    tokenizer.save_pretrained(str(out))
  return out


def load_lm_head(path: str | os.PathLike) -> np.ndarray | None:
  """A converted directory's lm_head.weight (None if it has none: tied, or converted before it
  was kept)."""
  file = pathlib.Path(path) / LM_HEAD_FILE
  return np.asarray(read_tensor(file, "lm_head.weight")) if file.is_file() else None


def load_converted(path: str | os.PathLike, dtype: str | None = None) -> tuple[dict, ModelConfig]:
  import orbax.checkpoint as ocp
  from rmjax.checkpoint.errors import CheckpointCorrupt, one_line
  path = pathlib.Path(path).resolve()
  meta = cli.read_json_object(path / CONFIG_FILE)
  if meta.get("format") != FORMAT:
    raise ValueError(f"{path / CONFIG_FILE} has format {meta.get('format')!r}, expected {FORMAT!r}")
  cfg = ModelConfig.from_dict(meta["model"])
  background_errors.install()
  try:
    with ocp.StandardCheckpointer() as ckpt:
      params = ckpt.restore(path / PARAMS_DIR)
  except Exception as e:  # noqa: BLE001 -- orbax/tensorstore raise many types for bad files
    background_errors.orbax_failed()
    raise CheckpointCorrupt(path / PARAMS_DIR, one_line(e)) from e
  if dtype and dtype != cfg.param_dtype:
    cast = _np_dtype(dtype)
    params = _map(params, lambda k, v: v if k in ("marker", "lora_a", "lora_b") else np.asarray(v).astype(cast))
    cfg = cfg.replace(param_dtype=dtype)
  return params, cfg


def _map(tree: dict, fn) -> dict:
  return {k: _map(v, fn) if isinstance(v, dict) else fn(k, v) for k, v in tree.items()}


def load_backbone(path_or_id: str | os.PathLike, dtype: str | None = None, marker: bool = True,
                  **overrides: Any) -> tuple[dict, ModelConfig]:
  """(decoder params as numpy, ModelConfig) from a converted dir, an HF dir or a hub id.

  `overrides` (e.g. compute_dtype, remat, lora_rank) are applied to the config; LoRA params
  are not created here (Decoder.init or the train state does that).
  """
  if is_converted(path_or_id):
    params, cfg = load_converted(path_or_id, dtype)
    return params, cfg.replace(**overrides) if overrides else cfg
  params, cfg, _ = load_hf_backbone(path_or_id, dtype, marker=marker, **overrides)
  return params, cfg


def convert(model: str, output: str | os.PathLike, dtype: str | None = None, marker: bool = True) -> pathlib.Path:
  _empty_output(output)  # before minutes of loading
  params, cfg, tok = load_hf_backbone(model, dtype, marker=marker, keep_lm_head=True)  # untied: kept
  return save_converted(params, cfg, output, tok)


def main(argv: list[str] | None = None) -> int:
  parser = cli.ArgumentParser(prog="python -m rmjax.convert", description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", required=True, help="HF model directory or hub id")
  parser.add_argument("--output", required=True, help="output directory, new or empty")
  parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                      help="param dtype to store (default: the checkpoint's)")
  parser.add_argument("--no-marker", action="store_true", help="do not add the <CONFIDENCE> marker")
  args = parser.parse_args(argv)
  return cli.run("convert", lambda: _convert_command(args))


def _convert_command(args: argparse.Namespace) -> int:
  out = convert(args.model, args.output, args.dtype, marker=not args.no_marker)
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
