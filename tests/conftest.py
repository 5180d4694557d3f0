"""Test-wide set-up: 8 fake CPU devices, a persistent JAX compilation cache, the real records.

XLA_FLAGS must be set before jax is first imported, which is why this lives in conftest. The
device count is appended to any XLA_FLAGS the caller set; RMJAX_TEST_MAX_ISA=AVX2 (XLA's ISA
names) also caps the instruction set XLA compiles for, so an AVX-512 machine runs the suite as
an AVX2-only CPU (other kernels, other fp32 summation orders) would. tests/_xla_env.py builds
both, and the XLA_FLAGS of subprocesses that need another device count.

The compilation cache (RMJAX_TEST_CACHE, default ~/.cache/rmjax/jax-test-cache) is shared by
the test process and the `rmjax.launch` subprocesses tests start (RMJAX_COMPILATION_CACHE), so a
program compiled once in a run is read back by every later test and subprocess that builds it;
an empty directory gives a cold run.

Real records: tests that need them take the `shared_data` fixture: RMJAX_SHARED_DATA, else
../shared/data beside the checkout. Without it they skip, naming the path;
RMJAX_REQUIRE_SHARED_DATA=1 (set by .ci/run) makes that a failure.
"""

import os
import pathlib

import _xla_env

os.environ["XLA_FLAGS"] = _xla_env.suite_flags()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

_CACHE = pathlib.Path(os.environ.get("RMJAX_TEST_CACHE", pathlib.Path.home() / ".cache" / "rmjax" / "jax-test-cache"))
_CACHE.mkdir(parents=True, exist_ok=True)
_MIN_COMPILE_SECS = 0.2  # tiny programs compile in about the time a cache read takes
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", _MIN_COMPILE_SECS)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
# The processes tests start (launchers, benchmarks) share the cache on the same terms; jax reads
# its options from the environment at import.
os.environ.setdefault("RMJAX_COMPILATION_CACHE", str(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", str(_MIN_COMPILE_SECS))

SHARED_DATA_ENV, REQUIRE_ENV = "RMJAX_SHARED_DATA", "RMJAX_REQUIRE_SHARED_DATA"
SHARED_DATA = pathlib.Path(os.environ.get(SHARED_DATA_ENV) or pathlib.Path(__file__).resolve().parents[2] / "shared" / "data")


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  """The real dataset records (never copied into the project)."""
  if not SHARED_DATA.is_dir():
    why = (f"real records not found at {SHARED_DATA}: put the checkout beside shared/ or set "
           f"{SHARED_DATA_ENV}=DIR to a copy of shared/data")
    if os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
      pytest.fail(f"{why} ({REQUIRE_ENV} is set)")
    pytest.skip(why)
  return SHARED_DATA


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  """Captured output is sent from an xdist worker as UTF-8, which a lone surrogate cannot be
  (the fuzz tests feed tools random bytes, and libraries log what they decoded from them): escape
  such characters so a passing test cannot crash its worker."""
  report = (yield).get_result()
  report.sections = [(name, text.encode("utf-8", "backslashreplace").decode("utf-8"))
                     for name, text in report.sections]


def pytest_collection_modifyitems(config, items):
  """Modules holding slow tests run first, each module's tests kept together (its fixtures are
  built once). xdist hands each worker a contiguous share and the idle ones steal from the
  end: with the long tests started early, the run ends on short ones that balance the workers
  instead of one worker finishing a minute-long test alone."""
  slow_modules = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
  items.sort(key=lambda item: item.module.__name__ not in slow_modules)  # stable: order within kept
