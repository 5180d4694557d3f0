r"""LoRA fine-tuning of Qwen3-4B-Instruct as a step-level confidence model.

Rank-16 adapters (alpha 32) on q/k/v/o train together with the head and the marker's embedding
row; the base stays frozen (stored in model.frozen_dtype). lr 1e-4 (the seed's value).

  python -m rmjax.launch --spec specs/lora.py \
      --spec.experiment_name=prm-lora \
      --spec.data.prm800k.path=data/prm800k/data --spec.data.eqasc.path=data/eqasc \
      --spec.data.reveal.path=data/reveal

batch_size is GLOBAL (16 = the seed's 4 per device x 4 accumulation steps on one device): on
8 GPUs use --spec.batch_size=128 to keep 4 rows per device per micro-batch.
"""

from rmjax.spec_io import load_sibling


def load_common():
  """specs/common.py, next to this file."""
  return load_sibling(__file__)


def get_config(arg=None):
  del arg  # no variants
  c = load_common().base_spec()
  c.experiment_name = "prm-lora"   # run dir = runs/prm-lora
  c.mode = "lora"                  # adapters + head + marker row train; base frozen
  c.lr = 1e-4                      # seed's LoRA learning rate
  c.lora.rank = 16                 # seed: r=16
  c.lora.alpha = 32.0              # seed: alpha=32 (scale 2)
  c.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj")  # seed's target modules
  c.data.prm800k.path = "data/prm800k/data"  # phase2_train.jsonl / phase2_test.jsonl live here
  c.data.eqasc.path = "data/eqasc"           # eqasc_{train,dev}_grc.json
  c.data.reveal.path = "data/reveal"         # eval/reveal_eval.csv (gated: --spec.data.reveal.use=False without it)
  return c
