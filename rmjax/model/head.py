"""The confidence head: a small MLP from a marker's hidden state to one logit.

Why it exists: the head is the only part trained from scratch, and it must export to the
PyTorch layout the seed project used, `nn.Sequential([Linear, GELU, Dropout, ..., Linear])`.
Dense layers are therefore named by their index in that Sequential (`linear_0`, `linear_3`,
`linear_6` for the default two hidden layers) and GELU is the exact erf form (torch's
default). The final layer starts tiny so initial predictions sit near 0.5.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

_ACTIVATIONS = {
  "gelu": lambda x: nn.gelu(x, approximate=False),
  "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
  "relu": nn.relu,
  "silu": nn.silu,
  "tanh": jnp.tanh,
}
# torch module names for export (nn.GELU() default is the exact form).
TORCH_ACTIVATIONS = {"gelu": "GELU()", "gelu_tanh": "GELU(approximate='tanh')", "relu": "ReLU()",
                     "silu": "SiLU()", "tanh": "Tanh()"}


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  hidden_dims: tuple[int, ...] = (1024, 256)
  activation: str = "gelu"
  dropout: float = 0.1
  final_init_std: float = 1e-3  # final Dense kernel ~ N(0, std), bias 0 -> sigmoid ~ 0.5

  def __post_init__(self):
    if isinstance(self.hidden_dims, list):
      object.__setattr__(self, "hidden_dims", tuple(self.hidden_dims))
    if self.activation not in _ACTIVATIONS:
      raise ValueError(f"unknown head activation {self.activation!r}; choose from {', '.join(_ACTIVATIONS)}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"head dropout must be in [0, 1), got {self.dropout}")


def torch_layer_names(cfg: HeadConfig) -> list[str]:
  """Our Dense names in order; name `linear_<i>` is torch Sequential key `<i>`."""
  return [f"linear_{3 * i}" for i in range(len(cfg.hidden_dims) + 1)]


class ConfidenceHead(nn.Module):
  """(..., D) float -> (..., 1) logit; Dense -> act -> Dropout blocks, then Dense to 1."""
  cfg: HeadConfig

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    names = torch_layer_names(self.cfg)
    act = _ACTIVATIONS[self.cfg.activation]
    for name, width in zip(names[:-1], self.cfg.hidden_dims):
      x = act(nn.Dense(width, name=name)(x))
      x = nn.Dropout(self.cfg.dropout)(x, deterministic=deterministic)
    final = nn.Dense(1, kernel_init=nn.initializers.normal(self.cfg.final_init_std),
                     bias_init=nn.initializers.zeros, name=names[-1])
    return final(x)
