"""HF import/export, config reading, marker placement and the convert CLI."""

import json
import subprocess
import sys

import _hf_tiny as H
import ml_dtypes
import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from rmjax import convert
from rmjax.checkpoint import CheckpointCorrupt
from rmjax.model.config import ModelConfig
from rmjax.model.hf import TensorFiles, load_hf_params, save_hf_params
from rmjax.model.marker import add_marker
from rmjax.model.transformer import Decoder

TOL = 1e-5


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    out |= _flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {prefix + k: np.asarray(v)}
  return out


def _assert_same_tree(a, b):
  fa, fb = _flat(a), _flat(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    assert fa[k].dtype == fb[k].dtype and np.array_equal(fa[k], fb[k]), k


def _word_tokenizer(n_tokens: int):
  """A word-level tokenizer with n_tokens entries and no marker (so the marker is new)."""
  vocab = {"<pad>": 0, "<eos>": 1} | {f"w{i}": i for i in range(2, n_tokens)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


@pytest.fixture(scope="module")
def qwen3_tied(tmp_path_factory):
  out = tmp_path_factory.mktemp("qwen3_tied")
  return H.build("qwen3", out, tied=True), out


@pytest.fixture(scope="module")
def llama_untied(tmp_path_factory):
  out = tmp_path_factory.mktemp("llama_untied")
  return H.build("llama", out, rope_parameters=H.LLAMA3_ROPE), out


def _torch_hidden(model, left=True):
  ids, pos, seg = H.padded_batch([8, 5], 8, left=left)
  return H.hidden_states(model, ids, pos, seg), (ids, pos, seg)


# -- import -> export -> import ---------------------------------------------------------------------
@pytest.mark.parametrize("which", ["qwen3_tied", "llama_untied"])
def test_round_trip_is_exact_and_loads_in_transformers(which, request, tmp_path):
  model, src = request.getfixturevalue(which)
  cfg = ModelConfig.from_hf(src)
  params = load_hf_params(src, cfg, keep_lm_head=True)
  out = save_hf_params(params, cfg, tmp_path / "export")
  original, exported = TensorFiles(src), load_file(str(out / "model.safetensors"))
  assert exported.keys() == original.names()
  for name, arr in exported.items():
    assert np.array_equal(arr, original.get(name)), name
  _assert_same_tree(load_hf_params(out, ModelConfig.from_hf(out), keep_lm_head=True), params)
  ref, batch = _torch_hidden(model)
  again = transformers.AutoModel.from_pretrained(out, attn_implementation="eager").float().eval()
  got = H.hidden_states(again, *batch)
  real = batch[2] > 0
  assert np.abs(got[real] - ref[real]).max() <= TOL


def test_untied_export_needs_lm_head(llama_untied, tmp_path):
  _, src = llama_untied
  cfg = ModelConfig.from_hf(src)
  params = load_hf_params(src, cfg)
  with pytest.raises(ValueError, match="lm_head"):
    save_hf_params(params, cfg, tmp_path / "a")
  original = np.asarray(TensorFiles(src).get("lm_head.weight"))
  out = save_hf_params(params, cfg, tmp_path / "b", lm_head=original)
  assert np.array_equal(load_file(str(out / "model.safetensors"))["lm_head.weight"], original)


def test_untied_export_grows_the_lm_head_with_the_vocabulary(llama_untied, tmp_path):
  """A marker past the embedding's last row grows the vocabulary; the exported lm_head must grow
  with it, or transformers refuses the checkpoint its own config.json describes."""
  _, src = llama_untied
  cfg = ModelConfig.from_hf(src)
  rows = cfg.vocab_size
  params, grown = add_marker(load_hf_params(src, cfg), cfg, marker_id=rows, num_real_tokens=rows)
  assert grown.vocab_size > rows
  original = np.asarray(TensorFiles(src).get("lm_head.weight"))
  out = save_hf_params(params, grown, tmp_path / "grown", lm_head=original)
  head = load_file(str(out / "model.safetensors"))["lm_head.weight"]
  assert head.shape == (grown.vocab_size, cfg.hidden_size)
  np.testing.assert_array_equal(head[:rows], original)
  np.testing.assert_allclose(head[rows:], np.broadcast_to(original.mean(0), head[rows:].shape), rtol=1e-6)
  model = transformers.AutoModelForCausalLM.from_pretrained(out)
  assert model.lm_head.weight.shape[0] == model.get_input_embeddings().weight.shape[0] == grown.vocab_size
  with pytest.raises(ValueError, match="does not fit"):
    save_hf_params(params, cfg.replace(vocab_size=rows - 1), tmp_path / "small", lm_head=original)


def test_lora_merged_export_matches_rmjax(qwen3_tied, tmp_path):
  _, src = qwen3_tied
  cfg = ModelConfig.from_hf(src, lora_rank=4, lora_targets=("q_proj", "o_proj", "up_proj"))
  params = load_hf_params(src, cfg)
  rng = np.random.default_rng(0)
  for group, name in (("attn", "q_proj"), ("attn", "o_proj"), ("mlp", "up_proj")):
    k = params["layers"][group][name]["kernel"]
    params["layers"][group][name] |= {
      "lora_a": rng.normal(0, 0.1, (k.shape[0], k.shape[1], 4)).astype(np.float32),
      "lora_b": rng.normal(0, 0.1, (k.shape[0], 4, k.shape[2])).astype(np.float32)}
  ids, pos, seg = H.padded_batch([8, 5], 8, left=False)
  ours = np.asarray(Decoder(cfg).apply({"params": params}, ids, pos, seg))
  with pytest.raises(ValueError, match="LoRA"):
    save_hf_params(params, cfg, tmp_path / "refused", lora="refuse")
  out = save_hf_params(params, cfg, tmp_path / "merged", lora="merge")
  merged = transformers.AutoModel.from_pretrained(out, attn_implementation="eager").float().eval()
  theirs = H.hidden_states(merged, ids, pos, seg)
  real = seg > 0
  plain = np.asarray(Decoder(cfg.replace(lora_rank=0)).apply({"params": load_hf_params(src, cfg)}, ids, pos, seg))
  assert np.abs(ours[real] - plain[real]).max() > 1e-3  # the adapter really changes the output
  assert np.abs(theirs[real] - ours[real]).max() <= TOL


def test_bf16_export_writes_bf16(qwen3_tied, tmp_path):
  _, src = qwen3_tied
  cfg = ModelConfig.from_hf(src)
  params = load_hf_params(src, cfg)
  out = save_hf_params(params, cfg, tmp_path / "bf16", dtype="bfloat16")
  header = json.loads((out / "config.json").read_text())
  assert header["dtype"] == "bfloat16"
  files = TensorFiles(out)
  emb = files.get("model.embed_tokens.weight")
  assert emb.dtype == ml_dtypes.bfloat16
  assert np.array_equal(emb, np.asarray(params["embed"]["embedding"]).astype(ml_dtypes.bfloat16))
  again = load_hf_params(out, ModelConfig.from_hf(out), "float32")
  assert again["embed"]["embedding"].dtype == np.float32


# -- bad checkpoints and configs ---------------------------------------------------------------------
def _doctored(src, dst, edit):
  tensors = load_file(str(src / "model.safetensors"))
  edit(tensors)
  dst.mkdir()
  (dst / "config.json").write_text((src / "config.json").read_text())
  save_file(tensors, str(dst / "model.safetensors"))
  return dst


def test_wrong_shape_names_tensor(qwen3_tied, tmp_path):
  _, src = qwen3_tied
  name = "model.layers.1.self_attn.k_proj.weight"
  bad = _doctored(src, tmp_path / "bad", lambda t: t.__setitem__(name, np.zeros((16, 64), np.float32)))
  with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*\(16, 64\).*\(32, 64\)"):
    load_hf_params(bad, ModelConfig.from_hf(bad))


def test_missing_and_unexpected_tensors_fail(qwen3_tied, tmp_path):
  _, src = qwen3_tied
  renamed = "model.layers.0.mlp.gate_proj.weightx"
  bad = _doctored(src, tmp_path / "bad", lambda t: t.__setitem__(renamed, t.pop("model.layers.0.mlp.gate_proj.weight")))
  with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.0\.mlp\.gate_proj\.weight'"):
    load_hf_params(bad, ModelConfig.from_hf(bad))
  extra = _doctored(src, tmp_path / "extra", lambda t: t.__setitem__("model.layers.0.mystery.weight", np.ones(3, np.float32)))
  with pytest.raises(ValueError, match=r"unexpected.*model\.layers\.0\.mystery\.weight"):
    load_hf_params(extra, ModelConfig.from_hf(extra))


def test_unsupported_architecture_lists_supported():
  with pytest.raises(ValueError, match=r"'gpt2'.*qwen3, qwen2, llama"):
    ModelConfig.from_hf({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 10})


def test_from_hf_reads_old_and_new_layouts():
  new = H.hf_config("llama", rope_parameters=H.LLAMA3_ROPE).to_dict()
  old = {k: v for k, v in new.items() if k != "rope_parameters"} | {
    "rope_theta": 50000.0, "torch_dtype": "bfloat16",
    "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 16}}
  a, b = ModelConfig.from_hf(new), ModelConfig.from_hf(old)
  assert a.rope_theta == b.rope_theta == 50000.0 and a.rope_scaling == b.rope_scaling
  assert a.rope_scaling.factor == 8.0 and b.param_dtype == "bfloat16"
  q2 = ModelConfig.from_hf(H.hf_config("qwen2").to_dict(), compute_dtype="bfloat16")
  assert q2.attention_bias and not q2.o_bias and not q2.qk_norm and q2.compute_dtype == "bfloat16"
  assert ModelConfig.from_hf(H.hf_config("qwen3").to_dict()).qk_norm
  assert ModelConfig.from_dict(a.to_dict()) == a


def test_missing_model_dir_is_one_line(tmp_path):
  with pytest.raises(FileNotFoundError, match="not found"):
    load_hf_params(tmp_path / "nope", ModelConfig.tiny())
  with pytest.raises(FileNotFoundError) as err:  # HF_HUB_OFFLINE=1 in tests: a hub id cannot be fetched
    load_hf_params("someone/not-a-real-model", ModelConfig.tiny())
  assert "\n" not in str(err.value)


# -- marker placement --------------------------------------------------------------------------------
def _emb(rows, d=4):
  return {"embed": {"embedding": np.arange(rows * d, dtype=np.float32).reshape(rows, d)}}


def test_marker_in_spare_row_starts_at_mean():
  cfg = ModelConfig.tiny(vocab_size=12, hidden_size=4, head_dim=2, num_heads=2, num_kv_heads=1)
  params, new = add_marker(_emb(12), cfg, marker_id=10, num_real_tokens=10)
  assert new.vocab_size == 12 and new.marker_id == 10
  np.testing.assert_array_equal(params["embed"]["marker"], np.arange(40, dtype=np.float32).reshape(10, 4).mean(0))
  np.testing.assert_array_equal(params["embed"]["embedding"], _emb(12)["embed"]["embedding"])


def test_marker_existing_token_keeps_its_row():
  cfg = ModelConfig.tiny(vocab_size=12, hidden_size=4, head_dim=2, num_heads=2, num_kv_heads=1)
  params, _ = add_marker(_emb(12), cfg, marker_id=3, num_real_tokens=11)
  np.testing.assert_array_equal(params["embed"]["marker"], [12, 13, 14, 15])


def test_marker_growth_pads_rows_and_lm_head():
  cfg = ModelConfig.tiny(vocab_size=12, hidden_size=4, head_dim=2, num_heads=2, num_kv_heads=1)
  start = _emb(12) | {"lm_head": {"embedding": -_emb(12)["embed"]["embedding"]}}
  params, new = add_marker(start, cfg, marker_id=12, num_real_tokens=12, pad_multiple=8)
  mean = start["embed"]["embedding"].mean(0)
  assert new.vocab_size == 16 and params["embed"]["embedding"].shape == (16, 4)
  np.testing.assert_array_equal(params["embed"]["marker"], mean)
  np.testing.assert_array_equal(params["embed"]["embedding"][12:], np.tile(mean, (4, 1)))
  np.testing.assert_array_equal(params["lm_head"]["embedding"][15], -mean)
  np.testing.assert_array_equal(params["embed"]["embedding"][:12], start["embed"]["embedding"])


# -- load_backbone and the convert CLI ---------------------------------------------------------------
@pytest.mark.parametrize("n_tokens,rows", [(150, 200), (200, 256)], ids=["spare_row", "grown"])
def test_load_backbone_places_new_marker(tmp_path, n_tokens, rows):
  H.build("qwen3", tmp_path, tied=True)
  _word_tokenizer(n_tokens).save_pretrained(tmp_path)
  params, cfg = convert.load_backbone(tmp_path)
  assert cfg.marker_id == n_tokens and cfg.vocab_size == rows
  table = params["embed"]["embedding"]
  np.testing.assert_allclose(params["embed"]["marker"], table[:n_tokens].mean(0), rtol=1e-6)
  ids = np.array([[5, n_tokens, 7]], np.int32)
  out = Decoder(cfg).apply({"params": params}, ids, np.arange(3)[None], np.ones((1, 3), np.int32))
  assert np.isfinite(np.asarray(out)).all()


def test_convert_cli_round_trip(tmp_path):
  src = tmp_path / "hf"
  H.build("qwen2", src)
  _word_tokenizer(150).save_pretrained(src)
  out = tmp_path / "converted"
  run = subprocess.run([sys.executable, "-m", "rmjax.convert", "--model", str(src), "--output", str(out)],
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr
  p_conv, c_conv = convert.load_backbone(out)
  p_hf, c_hf = convert.load_backbone(src)
  assert c_conv == c_hf and c_conv.marker_id >= 150  # (qwen2's tokenizer class may add its own specials)
  _assert_same_tree(p_conv, p_hf)
  tok = transformers.AutoTokenizer.from_pretrained(out)
  assert tok.convert_tokens_to_ids("<CONFIDENCE>") == c_conv.marker_id
  p16, c16 = convert.load_backbone(out, dtype="bfloat16")
  assert c16.param_dtype == "bfloat16" and p16["layers"]["mlp"]["up_proj"]["kernel"].dtype == ml_dtypes.bfloat16
  assert p16["embed"]["marker"].dtype == np.float32


def test_convert_into_a_folder_holding_files_is_refused_and_touches_nothing(tmp_path, capsys):
  """A converted directory's rmjax_model.json and tokenizer files would replace another's (a run's
  model/ folder has the same file names): only a new or empty folder is written."""
  src = tmp_path / "hf"
  H.build("qwen2", src)
  _word_tokenizer(150).save_pretrained(src)
  run_model = tmp_path / "run" / "model"
  run_model.mkdir(parents=True)
  (run_model / "rmjax_model.json").write_text('{"format": "rmjax-run-model-v1"}')
  capsys.readouterr()
  assert convert.main(["--model", str(src), "--output", str(run_model)]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "is not empty" in err, err
  assert [f.name for f in run_model.iterdir()] == ["rmjax_model.json"]
  assert (run_model / "rmjax_model.json").read_text() == '{"format": "rmjax-run-model-v1"}'


def test_a_damaged_converted_directory_is_one_line_naming_it(tmp_path):
  """A converted model's array files cut short: one CheckpointCorrupt line naming the params
  folder and tensorstore's error, without tensorstore's page of store spec."""
  src = tmp_path / "hf"
  H.build("qwen2", src)
  params, cfg = convert.load_backbone(src, marker=False)
  out = convert.save_converted(params, cfg, tmp_path / "converted")
  for data in (out / convert.PARAMS_DIR).glob("d/*"):
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
  with pytest.raises(CheckpointCorrupt) as e:
    convert.load_converted(out)
  line = str(e.value)
  assert line.startswith(f"corrupt or unreadable checkpoint {out / convert.PARAMS_DIR}: ") and "\n" not in line
  assert "Error reading" in line and "tensorstore_spec" not in line, line


def test_convert_cli_errors_are_one_line(tmp_path, capsys):
  assert convert.main(["--model", str(tmp_path / "missing"), "--output", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "Traceback" not in err and "missing" in err
  (tmp_path / "gpt").mkdir()
  (tmp_path / "gpt" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  assert convert.main(["--model", str(tmp_path / "gpt"), "--output", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "qwen3, qwen2, llama" in err


@pytest.mark.parametrize("change,message", [({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
                                            ({"use_sliding_window": True}, "sliding-window attention")])
def test_configs_the_model_would_compute_wrongly_are_refused(qwen3_tied, change, message):
  """A setting the Flax decoder does not implement must not load as a model computing something
  else (hidden_act: the MLP always gates with SiLU)."""
  _, src = qwen3_tied
  config = json.loads((src / "config.json").read_text())
  assert ModelConfig.from_hf(config).architecture == "qwen3"
  assert ModelConfig.from_hf(dict(config, hidden_act="silu")).architecture == "qwen3"
  with pytest.raises(ValueError, match=message):
    ModelConfig.from_hf(dict(config, **change))
