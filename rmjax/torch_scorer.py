"""Score (problem, steps) in PyTorch from an rmjax export directory.

Why it exists: the export is meant to be served with transformers / peft / torch alone; this is
the reference loader that proves it and that `rmjax.score` uses for export directories. It needs
the optional extra (`pip install rmjax[torch]`: torch + peft), never jax.

Token ids are produced by rmjax's own `Renderer` (same template text, same tokenizer call, same
truncation rules) from the tokenizer and render settings stored in the export, so they are
exactly the ids rmjax trained and scored on.

  scorer = TorchScorer.from_export("export/")
  scorer.score("What is 2+3?", ["2+3 = 5", "The answer is 5."])  # -> [0.93, 0.88]
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Sequence

import numpy as np

from rmjax.data.example import Example
from rmjax.data.render import RenderConfig, Renderer
from rmjax.export import ADAPTER, BACKBONE, BASE_BACKBONE, EXPORT_FILE, FORMAT, HEAD_PT, HEAD_ST
from rmjax.tokenizer import pad_id

_INSTALL = "pip install rmjax[torch]"


def _require_torch():
  try:
    import torch
    import transformers
  except ImportError as e:
    raise ImportError(f"the PyTorch scorer needs torch and transformers ({_INSTALL}): {e}") from None
  return torch, transformers


def read_export_meta(export_dir: str | pathlib.Path) -> dict[str, Any]:
  path = pathlib.Path(export_dir) / EXPORT_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: not an rmjax export directory")
  meta = json.loads(path.read_text())
  if meta.get("format") != FORMAT:
    raise ValueError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}")
  return meta


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
  acts = {"GELU()": lambda: nn.GELU(), "GELU(approximate='tanh')": lambda: nn.GELU(approximate="tanh"),
          "ReLU()": nn.ReLU, "SiLU()": nn.SiLU, "Tanh()": nn.Tanh}
  h = meta["head"]
  layers, width = [], h["input_dim"]
  for dim in h["hidden_dims"]:
    layers += [nn.Linear(width, dim), acts[h["torch_activation"]](), nn.Dropout(h["dropout"])]
    width = dim
  layers.append(nn.Linear(width, 1))
  head = nn.Sequential(*layers)
  pt = export_dir / HEAD_PT
  if pt.is_file():
    state = torch.load(pt, map_location="cpu", weights_only=True)
  else:
    from safetensors.torch import load_file
    state = load_file(str(export_dir / HEAD_ST))
  head.load_state_dict(state, strict=True)
  return head.float().eval()


def build_backbone(meta: dict[str, Any], export_dir: pathlib.Path, dtype: Any = None):
  """The HF decoder (AutoModel) with the trained weights: merged backbone or base + PEFT adapter."""
  torch, transformers = _require_torch()
  dtype = dtype or torch.float32
  files = meta["files"]
  if files.get("backbone"):
    return transformers.AutoModel.from_pretrained(str(export_dir / files["backbone"]), dtype=dtype).eval()
  try:
    from peft import PeftModel
  except ImportError as e:
    raise ImportError(f"LoRA exports need peft ({_INSTALL}): {e}") from None
  base_path = str(export_dir / files["backbone_base"]) if files.get("backbone_base") else meta["base_model"]
  base = transformers.AutoModel.from_pretrained(base_path, dtype=dtype)
  if base.get_input_embeddings().weight.shape[0] < meta["vocab_size"]:
    base.resize_token_embeddings(meta["vocab_size"])  # the marker row lies past the base's rows
  return PeftModel.from_pretrained(base, str(export_dir / files["lora_adapter"])).eval()


@dataclasses.dataclass
class TorchScorer:
  """Backbone + head + tokenizer of one export; `score` returns one probability (or None) per step."""
  backbone: Any
  head: Any
  tokenizer: Any
  meta: dict[str, Any]

  @classmethod
  def from_export(cls, export_dir: str | pathlib.Path, dtype: Any = None) -> "TorchScorer":
    from transformers import AutoTokenizer
    from rmjax.tokenizer import ensure_marker, marker_id
    export_dir = pathlib.Path(export_dir)
    meta = read_export_meta(export_dir)
    files = meta["files"]
    tok_dir = export_dir / (files.get("backbone") or files.get("lora_adapter") or BACKBONE)
    tok = ensure_marker(AutoTokenizer.from_pretrained(str(tok_dir)))
    if marker_id(tok) != meta["marker_id"]:
      raise ValueError(f"tokenizer in {tok_dir} gives marker id {marker_id(tok)}, export says {meta['marker_id']}")
    return cls(build_backbone(meta, export_dir, dtype), build_head(meta, export_dir), tok, meta)

  def tokenize(self, problem: str, steps: Sequence[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """(input_ids, marker_positions) exactly as rmjax renders them, or None if nothing fits."""
    cfg = render_config(self.meta, len(steps))
    ex = Example(source="score", id="0", problem=problem, steps=tuple(steps), targets=(None,) * len(steps))
    t = Renderer(self.tokenizer, cfg)(ex)
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
