"""One way for every command-line tool to report bad input: one line on stderr, exit code 2.

Why it exists: `python -m rmjax.{convert,export,score,evaluate}` are given paths typed by users,
and a missing, truncated or foreign file must end in one readable line, never a traceback. The
tools share this instead of each keeping its own `except (...)` list, so the list of what counts
as "bad input" is written once:

  def main(argv=None) -> int:
    args = parser.parse_args(argv)
    return cli.run("score", lambda: _main(args))

Only exception types that mean "the input is wrong" are caught (`user_errors()`); a TypeError,
AttributeError or KeyError escaping a tool is a bug in rmjax (the readers translate malformed
files into ValueError / OSError naming the path where they arise) and keeps its traceback.
`read_json_object` is that translation for the small JSON files the tools read.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
from typing import Any, Callable

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a command Ctrl-C stopped


def report(tool: str, message: str) -> int:
  """Prints "<tool>: error: <message>" on stderr; returns EXIT_USER_ERROR, the status to exit with."""
  print(f"{tool}: error: {message}", file=sys.stderr)
  return EXIT_USER_ERROR


class ArgumentParser(argparse.ArgumentParser):
  """argparse.ArgumentParser whose command-line mistakes are one line too: "<tool>: error: <what>
  (--help shows the usage)", exit code 2, where argparse prints its whole usage block first.
  <tool> is the module `prog` runs ("python -m rmjax.bench --loop" -> "rmjax.bench"), or else its
  first word ("launch/train.py")."""

  def error(self, message: str):
    words = self.prog.split()
    tool = words[words.index("-m") + 1] if "-m" in words[:-1] else words[0]
    raise SystemExit(report(tool, f"{message} (--help shows the usage)"))


def user_errors() -> tuple[type[BaseException], ...]:
  """Exception types that mean bad input: the path, a file in it, or a missing optional package.

  ValueError covers json.JSONDecodeError, UnicodeDecodeError and rmjax's own one-line errors
  (RunArtifactError, ExportError, SpecError); OSError covers missing / unreadable paths;
  CheckpointError is orbax / tensorstore failing on a checkpoint folder (already one line,
  naming it); SafetensorError is the safetensors library rejecting a file.
  """
  from safetensors import SafetensorError
  from rmjax.checkpoint import CheckpointError
  return (ValueError, OSError, ImportError, CheckpointError, SafetensorError)


def first_line(exc: BaseException) -> str:
  """The first non-empty line of the message, or the type name when there is no message."""
  for line in str(exc).splitlines():
    if line.strip():
      return line.strip()
  return type(exc).__name__


def is_out_of_memory(exc: BaseException) -> bool:
  """Whether `exc` is jax's error for a device out of memory (XLA's RESOURCE_EXHAUSTED)."""
  return isinstance(exc, RuntimeError) and type(exc).__name__ in ("JaxRuntimeError", "XlaRuntimeError") \
    and "RESOURCE_EXHAUSTED" in str(exc)


def out_of_memory_line(exc: BaseException, smaller: str, platform: str | None = None) -> str:
  """"out of device memory: <XLA's RESOURCE_EXHAUSTED line> (<what bounds it>; <smaller>)": on a
  GPU the share of its memory jax may use, on a CPU the host's memory. A MemoryError (numpy or
  Python allocating a host array, e.g. for a huge batch size) is "out of host memory"."""
  if isinstance(exc, MemoryError):
    return f"out of host memory: {first_line(exc)} (to need less: {smaller}; RMJAX_DEBUG=1 shows the traceback)"
  from rmjax.runtime import memory_fraction
  if platform is None:
    import jax
    platform = jax.default_backend()
  lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
  what = next((line for line in lines if "RESOURCE_EXHAUSTED" in line), first_line(exc))
  bound = (f"jax may use {memory_fraction()} of each GPU's memory, XLA_PYTHON_CLIENT_MEM_FRACTION"
           if platform == "gpu" else f"the {platform} backend uses this machine's memory")
  return f"out of device memory: {what} ({bound}; to need less: {smaller}; RMJAX_DEBUG=1 shows the traceback)"


def _refuse_constant(name: str) -> Any:
  raise ValueError(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
  value = float(text)
  if not math.isfinite(value):
    raise ValueError(f"{text[:40]} is past a float's range")
  return value


def json_value(text: str | bytes, finite: bool = False) -> Any:
  """json.loads, with every way user text can fail to decode as a ValueError: bad JSON or UTF-8,
  an integer past Python's digit limit, and nesting past its recursion limit. `finite` refuses
  NaN, Infinity and numbers past a float's range too: Python reads them as nan and inf, which
  JSON has no way to write, so a tool passing records through (score, rerank) would write invalid
  JSON. Readers take only typed fields, whose ranges they check, and need not refuse them."""
  try:
    return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float) if finite \
      else json.loads(text)
  except RecursionError:
    raise ValueError("JSON nested too deeply") from None


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
  """The JSON object in `path`; a ValueError naming the path if it is not valid JSON or not an
  object (a missing or unreadable file stays an OSError, which names the path itself)."""
  path = pathlib.Path(path)
  try:
    obj = json_value(path.read_bytes())
  except ValueError as e:
    raise ValueError(f"{path} is not valid JSON: {first_line(e)}") from None
  if not isinstance(obj, dict):
    raise ValueError(f"{path} holds a JSON {type(obj).__name__}, expected an object")
  return obj


def run(tool: str, body: Callable[[], int]) -> int:
  """body()'s return code, or EXIT_USER_ERROR after printing "rmjax.<tool>: error: <line>"
  (bad input, or a device out of memory: a batch too large for it is the user's setting too).
  RMJAX_DEBUG=1 lets the error through with its traceback, as rmjax.launch does. Ctrl-C is one
  line and EXIT_INTERRUPTED (the tools write their results whole or not at all: tool_files)."""
  errors = user_errors()
  try:
    return body()
  except KeyboardInterrupt:
    if os.environ.get("RMJAX_DEBUG"):
      raise
    print(f"rmjax.{tool}: interrupted (Ctrl-C); its results were not written, earlier ones are as they were",
          file=sys.stderr)
    return EXIT_INTERRUPTED
  except errors as e:
    if os.environ.get("RMJAX_DEBUG"):
      raise
    return report(f"rmjax.{tool}", first_line(e))
  except (RuntimeError, MemoryError) as e:
    if not (is_out_of_memory(e) or isinstance(e, MemoryError)) or os.environ.get("RMJAX_DEBUG"):
      raise
    return report(f"rmjax.{tool}", out_of_memory_line(e, 'a smaller batch'))
