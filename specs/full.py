r"""Full fine-tuning of Qwen3-4B-Instruct as a step-level confidence model.

Every backbone weight, the marker embedding and the head train; lr 2e-5 (the seed's value).

  python -m rmjax.launch --spec specs/full.py \
      --spec.experiment_name=prm-full \
      --spec.data.prm800k.path=data/prm800k/data --spec.data.eqasc.path=data/eqasc \
      --spec.data.reveal.path=data/reveal

batch_size is GLOBAL (16 = the seed's 4 per device x 4 accumulation steps on one device): on
8 GPUs use --spec.batch_size=128 to keep 4 rows per device per micro-batch.
"""

from rmjax.spec import load_sibling


def load_common():
  """specs/common.py, next to this file."""
  return load_sibling(__file__)


def get_config(arg=None):
  del arg  # no variants
  c = load_common().base_spec()
  c.experiment_name = "prm-full"   # run dir = runs/prm-full
  c.mode = "full"                  # every weight trains
  c.lr = 2e-5                      # seed's full fine-tuning learning rate
  c.data.prm800k.path = "data/prm800k/data"  # phase2_train.jsonl / phase2_test.jsonl live here
  c.data.eqasc.path = "data/eqasc"           # eqasc_{train,dev}_grc.json
  c.data.reveal.path = "data/reveal"         # eval/reveal_eval.csv (gated: --spec.data.reveal.use=False without it)
  return c
