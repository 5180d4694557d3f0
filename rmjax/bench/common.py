"""What both benchmark sides share: model presets, synthetic batches, FLOP counting, records.

Why it exists: a throughput comparison is only meaningful when both implementations train
the same model on the same tokens and are scored with the same arithmetic. Everything that
decides "the same" lives here, with no jax or torch import, so each side (and the test) reads
one definition: the model shape (`rmjax.model.config.ModelConfig`), the batches (numpy, in
the batch contract of BUILD.md, from a fixed seed), the analytic FLOP count (BUILD.md,
Measuring), the peak FLOP/s table for MFU, and the JSON record each run prints.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import statistics
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from rmjax import spec as spec_lib
from rmjax.cli import first_line
from rmjax.model.config import ModelConfig

IMPLS = ("rmjax", "torch")
MODES = ("full", "lora")
REQUIRED_KEYS = ("impl", "mode", "seq_len", "batch", "grad_accum", "tokens_per_s", "step_time_s", "peak_mem_mb",
                 "mfu", "model_flops")
RMJAX_KEYS = ("compiled_flops", "compiled_temp_mb", "compiled_arg_mb")
MARKER_EVERY = 64  # mean tokens per reasoning step; the marker closes each step
# What one run of a benchmark may raise that the tool reports as that run's error line before
# going on to its next run, so a run on scarce GPU time keeps the other figures (jax's runtime errors,
# device out-of-memory among them, are RuntimeErrors).
RUN_ERRORS = (ValueError, FloatingPointError, MemoryError, RuntimeError)


def _preset_tiny() -> ModelConfig:
  return ModelConfig.tiny("qwen3", vocab_size=512, max_position_embeddings=4096)


def _preset_75m() -> ModelConfig:
  # Qwen3-shaped, 75.5M parameters in matmuls (the N of the FLOP formula): 12 layers of
  # q/o 768x768, k/v 768x256, MLP 3 x 768x2048. A 32k vocabulary adds 25.2M embedding rows
  # (tied), which cost memory and optimizer state but no matmul FLOPs.
  return ModelConfig(architecture="qwen3", vocab_size=32768, hidden_size=768, intermediate_size=2048,
                     num_layers=12, num_heads=12, num_kv_heads=4, head_dim=64, qk_norm=True,
                     tie_word_embeddings=True, rope_theta=1e6, max_position_embeddings=32768)


def _preset_qwen3_4b() -> ModelConfig:
  return ModelConfig(architecture="qwen3", vocab_size=151936, hidden_size=2560, intermediate_size=9728,
                     num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128, qk_norm=True,
                     tie_word_embeddings=True, rope_theta=5e6, max_position_embeddings=40960)


PRESETS: dict[str, Callable[[], ModelConfig]] = {
  "tiny": _preset_tiny, "75m": _preset_75m, "qwen3-4b": _preset_qwen3_4b}


@dataclasses.dataclass(frozen=True)
class BenchSettings:
  """One benchmark run: shape, numerics and timing knobs, identical for both sides."""
  preset: str = "tiny"
  seq_len: int = 512
  batch: int = 4  # rows per micro-batch; a step takes batch * grad_accum rows
  # Micro-batches per optimizer step: rmjax runs training's accumulating step (grad_accum_steps),
  # torch N backward passes, then one optimizer step. 1 = no accumulation.
  grad_accum: int = 1
  steps: int = 5
  warmup: int = 2
  remat: bool = False
  dtype: str = "float32"  # compute dtype ("auto": bfloat16 on an accelerator); params stay float32
  head_dims: tuple[int, ...] = (1024, 256)
  dropout: float = 0.0  # head dropout; the same value on both sides
  lora_rank: int = 16
  lora_alpha: float = 32.0
  lr_full: float = 2e-5
  lr_lora: float = 1e-4
  weight_decay: float = 0.01
  max_grad_norm: float = 1.0
  seed: int = 0
  frozen_dtype: str = "auto"  # LoRA frozen base ("auto": bfloat16 on an accelerator, float32 on CPU)
  # rmjax ModelConfig.attention_mask: "causal" (no mask array), what training uses for unpacked
  # rows like the benchmark's (one example per row); "segments" is what packed rows need.
  attention_mask: str = "causal"
  segment_attention: str = "mask"  # rmjax ModelConfig.segment_attention: "mask" | "cudnn_packed"
  attention: str = ""  # rmjax attention: "" (auto: cuDNN on a GPU when it applies, else XLA), "xla", "cudnn"
  opt_state_dtype: str = "float32"  # rmjax Adam moments (mu and nu) dtype
  remat_name: str = ""  # rmjax remat policy by name ("" = "full" if remat else "none")
  # rmjax ModelConfig.scan_unroll: layers per loop iteration, 0 = no loop; "auto": what training's
  # "auto" tries first on the run's device (jax_impl.resolve_scan_unroll), an int or its text otherwise
  scan_unroll: int | str = spec_lib.AUTO
  attention_query_block: int = ModelConfig.attention_query_block  # rmjax XLA attention's query block (0 = one)
  cpu_dot_library: str = ModelConfig.cpu_dot_library  # rmjax on a CPU: the library its dots run in
  flops: bool = True  # compute compiled_flops from the unrolled 1- and 2-layer analysis compiles
  analysis_only: bool = False  # rmjax: compile from shapes and report the analysis, no steps
  profile_dir: str = ""  # rmjax: trace one extra step into this folder and summarise it (bench/profile.py)
  target: str = ""  # rmjax, analysis only: compile for this GPU (bench/gpu_target.py) instead of the local device

  @property
  def global_batch(self) -> int:
    """Rows per optimizer step (what tokens/s and model_flops count)."""
    return self.batch * self.grad_accum

  @property
  def remat_policy(self) -> str:
    return self.remat_name or ("full" if self.remat else "none")

  def __post_init__(self):
    if self.preset not in PRESETS:
      raise ValueError(f"unknown preset {self.preset!r}; choose from {', '.join(PRESETS)}")
    if self.seq_len < 2 or self.batch < 1 or self.steps < 1 or self.warmup < 0:
      raise ValueError(f"need seq_len >= 2, batch >= 1, steps >= 1, warmup >= 0; got seq_len={self.seq_len}, "
                       f"batch={self.batch}, steps={self.steps}, warmup={self.warmup}")
    if self.grad_accum < 1:
      raise ValueError(f"grad_accum={self.grad_accum} must be >= 1")
    if self.dtype not in ("auto", "float32", "bfloat16"):
      raise ValueError(f"dtype={self.dtype!r}; choose auto, float32 or bfloat16")
    if self.opt_state_dtype not in ("float32", "bfloat16"):
      raise ValueError(f"opt_state_dtype={self.opt_state_dtype!r}; choose float32 or bfloat16")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
    try:  # "auto" or an int (the command line's text made one)
      object.__setattr__(self, "scan_unroll", spec_lib.scan_unroll_setting(self.scan_unroll))
    except spec_lib.SpecError:
      raise ValueError(f"scan_unroll={self.scan_unroll!r} must be 'auto' or an integer >= 0") from None

  def on_device(self, accelerator: bool) -> "BenchSettings":
    """These settings with dtype "auto" resolved for the device the run found."""
    auto = "bfloat16" if accelerator else "float32"
    return dataclasses.replace(self, dtype=auto if self.dtype == "auto" else self.dtype,
                               frozen_dtype=auto if self.frozen_dtype == "auto" else self.frozen_dtype)

  def model_config(self, mode: str) -> ModelConfig:
    """The preset's decoder with this run's numerics (marker = last vocabulary row). scan_unroll
    "auto" still unresolved (the torch side, which has no layer loop, and the option check) leaves
    ModelConfig's own; the rmjax side resolves it for its device first (jax_impl.resolve_scan_unroll)."""
    if self.dtype == "auto":
      raise ValueError("resolve dtype 'auto' with on_device() before building the model")
    cfg = PRESETS[self.preset]()
    if self.seq_len > cfg.max_position_embeddings:
      raise ValueError(f"seq_len={self.seq_len} exceeds the {self.preset} preset's "
                       f"max_position_embeddings={cfg.max_position_embeddings}")
    loop = {} if self.scan_unroll == spec_lib.AUTO else {"scan_unroll": self.scan_unroll}
    return cfg.replace(compute_dtype=self.dtype, remat=self.remat_policy, **loop,
                       attention_query_block=self.attention_query_block, cpu_dot_library=self.cpu_dot_library,
                       attention_impl=self.attention or None, attention_mask=self.attention_mask,
                       segment_attention=self.segment_attention,
                       lora_rank=self.lora_rank if mode == "lora" else 0, lora_alpha=self.lora_alpha,
                       marker_id=cfg.vocab_size - 1)

  def lr(self, mode: str) -> float:
    return self.lr_lora if mode == "lora" else self.lr_full


# -- synthetic batches ---------------------------------------------------------------------------

def marker_layout(seq_len: int, rng: np.random.Generator) -> np.ndarray:
  """Marker positions of one row: steps of MARKER_EVERY +- 25% tokens, the first after a prompt."""
  lo, hi = (3 * MARKER_EVERY) // 4, (5 * MARKER_EVERY) // 4
  positions, pos = [], -1
  while True:
    pos += int(rng.integers(lo, hi + 1))
    if pos >= seq_len:
      break
    positions.append(pos)
  return np.asarray(positions or [seq_len - 1], np.int32)


def max_markers(seq_len: int) -> int:
  return max(1, seq_len // ((3 * MARKER_EVERY) // 4))


def make_batches(cfg: ModelConfig, settings: BenchSettings, count: int) -> list[dict[str, np.ndarray]]:
  """`count` training batches in the BUILD.md batch contract, identical for every caller.

  Each holds a whole step's rows (`global_batch`: batch x grad_accum). Rows are full (no
  padding), one example per row; token ids avoid the marker id except at the marker positions;
  targets are random 0/1.
  """
  rng = np.random.default_rng(settings.seed)
  B, T, M = settings.global_batch, settings.seq_len, max_markers(settings.seq_len)
  batches = []
  for _ in range(count):
    ids = rng.integers(0, cfg.marker_id, size=(B, T), dtype=np.int32)
    marker_positions = np.zeros((B, M), np.int32)
    targets = np.zeros((B, M), np.float32)
    mask = np.zeros((B, M), np.float32)
    for b in range(B):
      pos = marker_layout(T, rng)
      ids[b, pos] = cfg.marker_id
      marker_positions[b, :len(pos)] = pos
      targets[b, :len(pos)] = rng.integers(0, 2, size=len(pos))
      mask[b, :len(pos)] = 1.0
    batches.append({
      "input_ids": ids,
      "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
      "segment_ids": np.ones((B, T), np.int32),
      "marker_positions": marker_positions,
      "targets": targets,
      "target_mask": mask,
    })
  return batches


def non_pad_tokens(batch: Mapping[str, np.ndarray]) -> int:
  return int((np.asarray(batch["segment_ids"]) > 0).sum())


def supervised_markers(batch: Mapping[str, np.ndarray]) -> int:
  return int(np.asarray(batch["target_mask"]).sum())


# -- FLOP accounting (BUILD.md, Measuring) -------------------------------------------------------

def decoder_matmul_params(cfg: ModelConfig) -> int:
  """N: decoder weights used in matmuls (q/k/v/o, gate/up/down); no embedding, no LM head."""
  D, H, K, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  attention = D * H * d + 2 * D * K * d + H * d * D
  mlp = 3 * D * cfg.intermediate_size
  return cfg.num_layers * (attention + mlp)


_LAST_LAYER_AT_QUERIES = ("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _projection_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
  D, H, K, d, I = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
  return {"q_proj": (D, H * d), "k_proj": (D, K * d), "v_proj": (D, K * d), "o_proj": (H * d, D),
          "gate_proj": (D, I), "up_proj": (D, I), "down_proj": (I, D)}


def lora_params(cfg: ModelConfig, layers: int | None = None, projections: Iterable[str] | None = None) -> int:
  """LoRA adapter weights (A: r x in, B: out x r) over the targeted projections (of `projections`
  only, when given) in `layers` layers (default: all)."""
  shapes = _projection_shapes(cfg)
  wanted = set(cfg.lora_targets if projections is None else projections) & set(cfg.lora_targets)
  per_layer = sum(cfg.lora_rank * (shapes[t][0] + shapes[t][1]) for t in wanted)
  return (cfg.num_layers if layers is None else layers) * per_layer if cfg.lora_rank else 0


def head_matmul_params(hidden_size: int, head_dims: Iterable[int]) -> int:
  dims = [hidden_size, *head_dims, 1]
  return sum(a * b for a, b in zip(dims[:-1], dims[1:]))


def analytic_model_flops(cfg: ModelConfig, tokens: int, seq_len: int, mode: str, *,
                         head_dims: Iterable[int] = (), markers: int = 0,
                         last_layer_rows: int | None = None) -> float:
  """Model FLOPs of one training step (remat recomputation is NOT counted).

  full: tokens * (6N + 6*L*H*d_head*T). lora: tokens * (4N + 6*N_lora + 6*L*H*d_head*T): the
  frozen weights need the forward (2N) and the activation gradient (2N) but no weight gradient;
  the adapters are trained (6 per weight). The attention term (causal, QK^T and AV, forward +
  backward) is the same in both modes. `tokens` counts non-pad tokens; the head adds
  6 * its matmul weights per supervised marker (it runs at markers only).
  `last_layer_rows`: where the model runs its last layer's queries, output projection and MLP at
  those rows only (model/transformer.py's Decoder with query positions, the layers unrolled), so
  many rows; None: every token, as a plain decoder does.
  """
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}; choose from {', '.join(MODES)}")
  n = decoder_matmul_params(cfg)
  attention_per_layer = 6 * cfg.num_heads * cfg.head_dim * seq_len
  frozen_weight = 6 if mode == "full" else 4
  per_token = frozen_weight * n + cfg.num_layers * attention_per_layer
  if mode == "lora":
    per_token += 6 * lora_params(cfg)
  flops = tokens * per_token + 6 * head_matmul_params(cfg.hidden_size, head_dims) * markers
  if last_layer_rows is not None:
    shapes = _projection_shapes(cfg)
    at_queries = frozen_weight * sum(a * b for t, (a, b) in shapes.items() if t in _LAST_LAYER_AT_QUERIES)
    if mode == "lora":
      at_queries += 6 * lora_params(cfg, layers=1, projections=_LAST_LAYER_AT_QUERIES)
    flops -= (tokens - last_layer_rows) * (at_queries + attention_per_layer)
  return float(flops)


def step_model_flops(cfg: ModelConfig, settings: BenchSettings, batch: Mapping[str, np.ndarray],
                     mode: str, last_layer_at_markers: bool = False) -> float:
  markers = supervised_markers(batch)
  return analytic_model_flops(cfg, non_pad_tokens(batch), settings.seq_len, mode, head_dims=settings.head_dims,
                              markers=markers, last_layer_rows=markers if last_layer_at_markers else None)


def mean_model_flops(cfg: ModelConfig, settings: BenchSettings, batches: list[Mapping[str, np.ndarray]],
                     mode: str, last_layer_at_markers: bool = False) -> float:
  """Model FLOPs per step averaged over the timed batches (marker counts differ slightly);
  `last_layer_at_markers`: the model runs its last layer at the markers only (rmjax's unrolled)."""
  return statistics.fmean(step_model_flops(cfg, settings, b, mode, last_layer_at_markers) for b in batches)


# -- hardware ---------------------------------------------------------------------------------

def peak_flops(device_kind: str) -> float | None:
  """Dense bf16 peak FLOP/s of one accelerator from its name; None when unknown (or a CPU)."""
  kind = device_kind.upper()
  if "H100" in kind and "PCIE" in kind:
    return 756e12
  if "H100" in kind or "H200" in kind or "GH200" in kind:
    return 989.5e12
  if "A100" in kind:
    return 312e12
  return None


def host_peak_rss_mb() -> float:
  """This process's peak resident set size (Linux reports ru_maxrss in KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# -- timing and records -----------------------------------------------------------------------

def time_steps(step: Callable[[dict[str, Any]], None], batches: list[dict[str, Any]],
               warmup: int, steps: int) -> list[float]:
  """Run `warmup` untimed then `steps` timed calls of `step` (which must block until done)."""
  for i in range(warmup):
    step(batches[i % len(batches)])
  times = []
  for i in range(steps):
    start = time.perf_counter()
    step(batches[(warmup + i) % len(batches)])
    times.append(time.perf_counter() - start)
  return times


def make_record(impl: str, mode: str, settings: BenchSettings, batch: Mapping[str, np.ndarray],
                model_flops: float, times: list[float], peak_mem_mb: float, peak: float | None,
                device: str, **extra: Any) -> dict[str, Any]:
  step_time = statistics.median(times)
  return {
    "impl": impl, "mode": mode, "preset": settings.preset, "seq_len": settings.seq_len,
    "batch": settings.batch, "grad_accum": settings.grad_accum, "dtype": settings.dtype,
    "remat": settings.remat, "device": device,
    "tokens_per_s": non_pad_tokens(batch) / step_time, "step_time_s": step_time,
    "step_time_min_s": min(times), "step_times_s": [round(t, 6) for t in times], "peak_mem_mb": round(peak_mem_mb, 1),
    "mfu": None if peak is None else model_flops / step_time / peak,
    "model_flops": model_flops, **extra}


def ratios(records: Iterable[Mapping[str, Any]]) -> dict[str, float | None]:
  """rmjax tokens/s over torch tokens/s per mode measured (None if a side is missing)."""
  tps: dict[tuple[str, str], float] = {}
  modes: list[str] = []
  for r in records:
    if "tokens_per_s" in r:
      tps[(r["impl"], r["mode"])] = r["tokens_per_s"]
    if r.get("mode") in MODES and r["mode"] not in modes:
      modes.append(r["mode"])
  out = {}
  for mode in modes:
    jx, pt = tps.get(("rmjax", mode)), tps.get(("torch", mode))
    out[mode] = jx / pt if jx and pt else None
  return out


def median_ratios(rounds: Sequence[Mapping[str, float | None]]) -> dict[str, float | None]:
  """Per mode, the median of the rounds' ratios (None where no round measured both sides)."""
  out = {}
  for mode in rounds[0] if rounds else ():
    measured = [r[mode] for r in rounds if r.get(mode) is not None]
    out[mode] = statistics.median(measured) if measured else None
  return out


def error_text(exc: BaseException) -> str:
  """A failed run's error field: the exception's type and first line."""
  return f"{type(exc).__name__}: {first_line(exc)}"


def emit(record: Mapping[str, Any], stream=None) -> None:
  print(json.dumps(record), file=stream or sys.stdout, flush=True)
