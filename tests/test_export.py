"""Run artefacts, export to HF / PEFT / torch head, and the torch round trip (fp32, CPU).

The reference torch scores here are computed independently of rmjax.torch_scorer, the way the
README tells a torch user to load an export: AutoModelForCausalLM (backbone/) or
AutoPeftModelForCausalLM (lora_adapter/), one example at a time (no padding), the last hidden
state at the marker positions, and an nn.Sequential loaded from mlp_head.pt; token ids and marker
positions are those `rmjax.score --with-tokens` reports.
"""

import json
import pathlib
import re
import shutil
import warnings

import numpy as np
import pytest
import torch
from flax import traverse_util
from safetensors.numpy import load_file, save_file

import _tiny_run as R
from rmjax import convert, export, score
from rmjax.model.hf import TensorFiles
from rmjax.run_artifacts import RunArtifactError, load_run_model, resolve_checkpoint
from rmjax.torch_scorer import TorchScorer

TOL = 1e-4
EXAMPLES = [
  {"problem": "Compute 3 + 4 * 2.", "steps": ["4 * 2 = 8", "3 + 8 = 11", "The answer is 11."], "id": "a"},
  {"problem": "How many apples are left? <CONFIDENCE>", "steps": ["We subtract 3 from 10.", "10 - 3 = 7",
               "So the total is 7 <CONFIDENCE>.", "The answer is 7."], "meta": {"k": 1}},
  {"problem": "Compute 12 * 12.", "steps": ["12 * 12 = 144", "# Answer 144"]},
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  d = tmp_path_factory.mktemp("export")
  base = R.make_base(d / "base")
  runs = {"lora": R.make_run(d / "lora", base, mode="lora", later_steps=(9,)),
          "full": R.make_run(d / "full", base, mode="full"),
          "demo": R.make_run(d / "demo", base, mode="lora", base_name="demo", seed=3)}
  export.export(d / "lora", d / "ex_lora")
  export.export(d / "lora", d / "ex_merged", merge_lora=True)
  export.export(d / "full", d / "ex_full")
  export.export(d / "demo", d / "ex_demo")
  inp = d / "in.jsonl"
  inp.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
  return d, base, runs, inp


def jax_scores(world, run: str) -> list[dict]:
  d, _, _, inp = world
  out = d / f"scores_{run}.jsonl"
  if not out.exists():
    assert score.main(["--checkpoint", str(d / run), "--input", str(inp), "--output", str(out),
                       "--batch-size", "2", "--with-tokens"]) == 0
  return [json.loads(line) for line in out.read_text().splitlines()]


def torch_reference(export_dir: pathlib.Path, rows: list[dict]) -> list[list[float]]:
  """Scores of an export loaded exactly as the README's "Loading an export in PyTorch" says."""
  from peft import AutoPeftModelForCausalLM
  from transformers import AutoModelForCausalLM
  meta = json.loads((export_dir / "rmjax_export.json").read_text())
  if meta["files"]["lora_adapter"]:
    model = AutoPeftModelForCausalLM.from_pretrained(export_dir / "lora_adapter", dtype=torch.float32)
  else:
    model = AutoModelForCausalLM.from_pretrained(export_dir / "backbone", dtype=torch.float32)
  model.eval()
  dims = [meta["head"]["input_dim"], *meta["head"]["hidden_dims"]]
  layers = []
  for a, b in zip(dims, dims[1:]):
    layers += [torch.nn.Linear(a, b), torch.nn.GELU(), torch.nn.Dropout(meta["head"]["dropout"])]
  head = torch.nn.Sequential(*layers, torch.nn.Linear(dims[-1], 1))
  head.load_state_dict(torch.load(export_dir / "mlp_head.pt", weights_only=True))
  head.eval()
  out = []
  with torch.no_grad():
    for r in rows:
      hidden = model(input_ids=torch.tensor([r["input_ids"]]), output_hidden_states=True).hidden_states[-1][0]
      out.append(torch.sigmoid(head(hidden[r["marker_positions"]]))[:, 0].tolist())
  return out


def max_diff(a: list[list[float]], b: list[list[float]]) -> float:
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b, strict=True))


# -- run artefacts --------------------------------------------------------------------------------
def test_load_run_model_restores_saved_params_and_resolves_best(world):
  d, base, runs, _ = world
  rm = load_run_model(d / "lora")
  assert (rm.step, rm.mode, rm.base_model_path) == (7, "lora", str(base))  # best (0.25), not latest (9)
  got, want = traverse_util.flatten_dict(rm.params), traverse_util.flatten_dict(runs["lora"])
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])
  assert resolve_checkpoint(d / "lora" / "checkpoints" / "checkpoint_step_9")[2] == 9
  assert rm.model_cfg.marker_id == rm.tokenizer.convert_tokens_to_ids("<CONFIDENCE>")
  tmp = d / "lora_nobest"
  shutil.copytree(d / "lora", tmp)
  (tmp / "checkpoints" / "best.json").unlink()
  assert resolve_checkpoint(tmp)[2] == 9  # no best.json: latest
  with pytest.raises(RunArtifactError, match="neither a run directory"):
    resolve_checkpoint(d / "base")


# -- file layout ----------------------------------------------------------------------------------
def test_export_layout_and_head_state_dict(world):
  d, base, _, _ = world
  assert sorted(p.name for p in (d / "ex_lora").iterdir()) == [
    "lora_adapter", "mlp_head.pt", "mlp_head.safetensors", "rmjax_export.json"]
  assert (d / "ex_full" / "backbone" / "config.json").is_file()
  meta = json.loads((d / "ex_lora" / "rmjax_export.json").read_text())
  assert meta["base_model"] == str(base) and meta["mode"] == "lora" and meta["marker_token"] == "<CONFIDENCE>"
  assert meta["template"] == "default" and meta["max_length"] == R.RENDER.max_length
  assert meta["head"]["hidden_dims"] == [16, 8] and meta["head"]["output"] == "sigmoid"
  sd = torch.load(d / "ex_lora" / "mlp_head.pt", weights_only=True)
  assert {k: tuple(v.shape) for k, v in sd.items()} == {
    "0.weight": (16, 64), "0.bias": (16,), "3.weight": (8, 16), "3.bias": (8,), "6.weight": (1, 8), "6.bias": (1,)}
  st = load_file(str(d / "ex_lora" / "mlp_head.safetensors"))
  for k in sd:
    np.testing.assert_array_equal(sd[k].numpy(), st[k])
  cfg = json.loads((d / "ex_lora" / "lora_adapter" / "adapter_config.json").read_text())
  assert (cfg["base_model_name_or_path"], cfg["r"], cfg["lora_alpha"]) == (str(base), 4, 8)
  assert sorted(cfg["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
  assert cfg["trainable_token_indices"] == [meta["marker_id"]]
  for sub in ("ex_lora/lora_adapter", "ex_full/backbone"):
    assert "<CONFIDENCE>" in (d / sub / "tokenizer.json").read_text()


def test_adapter_keys_match_what_peft_saves(world, tmp_path):
  """Our key names / shapes equal those peft itself writes for the same config on the class
  most adapters are made for, AutoModelForCausalLM."""
  from peft import LoraConfig, get_peft_model
  from transformers import AutoModelForCausalLM
  d, base, _, _ = world
  cfg = json.loads((d / "ex_lora" / "lora_adapter" / "adapter_config.json").read_text())
  ref = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(
    task_type=cfg["task_type"], r=cfg["r"], lora_alpha=cfg["lora_alpha"], target_modules=cfg["target_modules"],
    trainable_token_indices=cfg["trainable_token_indices"]))
  ref.save_pretrained(tmp_path / "ref")
  want = {k: v.shape for k, v in load_file(str(tmp_path / "ref" / "adapter_model.safetensors")).items()}
  got = {k: v.shape for k, v in load_file(str(d / "ex_lora" / "lora_adapter" / "adapter_model.safetensors")).items()}
  assert got == want


# -- round trips ----------------------------------------------------------------------------------
@pytest.mark.parametrize("run,export_dir", [("full", "ex_full"), ("lora", "ex_lora"), ("demo", "ex_demo")])
def test_score_round_trip_torch_equals_jax(world, run, export_dir):
  d, base, _, _ = world
  rows = jax_scores(world, run)
  assert all(len(r["step_scores"]) == len(e["steps"]) >= 2 and None not in r["step_scores"]
             for r, e in zip(rows, EXAMPLES))
  scores = [r["step_scores"] for r in rows]
  assert np.std(np.concatenate(scores)) > 1e-2  # not all ~0.5: the comparison means something
  assert max_diff(torch_reference(d / export_dir, rows), scores) < TOL
  # rmjax's own torch loader renders the text itself: same ids, same scores; loading it says
  # nothing of transformers' or peft's own deprecations to the user
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    scorer = TorchScorer.from_export(d / export_dir)
  library = [f"{w.category.__name__}: {w.message}" for w in caught if re.search(r"/(transformers|peft)/", w.filename)]
  assert not library, library
  for r in rows:
    ids, markers = scorer.tokenize(r["problem"], r["steps"])
    assert ids.tolist() == r["input_ids"] and markers.tolist() == r["marker_positions"]
  assert max_diff(scorer.score_many([(r["problem"], r["steps"]) for r in rows]), scores) < TOL
  # and rmjax.score on the export directory goes through that loader
  out = d / f"scores_export_{run}.jsonl"
  assert score.main(["--checkpoint", str(d / export_dir), "--input", str(world[3]), "--output", str(out)]) == 0
  assert max_diff([json.loads(x)["step_scores"] for x in out.read_text().splitlines()], scores) < TOL


@pytest.mark.parametrize("mode,merge,converted", [("lora", False, False), ("full", False, False),
                                                  ("lora", False, True), ("lora", True, True)])
def test_untied_base_whose_vocabulary_the_marker_grows(tmp_path, mode, merge, converted):
  """An untied base with no spare embedding row (Llama 3's layout), given as an HF folder or as
  its `rmjax.convert` folder: the exports load in transformers as what their config.json names
  and score as rmjax does, loaded by rmjax's loader or as the README says: the resized embedding
  is no adapter tensor, the backbone's lm_head grows with the vocabulary, and a converted base
  gives its lm_head to the export."""
  from transformers import AutoModelForCausalLM
  base = R.make_base(tmp_path / "base", tied=False, spare_rows=False)
  base_name = str(convert.convert(str(base), tmp_path / "converted")) if converted else None
  R.make_run(tmp_path / "run", base, mode=mode, base_name=base_name)
  rm = load_run_model(tmp_path / "run")
  assert rm.model_cfg.vocab_size > json.loads((base / "config.json").read_text())["vocab_size"]
  ex = export.export(tmp_path / "run", tmp_path / "ex", merge_lora=merge)
  inp, out = tmp_path / "in.jsonl", tmp_path / "jax.jsonl"
  inp.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
  assert score.main(["--checkpoint", str(tmp_path / "run"), "--input", str(inp), "--output", str(out),
                     "--with-tokens"]) == 0
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  want = [r["step_scores"] for r in rows]
  got = TorchScorer.from_export(ex).score_many([(e["problem"], e["steps"]) for e in EXAMPLES])
  assert max_diff(got, want) < TOL
  assert max_diff(torch_reference(ex, rows), want) < TOL  # as the README loads it (peft resizes)
  files = json.loads((ex / "rmjax_export.json").read_text())["files"]
  for folder in filter(None, (files["backbone"], files["backbone_base"])):
    model = AutoModelForCausalLM.from_pretrained(ex / folder)
    assert model.lm_head.weight.shape[0] == model.get_input_embeddings().weight.shape[0] == rm.model_cfg.vocab_size


def test_demo_lora_export_writes_base_backbone(world):
  d, _, _, _ = world
  meta = json.loads((d / "ex_demo" / "rmjax_export.json").read_text())
  assert meta["files"]["backbone_base"] == "backbone_base" and meta["base_model"] == "demo"
  cfg = json.loads((d / "ex_demo" / "lora_adapter" / "adapter_config.json").read_text())
  assert cfg["base_model_name_or_path"] == str(d / "ex_demo" / "backbone_base")


def test_merge_lora_equals_unmerged(world):
  d, base, _, _ = world
  rows = jax_scores(world, "lora")
  merged = torch_reference(d / "ex_merged", rows)
  assert max_diff(merged, torch_reference(d / "ex_lora", rows)) < TOL
  assert max_diff(merged, [r["step_scores"] for r in rows]) < TOL


def test_marker_row_is_trained_and_carried(world, tmp_path):
  d, base, runs, _ = world
  marker_id = load_run_model(d / "lora").model_cfg.marker_id
  trained = np.asarray(runs["lora"]["decoder"]["embed"]["marker"])
  base_row = np.asarray(TensorFiles(base).get("model.embed_tokens.weight"))[marker_id]
  assert np.max(np.abs(trained - base_row)) > 0.05
  adapter = load_file(str(d / "ex_lora" / "lora_adapter" / "adapter_model.safetensors"))
  np.testing.assert_array_equal(adapter["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"],
                                trained[None])
  full_rows = np.asarray(TensorFiles(d / "ex_full" / "backbone").get("model.embed_tokens.weight"))
  np.testing.assert_array_equal(full_rows[marker_id], np.asarray(runs["full"]["decoder"]["embed"]["marker"]))
  # without the marker row the torch scores move: torch really uses it
  broken = _copy_export(d / "ex_lora", tmp_path / "nomarker")
  _edit_adapter(broken, lambda k: None if "token_adapter" in k else k)
  cfg_path = broken / "lora_adapter" / "adapter_config.json"
  cfg_path.write_text(json.dumps(json.loads(cfg_path.read_text()) | {"trainable_token_indices": None}))
  rows = jax_scores(world, "lora")
  assert max_diff(torch_reference(broken, rows), [r["step_scores"] for r in rows]) > 1e-3


def test_broken_adapter_key_makes_comparison_fail(world, tmp_path):
  """peft only warns about keys it cannot place (here: keyed for the bare decoder, AutoModel);
  the output comparison must catch it."""
  d, base, _, _ = world
  broken = _copy_export(d / "ex_lora", tmp_path / "badkey")
  _edit_adapter(broken, lambda k: k.replace("base_model.model.model.layers.", "base_model.model.layers."))
  rows = jax_scores(world, "lora")
  with pytest.warns(UserWarning):
    got = torch_reference(broken, rows)
  with pytest.raises(AssertionError):
    assert max_diff(got, [r["step_scores"] for r in rows]) < TOL


def _copy_export(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
  shutil.copytree(src, dst)
  return dst


def _edit_adapter(export_dir: pathlib.Path, rename) -> None:
  path = export_dir / "lora_adapter" / "adapter_model.safetensors"
  tensors = load_file(str(path))
  save_file({rename(k): v for k, v in tensors.items() if rename(k) is not None}, str(path))


def test_export_errors_are_one_line(world, capsys):
  d, _, _, _ = world
  assert export.main(["--checkpoint", str(d / "lora"), "--output", str(d / "ex_lora")]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("rmjax.export: error:") and "not empty" in err and "\n" not in err
  assert export.main(["--checkpoint", str(d / "nope"), "--output", str(d / "ex_x")]) == 2
  assert "not found" in capsys.readouterr().err


def test_a_full_disk_names_the_file_and_leaves_no_half_export(world, capsys, monkeypatch):
  """safetensors said "Error while serializing: I/O error: No space left on device (os error 28)"
  naming no path, and the half-written directory then made the next try refuse a non-empty
  --output."""
  from safetensors import SafetensorError
  d, _, _, _ = world

  def full(*args, **kwargs):
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
  monkeypatch.setattr(export, "save_file", full)
  out = d / "ex_full_disk"
  assert export.main(["--checkpoint", str(d / "lora"), "--output", str(out)]) == 2
  assert capsys.readouterr().err == (f"rmjax.export: error: cannot write {out / 'lora_adapter'}: Error while "
                                     "serializing: I/O error: No space left on device (os error 28)\n")
  assert not out.exists() and not [p for p in d.iterdir() if p.name.startswith(".ex_full_disk")]
  monkeypatch.undo()
  out.mkdir()  # an empty --output folder is filled
  assert export.main(["--checkpoint", str(d / "lora"), "--output", str(out)]) == 0
  assert (out / export.EXPORT_FILE).is_file() and (out / "lora_adapter" / "adapter_config.json").is_file()
