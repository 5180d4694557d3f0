"""The project's test set-up (tests/conftest.py: fake CPU devices, JAX environment, compilation
cache) for these tests too, whichever folder pytest starts from."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "tests"))  # tests/conftest.py's helpers

from conftest import *  # noqa: E402,F401,F403  (tests/conftest.py)
