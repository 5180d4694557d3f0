"""Tests of `python -m benchmarks.step_options` on the tiny preset."""

import argparse
import json

import pytest

from benchmarks import step_options

TINY = ["--preset", "tiny", "--seq-len", "64", "--batch", "2"]
FLAGS = ("every_row_last_layer", *step_options.RETRACED)


def test_options_are_name_value_pairs_read_as_bool_int_or_text():
  assert step_options.parse_option("a=true") == ("a", True)
  assert step_options.parse_option("a=False") == ("a", False)
  assert step_options.parse_option("a=3") == ("a", 3)
  assert step_options.parse_option("a=") == ("a", "")
  for bad in ("a", "=1"):
    with pytest.raises(argparse.ArgumentTypeError):
      step_options.parse_option(bad)


def test_the_step_without_ynnpack_is_timed_against_the_default(capsys):
  assert step_options.main([*TINY, "--rounds", "2", "--block", "1",
                            "--option", "xla_cpu_experimental_ynn_fusion_type="]) == 0
  record = json.loads(capsys.readouterr().out)
  assert record["options"] == {"xla_cpu_experimental_ynn_fusion_type": ""}
  assert record["default_s"] > 0 and record["options_s"] > 0
  assert record["default_over_options"] == pytest.approx(record["default_s"] / record["options_s"])


@pytest.mark.parametrize("option, says", [("xla_cpu_no_such_option=1", "No such compile option"),
                                          ("xla_backend_optimization_level=0", "leave the compiled step unchanged")])
def test_an_unknown_or_ineffective_option_is_one_line(option, says, capsys):
  """The suite's XLA_FLAGS already set the optimization level to 0 (tests/_xla_env.py): asking
  for it again changes nothing, which the tool must say rather than time two equal programs."""
  assert step_options.main([*TINY, "--option", option]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("benchmarks.step_options: error: ") and says in err


@pytest.mark.parametrize("flag", FLAGS)
def test_the_step_traced_otherwise_is_timed_against_the_shipped_one(flag, capsys):
  """Each flag retraces the other variant (the tool stops if the programs are equal) and leaves
  the shipped tracing in place afterwards."""
  names = [name for name, _, _ in step_options.RETRACED.values()]
  shipped = [getattr(step_options.transformer, name) for name in names]
  mode = ["--mode", "lora"] if flag == "output_scaled_lora" else []  # LoRA's own: no-op in full
  assert step_options.main([*TINY, *mode, "--rounds", "2", "--block", "1", "--" + flag.replace("_", "-")]) == 0
  record = json.loads(capsys.readouterr().out)
  assert record[flag] is True and not any(record[other] for other in FLAGS if other != flag)
  assert record["options"] == {}
  assert record["default_s"] > 0 and record["options_s"] > 0
  assert [getattr(step_options.transformer, name) for name in names] == shipped


def test_nothing_to_compare_is_a_usage_error(capsys):
  with pytest.raises(SystemExit) as exit_info:
    step_options.main(list(TINY))
  assert exit_info.value.code == 2 and "nothing to compare" in capsys.readouterr().err


def test_the_step_with_its_dots_in_another_library_is_timed_against_the_shipped_one(capsys):
  assert step_options.main([*TINY, "--rounds", "2", "--block", "1", "--cpu-dot-library", "onednn"]) == 0
  record = json.loads(capsys.readouterr().out)
  assert record["cpu_dot_library"] == "onednn" and record["options"] == {}
  assert not any(record[flag] for flag in FLAGS)
  assert record["default_s"] > 0 and record["options_s"] > 0
