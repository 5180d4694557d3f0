"""Tests of the measurement tools (collected by `python -m pytest` from the repository root)."""

import json


def json_lines(text: str) -> list[dict]:
  """The JSON records among a tool's output lines."""
  return [json.loads(line) for line in text.splitlines() if line.startswith("{")]
