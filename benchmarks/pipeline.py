"""Input-pipeline benchmark: can one CPU core feed the accelerator?

    python -m benchmarks.pipeline [--examples N] [--vocab V] [--max-length L]

Builds PRM800K-like examples in memory (3-10 steps of ~100-300 tokens each, like real model
solutions; the text is generated, SYNTHETIC), trains a Qwen-style byte-level BPE tokenizer
offline (Qwen2's pre-tokenizer regex + byte-level, NFC), and times on one thread:
  render  : Example -> Tokenized (one tokenize call per example, truncation, targets)
  pipeline: the full grain training pipeline (mix, shuffle, render, bucketed batches).
Prints one JSON line with examples/s and tokens/s (non-padding tokens) for each. Compare with
the trainer's tokens/s per host: the pipeline must be faster.
"""

from __future__ import annotations

import json
import os
import random
import time

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from rmjax import cli
from rmjax.data.example import Example
from rmjax.data.pipeline import PipelineConfig, train_dataset
from rmjax.data.render import RenderConfig, Renderer
from rmjax.tokenizer import MARKER

# Qwen2 / Qwen3 tokenizer.json pre-tokenizer pattern (public, in every Qwen tokenizer.json).
_QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_WORDS = tuple(("the of and to we that is so this a in for then number value sum product equation "
          "side both divide multiply subtract add term factor solve find let since which gives "
          "notice need means first second next therefore answer integer prime root square "
          "function real positive negative triangle angle area circle radius probability").split())
_LATEX = (r"$x^2 + {a}x - {b} = 0$", r"$\frac{{{a}}}{{{b}}}$", r"$\sqrt{{{a}}}$", r"$({a} + {b})^2$",
          r"$\binom{{{a}}}{{{b}}}$", r"${a} \cdot {b} = {c}$", r"$\angle ABC = {a}^\circ$")


def _pseudo_words(n: int, seed: int = 0) -> tuple[str, ...]:
  """A larger, fixed vocabulary of made-up words so BPE learns a realistic number of merges."""
  rng = random.Random(seed)
  syll = [c + v for c in "bcdfghklmnprstvwz" for v in "aeiou"] + ["th", "qu", "st", "ing", "tion"]
  return tuple("".join(rng.choice(syll) for _ in range(rng.randint(1, 4))) for _ in range(n))


_ALL_WORDS = _WORDS + _pseudo_words(6000)


def _sentence(rng: random.Random) -> str:
  words = []
  for _ in range(rng.randint(6, 18)):
    r = rng.random()
    if r < 0.12:
      a, b = rng.randint(1, 999), rng.randint(1, 99)
      words.append(rng.choice(_LATEX).format(a=a, b=b, c=a * b))
    elif r < 0.2:
      words.append(str(rng.randint(0, 10_000)))
    elif r < 0.7:
      words.append(rng.choice(_WORDS))
    else:
      words.append(rng.choice(_ALL_WORDS))
  return " ".join(words).capitalize() + "."


def _step(rng: random.Random, approx_words: int) -> str:
  parts, n = [], 0
  while n < approx_words:
    s = _sentence(rng)
    parts.append(s)
    n += len(s.split())
  return " ".join(parts)


def make_examples(n: int, seed: int) -> list[Example]:
  """SYNTHETIC PRM800K-like examples: 3-10 steps of ~60-200 words (~100-300 tokens)."""
  rng = random.Random(seed)
  out = []
  for i in range(n):
    k = rng.randint(3, 10)
    steps = tuple(_step(rng, rng.randint(60, 200)) for _ in range(k))
    targets = tuple(rng.choice((1.0, 1.0, 0.5, 0.0, None)) for _ in range(k))
    out.append(Example("bench", str(i), _step(rng, 40), steps, targets))
  return out


def qwen_style_tokenizer(vocab_size: int, corpus: list[str]) -> PreTrainedTokenizerFast:
  """A byte-level BPE tokenizer with Qwen's normalizer and pre-tokenizer, trained offline."""
  tok = Tokenizer(models.BPE())
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
    pre_tokenizers.Split(Regex(_QWEN_PATTERN), behavior="isolated"),
    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", MARKER],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(corpus, trainer=trainer)
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                 pad_token="<|endoftext|>", model_max_length=1 << 20)
  fast.add_special_tokens({"additional_special_tokens": [MARKER]})
  return fast


class _ListSource:
  def __init__(self, items):
    self.items = items

  def __len__(self):
    return len(self.items)

  def __getitem__(self, i):
    return self.items[i]


def run(n_examples: int, vocab: int, max_length: int, batch: int) -> dict:
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  examples = make_examples(n_examples, seed=0)
  corpus = [ex.problem + "\n" + "\n".join(ex.steps) for ex in make_examples(1000, seed=1)]
  tok = qwen_style_tokenizer(vocab, corpus)
  cfg = RenderConfig(max_length=max_length, max_steps_per_example=10,
                     length_buckets=tuple(b for b in (256, 512, 1024, 2048, 4096, 8192) if b < max_length) + (max_length,))
  render = Renderer(tok, cfg)
  t0 = time.perf_counter()
  rendered = [render(ex) for ex in examples]
  t_render = time.perf_counter() - t0
  tokens = sum(len(r) for r in rendered if r is not None)
  ds = train_dataset({"bench": (_ListSource(examples), 1.0)}, cfg, tok,
                     PipelineConfig(num_threads=0, prefetch=64), seed=0, global_batch=batch)
  it = iter(ds)
  n_batches = max(1, n_examples // batch)
  t0 = time.perf_counter()
  pipe_tokens = 0
  for _ in range(n_batches):
    b = next(it)
    pipe_tokens += int((b["segment_ids"] > 0).sum())
  t_pipe = time.perf_counter() - t0
  return {
    "bench": "rmjax.data input pipeline (one thread)", "examples": n_examples, "vocab": len(tok),
    "max_length": max_length, "mean_tokens_per_example": round(tokens / n_examples, 1),
    "render_examples_per_s": round(n_examples / t_render, 1),
    "render_tokens_per_s": round(tokens / t_render),
    "pipeline_examples_per_s": round(n_batches * batch / t_pipe, 1),
    "pipeline_tokens_per_s": round(pipe_tokens / t_pipe),
  }


def main(argv=None) -> None:
  p = cli.ArgumentParser(prog="python -m benchmarks.pipeline", description=__doc__.splitlines()[0])
  p.add_argument("--examples", type=int, default=1000)
  p.add_argument("--vocab", type=int, default=8192)
  p.add_argument("--max-length", type=int, default=2048)
  p.add_argument("--batch", type=int, default=16)
  a = p.parse_args(argv)
  print(json.dumps(run(a.examples, a.vocab, a.max_length, a.batch)))


if __name__ == "__main__":
  main()
