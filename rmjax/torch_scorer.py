"""Score (problem, steps) in PyTorch from an rmjax export directory.

Why it exists: the export is meant to be served with transformers / peft / torch alone; this is
the reference loader that proves it and that `rmjax.score` uses for export directories. It needs
the optional extra (`pip install -e ".[torch]" in the rmjax checkout`: torch + peft), never jax.

Token ids are produced by rmjax's own `Renderer` (same template text, same tokenizer call, same
truncation rules) from the tokenizer and render settings stored in the export, so they are
exactly the ids rmjax trained and scored on.

A damaged export (a file missing, truncated or overwritten, rmjax_export.json of the wrong
shape) is a ValueError / FileNotFoundError naming the file, never a model with some weights
silently left at their initial values.

  scorer = TorchScorer.from_export("export/")
  scorer.score("What is 2+3?", ["2+3 = 5", "The answer is 5."])  # -> [0.93, 0.88]
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import warnings
from pickle import UnpicklingError  # only the error type torch.load(weights_only=True) raises
from typing import Any, Iterator, Sequence

import numpy as np

from rmjax.cli import first_line, read_json_object
from rmjax.data.example import Example
from rmjax.data.render import RenderConfig, Renderer
from rmjax.export import ADAPTER, BACKBONE, BASE_BACKBONE, EXPORT_FILE, FORMAT, HEAD_PT, HEAD_ST
from rmjax.tokenizer import pad_id

_INSTALL = 'pip install -e ".[torch]" in the rmjax checkout'


def _require_torch():
  try:
    import torch
    import transformers
  except ImportError as e:
    raise ImportError(f"the PyTorch scorer needs torch and transformers ({_INSTALL}): {e}") from None
  return torch, transformers


# rmjax_export.json's head.torch_activation -> (torch.nn class, arguments)
_ACTIVATIONS = {"GELU()": ("GELU", {}), "GELU(approximate='tanh')": ("GELU", {"approximate": "tanh"}),
                "ReLU()": ("ReLU", {}), "SiLU()": ("SiLU", {}), "Tanh()": ("Tanh", {})}
_DIR_KEYS = (BACKBONE, ADAPTER, BASE_BACKBONE)
# Decoder settings an HF config.json must give exactly as rmjax trained them (rmjax_export.json's
# model_config); vocab_size may be smaller (the embeddings are resized for the marker).
_ARCH_FIELDS = ("architecture", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling", "attention_bias", "o_bias", "qk_norm",
                "tie_word_embeddings")


def read_export_meta(export_dir: str | pathlib.Path) -> dict[str, Any]:
  path = pathlib.Path(export_dir) / EXPORT_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: not an rmjax export directory")
  meta = read_json_object(path)
  if meta.get("format") != FORMAT:
    raise ValueError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}")
  try:
    _check_meta(meta)
  except KeyError as e:
    raise ValueError(f"{path} has no key {e}") from None
  except (TypeError, ValueError, AttributeError) as e:  # a value of the wrong type or range
    raise ValueError(f"{path} is malformed: {first_line(e)}") from None
  return meta


def _positive_ints(values: Any) -> bool:
  return all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)


def _check_meta(meta: dict[str, Any]) -> None:
  """Raises KeyError / TypeError / ValueError where a field this scorer reads is missing or odd."""
  from rmjax.model.config import ModelConfig
  render_config(meta)
  ModelConfig.from_dict(meta["model_config"])
  h = meta["head"]
  if not _positive_ints([h["input_dim"], *h["hidden_dims"]]) or h["torch_activation"] not in _ACTIVATIONS \
      or not 0 <= float(h["dropout"]) < 1:
    raise ValueError("head: input_dim / hidden_dims must be positive integers, torch_activation one of "
                     f"{', '.join(_ACTIVATIONS)}, dropout in [0, 1)")
  files = meta["files"]
  names = [files[k] for k in _DIR_KEYS]
  if not all(n is None or (isinstance(n, str) and n and pathlib.Path(n).name == n) for n in names):
    raise ValueError(f"files: {', '.join(_DIR_KEYS)} must be folder names inside the export or null")
  if not files[BACKBONE] and not files[ADAPTER]:
    raise ValueError(f"files names neither {BACKBONE!r} nor {ADAPTER!r}")
  if not _positive_ints([meta["vocab_size"], meta["marker_id"] + 1]) or not isinstance(meta["base_model"], str):
    raise ValueError("vocab_size and marker_id must be integers, base_model a string")


def render_config(meta: dict[str, Any], num_steps: int | None = None) -> RenderConfig:
  """The export's render settings; `num_steps` lifts the per-example step cap (scoring)."""
  r = meta["render"]
  steps = num_steps if num_steps is not None else r["max_steps_per_example"]
  return RenderConfig(template=r["template"], max_length=r["max_length"], max_steps_per_example=max(steps, 1),
                      length_buckets=tuple(r["length_buckets"]), max_markers=0)


def build_head(meta: dict[str, Any], export_dir: pathlib.Path):
  """nn.Sequential(Linear, act, Dropout, ..., Linear(., 1)) with the exported weights, eval mode."""
  torch, _ = _require_torch()
  nn = torch.nn
  h = meta["head"]
  act_class, act_args = _ACTIVATIONS[h["torch_activation"]]
  layers, width = [], h["input_dim"]
  for dim in h["hidden_dims"]:
    layers += [nn.Linear(width, dim), getattr(nn, act_class)(**act_args), nn.Dropout(float(h["dropout"]))]
    width = dim
  layers.append(nn.Linear(width, 1))
  head = nn.Sequential(*layers)
  from safetensors import SafetensorError
  from safetensors.torch import load_file
  pt, st = export_dir / HEAD_PT, export_dir / HEAD_ST
  path = pt if pt.exists() else st
  if not path.exists():
    raise FileNotFoundError(f"{pt} and {st} not found: the export has no head weights")
  try:  # what torch / safetensors raise for a truncated, foreign or mismatched weights file
    state = torch.load(path, map_location="cpu", weights_only=True) if path == pt else load_file(str(path))
    head.load_state_dict(state, strict=True)
  except (OSError, RuntimeError, ValueError, EOFError, UnpicklingError, SafetensorError) as e:
    raise ValueError(f"{path}: unreadable head weights: {type(e).__name__}: {first_line(e)}") from None
  return head.float().eval()


def _require_files(directory: pathlib.Path, *names: str) -> None:
  """transformers and peft would look a missing local file up on the hub: say it is missing."""
  for name in names:
    if not (directory / name).is_file():
      raise FileNotFoundError(f"{directory / name} not found (incomplete export)")


# Deprecations one library raises about another's use of it (peft calling transformers'
# `is_gradient_checkpointing`): nothing the user did or can act on.
_LIBRARY_DEPRECATIONS = r"`is_gradient_checkpointing` is deprecated"


@contextlib.contextmanager
def _loading(directory: str | pathlib.Path) -> Iterator[None]:
  """Keeps transformers' progress bars and the libraries' deprecations of each other off stderr,
  and names the directory when its files cannot be read."""
  from huggingface_hub.errors import StrictDataclassError
  from safetensors import SafetensorError
  from transformers.utils import logging as hf_logging
  bars = hf_logging.is_progress_bar_enabled()
  hf_logging.disable_progress_bar()
  try:
    with warnings.catch_warnings():
      warnings.filterwarnings("ignore", message=_LIBRARY_DEPRECATIONS, category=FutureWarning)
      yield
  # What transformers / peft / safetensors raise for truncated or foreign files, and (TypeError,
  # KeyError, AttributeError) for a config field of the wrong type they do not validate.
  except (OSError, ValueError, RuntimeError, SafetensorError, StrictDataclassError, TypeError, KeyError,
          AttributeError) as e:
    raise ValueError(f"cannot load {directory}: {type(e).__name__}: {first_line(e)}") from None
  finally:
    if bars:
      hf_logging.enable_progress_bar()


def _check_hf_config(meta: dict[str, Any], model_dir: pathlib.Path, written_by_export: bool) -> None:
  """config.json must describe the decoder rmjax trained (a changed value would score silently
  wrong); one the export wrote must also keep every key it was written with (transformers'
  defaults for a lost key, e.g. head_dim, are not rmjax's)."""
  from rmjax.model.config import ModelConfig
  from rmjax.model.hf import hf_model_config
  path = model_dir / "config.json"
  written = read_json_object(path)  # read once: parsed below and checked for lost keys
  got, want = hf_model_config(model_dir, written), ModelConfig.from_dict(meta["model_config"])
  bad = [f for f in _ARCH_FIELDS if getattr(got, f) != getattr(want, f)]
  if written_by_export:
    bad += [k for k in want.replace(lora_rank=0, marker_id=None).to_hf() if k not in written]
  if bad:
    raise ValueError(f"{path} disagrees with {EXPORT_FILE} on {', '.join(bad)}")


def _check_adapter_config(meta: dict[str, Any], adapter: pathlib.Path) -> None:
  """adapter_config.json must give the LoRA settings rmjax trained with (rmjax_export.json)."""
  path = adapter / "adapter_config.json"
  cfg, model = read_json_object(path), meta["model_config"]
  want = {"r": model["lora_rank"], "lora_alpha": model["lora_alpha"], "target_modules": sorted(model["lora_targets"]),
          "trainable_token_indices": [meta["marker_id"]], "use_dora": False, "use_rslora": False}
  got = dict(cfg, target_modules=sorted(map(str, cfg.get("target_modules") or [])))
  bad = [k for k in want if got.get(k) != want[k]]
  if bad:
    raise ValueError(f"{path} disagrees with {EXPORT_FILE} on {', '.join(bad)}")


def _check_adapter_used(model: Any, adapter: pathlib.Path) -> None:
  """Every tensor of adapter_model.safetensors was loaded and every adapter weight came from it
  (peft only warns about unexpected or missing keys, leaving weights at their initial values)."""
  from peft import get_peft_model_state_dict
  from safetensors import safe_open
  with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
    saved = set(f.keys())
  # Not peft's embedding layers: it adds the whole resized embedding matrix when the marker grew
  # the vocabulary, which an adapter does not carry (the marker row is its trainable token).
  loaded = set(get_peft_model_state_dict(model, save_embedding_layers=False).keys())
  if saved != loaded:
    raise ValueError(f"{adapter / 'adapter_model.safetensors'} does not match adapter_config.json: "
                     f"{len(saved - loaded)} tensors unused, {len(loaded - saved)} missing")


def build_backbone(meta: dict[str, Any], export_dir: pathlib.Path, dtype: Any = None):
  """The HF decoder (the bare *Model) with the trained weights: the merged backbone, or the base
  loaded as AutoModelForCausalLM (the class the adapter is for) with the PEFT adapter applied."""
  torch, transformers = _require_torch()
  dtype = dtype or torch.float32
  files = meta["files"]
  model_files = ("config.json", "model.safetensors")
  if files[BACKBONE]:
    path = export_dir / files[BACKBONE]
    _require_files(path, *model_files)
    _check_hf_config(meta, path, written_by_export=True)
    with _loading(path):
      return transformers.AutoModel.from_pretrained(str(path), dtype=dtype).eval()
  try:
    from peft import PeftModel
  except ImportError as e:
    raise ImportError(f"LoRA exports need peft ({_INSTALL}): {e}") from None
  base_path = str(export_dir / files[BASE_BACKBONE]) if files[BASE_BACKBONE] else meta["base_model"]
  if files[BASE_BACKBONE] or pathlib.Path(base_path).is_dir():  # a hub id is not checked offline
    _require_files(pathlib.Path(base_path), *model_files)
    _check_hf_config(meta, pathlib.Path(base_path), written_by_export=bool(files[BASE_BACKBONE]))
  with _loading(base_path):
    base = transformers.AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
  if base.get_input_embeddings().weight.shape[0] < meta["vocab_size"]:
    base.resize_token_embeddings(meta["vocab_size"])  # the marker row lies past the base's rows
  adapter = export_dir / files[ADAPTER]
  _require_files(adapter, "adapter_config.json", "adapter_model.safetensors")
  _check_adapter_config(meta, adapter)
  with _loading(adapter):
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
  _check_adapter_used(model, adapter)
  return model.get_base_model().get_decoder()  # the adapted decoder; the LM head is never used


@dataclasses.dataclass
class TorchScorer:
  """Backbone + head + tokenizer of one export; `score` returns one probability (or None) per step."""
  backbone: Any
  head: Any
  tokenizer: Any
  meta: dict[str, Any]
  # One Renderer per step count: building one copies the Rust tokenizer, which would otherwise
  # dominate scoring on a CPU.
  _renderers: dict[int, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)

  @classmethod
  def from_export(cls, export_dir: str | pathlib.Path, dtype: Any = None) -> "TorchScorer":
    from rmjax.tokenizer import load_tokenizer_dir, marker_id
    export_dir = pathlib.Path(export_dir)
    meta = read_export_meta(export_dir)
    files = meta["files"]
    tok_dir = export_dir / (files[BACKBONE] or files[ADAPTER])
    tok = load_tokenizer_dir(tok_dir)
    if marker_id(tok) != meta["marker_id"]:
      raise ValueError(f"tokenizer in {tok_dir} gives marker id {marker_id(tok)}, export says {meta['marker_id']}")
    return cls(build_backbone(meta, export_dir, dtype), build_head(meta, export_dir), tok, meta)

  def tokenize(self, problem: str, steps: Sequence[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """(input_ids, marker_positions) exactly as rmjax renders them, or None if nothing fits."""
    renderer = self._renderers.get(len(steps))
    if renderer is None:
      renderer = self._renderers[len(steps)] = Renderer(self.tokenizer, render_config(self.meta, len(steps)))
    ex = Example(source="score", id="0", problem=problem, steps=tuple(steps), targets=(None,) * len(steps))
    t = renderer(ex)
    return None if t is None else (t.input_ids, t.marker_positions)

  def score_ids(self, rows: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[list[float]]:
    """Probabilities at the marker positions of already-tokenized rows (right-padded batch)."""
    torch, _ = _require_torch()
    if not rows:
      return []
    n = max(len(ids) for ids, _ in rows)
    ids_BT = np.full((len(rows), n), pad_id(self.tokenizer), np.int64)
    mask_BT = np.zeros((len(rows), n), np.int64)
    for b, (ids, _) in enumerate(rows):
      ids_BT[b, : len(ids)] = ids
      mask_BT[b, : len(ids)] = 1
    with torch.no_grad():
      hidden_BTD = self.backbone(input_ids=torch.from_numpy(ids_BT),
                                 attention_mask=torch.from_numpy(mask_BT)).last_hidden_state
      out = []
      for b, (_, markers) in enumerate(rows):
        h_MD = hidden_BTD[b, torch.as_tensor(np.asarray(markers, np.int64))].float()
        out.append(torch.sigmoid(self.head(h_MD)[:, 0]).tolist())
    return out

  def score(self, problem: str, steps: Sequence[str]) -> list[float | None]:
    """One probability per step; None for steps whose marker did not fit in max_length."""
    return self.score_many([(problem, steps)])[0]

  def score_many(self, items: Sequence[tuple[str, Sequence[str]]]) -> list[list[float | None]]:
    tokenized = [self.tokenize(p, s) if len(s) else None for p, s in items]
    kept = [t for t in tokenized if t is not None]
    scores = iter(self.score_ids(kept))
    out = []
    for (_, steps), t in zip(items, tokenized):
      got = next(scores) if t is not None else []
      out.append(list(got) + [None] * (len(steps) - len(got)))
    return out
