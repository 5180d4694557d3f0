"""Spec files in and out: loading `file.py[:arg]`, command-line overrides, the JSON form.

Why apart from validation: the launcher and every tool parse `--spec.key=value` and `--set
KEY=VALUE` before anything else exists, and logs write the spec as JSON; none of that needs to
know what a valid spec is. `rmjax.spec` (validation and derived quantities) re-exports these
names, so `from rmjax.spec import load_spec_file` keeps working.

This module must stay light (no jax/flax import): the launcher imports it before jax starts.
"""

from __future__ import annotations

import ast
import difflib
import importlib.machinery
import importlib.util
import json
import keyword
import os
import pathlib
import re
from typing import Any, Iterable, Mapping, Sequence

import ml_collections

ConfigDict = ml_collections.ConfigDict


class SpecError(ValueError):
  """A spec problem the user must fix; the message is meant to be printed as is."""


AUTO = "auto"
# Keys that hold "auto" or a whole number. ml-collections types a field by its default and
# config_flags parses a str field's value as text, so they are str fields ("auto", "0", "2");
# an int set through `apply_overrides` (`--set model.scan_unroll=0`) is stored as its text.
AUTO_OR_INT_KEYS = ("model.scan_unroll",)


# ---------------------------------------------------------------------------------------------
# Keys, loading, overrides.

def dotted_items(spec: ConfigDict, prefix: str = "") -> Iterable[tuple[str, Any]]:
  """Yields (dotted key, value) for every node, sub-dicts included, depth first."""
  for key, value in spec.items():
    name = f"{prefix}{key}"
    yield name, value
    if isinstance(value, ConfigDict):
      yield from dotted_items(value, name + ".")


def dotted_keys(spec: ConfigDict) -> list[str]:
  return [k for k, _ in dotted_items(spec)]


def get_dotted(spec: ConfigDict, key: str) -> Any:
  node: Any = spec
  for part in key.split("."):
    node = node[part]
  return node


def expand_home(spec: ConfigDict) -> None:
  """A path key (output_dir, init_from, any *.path) starting with "~" gets the home directory:
  the shell expands "~" only at a word's start, not after `--spec.output_dir=`, and a run would
  otherwise write into a folder named "~" under the working directory."""
  for key, value in list(dotted_items(spec)):
    if isinstance(value, str) and value.startswith("~") and (
        key in ("output_dir", "init_from") or key.rsplit(".", 1)[-1] == "path"):
      parent, _, leaf = key.rpartition(".")
      (get_dotted(spec, parent) if parent else spec)[leaf] = os.path.expanduser(value)


def closest_keys(key: str, keys: Sequence[str], n: int = 3) -> list[str]:
  """Closest valid keys to a mistyped one: whole dotted keys first, then by last component."""
  found = difflib.get_close_matches(key, keys, n=n, cutoff=0.6)
  leaf = key.rsplit(".", 1)[-1]
  by_leaf = [k for k in keys if difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1]], cutoff=0.75)]
  for k in by_leaf:
    if k not in found and len(found) < n:
      found.append(k)
  return found


def load_sibling(spec_file: str, filename: str = "common.py"):
  """Imports a module that sits next to a spec file (config_flags loads specs by path, so the
  specs directory is not a package and `import common` would not resolve)."""
  path = pathlib.Path(spec_file).resolve().with_name(filename)
  module_spec = importlib.util.spec_from_file_location(f"rmjax_specs_{path.stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def load_spec_file(path_arg: str, module_name: str = "rmjax_spec") -> ConfigDict:
  """Loads `file.py[:arg]` the way ml_collections' config_flags does (an unlocked copy).

  Raises SpecError (one line) when the file is missing or has no get_config.
  """
  path, _, arg = path_arg.partition(":")
  if not path:
    raise SpecError("empty spec path; pass --spec FILE, e.g. --spec specs/demo.py")
  if os.path.isdir(path):
    raise SpecError(f"spec {path} is a directory; give one of its .py files, e.g. specs/demo.py")
  if not os.path.isfile(path):
    raise SpecError(f"spec file not found: {path}")
  try:
    loader = importlib.machinery.SourceFileLoader(module_name, path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(module_name, loader))
    loader.exec_module(module)
    if not hasattr(module, "get_config"):
      raise SpecError(f"spec file {path} defines no get_config(arg=None)")
    config = module.get_config(arg) if arg else module.get_config()
  except SpecError:
    raise
  except Exception as e:  # noqa: BLE001  a broken spec file is a user error: one line
    raise SpecError(f"cannot load spec {path_arg}: {type(e).__name__}: {e}") from e
  if not isinstance(config, ConfigDict):
    raise SpecError(f"{path}: get_config() returned {type(config).__name__}, not a ConfigDict")
  return config


def find_flag_value(argv: Sequence[str], name: str) -> str | None:
  """Value of `--name X` / `--name=X` in argv (the last one wins), or None."""
  value = None
  for i, arg in enumerate(argv):
    m = re.fullmatch(rf"--?{re.escape(name)}(=(.*))?", arg)
    if m:
      value = m.group(2) if m.group(1) is not None else (argv[i + 1] if i + 1 < len(argv) else "")
  return value


def override_keys(argv: Sequence[str], name: str = "spec") -> list[tuple[str, str]]:
  """(dotted key, original argument) for every `--spec.key[=v]` / `--nospec.key` in argv."""
  out = []
  for arg in argv:
    m = re.match(rf"--?(?:no)?{re.escape(name)}\.([^=]+)", arg)
    if m:
      out.append((m.group(1), arg))
  return out


def check_overrides(spec: ConfigDict, argv: Sequence[str], name: str = "spec") -> None:
  """Raises SpecError naming the first unknown override key and its closest valid keys."""
  keys = dotted_keys(spec)
  known = set(keys)
  for key, arg in override_keys(argv, name):
    reserved = [part for part in key.split(".") if keyword.iskeyword(part)]
    if key in known and reserved:
      raise SpecError(f"spec key '{key}' cannot be overridden on the command line ('{reserved[0]}' "
                      "is a Python keyword); set it in a spec file")
    if key not in known:
      close = closest_keys(key, keys)
      hint = f"; did you mean {', '.join(name + '.' + k for k in close)}?" if close else ""
      raise SpecError(f"unknown spec key '{key}' in {arg}{hint}")


_VALUE_SYNTAX = "values are JSON or Python literals: true or True, 3, 1e-4, (64, 128), [64, 128], 'text'"


def parse_set_item(item: str, flag: str = "--set") -> tuple[str, Any]:
  """`KEY=VALUE` -> (KEY, VALUE): JSON when it parses, else a Python literal (True, (64, 128),
  64,128: the forms `--spec.KEY=VALUE` takes on the launcher), else the string itself."""
  key, sep, text = item.partition("=")
  if not sep or not key:
    raise SpecError(f"{flag} expects KEY=VALUE, got {item!r}")
  try:
    return key, json.loads(text)
  except json.JSONDecodeError:
    pass
  try:
    return key, ast.literal_eval(text)
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
    return key, text


def apply_overrides(spec: ConfigDict, items: Sequence[str], flag: str = "--set") -> ConfigDict:
  """Sets `KEY=VALUE` items (dotted spec keys; VALUE parsed as JSON, else as a Python literal
  such as True or (64, 128), else kept as a string) on `spec` in place, for the tools that take
  overrides without absl flags.

  Raises SpecError (one line) for a malformed item, an unknown key (with the closest valid
  ones), a whole sub-dict as the target, or a value of another type than the key's.
  """
  keys = dotted_keys(spec)
  for item in items:
    key, value = parse_set_item(item, flag)
    if key not in keys:
      close = closest_keys(key, keys)
      hint = f"; did you mean {', '.join(close)}?" if close else ""
      raise SpecError(f"unknown spec key '{key}' in {flag} {item}{hint}")
    if isinstance(get_dotted(spec, key), ConfigDict):
      raise SpecError(f"{flag} {item}: '{key}' is a group of keys; set one of its keys instead")
    parent, _, leaf = key.rpartition(".")
    node = get_dotted(spec, parent) if parent else spec
    if isinstance(getattr(node, leaf), tuple) and isinstance(value, list):
      value = tuple(value)
    if key in AUTO_OR_INT_KEYS and isinstance(value, int) and not isinstance(value, bool):
      value = str(value)
    try:
      setattr(node, leaf, value)
    except TypeError:
      raise SpecError(f"{flag} {item}: '{key}' holds {describe_type(spec, key)} values, "
                      f"got {type(value).__name__} {value!r} ({_VALUE_SYNTAX})") from None
  return spec


def describe_type(spec: ConfigDict, key: str) -> str:
  try:
    value = get_dotted(spec, key)
  except (KeyError, AttributeError):
    return "?"
  return type(value).__name__


# ---------------------------------------------------------------------------------------------
# Conversion.

def spec_to_dict(spec: ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
  """A JSON-safe nested dict (tuples -> lists, non-JSON leaves -> str)."""
  raw = spec.to_dict() if isinstance(spec, ConfigDict) else dict(spec)
  return _jsonable(raw)


def _jsonable(value: Any) -> Any:
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, pathlib.PurePath):
    return str(value)
  return repr(value)
