"""Hugging Face checkpoints <-> rmjax params, through ONE declarative name table.

Why it exists: import and export must be exact inverses, so both read the same table
(`param_table`): each row is an HF tensor name template, our param path, and whether the
tensor is a torch (out, in) weight (transposed) and/or per-layer (stacked on the layer axis).
Loading reads safetensors files directly into numpy arrays in the target dtype (no torch
model, memory-mapped), and checks that every expected tensor exists with the expected shape
and nothing unexpected is left over. The safetensors header is parsed here because the
library's numpy API cannot represent bfloat16 (the dtype of most real checkpoints); it is
checked against the file (every tensor's bytes inside it), so a truncated or foreign file is a
ValueError naming it, never weights read from the wrong bytes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
import struct
from typing import Any, Iterator, Mapping

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from rmjax.cli import first_line, read_json_object
from rmjax.model.config import ModelConfig
from rmjax.model.marker import grow_rows

Params = dict[str, Any]
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
              "BOOL": np.bool_}
_IGNORABLE = (re.compile(r".*rotary_emb\.inv_freq$"),)
HF_FILE_PATTERNS = ("config.json", "generation_config.json", "*.safetensors",
                    "model.safetensors.index.json", "tokenizer*", "special_tokens_map.json",
                    "vocab.json", "merges.txt", "added_tokens.json", "chat_template*")


@dataclasses.dataclass(frozen=True)
class Row:
  hf: str  # name template; "{i}" = layer index
  path: tuple[str, ...]  # rmjax param path
  transpose: bool = False  # torch Linear (out, in) <-> our kernel (in, out)

  @property
  def per_layer(self) -> bool:
    return "{i}" in self.hf


def param_table(cfg: ModelConfig, lm_head: bool = False) -> list[Row]:
  """The table for this config; `lm_head` adds the untied output matrix (export/round trip)."""
  rows = [Row("model.embed_tokens.weight", ("embed", "embedding")),
          Row("model.norm.weight", ("final_norm", "scale"))]
  if lm_head and not cfg.tie_word_embeddings:
    rows.append(Row("lm_head.weight", ("lm_head", "embedding")))
  layer = "model.layers.{i}."
  rows += [Row(layer + "input_layernorm.weight", ("layers", "input_norm", "scale")),
           Row(layer + "post_attention_layernorm.weight", ("layers", "post_attn_norm", "scale"))]
  for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
    rows.append(Row(layer + f"self_attn.{proj}.weight", ("layers", "attn", proj, "kernel"), True))
    if cfg.o_bias if proj == "o_proj" else cfg.attention_bias:
      rows.append(Row(layer + f"self_attn.{proj}.bias", ("layers", "attn", proj, "bias")))
  if cfg.qk_norm:
    rows += [Row(layer + f"self_attn.{n}.weight", ("layers", "attn", n, "scale")) for n in ("q_norm", "k_norm")]
  for proj in ("gate_proj", "up_proj", "down_proj"):
    rows.append(Row(layer + f"mlp.{proj}.weight", ("layers", "mlp", proj, "kernel"), True))
  return rows


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Expected torch shape of each HF tensor name template (per layer for layer rows)."""
  d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  q, kv = cfg.num_heads * h, cfg.num_kv_heads * h
  out = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,),
         "lm_head.weight": (cfg.vocab_size, d)}
  layer = "model.layers.{i}."
  out |= {layer + "input_layernorm.weight": (d,), layer + "post_attention_layernorm.weight": (d,)}
  for proj, (o, i) in {"q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q)}.items():
    out[layer + f"self_attn.{proj}.weight"] = (o, i)
    out[layer + f"self_attn.{proj}.bias"] = (o,)
  out |= {layer + "self_attn.q_norm.weight": (h,), layer + "self_attn.k_norm.weight": (h,)}
  out |= {layer + "mlp.gate_proj.weight": (f, d), layer + "mlp.up_proj.weight": (f, d),
          layer + "mlp.down_proj.weight": (d, f)}
  return out


# -- reading safetensors ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Entry:
  path: pathlib.Path
  offset: int  # of the tensor's first byte in the file
  dtype: np.dtype
  shape: tuple[int, ...]


def _is_count(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _valid_entry(info: Any) -> bool:
  """A header entry {"dtype": known name, "shape": [n, ...], "data_offsets": [begin, end]}."""
  if not isinstance(info, dict):
    return False
  dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
  return (isinstance(dtype, str) and dtype in _ST_DTYPES and isinstance(shape, list) and all(map(_is_count, shape))
          and isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets)))


def read_safetensors_header(path: pathlib.Path) -> dict[str, _Entry]:
  """Tensor name -> where its bytes are, after checking that every tensor lies inside the file
  with the size its dtype and shape need; a ValueError naming `path` otherwise."""
  if not path.is_file():
    raise FileNotFoundError(f"safetensors file not found: {path}")
  size = path.stat().st_size
  with open(path, "rb") as fh:
    head = fh.read(8)
    n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
    if n is None or n > size - 8:
      raise ValueError(f"{path} is truncated or not a safetensors file ({size} bytes)")
    try:
      header = json.loads(fh.read(n))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
      raise ValueError(f"{path} has an unreadable safetensors header: {first_line(e)}") from None
  if not isinstance(header, dict):
    raise ValueError(f"{path} has a safetensors header that is not a JSON object")
  data_bytes, entries = size - 8 - n, {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if not _valid_entry(info):
      raise ValueError(f"{path}: tensor {name!r} has a malformed or unsupported header entry")
    dtype, shape = np.dtype(_ST_DTYPES[info["dtype"]]), tuple(info["shape"])
    begin, end = info["data_offsets"]
    if not begin <= end <= data_bytes or end - begin != dtype.itemsize * math.prod(shape):
      raise ValueError(f"{path}: tensor {name!r} does not fit in the file (truncated or corrupt)")
    entries[name] = _Entry(path, 8 + n + begin, dtype, shape)
  return entries


class TensorFiles:
  """Name -> lazily memory-mapped numpy tensor across one or several safetensors files."""

  def __init__(self, model_dir: pathlib.Path):
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
      weight_map = read_json_object(index).get("weight_map")
      if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise ValueError(f"{index} has no 'weight_map' object of file names")
      files = sorted(set(weight_map.values()))
    elif (model_dir / "model.safetensors").is_file():
      files = ["model.safetensors"]
    else:
      raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")
    self._entries: dict[str, _Entry] = {}
    for name in files:
      self._entries |= read_safetensors_header(model_dir / name)

  def names(self) -> set[str]:
    return set(self._entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._entries[name].shape

  def get(self, name: str) -> np.ndarray:
    return _read_entry(self._entries[name])


def _read_entry(e: _Entry) -> np.ndarray:
  if not e.shape or 0 in e.shape:
    return np.zeros(e.shape, e.dtype) if e.shape else np.fromfile(e.path, e.dtype, 1, offset=e.offset).reshape(())
  return np.memmap(e.path, dtype=e.dtype, mode="r", offset=e.offset, shape=e.shape)


def read_tensor(path: pathlib.Path, name: str) -> np.ndarray:
  """One named tensor of one safetensors file (memory-mapped); a ValueError naming `path` if it
  is not there or the file is malformed."""
  entries = read_safetensors_header(path)
  if name not in entries:
    raise ValueError(f"{path} has no tensor {name!r}")
  return _read_entry(entries[name])


def _hf_prefix(names: set[str]) -> str:
  """"model." for *ForCausalLM checkpoints, "" for bare *Model checkpoints."""
  if "model.embed_tokens.weight" in names:
    return ""
  if "embed_tokens.weight" in names:
    return "model."
  raise ValueError("checkpoint has no embed_tokens.weight (neither 'model.embed_tokens.weight' "
                   "nor 'embed_tokens.weight'); is this a Qwen/Llama decoder?")


def _canonical(names: set[str]) -> dict[str, str]:
  """canonical (model.-prefixed) name -> name in the file."""
  add = _hf_prefix(names)
  return {(add + n if add and not n.startswith("lm_head.") else n): n for n in names}


def _set(tree: Params, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def hf_model_config(model_dir: pathlib.Path, config: dict[str, Any] | None = None, **overrides: Any) -> ModelConfig:
  """ModelConfig from `model_dir`/config.json (or from `config`, that file already read); a
  missing or malformed file is an error naming it."""
  path = model_dir / "config.json"
  if config is None:
    if not path.is_file():
      raise FileNotFoundError(f"{path} not found: not an HF model directory")
    config = read_json_object(path)
  try:
    return ModelConfig.from_hf(config, **overrides)
  except KeyError as e:
    raise ValueError(f"{path} has no key {e}") from None
  except (TypeError, ValueError, AttributeError) as e:  # a value of the wrong type or range
    raise ValueError(f"{path}: {first_line(e)}") from None


def resolve_model_dir(path_or_id: str | os.PathLike) -> pathlib.Path:
  """A local directory as is; anything else is a hub id fetched with snapshot_download."""
  path = pathlib.Path(path_or_id)
  if path.is_dir():
    return path
  if path.exists() or str(path_or_id).startswith((".", "/", "~")) or str(path_or_id).count("/") > 1:
    raise FileNotFoundError(f"model directory not found: {path_or_id}")
  from huggingface_hub import snapshot_download  # only needed for hub ids
  try:
    return pathlib.Path(snapshot_download(str(path_or_id), allow_patterns=list(HF_FILE_PATTERNS)))
  except Exception as e:  # offline, unknown repo, gated...: one line for the user
    raise FileNotFoundError(f"{path_or_id!r} is not a local directory and could not be fetched "
                            f"from the hub: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def load_hf_params(path_or_id: str | os.PathLike, cfg: ModelConfig, dtype: str | None = None,
                   keep_lm_head: bool = False) -> Params:
  """Decoder params (numpy, `dtype` or cfg.param_dtype) from an HF checkpoint.

  Every tensor of the table must exist with its expected shape; a tensor nobody expects is an
  error too, except rotary inv_freq buffers and `lm_head.weight` (unused here: we never compute
  vocab logits; kept as `lm_head/embedding` when `keep_lm_head` and the model is untied).
  """
  model_dir = resolve_model_dir(path_or_id)
  files = TensorFiles(model_dir)
  target = np.dtype(ml_dtypes.bfloat16) if (dtype or cfg.param_dtype) == "bfloat16" else np.dtype(dtype or cfg.param_dtype)
  try:
    names = _canonical(files.names())
  except ValueError as e:
    raise ValueError(f"{model_dir}: {e}") from None
  shapes = hf_shapes(cfg)
  params: Params = {}
  used: set[str] = set()
  for row in param_table(cfg, lm_head=keep_lm_head):
    expected = shapes[row.hf]
    ours = expected[::-1] if row.transpose else expected
    layers = list(range(cfg.num_layers)) if row.per_layer else [None]
    # Filled one tensor at a time: host memory peaks at the result, not result + copies.
    value = np.empty(((cfg.num_layers,) if row.per_layer else ()) + ours, dtype=target)
    for i in layers:
      name = row.hf.format(i=i)
      if name not in names:
        raise ValueError(f"{model_dir}: checkpoint is missing tensor {name!r} (expected shape {expected})")
      found = files.shape(names[name])
      if found != expected:
        raise ValueError(f"{model_dir}: tensor {name!r} has shape {found}, expected {expected} from config.json")
      arr = files.get(names[name])
      value[() if i is None else i] = arr.T if row.transpose else arr
      used.add(name)
    _set(params, row.path, value)
  extra = sorted(n for n in names if n not in used and n != "lm_head.weight"
                 and not any(p.match(n) for p in _IGNORABLE))
  if extra:
    raise ValueError(f"{model_dir}: checkpoint has {len(extra)} unexpected tensor(s) for {cfg.architecture}: "
                     f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
  return params


# -- writing ----------------------------------------------------------------------------------------
def merge_lora(params: Params, cfg: ModelConfig) -> Params:
  """Params with every LoRA pair folded into its kernel: W + (alpha/r) * A @ B (float32 math)."""
  def fold(node: Any) -> Any:
    if not isinstance(node, Mapping):
      return node
    if "lora_a" in node:
      k = np.asarray(node["kernel"])
      delta = np.matmul(np.asarray(node["lora_a"], np.float32), np.asarray(node["lora_b"], np.float32))
      merged = (k.astype(np.float32) + (cfg.lora_alpha / cfg.lora_rank) * delta).astype(k.dtype)
      return {key: (merged if key == "kernel" else v) for key, v in node.items()
              if key not in ("lora_a", "lora_b")}
    return {key: fold(v) for key, v in node.items()}
  return fold(params)


def _has_lora(params: Mapping[str, Any]) -> bool:
  return any(isinstance(v, Mapping) and ("lora_a" in v or _has_lora(v)) for v in params.values())


def hf_tensors(params: Params, cfg: ModelConfig, dtype: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, torch-layout numpy array) for every row of the table; marker row written in."""
  target = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else (np.dtype(dtype) if dtype else None)
  for row in param_table(cfg, lm_head="lm_head" in params):
    value = np.asarray(_get(params, row.path))
    if row.path == ("embed", "embedding") and cfg.marker_id is not None and "marker" in params["embed"]:
      value = value.copy()
      value[cfg.marker_id] = np.asarray(params["embed"]["marker"]).astype(value.dtype)
    for i in range(cfg.num_layers) if row.per_layer else [None]:
      arr = value[i] if row.per_layer else value
      arr = arr.T if row.transpose else arr
      yield row.hf.format(i=i), np.ascontiguousarray(arr, dtype=target or arr.dtype)


def save_hf_params(params: Params, cfg: ModelConfig, out_dir: str | os.PathLike, lora: str = "merge",
                   dtype: str | None = None, lm_head: np.ndarray | None = None) -> pathlib.Path:
  """Write config.json + model.safetensors that transformers loads as *ForCausalLM.

  lora: "merge" folds LoRA into the kernels, "refuse" raises if LoRA params are present.
  An untied model needs an lm_head: `params["lm_head"]` if present, else `lm_head` (HF layout
  (rows, hidden), e.g. the original checkpoint's), else a ValueError. rmjax never computes
  vocabulary logits, so that matrix only has to make the checkpoint loadable: where the marker
  enlarged the vocabulary, rows are appended up to cfg.vocab_size (the mean row, as
  `marker.add_marker` grows it), or config.json's vocab_size would not match it.
  """
  if lora not in ("merge", "refuse"):
    raise ValueError(f"lora must be 'merge' or 'refuse', got {lora!r}")
  if _has_lora(params):
    if lora == "refuse":
      raise ValueError("params contain LoRA weights; merge them (lora='merge') or export a PEFT adapter")
    params = merge_lora(params, cfg)
  if not cfg.tie_word_embeddings and "lm_head" not in params:
    if lm_head is None:
      raise ValueError("untied model without lm_head params: pass lm_head=<the original checkpoint's lm_head.weight>")
    rows, width = lm_head.shape
    if width != cfg.hidden_size or rows > cfg.vocab_size:
      raise ValueError(f"lm_head of shape {lm_head.shape} does not fit vocab_size={cfg.vocab_size}, "
                       f"hidden_size={cfg.hidden_size}")
    params = dict(params) | {"lm_head": {"embedding": grow_rows(lm_head, cfg.vocab_size)}}
  tensors = dict(hf_tensors(params, cfg, dtype))
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  out_dtype = dtype or str(np.asarray(_get(params, ("embed", "embedding"))).dtype)
  export_cfg = cfg.replace(lora_rank=0, marker_id=None)
  (out / "config.json").write_text(json.dumps(export_cfg.to_hf(dtype=out_dtype), indent=2) + "\n")
  save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
  return out

