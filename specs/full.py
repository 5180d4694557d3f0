r"""Full fine-tuning of Qwen3-4B-Instruct as a step-level confidence model.

Every backbone weight, the marker embedding and the head train; lr 2e-5 (the seed's value).

  python -m rmjax.launch --spec specs/full.py \
      --spec.experiment_name=prm-full \
      --spec.data.prm800k.path=data/prm800k/data --spec.data.eqasc.path=data/eqasc \
      --spec.data.reveal.path=data/reveal

batch_size is GLOBAL (16 = the seed's 4 per device x 4 accumulation steps on one device), here
in one pass (grad_accum_steps=1): the same rows and loss, and less memory than accumulating,
which keeps a float32 gradient sum beside each micro-batch's gradients. In one pass it fits an
80 GB GPU under rmjax's memory fraction of 0.9; 4 x 4 accumulated does not (compiled peaks:
BUILD.md, Results).
On 8 GPUs --spec.batch_size=128 keeps 16 rows per device.
"""

from rmjax.spec_io import load_sibling


def load_common():
  """specs/common.py, next to this file."""
  return load_sibling(__file__)


def get_config(arg=None):
  del arg  # no variants
  c = load_common().base_spec()
  c.experiment_name = "prm-full"   # run dir = runs/prm-full
  c.mode = "full"                  # every weight trains
  c.lr = 2e-5                      # seed's full fine-tuning learning rate
  c.grad_accum_steps = 1           # the seed's 16 rows in one pass (docstring: memory)
  c.data.prm800k.path = "data/prm800k/data"  # phase2_train.jsonl / phase2_test.jsonl live here
  c.data.eqasc.path = "data/eqasc"           # eqasc_{train,dev}_grc.json
  c.data.reveal.path = "data/reveal"         # eval/reveal_eval.csv (gated: --spec.data.reveal.use=False without it)
  return c
