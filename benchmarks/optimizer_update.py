"""`python -m benchmarks.optimizer_update`: one optimizer update's time, by the form of the guard.

Why it exists: the train step skips an update whose loss or gradient norm is not finite
(train/step.py). That guard can be a select between the new and the old parameters and moments,
or a conditional that runs the update only when it is finite. On a CPU the two differ: XLA's CPU
backend has no multi-output fusion, so the select re-reads every new and old leaf and cannot
update the donated buffers in place, while the conditional's update can. This times the trained
weights' update alone (clipping, AdamW, the guard; the step's gradient norm included) on a
preset's trainable parameters under each form: "select", "branch" (the conditional) and "none"
(no guard, the floor), each jitted with parameters and moments donated as in the step, median
of `--repeats` calls after one compile; with `--torch`, torch's `clip_grad_norm_` and fused
AdamW on tensors of the same shapes, timed after every JAX block (torch's OpenMP threads would
otherwise share the cores with XLA's). Prints one JSON line of seconds per form.

  python -m benchmarks.optimizer_update --preset 75m --mode full --torch
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmjax import cli
from rmjax.bench import common, jax_impl
from rmjax.train import optim
from rmjax.train import step as train_step

FORMS = {"select": train_step.update_by_select, "branch": train_step.update_by_branch,
         "none": lambda tx, grads, norm, finite, params, opt_state: train_step.apply_update(
           tx, grads, norm, params, opt_state)}


def trainable_arrays(preset: str, mode: str, seed: int = 0) -> dict:
  """Random float32 arrays shaped like the preset's trained weights in `mode`."""
  device = jax.devices()[0]
  settings = common.BenchSettings(preset=preset).on_device(device.platform != "cpu")
  _, abstract = jax_impl.build_abstract(settings, mode, device)
  leaves, treedef = jax.tree.flatten(abstract.params)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(treedef, [rng.standard_normal(x.shape, np.float32) * 0.02 for x in leaves])


def time_form(form: str, params: dict, grads: dict, cfg: optim.OptimConfig, repeats: int) -> float:
  tx = optim.make_optimizer(cfg)
  guarded = FORMS[form]

  def update(params, opt_state, grads):
    norm = optax.tree.norm(grads)
    return guarded(tx, grads, norm, jnp.isfinite(norm), params, opt_state)

  run = jax.jit(update, donate_argnums=(0, 1))
  state = jax.device_put((params, tx.init(params)))
  grads = jax.device_put(grads)
  state = jax.block_until_ready(run(*state, grads))  # compiles
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state = jax.block_until_ready(run(*state, grads))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def time_torch(params: dict, grads: dict, cfg: optim.OptimConfig, repeats: int) -> float:
  import torch
  tensors = [torch.nn.Parameter(torch.from_numpy(np.array(x))) for x in jax.tree.leaves(params)]
  for tensor, grad in zip(tensors, jax.tree.leaves(grads), strict=True):
    tensor.grad = torch.from_numpy(np.array(grad))
  opt = torch.optim.AdamW(tensors, lr=cfg.lr, betas=(cfg.b1, cfg.b2), eps=cfg.eps,
                          weight_decay=cfg.weight_decay, fused=True)

  def update():
    torch.nn.utils.clip_grad_norm_(tensors, cfg.max_grad_norm)
    opt.step()

  update()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    update()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv: Sequence[str] | None = None) -> int:
  p = cli.ArgumentParser(prog="python -m benchmarks.optimizer_update", description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="75m", choices=sorted(common.PRESETS))
  p.add_argument("--mode", default="full", choices=optim.MODES)
  p.add_argument("--forms", nargs="+", default=list(FORMS), choices=list(FORMS))
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--torch", action="store_true", help="also time torch's clipping and fused AdamW")
  args = p.parse_args(argv)
  cfg = optim.OptimConfig(lr=1e-4, schedule="constant", mode=args.mode)
  params = trainable_arrays(args.preset, args.mode)
  grads = jax.tree.map(lambda x: np.full_like(x, 1e-3), params)
  record = {"preset": args.preset, "mode": args.mode,
            "trained_params": sum(x.size for x in jax.tree.leaves(params))}
  record |= {f"{form}_s": time_form(form, params, grads, cfg, args.repeats) for form in args.forms}
  if args.torch:
    record["torch_s"] = time_torch(params, grads, cfg, args.repeats)
  print(json.dumps(record), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
