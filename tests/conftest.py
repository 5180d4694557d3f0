"""Test-wide set-up: 8 fake CPU devices and a persistent JAX compilation cache.

XLA_FLAGS must be set before jax is first imported, which is why this lives in conftest.
The compilation cache is shared across test runs (and CI runs on the same machine), which
cuts the suite's time substantially on 2 cores.
"""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

_CACHE = pathlib.Path(os.environ.get("RMJAX_TEST_CACHE", pathlib.Path.home() / ".cache" / "rmjax" / "jax-test-cache"))
_CACHE.mkdir(parents=True, exist_ok=True)
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  """The real dataset records in ../shared/data (never copied into the project)."""
  if not SHARED_DATA.is_dir():
    pytest.fail(f"real data not found at {SHARED_DATA}; the checkout must sit beside shared/")
  return SHARED_DATA
