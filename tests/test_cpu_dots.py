"""`model.cpu_dot_library`: which library runs a CPU step's dots (rmjax/model/cpu_dots.py)."""

import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _tiny_train as tt
from rmjax import spec as spec_lib
from rmjax.model import cpu_dots
from rmjax.model.config import ModelConfig
from rmjax.train import auto_settings
from rmjax.train.step import device_batch

CACHE_WARNING = "persistent compilation cache"
DEMO_SPEC = pathlib.Path(__file__).resolve().parents[1] / "specs" / "demo.py"


def _first_step(library: str, batch: dict) -> dict:
  """Eval probabilities at the initial params, then one train step's loss and gradient norm, and
  the compiled train step's text, of the tiny model with its dots in `library`."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")  # below the filter the steps install
    model, cfg, mesh, state, steps = tt.setup(mesh_cfg=(1, 1, 1), devices=jax.devices()[:1], cpu_dot_library=library)
    placed = device_batch(batch, mesh)
    hlo = auto_settings.compile_step(steps, state, placed).as_text()
    probs = np.asarray(steps.eval_step(state.params, state.frozen, placed))
    _, metrics = steps.train_step(state, placed)
  return {"hlo": hlo, "probs": probs, "loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
          "cache_warnings": [str(w.message) for w in caught if CACHE_WARNING in str(w.message)]}


def test_a_onednn_step_runs_its_dots_in_onednn_with_ynnpacks_values_and_no_cache_warning():
  """Each library's step runs its dots where it says, and both compute the same loss, gradient
  norm and probabilities up to the order of fp32 sums. oneDNN's steps cannot be cached; jax's
  warning about it is silenced (it is not the user's to fix), while ynnpack's steps still are."""
  batch = tt.make_batch(0)
  ynn, onednn = _first_step("ynnpack", batch), _first_step("onednn", batch)
  assert "onednn_fusion" in onednn["hlo"] and "onednn_fusion" not in ynn["hlo"]
  assert "ynn_fusion" in ynn["hlo"]
  np.testing.assert_allclose(onednn["probs"], ynn["probs"], rtol=1e-5, atol=1e-6)
  assert onednn["loss"] == pytest.approx(ynn["loss"], rel=1e-5)
  assert onednn["grad_norm"] == pytest.approx(ynn["grad_norm"], rel=1e-5)
  assert onednn["cache_warnings"] == [] and ynn["cache_warnings"] == []


@pytest.fixture
def cache_every_compile():
  """jax writes every compiled program to the persistent cache (conftest skips the fastest)."""
  before = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  yield
  jax.config.update("jax_persistent_cache_min_compile_time_secs", before)


def test_the_silenced_warning_is_the_one_jax_gives_for_a_onednn_program(cache_every_compile):
  """The filter must match what jax really says when it cannot cache a oneDNN program (else a
  user sees it every run): compile one with caching forced and the filter off, then on."""
  options = dict(cpu_dots.CPU_DOT_LIBRARIES["onednn"])

  def compile_dot(n: int) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      cpu_dots.compiler_options("cpu", "onednn") if n else None  # installs the filter on top
      x = jnp.ones((8, 4 + n), jnp.float32)  # a new shape each time: nothing read back from the cache
      jax.jit(lambda a: a @ a.T, compiler_options=options).lower(x).compile()
    return [str(w.message) for w in caught if CACHE_WARNING in str(w.message)]

  unfiltered = compile_dot(0)
  assert unfiltered and "onednn" in unfiltered[0]
  assert compile_dot(1) == []


def test_options_apply_to_a_cpu_only_and_unknown_libraries_are_refused():
  assert cpu_dots.compiler_options("cpu", "ynnpack") == {}
  assert cpu_dots.compiler_options("gpu", "onednn") == {}
  assert cpu_dots.compiler_options("cpu", "onednn")["xla_cpu_use_onednn"] is True
  with pytest.raises(ValueError, match="cpu_dot_library='mkl'; choose from ynnpack, onednn"):
    ModelConfig(cpu_dot_library="mkl")
  spec = spec_lib.load_spec_file(str(DEMO_SPEC))
  spec.model.cpu_dot_library = "mkl"
  with pytest.raises(spec_lib.SpecError, match="model.cpu_dot_library"):
    spec_lib.validate(spec, 1, 1)
