r"""Seed-compatible LoRA launcher: the seed's train_lora.py flags, run by rmjax on specs/lora.py.

Why it exists: the seed had a separate LoRA script; this keeps its name and flags. All the
mapping (seed flag / JSON key -> spec key, documented there) lives in launch/train.py.

  python launch/train_lora.py --config seed_config.json --experiment_name prm-lora \
      --lora_r 16 --lora_alpha 32 --learning_rate 1e-4
"""

import importlib.util
import pathlib


def _train_module():
  """launch/train.py, loaded by path (launch/ holds scripts, not a package)."""
  path = pathlib.Path(__file__).resolve().with_name("train.py")
  module_spec = importlib.util.spec_from_file_location("rmjax_launch_train", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


if __name__ == "__main__":
  _train_module().main("lora")
