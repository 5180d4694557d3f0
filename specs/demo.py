r"""The embedded demo: a tiny random backbone on synthetic PRM800K-format data, CPU-sized.

Nothing is downloaded: the backbone (model.demo shape) and a small BPE tokenizer are built
in-process, and PRM800K-format records are generated into the run directory (data.prm800k.path
= ""). It runs end to end (train, eval, checkpoints, logs) in a few minutes on 2 CPU cores and
its eval loss must fall: a smoke test of the whole system.

  python -m rmjax.launch --spec specs/demo.py
  python -m rmjax.launch --spec specs/demo.py:lora    # same, LoRA mode (adapters + head train)

Argument: "" (full fine-tuning) or "lora".
"""

from rmjax.spec_io import load_sibling


def load_common():
  """specs/common.py, next to this file."""
  return load_sibling(__file__)


def get_config(arg=None):
  variant = arg or "full"
  if variant not in ("full", "lora"):
    raise ValueError(f"specs/demo.py takes 'full' or 'lora', got {arg!r}")
  c = load_common().base_spec()
  c.experiment_name = f"demo-{variant}"  # run dir = runs/demo-full or runs/demo-lora
  c.mode = variant
  c.lr = 1e-3                      # tiny model, few steps: a large learning rate
  c.max_steps = 600                # about a minute on 2 CPU cores, compilation included
  c.batch_size = 16                # global; micro-batch 8 splits over 1, 2, 4 or 8 devices
  c.grad_accum_steps = 2           # keeps the accumulation path exercised
  c.warmup_steps = 60              # 10% of max_steps
  c.eval_steps = 200               # three evaluations
  c.save_steps = 200               # three checkpoints
  c.max_eval_batches = 0           # the synthetic eval split is small: evaluate all of it

  c.model.path = "demo"            # tiny random backbone of common's model.demo shape, built in-process
  c.model.compute_dtype = "float32"  # CPU: no bf16 speed-up, and exact numbers for tests
  c.model.frozen_dtype = "float32"
  c.model.remat = "none"           # activations are tiny
  c.head.hidden_dims = (64, 32)    # small head for a 64-wide backbone
  c.head.dropout = 0.0             # short run: no regularisation needed

  c.lora.rank = 8                  # LoRA variant only
  c.lora.alpha = 16.0

  c.data.max_length = 128          # synthetic examples are short
  c.data.length_buckets = (64, 128)  # two shapes -> two compilations per step function
  c.data.prm800k.path = ""         # "" = synthetic PRM800K-format records generated into the run dir
  # Small numbers keep the arithmetic table learnable by a 2-layer, 64-wide model in 600 steps
  # (with the default 1..9 operands and values up to 30 it stalls near AUROC 0.65).
  c.data.synthetic.max_operand = 3
  c.data.synthetic.max_value = 12
  c.data.prm800k.weight = 1.0      # the only training source
  c.data.eqasc.use = False         # no eQASC data in the demo
  c.data.reveal.use = False        # no REVEAL data in the demo
  c.checkpoint.async_save = False  # tiny checkpoints: synchronous saves keep the demo simple
  return c
