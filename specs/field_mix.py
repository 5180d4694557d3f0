r"""A field dataset mixed with PRM800K: Math-Shepherd (TRL stepwise format) beside PRM800K.

Shows that a dataset is a spec entry, not code: `data.math_shepherd` below is a source block
(specs/common.py's `source_block`) naming its reader, path, weight and splits; training and
evaluation treat it like the built-in PRM800K block. The model and schedule are the demo's
(tiny random backbone, CPU-sized); PRM800K is synthetic unless data.prm800k.path is set.
Math-Shepherd's text is longer than the synthetic arithmetic, so rows run to 512 tokens.

With the real records saved beside the checkout (a couple of minutes on 2 CPU cores):

  python -m rmjax.launch --spec specs/field_mix.py \
    --spec.data.math_shepherd.path=../shared/data/trl_stepwise/math_shepherd_to_trl.derived.jsonl

With the whole dataset (hf://datasets/trl-lib/math_shepherd, its train and test splits), after
`huggingface-cli download --repo-type dataset trl-lib/math_shepherd`:

  python -m rmjax.launch --spec specs/field_mix.py

ProcessBench is listed as an evaluation-only benchmark, off by default: add
--spec.data.processbench.use=True once hf://datasets/Qwen/ProcessBench is downloaded.
"""

from rmjax.spec_io import load_sibling


def get_config(arg=None):
  demo = load_sibling(__file__, "demo.py")
  common = load_sibling(__file__)
  c = demo.get_config(arg)
  c.experiment_name = f"field-mix-{arg or 'full'}"
  c.max_steps = 200                # longer rows than the demo's: fewer steps for the same couple of minutes
  c.warmup_steps = 20
  c.eval_steps = 100
  c.save_steps = 100
  c.data.max_length = 512          # Math-Shepherd problems alone run to ~300 demo tokens
  c.data.length_buckets = (128, 512)  # two shapes, as in the demo: two compilations per step function
  c.data.prm800k.weight = 0.5      # half the rows from (synthetic) PRM800K ...
  c.data.math_shepherd = common.source_block(  # ... half from Math-Shepherd, TRL stepwise format
      "stepwise", path="hf://datasets/trl-lib/math_shepherd", weight=0.5,
      train_split="train", eval_split="test")
  c.data.processbench = common.source_block(  # a benchmark: evaluated, never trained on or selected by
      "processbench", path="hf://datasets/Qwen/ProcessBench", weight=0.0, eval_split="gsm8k",
      use=False, test_only=True)
  return c
