"""The marker is one token, the demo tokenizer is deterministic, and tokenizers round-trip."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from rmjax.tokenizer import MARKER, build_demo_tokenizer, load_tokenizer, marker_id, pad_id


@pytest.fixture(scope="module")
def tok():
  return build_demo_tokenizer()


@pytest.mark.parametrize("text", ["step one <CONFIDENCE>\n", "x<CONFIDENCE>y", "<CONFIDENCE><CONFIDENCE>",
                                  "12 + 21 = 33 <CONFIDENCE>\n# Answer"])
def test_marker_stays_one_token_inside_text(tok, text):
  ids = tok.encode(text, add_special_tokens=False)
  mid = marker_id(tok)
  assert ids.count(mid) == text.count(MARKER)
  assert tok.convert_ids_to_tokens(mid) == MARKER
  # Nothing else in the text decodes to a marker fragment: removing the marker ids leaves the rest.
  rest = tok.decode([i for i in ids if i != mid])
  assert rest == text.replace(MARKER, "")


def test_demo_tokenizer_is_deterministic_and_has_specials(tok):
  again = build_demo_tokenizer()
  assert again.get_vocab() == tok.get_vocab()
  assert len(tok) == 512
  assert tok.pad_token == "<pad>" and tok.eos_token == "<eos>"
  assert pad_id(tok) != marker_id(tok) != tok.eos_token_id


def test_save_and_load_round_trip(tok, tmp_path):
  text = "Problem: Compute 4 + 7.\n\nSolution:\n4 + 7 = 11 <CONFIDENCE>\n"
  tok.save_pretrained(tmp_path)
  loaded = load_tokenizer(str(tmp_path))
  assert loaded(text)["input_ids"] == tok(text)["input_ids"]
  assert marker_id(loaded) == marker_id(tok)
  assert pad_id(loaded) == pad_id(tok)


def test_load_adds_marker_and_pad_when_missing(tmp_path):
  raw = Tokenizer(models.BPE())
  raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  raw.train_from_iterator(["hello world step one"] * 10, trainers.BpeTrainer(
    vocab_size=300, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False))
  PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>").save_pretrained(tmp_path)
  loaded = load_tokenizer(str(tmp_path))
  assert loaded.pad_token == "</s>"
  assert loaded.encode("step one <CONFIDENCE>\n", add_special_tokens=False).count(marker_id(loaded)) == 1


def test_adding_the_marker_keeps_the_tokenizers_own_extra_special_tokens(tmp_path):
  """Qwen's tokenizers list <|im_start|> and <|im_end|> as extra special tokens; registering the
  marker must add to that list, not replace it (they would stop being special when saved)."""
  base = build_demo_tokenizer(marker=False)
  base.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
  base.save_pretrained(tmp_path)
  loaded = load_tokenizer(str(tmp_path))
  assert {"<|im_start|>", "<|im_end|>", MARKER} <= set(loaded.all_special_tokens)
  loaded.save_pretrained(tmp_path / "again")
  assert {"<|im_start|>", "<|im_end|>", MARKER} <= set(load_tokenizer(str(tmp_path / "again")).all_special_tokens)


def test_missing_tokenizer_path_is_a_one_line_error(tmp_path):
  with pytest.raises(ValueError, match="cannot load tokenizer") as e:
    load_tokenizer(str(tmp_path / "nope"))
  assert "\n" not in str(e.value)
