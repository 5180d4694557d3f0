"""rmjax.spec_io: spec files in and out: loading, --spec./--set overrides, the JSON form, path keys."""

import json
import re

import pytest

from rmjax import spec as spec_lib
from test_spec import SPECS, demo_spec, load_with_config_flags


def test_a_home_folder_in_a_path_key_is_expanded(monkeypatch):
  """`--spec.output_dir=~/runs`: the shell leaves "~" after "=" alone, and the run went into a
  folder named "~" under the working directory. Only path keys change."""
  monkeypatch.setenv("HOME", "/home/someone")
  spec = demo_spec(output_dir="~/runs", init_from="~/ckpt", experiment_name="~x", data__prm800k__path="~/prm")
  spec_lib.expand_home(spec)
  assert (spec.output_dir, spec.init_from, spec.data.prm800k.path) == ("/home/someone/runs", "/home/someone/ckpt",
                                                                      "/home/someone/prm")
  assert spec.experiment_name == "~x"  # not a path key
  plain = demo_spec()
  before = spec_lib.spec_to_dict(plain)
  spec_lib.expand_home(plain)
  assert spec_lib.spec_to_dict(plain) == before


def test_spec_to_dict_is_json_safe():
  spec = load_with_config_flags("demo.py")
  d = json.loads(json.dumps(spec_lib.spec_to_dict(spec)))
  assert d["data"]["length_buckets"] == [64, 128]
  assert d["lora"]["targets"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
  assert d["checkpoint"]["async_save"] is False
  assert d["mesh"] == {"data": -1, "fsdp": 1, "tensor": 1}


def test_check_overrides_suggests_close_keys():
  spec = spec_lib.load_spec_file(str(SPECS / "lora.py"))
  with pytest.raises(spec_lib.SpecError) as e:
    spec_lib.check_overrides(spec, ["--spec=x", "--spec.lr=1", "--spec.lrr=1"])
  assert str(e.value) == "unknown spec key 'lrr' in --spec.lrr=1; did you mean spec.lr?"
  with pytest.raises(spec_lib.SpecError, match=r"did you mean spec\.data\.max_length"):
    spec_lib.check_overrides(spec, ["--spec.data.max_lenght=3"])
  with pytest.raises(spec_lib.SpecError, match="spec.lora.rank"):
    spec_lib.check_overrides(spec, ["--nospec.lora.rnk"])
  spec_lib.check_overrides(spec, ["--spec.model.demo.head_dim=8", "--nospec.data.pack", "--spec.mesh", "x"])


def test_find_flag_value():
  assert spec_lib.find_flag_value(["--spec", "a.py", "--spec.lr=1"], "spec") == "a.py"
  assert spec_lib.find_flag_value(["--spec=b.py:lora"], "spec") == "b.py:lora"
  assert spec_lib.find_flag_value(["--spec.lr=1"], "spec") is None


def test_load_spec_file_errors(tmp_path):
  with pytest.raises(spec_lib.SpecError, match="spec file not found"):
    spec_lib.load_spec_file(str(tmp_path / "x.py"))
  with pytest.raises(spec_lib.SpecError, match=r"is a directory; give one of its \.py files"):  # it exists
    spec_lib.load_spec_file(str(tmp_path))
  (tmp_path / "bad.py").write_text("x = 1\n")
  with pytest.raises(spec_lib.SpecError, match="defines no get_config"):
    spec_lib.load_spec_file(str(tmp_path / "bad.py"))
  with pytest.raises(spec_lib.SpecError, match="takes 'full' or 'lora'"):
    spec_lib.load_spec_file(f"{SPECS / 'demo.py'}:nope")


def test_set_items_take_the_value_forms_of_the_launcher_and_of_json():
  spec = demo_spec()
  spec_lib.apply_overrides(spec, ["data.eqasc.use=True", "data.pack=false", "data.length_buckets=64,128,2048",
                                  "lr=1e-3", "data.prm800k.path=/data/prm800k", "experiment_name='x y'"])
  assert (spec.data.eqasc.use, spec.data.pack, spec.lr) == (True, False, 1e-3)
  assert spec.data.length_buckets == (64, 128, 2048)
  assert (spec.data.prm800k.path, spec.experiment_name) == ("/data/prm800k", "x y")
  spec_lib.apply_overrides(spec, ["data.length_buckets=[32, 64]"])  # JSON's list for a tuple key
  assert spec.data.length_buckets == (32, 64)
  with pytest.raises(spec_lib.SpecError, match=re.escape("'data.eval_batch_size' holds int values, got str 'many' "
                                                         "(values are JSON or Python literals: true or True")):
    spec_lib.apply_overrides(spec, ["data.eval_batch_size=many"])
