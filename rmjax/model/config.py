"""The decoder's configuration, one frozen dataclass shared by model, import and export.

Why it exists: the decoder, the HF name table and the export code must agree on every
architectural detail (biases, qk-norm, rope scaling, tied embeddings). Keeping them in one
hashable value means a jitted function can close over it and a checkpoint can store it as
json. `from_hf` reads config.json as transformers 5 writes it (and as transformers 4 did, with a
top-level `rope_theta` / `rope_scaling`, as many hub models still have it), `to_hf` writes it
back for export.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Mapping

from rmjax.model.cpu_dots import CPU_DOT_LIBRARIES, DEFAULT_CPU_DOT_LIBRARY

SUPPORTED_ARCHITECTURES = ("qwen3", "qwen2", "llama")
_HF_CLASSES = {
  "qwen3": "Qwen3ForCausalLM",
  "qwen2": "Qwen2ForCausalLM",
  "llama": "LlamaForCausalLM",
}
_ARCH_FROM_CLASS = {v: k for k, v in _HF_CLASSES.items()} | {
  "Qwen3Model": "qwen3", "Qwen2Model": "qwen2", "LlamaModel": "llama"}
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "save_dots_no_batch", "dots_and_attention_saveable", "projections_and_attention_saveable",
                  "mlp_projections_saveable", "nothing_saveable")
ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = ("float32", "bfloat16", "float16")
# How packed rows attend under cuDNN (ModelConfig.segment_attention).
SEGMENT_ATTENTION = ("auto", "mask", "cudnn_packed")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling as in HF `rope_parameters` (types default, linear, llama3)."""
  rope_type: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"unsupported rope_type {self.rope_type!r}; supported: {', '.join(ROPE_TYPES)}")

  def to_hf(self) -> dict[str, Any]:
    if self.rope_type == "linear":
      return {"rope_type": "linear", "factor": self.factor}
    return {"rope_type": self.rope_type, "factor": self.factor,
            "low_freq_factor": self.low_freq_factor, "high_freq_factor": self.high_freq_factor,
            "original_max_position_embeddings": self.original_max_position_embeddings}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture plus numerics of a Qwen3 / Qwen2 / Llama decoder (no LM head)."""
  architecture: str = "qwen3"
  vocab_size: int = 256
  hidden_size: int = 64
  intermediate_size: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 16
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  attention_bias: bool = False  # q/k/v biases (Qwen2 always; Llama/Qwen3 when attention_bias)
  o_bias: bool = False  # o_proj bias (Llama/Qwen3 with attention_bias=True)
  qk_norm: bool = False  # Qwen3 per-head RMSNorm on q and k before rope
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 32768
  param_dtype: str = "float32"
  compute_dtype: str = "float32"
  remat: str = "none"
  attention_impl: str | None = None  # None (auto: cuDNN on a GPU when it applies, else XLA) / "xla" / "cudnn"
  # "segments": causal within each nonzero segment id (packed rows need it). "causal": causal
  # only, no mask array: exact for rows holding one example from position 0 with padding at the
  # end (real tokens never see the padding), and lets cuDNN run its plain causal kernel.
  attention_mask: str = "segments"
  # How "segments" attends under cuDNN: "mask" passes the (B, 1, T, T) segment mask to
  # jax.nn.dot_product_attention (every implementation); "cudnn_packed" gives cuDNN the segments
  # as a packed layout instead (model/cudnn_attention.py: no mask, no score blocks between two
  # examples; Hopper GPUs); "auto" the packed layout where it can run, else the mask (the spec's
  # default too). Other implementations (XLA on a CPU) use the mask either way.
  segment_attention: str = "auto"
  # Segment slots per row of that packed layout: 0 = the confidence model's marker slots (every
  # example has a marker); training sets data.max_segments_per_row, which the packer keeps to.
  max_segments: int = 0
  # Layers per iteration of the layer loop; 0 (or >= num_layers) unrolls it: no loop, so on a GPU
  # each layer reads its weights and saved activations in place instead of copies out of the
  # stacked buffers, for a longer compile. The weights are stacked either way.
  scan_unroll: int = 1
  # XLA attention (CPU; fp32 on a GPU) in blocks of this many query rows, each attending only the
  # keys up to its last row, so the scores above the diagonal are skipped (model/blocked_attention.py).
  # 0 = one block: all T x T scores, the upper half masked.
  attention_query_block: int = 128
  # With the layers unrolled, the Decoder given query positions (the confidence model's markers)
  # runs its last layer's queries, output projection and MLP at those rows only
  # (model/transformer.py); False: at every row, as a rolled loop does (to measure the gain).
  last_layer_query_rows_only: bool = True
  # The library XLA hands a CPU step's dots to: "ynnpack" (XLA's default) | "onednn"
  # (model/cpu_dots.py); the same products up to float rounding; a GPU ignores it.
  cpu_dot_library: str = DEFAULT_CPU_DOT_LIBRARY
  lora_rank: int = 0
  lora_alpha: float = 32.0
  lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
  marker_id: int | None = None

  def __post_init__(self):
    if self.architecture not in SUPPORTED_ARCHITECTURES:
      raise ValueError(f"unsupported architecture {self.architecture!r}; "
                       f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for rope")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"unknown remat policy {self.remat!r}; choose from {', '.join(REMAT_POLICIES)}")
    for name in ("param_dtype", "compute_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"{name}={getattr(self, name)!r}; choose from {', '.join(DTYPES)}")
    if self.attention_impl not in (None, "xla", "cudnn"):
      raise ValueError(f"attention_impl={self.attention_impl!r}; choose None, 'xla' or 'cudnn'")
    if self.attention_mask not in ("segments", "causal"):
      raise ValueError(f"attention_mask={self.attention_mask!r}; choose 'segments' or 'causal'")
    if self.segment_attention not in SEGMENT_ATTENTION:
      raise ValueError(f"segment_attention={self.segment_attention!r}; choose 'auto', 'mask' or 'cudnn_packed'")
    if self.max_segments < 0:
      raise ValueError(f"max_segments={self.max_segments} must be >= 0 (0 = the marker slots)")
    if self.scan_unroll < 0:
      raise ValueError(f"scan_unroll={self.scan_unroll} must be >= 0 (0 = unroll every layer)")
    if self.attention_query_block < 0:
      raise ValueError(f"attention_query_block={self.attention_query_block} must be >= 0 (0 = one block)")
    if self.cpu_dot_library not in CPU_DOT_LIBRARIES:
      raise ValueError(f"cpu_dot_library={self.cpu_dot_library!r}; choose from {', '.join(CPU_DOT_LIBRARIES)}")
    if isinstance(self.lora_targets, list):
      object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
    bad = set(self.lora_targets) - set(LORA_TARGETS)
    if self.lora_rank < 0 or bad:
      raise ValueError(f"bad LoRA settings rank={self.lora_rank} targets={sorted(bad)}; "
                       f"targets must be among {', '.join(LORA_TARGETS)}")
    if isinstance(self.rope_scaling, Mapping):
      object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
    if self.marker_id is not None and not 0 <= self.marker_id < self.vocab_size:
      raise ValueError(f"marker_id={self.marker_id} outside the vocabulary (size {self.vocab_size})")

  def replace(self, **changes: Any) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  # -- tiny configs for tests and demos ------------------------------------------------------
  @classmethod
  def tiny(cls, architecture: str = "qwen3", **overrides: Any) -> "ModelConfig":
    """A 2-layer, hidden-64 config of the given family (fast enough for CPU tests)."""
    family = {"qwen3": dict(qk_norm=True, tie_word_embeddings=True),
              "qwen2": dict(attention_bias=True),
              "llama": dict()}[architecture]
    return cls(**({"architecture": architecture} | family | overrides))

  # -- json round trip (our own checkpoints) ---------------------------------------------------
  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["lora_targets"] = list(self.lora_targets)
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"unknown ModelConfig keys: {', '.join(unknown)}")
    d = dict(d)
    if d.get("rope_scaling") is not None:
      d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    if "lora_targets" in d:
      d["lora_targets"] = tuple(d["lora_targets"])
    return cls(**d)

  # -- Hugging Face config.json ---------------------------------------------------------------
  @classmethod
  def from_hf(cls, config: Mapping[str, Any] | str | pathlib.Path, **overrides: Any) -> "ModelConfig":
    """Read a HF config (dict, config.json path or model directory); `overrides` win."""
    if not isinstance(config, Mapping):
      path = pathlib.Path(config)
      config = json.loads((path / "config.json" if path.is_dir() else path).read_text())
    arch = _architecture(config)
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    bias = bool(config.get("attention_bias", False))
    if arch == "llama" and config.get("mlp_bias"):
      raise ValueError("llama configs with mlp_bias=true are not supported")
    if config.get("use_sliding_window"):
      raise ValueError("sliding-window attention (use_sliding_window=true) is not supported")
    if config.get("hidden_act", "silu") not in ("silu", "swish"):  # the MLP is SwiGLU: SiLU gates only
      raise ValueError(f"hidden_act={config.get('hidden_act')!r} is not supported (the MLP computes SiLU)")
    fields = dict(
      architecture=arch,
      vocab_size=int(config["vocab_size"]),
      hidden_size=hidden,
      intermediate_size=int(config["intermediate_size"]),
      num_layers=int(config["num_hidden_layers"]),
      num_heads=heads,
      num_kv_heads=int(config.get("num_key_value_heads") or heads),
      head_dim=int(config.get("head_dim") or hidden // heads),
      rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
      rope_theta=float(theta),
      rope_scaling=None if rope_type == "default" else _rope_scaling(rope_type, rope, config),
      attention_bias=True if arch == "qwen2" else bias,
      o_bias=False if arch == "qwen2" else bias,
      qk_norm=arch == "qwen3",
      tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
      max_position_embeddings=int(config.get("max_position_embeddings", 32768)),
    )
    dtype = config.get("dtype") or config.get("torch_dtype")
    if dtype in DTYPES:
      fields["param_dtype"] = dtype
    return cls(**(fields | overrides))

  def to_hf(self, dtype: str | None = None) -> dict[str, Any]:
    """config.json content that transformers 5 loads into the matching *ForCausalLM."""
    rope = {"rope_theta": self.rope_theta, "rope_type": "default"}
    if self.rope_scaling is not None:
      rope |= self.rope_scaling.to_hf()
    out = {
      "architectures": [_HF_CLASSES[self.architecture]],
      "model_type": self.architecture,
      "vocab_size": self.vocab_size,
      "hidden_size": self.hidden_size,
      "intermediate_size": self.intermediate_size,
      "num_hidden_layers": self.num_layers,
      "num_attention_heads": self.num_heads,
      "num_key_value_heads": self.num_kv_heads,
      "head_dim": self.head_dim,
      "hidden_act": "silu",
      "rms_norm_eps": self.rms_norm_eps,
      "rope_parameters": rope,
      "tie_word_embeddings": self.tie_word_embeddings,
      "max_position_embeddings": self.max_position_embeddings,
      "dtype": dtype or self.param_dtype,
    }
    if self.architecture != "qwen2":
      if self.attention_bias != self.o_bias:
        raise ValueError(f"{self.architecture} has one attention_bias flag for q/k/v/o; "
                         f"got attention_bias={self.attention_bias}, o_bias={self.o_bias}")
      out["attention_bias"] = self.attention_bias
    elif not self.attention_bias or self.o_bias:
      raise ValueError("qwen2 always has q/k/v biases and no o_proj bias")
    if self.architecture == "qwen3" and not self.qk_norm or self.architecture != "qwen3" and self.qk_norm:
      raise ValueError(f"qk_norm={self.qk_norm} does not match architecture {self.architecture}")
    return out


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _architecture(config: Mapping[str, Any]) -> str:
  model_type = config.get("model_type")
  if model_type in SUPPORTED_ARCHITECTURES:
    return model_type
  for name in config.get("architectures") or ():
    if name in _ARCH_FROM_CLASS:
      return _ARCH_FROM_CLASS[name]
  found = model_type or ",".join(config.get("architectures") or ()) or "none given"
  raise ValueError(f"unsupported architecture {found!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def _rope_scaling(rope_type: str, rope: Mapping[str, Any], config: Mapping[str, Any]) -> RopeScaling:
  if rope_type not in ROPE_TYPES:
    raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
  if rope_type == "linear":
    return RopeScaling("linear", factor=float(rope["factor"]))
  return RopeScaling(
    "llama3", factor=float(rope["factor"]),
    low_freq_factor=float(rope["low_freq_factor"]),
    high_freq_factor=float(rope["high_freq_factor"]),
    original_max_position_embeddings=int(
      rope.get("original_max_position_embeddings") or config.get("max_position_embeddings")))
