"""Export a trained confidence model to standard PyTorch artefacts (HF model, PEFT adapter, head).

Why it exists: users train in JAX but serve and share in PyTorch. An export directory must give
the same scores in torch as rmjax does, with only transformers / peft / torch:

  python -m rmjax.export --checkpoint runs/demo --output export/ [--merge-lora]

DIR/rmjax_export.json    base model, mode, marker token + id, template, max_length, head dims /
                         activation / output function, the file layout below, rmjax model config
DIR/backbone/            full fine-tuning or --merge-lora: HF model dir (config.json,
                         model.safetensors, tokenizer incl. <CONFIDENCE>) for AutoModelForCausalLM
DIR/lora_adapter/        LoRA: a PEFT adapter (task CAUSAL_LM) for the base loaded as
                         AutoModelForCausalLM, the class most PEFT adapters are made for, so
                         `AutoPeftModelForCausalLM.from_pretrained(DIR/lora_adapter)` loads it:
                         keys base_model.model.model.layers.<i>.self_attn.q_proj.lora_A.weight
                         (r, in) / lora_B.weight (out, r); the trained marker row travels as PEFT
                         trainable tokens (trainable_token_indices=[marker_id], saved as
                         base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta,
                         which holds the row's new VALUE, not a difference); tokenizer files
DIR/backbone_base/       LoRA whose base is not an HF model (the "demo" backbone, or an rmjax
                         converted dir): the frozen base weights as an HF dir, so the adapter
                         has something to apply to; adapter_config.json then points here
DIR/mlp_head.safetensors, DIR/mlp_head.pt
                         state dict of nn.Sequential(Linear, act, Dropout, ..., Linear(., 1));
                         sigmoid after it gives the confidence

The head reads the decoder's last hidden state (after its final norm: `hidden_states[-1]` of
the CausalLM's output) at each marker position. Marker rows beyond the base's embedding matrix
(the matrix grew when the marker was added) need the embeddings resized to the tokenizer before
the adapter is applied; AutoPeftModelForCausalLM does that from the adapter's tokenizer, and so
does `rmjax.torch_scorer`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import secrets
import shutil
import sys
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from rmjax import cli
from rmjax.convert import is_converted, load_lm_head
from rmjax.model.config import ModelConfig
from rmjax.model.head import TORCH_ACTIVATIONS, HeadConfig, torch_layer_names
from rmjax.model.hf import TensorFiles, param_table, resolve_model_dir, save_hf_params
from rmjax.run_artifacts import RunModel, head_cfg_to_dict, load_run_model, render_cfg_to_dict
from rmjax.tokenizer import MARKER
from rmjax.tool_files import naming

EXPORT_FILE = "rmjax_export.json"
FORMAT = "rmjax-export-v1"
BACKBONE, ADAPTER, BASE_BACKBONE = "backbone", "lora_adapter", "backbone_base"
HEAD_ST, HEAD_PT = "mlp_head.safetensors", "mlp_head.pt"
# PEFT's key prefix of the decoder's modules inside a PeftModelForCausalLM.
_PEFT_PREFIX = "base_model.model."


class ExportError(ValueError):
  """A one-line reason why the export cannot be written."""


# -- head -------------------------------------------------------------------------------------------
def head_state_dict(head: dict, cfg: HeadConfig) -> dict[str, np.ndarray]:
  """torch Sequential state dict ("0.weight" (out, in), "0.bias", "3.weight", ...) as float32 numpy."""
  out = {}
  for name in torch_layer_names(cfg):
    idx = name.split("_")[1]
    layer = head[name]
    out[f"{idx}.weight"] = np.ascontiguousarray(np.asarray(layer["kernel"], np.float32).T)
    out[f"{idx}.bias"] = np.ascontiguousarray(np.asarray(layer["bias"], np.float32))
  return out


def write_head(head: dict, cfg: HeadConfig, out: pathlib.Path) -> list[str]:
  """mlp_head.safetensors always; mlp_head.pt when torch is installed. Returns the file names."""
  sd = head_state_dict(head, cfg)
  save_file(sd, str(out / HEAD_ST), metadata={"format": "pt"})
  try:
    import torch
  except ImportError:
    print(f"rmjax.export: warning: torch not installed, {HEAD_PT} not written "
          f'(pip install -e ".[torch]" in the rmjax checkout); {HEAD_ST} holds the same tensors', file=sys.stderr)
    return [HEAD_ST]
  torch.save({k: torch.from_numpy(v.copy()) for k, v in sd.items()}, out / HEAD_PT)
  return [HEAD_ST, HEAD_PT]


# -- LoRA adapter -----------------------------------------------------------------------------------
def _node(tree: dict, path: tuple[str, ...]) -> Any:
  for key in path:
    if not isinstance(tree, dict) or key not in tree:
      return None
    tree = tree[key]
  return tree


def adapter_tensors(decoder: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """PEFT adapter tensors keyed as peft saves them for a *ForCausalLM base."""
  out: dict[str, np.ndarray] = {}
  for row in param_table(cfg):
    if not row.transpose:
      continue
    node = _node(decoder, row.path[:-1])
    if node is None or "lora_a" not in node:
      continue
    module = row.hf.removesuffix(".weight")
    a_LIR, b_LRO = np.asarray(node["lora_a"], np.float32), np.asarray(node["lora_b"], np.float32)
    for i in range(cfg.num_layers):
      prefix = _PEFT_PREFIX + module.format(i=i)
      out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a_LIR[i].T)  # (r, in)
      out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b_LRO[i].T)  # (out, r)
  if not out:
    raise ExportError("mode is lora but the checkpoint holds no lora_a/lora_b parameters")
  embed = decoder["embed"]
  if cfg.marker_id is not None and "marker" in embed:
    marker_1D = np.asarray(embed["marker"], np.float32)[None, :]
    out[_PEFT_PREFIX + "model.embed_tokens.token_adapter.trainable_tokens_delta"] = marker_1D
  return out


def _alpha(value: float) -> int | float:
  return int(value) if float(value).is_integer() else float(value)


def adapter_config(cfg: ModelConfig, base: str) -> dict[str, Any]:
  """adapter_config.json for peft's LoraConfig (fields peft 0.17-0.21 read; others default)."""
  return {
    "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
    "r": cfg.lora_rank, "lora_alpha": _alpha(cfg.lora_alpha), "lora_dropout": 0.0,
    "target_modules": sorted(cfg.lora_targets), "bias": "none", "fan_in_fan_out": False,
    "use_rslora": False, "use_dora": False, "modules_to_save": None, "init_lora_weights": True,
    "inference_mode": True, "layers_to_transform": None, "layers_pattern": None,
    "rank_pattern": {}, "alpha_pattern": {},
    "trainable_token_indices": [cfg.marker_id] if cfg.marker_id is not None else None,
  }


def _strip_lora(tree: Any, drop_marker: bool) -> Any:
  if not isinstance(tree, dict):
    return tree
  return {k: _strip_lora(v, drop_marker) for k, v in tree.items()
          if k not in ("lora_a", "lora_b") and not (drop_marker and k == "marker")}


def hf_base_available(base: str) -> bool:
  """True when `base` names an HF model (local dir with config.json + safetensors, or a hub id)."""
  if base in ("", "demo"):
    return False
  p = pathlib.Path(base)
  if p.is_dir():
    return (p / "config.json").is_file() and ((p / "model.safetensors").is_file()
                                              or (p / "model.safetensors.index.json").is_file())
  return not p.exists() and not base.startswith((".", "/", "~")) and base.count("/") == 1


def _base_rows(base: str) -> int | None:
  """Embedding rows of a local HF base (None for a hub id: not checked offline)."""
  p = pathlib.Path(base)
  if not p.is_dir():
    return None
  return json.loads((p / "config.json").read_text()).get("vocab_size")


def write_adapter(rm: RunModel, out: pathlib.Path, base_ref: str) -> None:
  d = out / ADAPTER
  d.mkdir(parents=True, exist_ok=True)
  save_file(adapter_tensors(rm.params["decoder"], rm.model_cfg), str(d / "adapter_model.safetensors"),
            metadata={"format": "pt"})
  (d / "adapter_config.json").write_text(json.dumps(adapter_config(rm.model_cfg, base_ref), indent=2) + "\n")
  rm.tokenizer.save_pretrained(str(d))


def _base_lm_head(rm: RunModel) -> np.ndarray | None:
  """The base model's lm_head.weight (an untied model's HF checkpoint needs one; training never
  loads it): from the HF base, or from a converted base's lm_head file."""
  base = rm.base_model_path
  if is_converted(base):
    return load_lm_head(base)
  if hf_base_available(base):
    return TensorFiles(resolve_model_dir(base)).get("lm_head.weight")
  return None


def write_backbone(rm: RunModel, out_dir: pathlib.Path, *, base_only: bool = False,
                   shown: pathlib.Path | None = None) -> None:
  """An HF model dir: trained weights (LoRA merged) or, with base_only, the frozen base. A failed
  write names `shown` (the final path, while out_dir is a temporary one), a failed read its file."""
  dec = _strip_lora(rm.params["decoder"], drop_marker=True) if base_only else rm.params["decoder"]
  cfg = rm.model_cfg
  lm_head = None
  if not cfg.tie_word_embeddings and "lm_head" not in dec:
    lm_head = _base_lm_head(rm)
    if lm_head is None:
      raise ExportError(f"untied model: the base {rm.base_model_path} has no lm_head to copy")
  with naming(shown or out_dir):
    save_hf_params(dec, cfg, out_dir, lora="merge", lm_head=lm_head)
    rm.tokenizer.save_pretrained(str(out_dir))


# -- the export -------------------------------------------------------------------------------------
def export_meta(rm: RunModel, files: dict[str, Any]) -> dict[str, Any]:
  head = head_cfg_to_dict(rm.head_cfg) | {"torch_activation": TORCH_ACTIVATIONS[rm.head_cfg.activation],
                                          "output": "sigmoid", "input_dim": rm.model_cfg.hidden_size}
  return {
    "format": FORMAT, "base_model": rm.base_model_path, "mode": rm.mode,
    "marker_token": MARKER, "marker_id": rm.model_cfg.marker_id, "vocab_size": rm.model_cfg.vocab_size,
    "template": rm.render_cfg.template, "max_length": rm.render_cfg.max_length,
    "render": render_cfg_to_dict(rm.render_cfg), "head": head, "files": files,
    "model_config": rm.model_cfg.to_dict(), "checkpoint": str(rm.checkpoint_dir), "step": rm.step,
  }


def export(checkpoint: str | os.PathLike, output: str | os.PathLike, merge_lora: bool = False,
           write_base: bool = False) -> pathlib.Path:
  """Write the export directory for a run dir / checkpoint dir; returns the output path."""
  out = pathlib.Path(output).absolute()
  if out.exists() and any(out.iterdir()):
    raise ExportError(f"output directory {out} exists and is not empty")
  rm = load_run_model(checkpoint)
  if rm.model_cfg.marker_id is None:
    raise ExportError("the model has no marker id; cannot export a confidence model")
  # Written in a folder beside `out` and renamed to it only when complete (rename replaces an
  # empty folder): a full disk, an error or Ctrl-C leaves no half export, which would look whole
  # to a reader and make the next try refuse a non-empty `out`.
  out.parent.mkdir(parents=True, exist_ok=True)
  work = out.with_name(f".{out.name}.{secrets.token_hex(4)}.partial")
  try:
    work.mkdir()
    _write_export(rm, out, work, merge_lora, write_base)
    with naming(out):
      os.replace(work, out)
  except BaseException:
    shutil.rmtree(work, ignore_errors=True)
    raise
  return out


def _write_export(rm: RunModel, out: pathlib.Path, work: pathlib.Path, merge_lora: bool, write_base: bool) -> None:
  """The export's files into `work`, to be renamed to `out`; a failed write names its path in `out`."""
  files: dict[str, Any] = {"backbone": None, "lora_adapter": None, "backbone_base": None}
  if rm.mode == "full" or merge_lora:
    write_backbone(rm, work / BACKBONE, shown=out / BACKBONE)
    files["backbone"] = BACKBONE
  else:
    has_base = hf_base_available(rm.base_model_path) and not write_base
    if has_base:
      rows = _base_rows(rm.base_model_path)
      files["base_needs_resize"] = rows is not None and rows < rm.model_cfg.vocab_size
      base_ref = rm.base_model_path
    else:
      write_backbone(rm, work / BASE_BACKBONE, base_only=True, shown=out / BASE_BACKBONE)
      files["backbone_base"] = BASE_BACKBONE
      base_ref = str(out / BASE_BACKBONE)  # where it will be once `work` is renamed
    with naming(out / ADAPTER):
      write_adapter(rm, work, base_ref)
    files["lora_adapter"] = ADAPTER
  with naming(out):  # the head files: mlp_head.safetensors, mlp_head.pt
    files["head"] = write_head(rm.params["head"], rm.head_cfg, work)
  meta = export_meta(rm, files) | {"merged_lora": bool(merge_lora and rm.mode == "lora")}
  with naming(out / EXPORT_FILE):
    (work / EXPORT_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
  parser = cli.ArgumentParser(prog="python -m rmjax.export", description=__doc__.split("\n\n")[0])
  parser.add_argument("--checkpoint", required=True, help="run directory (its best checkpoint) or a "
                      "checkpoints/checkpoint_step_<N> directory")
  parser.add_argument("--output", required=True, help="export directory (must be empty or absent)")
  parser.add_argument("--merge-lora", action="store_true", help="LoRA runs: fold the adapter into "
                      "the weights and write backbone/ instead of lora_adapter/")
  parser.add_argument("--write-base", action="store_true", help="LoRA runs: also write the frozen "
                      "base as backbone_base/ and point the adapter at it (default only when the "
                      "base is not an HF model, e.g. the demo backbone)")
  args = parser.parse_args(argv)
  return cli.run("export", lambda: _export_command(args))


def _export_command(args: argparse.Namespace) -> int:
  out = export(args.checkpoint, args.output, merge_lora=args.merge_lora, write_base=args.write_base)
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
