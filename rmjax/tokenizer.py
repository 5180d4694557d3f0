"""Tokenizers with the `<CONFIDENCE>` marker as one special token.

Every step of a reasoning trace is followed by the marker; the model reads its hidden state
there. The marker must therefore be exactly ONE token that byte-level BPE never splits or
merges with its neighbours, which is what registering it as a special token guarantees.

`load_tokenizer` wraps a real HF tokenizer (Qwen3 / Qwen2 / Llama); `build_demo_tokenizer`
trains a small byte-level BPE tokenizer offline (no network, deterministic) for tests and the
CPU demo, on a built-in corpus that covers the synthetic arithmetic data.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import random

# rmjax takes only tokenizers from transformers (its PyTorch models serve the [torch] extra), so
# without torch the "PyTorch was not found. Models won't be available" advice transformers gives
# at import is noise on every command: it is an advisory warning, which this turns off.
if importlib.util.find_spec("torch") is None:
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from huggingface_hub.errors import StrictDataclassError  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast  # noqa: E402

from rmjax.cli import first_line

MARKER = "<CONFIDENCE>"
DEMO_PAD = "<pad>"
DEMO_EOS = "<eos>"

_ENGLISH = (
  "Problem: Solution: Compute the value of the expression. First we multiply, then we add. "
  "The answer is the result of the last step. We subtract the second number from the first. "
  "So the total is the sum of the parts. Let us check each step carefully. This step is wrong "
  "because the product is not correct. The question asks how many apples are left. "
  "There are three groups of people. We know that each box holds a number of balls. "
  "Therefore the final answer is given below. Evaluate the expression step by step. "
  "Now divide both sides by two. Next, simplify the fraction and combine like terms. "
  "A train travels at a constant speed for several hours; how far does it go? "
  "I notice that the equation has two unknowns, so I need two equations. "
)


def _demo_corpus(n_lines: int = 3000, seed: int = 0) -> list[str]:
  """Built-in training text: English glue plus arithmetic in the synthetic data's style."""
  rng = random.Random(seed)
  lines = [_ENGLISH] * 20
  ops = ["+", "-", "*"]
  for _ in range(n_lines):
    a, b, c = rng.randint(0, 99), rng.randint(0, 99), rng.randint(0, 999)
    op = rng.choice(ops)
    lines.append(f"Problem: Compute {a} {op} {b} {rng.choice(ops)} {c}.\n\nSolution:\n"
                 f"{a} {op} {b} = {c} {MARKER}\nThe answer is {c}. {MARKER}\n# Answer\n\n{c}\n")
  return lines


def build_demo_tokenizer(vocab_size: int = 512, corpus: list[str] | None = None,
                         marker: bool = True) -> PreTrainedTokenizerFast:
  """Train a small byte-level BPE tokenizer offline; same inputs give the same tokenizer.

  Special tokens: `<pad>` (id 0, padding), `<eos>` (id 1), `<CONFIDENCE>` (id 2, marker; with
  marker=False none, as in a real base model's tokenizer, which `ensure_marker` extends).
  """
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size, min_frequency=2, show_progress=False,
    special_tokens=[DEMO_PAD, DEMO_EOS] + ([MARKER] if marker else []),
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(corpus if corpus is not None else _demo_corpus(), trainer=trainer)
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=DEMO_PAD, eos_token=DEMO_EOS,
                                 model_max_length=1 << 20)
  if marker:
    fast.add_special_tokens({"additional_special_tokens": [MARKER]})
  return fast


def ensure_marker(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
  """Register `<CONFIDENCE>` as a special token (if absent) and make sure a pad token exists."""
  vocab = tok.get_vocab()
  if MARKER not in vocab or MARKER not in tok.all_special_tokens:
    # Appended: the tokenizer's own extra specials (Qwen's <|im_start|>, ...) stay special.
    tok.add_special_tokens({"additional_special_tokens": [MARKER]}, replace_extra_special_tokens=False)
  if tok.pad_token is None:
    if tok.eos_token is None:
      raise ValueError("tokenizer has neither a pad nor an eos token; cannot pad batches")
    tok.pad_token = tok.eos_token
  marker_id(tok)  # validates: one token
  return tok


def _auto_tokenizer():
  """transformers' AutoTokenizer, imported when a saved or hub tokenizer is read: its import
  reaches transformers' model configuration code, which imports torch where torch is installed
  (about 1.3 s here), and the demo tokenizer and the training loop need none of it."""
  from transformers import AutoTokenizer
  return AutoTokenizer


def load_tokenizer(path_or_id: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
  """Load a HF tokenizer (hub id or local dir) and add the marker; `"demo"` builds the demo one."""
  if path_or_id == "demo":
    return build_demo_tokenizer()
  try:
    tok = _auto_tokenizer().from_pretrained(path_or_id, trust_remote_code=trust_remote_code)
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot load tokenizer from {path_or_id!r}: {str(e).splitlines()[0]}") from None
  return ensure_marker(tok)


# How transformers and tokenizers report a malformed tokenizer file: the Rust parser raises a plain
# `Exception` ("data did not match any variant of untagged enum ..."), the Python side OSError,
# ValueError, or TypeError / AttributeError / KeyError on a field of the wrong type, and
# huggingface_hub's StrictDataclassError on a config.json field of the wrong type.
_BAD_TOKENIZER_FILE = (OSError, ValueError, TypeError, AttributeError, KeyError, StrictDataclassError)


def load_tokenizer_dir(directory: str | os.PathLike, marker: bool = True) -> PreTrainedTokenizerBase:
  """The tokenizer saved in `directory` (with the marker ensured unless `marker=False`); a missing
  or malformed one is one ValueError naming the directory (run, export and model directories)."""
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise FileNotFoundError(f"tokenizer directory not found: {directory}")
  try:
    tok = _auto_tokenizer().from_pretrained(str(directory))
    tok.encode(MARKER, add_special_tokens=False)  # uses the settings every call reads (model_max_length...)
    return ensure_marker(tok) if marker else tok
  except Exception as e:  # noqa: BLE001 -- narrowed below to what a bad file raises
    if type(e) is not Exception and not isinstance(e, _BAD_TOKENIZER_FILE):
      raise
    raise ValueError(f"no usable tokenizer in {directory}: {type(e).__name__}: {first_line(e)}") from e


def marker_id(tok: PreTrainedTokenizerBase) -> int:
  """The marker's token id; raises if the tokenizer would split the marker."""
  ids = tok.encode(MARKER, add_special_tokens=False)
  if len(ids) != 1:
    raise ValueError(f"{MARKER} is not a single token in this tokenizer (got ids {ids})")
  return int(ids[0])


def pad_id(tok: PreTrainedTokenizerBase) -> int:
  if tok.pad_token_id is None:
    raise ValueError("tokenizer has no pad token; load it with load_tokenizer()")
  return int(tok.pad_token_id)
