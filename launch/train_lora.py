r"""Seed-compatible LoRA launcher: the seed's train_lora.py flags, run by rmjax on specs/lora.py.

Why it exists: the seed had a separate LoRA script; this keeps its name and flags. All the
mapping (seed flag / JSON key -> spec key, documented there) lives in launch/train.py.

  python launch/train_lora.py --config seed_config.json --experiment_name prm-lora \
      --lora_r 16 --lora_alpha 32 --learning_rate 1e-4
"""

from rmjax.spec import load_sibling

if __name__ == "__main__":
  load_sibling(__file__, "train.py").main("lora")
