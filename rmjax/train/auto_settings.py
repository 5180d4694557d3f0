"""`model.remat` / `model.scan_unroll` = "auto": the fastest settings that fit, chosen per run.

Why it exists: how much the layers recompute (remat) and whether the layer loop is unrolled
change a step's speed and memory, never its numbers, and which combination is fastest depends
on how much memory the run's shapes leave. Before the train step is built, `resolve` compiles
the step from abstract state (nothing allocated) for the run's largest step shape under a short
list of candidates in a cost order, fastest first, reads XLA's memory analysis of each, and
takes the first whose compiled peak fits the device's memory with `MARGIN` to spare. Compiles
stop at the first fit. With `model.auto_time` it compiles every candidate instead and times one step of each
that fits (on a throwaway random state; nothing of the run's state is touched) and takes the
fastest.

Cost order (`COST_ORDER`), fastest first:
* GPU, full fine-tuning: unrolled + dots_and_attention_saveable, then the layer loop with
  dots_with_no_batch_dims_saveable, then the loop with mlp_projections_saveable, then the old
  default (loop, full remat).
* GPU, LoRA: unrolled + no remat, then the loop with dots_and_attention_saveable, then the loop
  with mlp_projections_saveable, then full remat in the loop.
  mlp_projections_saveable (the MLP's gate and up outputs: the backward pass recomputes the
  attention block only) is placed by XLA's predicted FLOPs, less recompute than full remat (no
  GPU timing yet), for memories between the two: specs/full.py on an H200. Otherwise both GPU
  orders are the order of the measured H100 rows of each setting (BUILD.md, Results).
* CPU (fp32), both modes: no remat unrolled, then no remat in the loop, then the old default.
  On the 75m preset at 4 x 512 rows no remat unrolled takes less time a step than the old
  default in both modes on the CPUs measured (BUILD.md, Results, "auto's CPU candidates").
The old default (`spec.AUTO_FALLBACK`: full remat in the loop) is always a candidate, last
where it is the slowest, so where the order holds auto is never slower than the old default.
A key set explicitly keeps its value in every candidate; only the "auto" keys vary.

When no candidate fits, the run takes the old default (what ran before auto) with a warning:
the compiled peak is a bound, and a run that truly does not fit stops with the launcher's
one-line out-of-memory message.

Memory limit: a GPU's allocator limit (`memory_stats()["bytes_limit"]`, which already leaves
the launcher's share for CUDA and libraries), the host's available memory on a CPU
(/proc/meminfo MemAvailable), or a given number (a compile-only target device).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from rmjax import sharding as shd
from rmjax import spec as spec_lib
from rmjax.cli import first_line
from rmjax.train.step import TRAIN_KEYS

log = logging.getLogger("rmjax.train")

AUTO = spec_lib.AUTO
MARGIN = 0.02  # of the memory limit left free: compiled peaks track measured ones within 0.5% (BUILD.md)


@dataclasses.dataclass(frozen=True)
class Candidate:
  remat: str
  scan_unroll: int

  def label(self) -> str:
    return f"{self.remat}/{'unrolled' if self.scan_unroll == 0 else f'loop{self.scan_unroll}'}"

  def as_dict(self) -> dict[str, Any]:
    return {"remat": self.remat, "scan_unroll": self.scan_unroll}


FALLBACK = Candidate(**spec_lib.AUTO_FALLBACK)
COST_ORDER: Mapping[tuple[str, str], tuple[Candidate, ...]] = {
  ("gpu", "full"): (Candidate("dots_and_attention_saveable", 0),
                    Candidate("dots_with_no_batch_dims_saveable", 1),
                    Candidate("mlp_projections_saveable", 1), FALLBACK),
  ("gpu", "lora"): (Candidate("none", 0), Candidate("dots_and_attention_saveable", 1),
                    Candidate("mlp_projections_saveable", 1), FALLBACK),
  ("cpu", "full"): (Candidate("none", 0), Candidate("none", 1), FALLBACK),
  ("cpu", "lora"): (Candidate("none", 0), Candidate("none", 1), FALLBACK),
}


def candidates(mode: str, platform: str, remat: str = AUTO, scan_unroll: int | str = AUTO) -> list[Candidate]:
  """The cost order for this device kind and mode under the explicit keys: the order's own
  candidates that have the explicit values first (measured), then the order with the explicit
  values put in; duplicates dropped (the first place kept). The old default (with any explicit
  key) is in the list, last unless it came earlier."""
  kind = "cpu" if platform == "cpu" else "gpu"  # "gpu", "cuda", "rocm": the GPU order
  order = (*COST_ORDER[(kind, mode)], FALLBACK)
  keep = lambda c: (remat == AUTO or c.remat == remat) and (scan_unroll == AUTO or c.scan_unroll == int(scan_unroll))
  fixed = [Candidate(c.remat if remat == AUTO else remat, c.scan_unroll if scan_unroll == AUTO else int(scan_unroll))
           for c in order[:-1]] + [old_default(remat, scan_unroll)]
  out: list[Candidate] = []
  for c in [c for c in order if keep(c)] + fixed:  # fixed[-1] is the old default, explicit keys put in
    if c not in out:
      out.append(c)
  return out


# ---------------------------------------------------------------------------- compile helpers
# (shared with rmjax.bench.jax_impl)

def abstract_batch(host_batch: Mapping[str, Any]) -> dict[str, jax.ShapeDtypeStruct]:
  return {k: jax.ShapeDtypeStruct(np.shape(host_batch[k]), np.asarray(host_batch[k]).dtype) for k in TRAIN_KEYS}


def batch_shapes(rows: int, length: int, markers: int) -> dict[str, jax.ShapeDtypeStruct]:
  """The train step's batch of `rows` x `length` tokens with `markers` marker slots, as shapes."""
  i32, f32 = np.dtype(np.int32), np.dtype(np.float32)
  tokens, slots = (rows, length), (rows, markers)
  return {"input_ids": jax.ShapeDtypeStruct(tokens, i32), "positions": jax.ShapeDtypeStruct(tokens, i32),
          "segment_ids": jax.ShapeDtypeStruct(tokens, i32), "marker_positions": jax.ShapeDtypeStruct(slots, i32),
          "targets": jax.ShapeDtypeStruct(slots, f32), "target_mask": jax.ShapeDtypeStruct(slots, f32)}


def lower_step(steps, state, batch):
  """The jitted train step of `steps`, lowered for these (abstract or real) inputs. An abstract
  batch entry is given the sharding a placed batch has: jax keys its trace cache on it, and the
  run's calls then find this trace (step_lowerer)."""
  placed = shd.batch_sharding(steps.mesh)
  as_placed = lambda x: (jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placed)
                         if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is None else x)
  with jax.set_mesh(steps.mesh):
    return steps._train.lower(state, {k: as_placed(batch[k]) for k in TRAIN_KEYS})


def compile_step(steps, state, batch):
  """The jitted train step of `steps`, lowered and compiled for these (abstract or real) inputs."""
  return lower_step(steps, state, batch).compile()


def cost_analysis(compiled) -> dict[str, Any]:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax returned one dict per program
    cost = cost[0] if cost else {}
  return dict(cost or {})


def cost_flops(compiled) -> float | None:
  flops = cost_analysis(compiled).get("flops")
  return None if flops is None else float(flops)


def mb(nbytes: float) -> float:
  return round(nbytes / 2**20, 1)


def memory_analysis(compiled) -> dict[str, Any]:
  mem = compiled.memory_analysis()
  get = lambda name: None if mem is None else mb(getattr(mem, name))
  return {"compiled_temp_mb": get("temp_size_in_bytes"), "compiled_arg_mb": get("argument_size_in_bytes"),
          "compiled_out_mb": get("output_size_in_bytes"), "compiled_alias_mb": get("alias_size_in_bytes")}


def compiled_peak(analysis: Mapping[str, Any]) -> dict[str, Any]:
  """compiled_peak_mb = max(init, step arguments + temp + outputs not aliased to arguments)."""
  keys = ("compiled_arg_mb", "compiled_temp_mb", "compiled_out_mb", "compiled_alias_mb")
  if any(analysis.get(k) is None for k in keys):
    return {}
  arg, temp, out, alias = (analysis[k] for k in keys)
  return {"compiled_peak_mb": round(max(arg + temp + out - alias, analysis.get("compiled_init_mb") or 0.0), 1)}


def step_peak_bytes(compiled) -> int | None:
  """XLA's bound on the step's device peak: arguments + temp + outputs not aliased to arguments."""
  mem = compiled.memory_analysis()
  if mem is None:
    return None
  return int(mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
             - mem.alias_size_in_bytes)


def memory_limit(device: jax.Device) -> tuple[int, str]:
  """(bytes a run may use on `device`, where that number comes from)."""
  stats = {}
  try:
    stats = device.memory_stats() or {}
  except Exception:  # noqa: BLE001  some backends do not report
    pass
  if stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), "the device's bytes_limit"
  for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
    if line.startswith("MemAvailable:"):  # shared by the host's CPU devices
      return int(line.split()[1]) * 1024 // jax.local_device_count(), "the host's MemAvailable per device"
  raise RuntimeError(f"cannot tell how much memory {device.platform} device {device.id} has")


# ---------------------------------------------------------------------------- choosing

@dataclasses.dataclass
class Trial:
  candidate: Candidate
  peak_bytes: int | None = None
  compile_s: float = 0.0
  fits: bool = False
  step_s: float | None = None
  error: str = ""

  def as_record(self) -> dict[str, Any]:
    """The trial as one JSON object: MB as the tools report them (MiB), seconds rounded."""
    return {**self.candidate.as_dict(), "compiled_peak_mb": None if self.peak_bytes is None else mb(self.peak_bytes),
            "fits": self.fits, "compile_s": round(self.compile_s, 1),
            **({} if self.step_s is None else {"step_s": self.step_s}), **({"error": self.error} if self.error else {})}

  def describe(self, limit: int) -> str:
    if self.error:
      return f"{self.candidate.label()} failed to compile ({self.error})"
    peak = "?" if self.peak_bytes is None else f"{mb(self.peak_bytes):,.0f}"
    timed = "" if self.step_s is None else f", {self.step_s * 1e3:.1f} ms a step"
    return f"{self.candidate.label()} {peak} MB{'' if self.fits else ' (no fit)'}{timed}"


@dataclasses.dataclass
class Choice:
  candidate: Candidate
  trials: list[Trial]
  limit_bytes: int
  limit_source: str
  timed: bool
  fitted: bool
  old_default: Candidate  # what a run took before "auto": taken when none fits
  # `resolve`'s Steps for the chosen candidate: jax holds their trace and compile for the run's
  # largest shape, which the run reuses (step_lowerer)
  steps: Any = None

  @property
  def compile_s(self) -> float:
    return sum(t.compile_s for t in self.trials)

  def as_record(self) -> dict[str, Any]:
    """What was compiled (and timed, with `auto_time`) in the cost order, and what a run without
    `auto_time` takes (`order_pick`: the first that fits, the old default when none does), next
    to the old default: with the step times, whether the cost order held on this device."""
    first_fit = next((t.candidate for t in self.trials if t.fits), self.old_default)
    return {"chosen": self.candidate.as_dict(), "order_pick": first_fit.as_dict(),
            "old_default": self.old_default.as_dict(),
            "timed": self.timed, "fitted": self.fitted, "compile_s": round(self.compile_s, 1),
            "trials": [t.as_record() for t in self.trials]}

  def describe(self) -> str:
    """The one log line: what was chosen and why."""
    how = "fastest timed step that fits" if self.timed else "first in the cost order that fits"
    if not self.fitted:
      how = "none fits; the old default"
    budget = self.limit_bytes * (1 - MARGIN)
    tried = "; ".join(t.describe(self.limit_bytes) for t in self.trials)
    return (f"Auto settings: remat={self.candidate.remat}, scan_unroll={self.candidate.scan_unroll} ({how}; "
            f"compiled step peaks vs {mb(budget):,.0f} MB = {1 - MARGIN:.0%} of {mb(self.limit_bytes):,.0f} MB, "
            f"{self.limit_source}: {tried}; {self.compile_s:.1f} s compiling)")


def old_default(remat: str = AUTO, scan_unroll: int | str = AUTO) -> Candidate:
  """What a run took before "auto" (spec.AUTO_FALLBACK), with the explicit keys put in."""
  return Candidate(FALLBACK.remat if remat == AUTO else remat,
                   FALLBACK.scan_unroll if scan_unroll == AUTO else int(scan_unroll))


def choose(options: Sequence[Candidate], compile_fn: Callable[[Candidate], Any], limit_bytes: int,
           limit_source: str = "given", time_fn: Callable[[Candidate, Any], float] | None = None,
           fallback: Candidate | None = None) -> Choice:
  """Compiles `options` in order; the first whose peak fits `limit_bytes` less MARGIN, or with
  `time_fn` the fastest that fits (every option compiled). None fits: `fallback` (the old
  default; by default the last option)."""
  budget = limit_bytes * (1 - MARGIN)
  trials: list[Trial] = []
  for c in options:
    trial = Trial(c)
    trials.append(trial)
    start = time.perf_counter()
    try:
      compiled = compile_fn(c)
    except jax.errors.JaxRuntimeError as e:  # e.g. a compile that runs out of memory
      trial.compile_s, trial.error = time.perf_counter() - start, first_line(e)
      continue
    trial.compile_s = time.perf_counter() - start
    trial.peak_bytes = step_peak_bytes(compiled)
    trial.fits = trial.peak_bytes is None or trial.peak_bytes <= budget
    if trial.fits and time_fn is None:
      break
    if trial.fits:
      trial.step_s = time_fn(c, compiled)
    del compiled
  fitting, old = [t for t in trials if t.fits], fallback or options[-1]
  if not fitting:
    return Choice(old, trials, limit_bytes, limit_source, time_fn is not None, fitted=False, old_default=old)
  best = min(fitting, key=lambda t: t.step_s) if time_fn is not None else fitting[0]
  return Choice(best.candidate, trials, limit_bytes, limit_source, time_fn is not None, fitted=True, old_default=old)


# ---------------------------------------------------------------------------- a run's settings

def explicit_or_recorded(spec: Any, run_dir: pathlib.Path | None) -> dict[str, Any] | None:
  """The concrete {"remat", "scan_unroll"} without compiling: the spec's own values, with an
  "auto" one taken from `run_dir`'s logs/config.json (a resumed run reuses the choice). None
  when some "auto" key has no recorded concrete value (it must be resolved)."""
  settings = spec_lib.performance_settings(spec)
  if AUTO not in settings.values():
    return settings
  if run_dir is None:
    return None
  try:
    previous = json.loads((run_dir / "logs" / "config.json").read_text(encoding="utf-8"))["model"]
    recorded = {"remat": str(previous["remat"]), "scan_unroll": spec_lib.scan_unroll_setting(previous["scan_unroll"])}
  except (OSError, ValueError, KeyError, TypeError, spec_lib.SpecError):
    return None
  from rmjax.model.config import REMAT_POLICIES
  if recorded["remat"] not in REMAT_POLICIES or recorded["scan_unroll"] == AUTO:
    return None
  return {k: recorded[k] if v == AUTO else v for k, v in settings.items()}


def in_config(config: dict[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
  """The spec as a dict (spec_to_dict) with the concrete settings in place of "auto"."""
  return {**config, "model": {**config["model"], **settings}}


def run_shapes(spec: Any, render_cfg: Any) -> dict[str, jax.ShapeDtypeStruct]:
  """The run's largest train-step batch: every global row at the largest bucket a row can
  reach (max_length's), with the marker slots the pipeline gives each row."""
  return batch_shapes(int(spec.batch_size), render_cfg.bucket(render_cfg.max_length), render_cfg.markers)


def step_lowerer(model_cfg: Any, head_cfg: Any, optim_cfg: Any, mesh: Any,
                 shapes: Mapping[str, jax.ShapeDtypeStruct],
                 built: dict[Candidate, Any] | None = None) -> Callable[[Candidate], Any]:
  """candidate -> the run's train step lowered for `shapes` from abstract state (nothing
  allocated). `built`, when given, receives each candidate's Steps: a run that calls the chosen
  one's Steps on a state of their `state_shardings` finds jax's trace and compile
  of these shapes in the jitted function's caches, and neither traces nor compiles it again.
  (A run that builds its own Steps lowers to the same program, which the launcher's compilation
  cache then serves.)"""
  from rmjax.model.confidence import ConfidenceModel
  from rmjax.train.state import abstract_train_state
  from rmjax.train.step import make_steps

  def lower_fn(c: Candidate):
    model = ConfidenceModel(model_cfg.replace(**c.as_dict()), head_cfg)
    abstract, shardings = abstract_train_state(model, optim_cfg, mesh)
    steps = make_steps(model, optim_cfg, mesh, shardings)
    if built is not None:
      built[c] = steps
    return lower_step(steps, abstract, shapes)
  return lower_fn


def step_compiler(model_cfg: Any, head_cfg: Any, optim_cfg: Any, mesh: Any,
                  shapes: Mapping[str, jax.ShapeDtypeStruct],
                  built: dict[Candidate, Any] | None = None) -> Callable[[Candidate], Any]:
  """candidate -> the run's train step compiled for `shapes` from abstract state (`built`: as
  for step_lowerer)."""
  lower_fn = step_lowerer(model_cfg, head_cfg, optim_cfg, mesh, shapes, built)
  return lambda c: lower_fn(c).compile()


def resolve(spec: Any, model_cfg: Any, head_cfg: Any, optim_cfg: Any, mesh: Any, render_cfg: Any) -> Choice:
  """Resolves the spec's "auto" keys for this run (module docstring); logs nothing."""
  from rmjax.model.confidence import ConfidenceModel

  settings = spec_lib.performance_settings(spec)
  device = mesh.devices.flat[0]
  options = candidates(str(spec.mode), device.platform, settings["remat"], settings["scan_unroll"])
  shapes = run_shapes(spec, render_cfg)
  time_fn = None
  if bool(spec.model.auto_time):
    def time_fn(c: Candidate, compiled: Any) -> float:
      model = ConfidenceModel(model_cfg.replace(**c.as_dict()), head_cfg)
      return time_one_step(model, optim_cfg, mesh, compiled, shapes, int(spec.seed))
  limit, source = memory_limit(device)
  built: dict[Candidate, Any] = {}
  choice = choose(options, step_compiler(model_cfg, head_cfg, optim_cfg, mesh, shapes, built), limit, source,
                  time_fn, old_default(settings["remat"], settings["scan_unroll"]))
  if jax.process_count() > 1:  # every process must build the same step (timings may differ)
    from jax.experimental import multihost_utils
    index = int(multihost_utils.broadcast_one_to_all(np.int32(options.index(choice.candidate))))
    choice.candidate = options[index]
  choice.steps = built.get(choice.candidate)
  return choice


def time_one_step(model: Any, optim_cfg: Any, mesh: Any, compiled: Any,
                  shapes: Mapping[str, jax.ShapeDtypeStruct], seed: int) -> float:
  """Seconds of one step of `compiled` on a fresh random state (donated and dropped: the run's
  own state does not exist yet and is never touched), after one untimed step."""
  from rmjax.train.state import create_train_state
  from rmjax.train.step import device_batch
  state, _ = create_train_state(model, optim_cfg, mesh, jax.random.key(seed))
  host = {k: np.zeros(s.shape, s.dtype) for k, s in shapes.items()}
  host["segment_ids"][:] = 1  # one example per row, as long as the row
  host["positions"][:] = np.arange(host["positions"].shape[1], dtype=np.int32)
  batch = device_batch(host, mesh)
  with jax.set_mesh(mesh):
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
  seconds = time.perf_counter() - start
  del state, metrics, batch
  return seconds
