"""Device mesh, parameter partition rules and batch sharding, all expressed as data.

Why this module exists: sharding decisions must live in one place, be readable as a table
(regex on a parameter path -> PartitionSpec) and be applied the same way at init, at checkpoint
restore and in the jitted step, so parameters are created already sharded and never resharded.

Mesh axes are ("data", "fsdp", "tensor"). jax 0.10 `jax.make_mesh` defaults to Explicit axis
types; we ask for Auto axes so GSPMD propagates shardings through the model without every
matmul needing `out_sharding=`.

Rules assume the decoder's layers are stacked with a leading layer axis (nn.scan): a kernel is
(L, in, out). A rule spec longer than the array drops its leading `None`s (so the same rule fits
an unstacked (in, out) kernel); a shorter one is padded with `None`. Any mesh axis that does not
divide its dimension is dropped for that parameter (the parameter is then replicated along it),
so a rule is never a correctness risk, only a performance choice.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the leading batch dim is split over both

# (regex on the "/"-joined param path, PartitionSpec). First match wins; the last rule is the
# catch-all (replicated). Column-parallel projections split their output over "tensor",
# row-parallel ones their input; "fsdp" takes the other big dim.
DEFAULT_RULES: tuple[tuple[str, P], ...] = (
  (r"embed/embedding$", P("tensor", "fsdp")),  # (V, D)
  (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel$", P(None, "fsdp", "tensor")),  # (L, D, F)
  (r"(o_proj|down_proj)/kernel$", P(None, "tensor", "fsdp")),  # (L, F, D)
  (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/bias$", P(None, "tensor")),  # (L, F)
  (r"lora_a$", P(None, "fsdp", None)),  # (L, in, r): the small rank dim stays whole
  (r"lora_b$", P(None, None, "fsdp")),  # (L, r, out)
  (r".*", P()),  # norms, biases of row-parallel layers, marker row, head: replicated
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh shape; -1 on (at most) one axis means "all remaining devices"."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  @classmethod
  def from_spec(cls, spec: Any) -> MeshConfig:
    m = spec.mesh
    return cls(data=int(m.data), fsdp=int(m.fsdp), tensor=int(m.tensor))

  def resolve(self, num_devices: int) -> tuple[int, int, int]:
    """Concrete (data, fsdp, tensor) for `num_devices`, or a one-line ValueError."""
    sizes = (self.data, self.fsdp, self.tensor)
    if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
      raise ValueError(f"mesh {dict(zip(AXES, sizes))}: sizes must be positive, with at most one -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
      if num_devices % known:
        raise ValueError(f"mesh {dict(zip(AXES, sizes))}: {num_devices} devices are not divisible by {known}")
      sizes = tuple(num_devices // known if s == -1 else s for s in sizes)
    if math.prod(sizes) != num_devices:
      raise ValueError(f"mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices but {num_devices} are available")
    return sizes  # type: ignore[return-value]


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh with Auto axis types over `devices` (default: all)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = cfg.resolve(len(devices))
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def _axis_size(mesh: Mesh, entry: str | tuple[str, ...] | None) -> int:
  if entry is None:
    return 1
  names = (entry,) if isinstance(entry, str) else entry
  return math.prod(mesh.shape[n] for n in names)


def _fit_entry(mesh: Mesh, entry: str | tuple[str, ...] | None, dim: int) -> str | tuple[str, ...] | None:
  """Drop mesh axes from one spec entry (last first) until their product divides `dim`."""
  if entry is None:
    return None
  names = [entry] if isinstance(entry, str) else list(entry)
  while names and dim % _axis_size(mesh, tuple(names)):
    names.pop()
  if not names:
    return None
  return names[0] if len(names) == 1 else tuple(names)


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Align a rule's spec to an array's rank and drop axes that do not divide their dim."""
  entries = list(spec)
  while len(entries) > len(shape) and entries and entries[0] is None:
    entries.pop(0)
  if len(entries) > len(shape):
    raise ValueError(f"partition spec {spec} has more sharded dims than shape {tuple(shape)}")
  entries += [None] * (len(shape) - len(entries))
  fitted = [_fit_entry(mesh, e, d) for e, d in zip(entries, shape)]
  used = [n for e in fitted if e is not None for n in ((e,) if isinstance(e, str) else e)]
  if len(used) != len(set(used)):
    raise ValueError(f"partition spec {spec} uses a mesh axis twice")
  return P(*fitted)


def spec_for(path: str, shape: Sequence[int], mesh: Mesh, rules: Sequence[tuple[str, P]] = DEFAULT_RULES) -> P:
  """The PartitionSpec of the first rule whose regex matches `path`, fitted to `shape`."""
  for pattern, spec in rules:
    if re.search(pattern, path):
      return fit_spec(spec, shape, mesh)
  raise ValueError(f"no partition rule matches parameter {path!r}; add a catch-all (r'.*', P())")


def param_shardings(params: Any, mesh: Mesh, rules: Sequence[tuple[str, P]] = DEFAULT_RULES) -> Any:
  """Map a nested param dict (arrays or ShapeDtypeStructs) to a same-shaped tree of NamedShardings."""
  flat = traverse_util.flatten_dict(params, sep="/")
  out = {k: NamedSharding(mesh, spec_for(k, np.shape(v), mesh, rules)) for k, v in flat.items()}
  return traverse_util.unflatten_dict(out, sep="/")


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dim split over ("data", "fsdp"); applies to every array of a batch."""
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_shards(mesh: Mesh) -> int:
  """How many ways the batch dim is split (each micro-batch must be divisible by this)."""
  return _axis_size(mesh, BATCH_AXES)


def process_row_blocks(process_of_device: np.ndarray) -> dict[int, int]:
  """process index -> which equal, contiguous block of every global batch that process feeds.

  `process_of_device` is shaped like the mesh (data, fsdp, tensor) and holds each device's
  process index. Every process reads rows of its own (a distinct shard of every source) and
  `make_array_from_process_local_data` hands them to the batch shards its devices hold, so each
  process must hold a contiguous run of batch shards that no other process holds. A tensor (or
  any) axis spanning processes would put the same rows on two processes, which would then have to
  read identical data: refused here with a one-line ValueError rather than trained wrongly.
  """
  data, fsdp = process_of_device.shape[:2]
  held: dict[int, set[int]] = {}
  for (d, f, _t), p in np.ndenumerate(process_of_device):
    held.setdefault(int(p), set()).add(d * fsdp + f)
  count, shards = len(held), data * fsdp
  per = shards // count if shards % count == 0 else 0
  blocks: dict[int, int] = {}
  for p, mine in sorted(held.items()):
    start = min(mine)
    if not per or start % per or mine != set(range(start, start + per)):
      break
    blocks[p] = start // per
  if len(blocks) != count or len(set(blocks.values())) != count:
    layout = dict(zip(AXES, process_of_device.shape))
    raise ValueError(f"mesh {layout} does not give each of the {count} processes batch rows of its own "
                     f"(batch shards per process: {', '.join(f'{p}: {sorted(m)}' for p, m in sorted(held.items()))}); "
                     f"every process reads distinct rows, so keep the tensor axis within one process's devices "
                     f"and make data x fsdp a multiple of the process count")
  return blocks


def process_batch_block(mesh: Mesh) -> int:
  """Which block of every global batch (`process_row_blocks`) this process feeds."""
  if tuple(mesh.axis_names) != AXES:
    raise ValueError(f"mesh axes {mesh.axis_names}, expected {AXES}")
  process_of_device = np.vectorize(lambda d: d.process_index, otypes=[int])(mesh.devices)
  return process_row_blocks(process_of_device)[jax.process_index()]
