"""Mesh construction, partition rules as data, and batch sharding (8 fake CPU devices)."""

import numpy as np
import jax
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from rmjax import sharding as shd
from rmjax.model.confidence import ConfidenceModel
from rmjax.model.config import ModelConfig
from rmjax.model.head import HeadConfig
from rmjax.train.state import dummy_inputs


def test_mesh_resolve_fills_minus_one():
  assert shd.MeshConfig(-1, 2, 1).resolve(8) == (4, 2, 1)
  assert shd.MeshConfig(2, -1, 2).resolve(8) == (2, 2, 2)
  assert shd.MeshConfig(1, 1, 1).resolve(1) == (1, 1, 1)


@pytest.mark.parametrize("cfg, n, msg", [
  (shd.MeshConfig(2, 2, 1), 8, "needs 4 devices but 8"),
  (shd.MeshConfig(-1, 3, 1), 8, "not divisible by 3"),
  (shd.MeshConfig(-1, -1, 1), 8, "at most one -1"),
  (shd.MeshConfig(0, 1, 1), 8, "positive"),
])
def test_mesh_resolve_errors_are_one_line(cfg, n, msg):
  with pytest.raises(ValueError, match=msg) as err:
    cfg.resolve(n)
  assert "\n" not in str(err.value)


def test_make_mesh_uses_auto_axes_and_names():
  mesh = shd.make_mesh(shd.MeshConfig(2, 2, 2))
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert all(t == AxisType.Auto for t in mesh.axis_types)
  one = shd.make_mesh(shd.MeshConfig(1, 1, 1), devices=jax.devices()[:1])
  assert one.devices.size == 1


def test_mesh_from_spec():
  from ml_collections import ConfigDict
  spec = ConfigDict({"mesh": {"data": -1, "fsdp": 4, "tensor": 1}})
  assert shd.MeshConfig.from_spec(spec).resolve(8) == (2, 4, 1)


def test_fit_spec_aligns_rank_and_drops_indivisible_axes():
  mesh = shd.make_mesh(shd.MeshConfig(2, 2, 2))
  # Stacked rule on an unstacked kernel: the leading None goes.
  assert shd.fit_spec(P(None, "fsdp", "tensor"), (8, 6), mesh) == P("fsdp", "tensor")
  # Shorter spec is padded; 3 is not divisible by tensor=2, so that axis is dropped.
  assert shd.fit_spec(P(None, "fsdp", "tensor"), (2, 4, 3), mesh) == P(None, "fsdp", None)
  assert shd.fit_spec(P("tensor"), (4, 5), mesh) == P("tensor", None)
  # A tuple entry loses its last axis first: 6 divides by data=2 but not by data*fsdp=4.
  assert shd.fit_spec(P(("data", "fsdp")), (6,), mesh) == P("data")
  with pytest.raises(ValueError, match="twice"):
    shd.fit_spec(P("fsdp", "fsdp"), (4, 4), mesh)


def _abstract_params(vocab: int = 64):
  mc = ModelConfig.tiny("qwen2", vocab_size=vocab, hidden_size=32, intermediate_size=64, num_heads=4,
                        num_kv_heads=2, head_dim=8, lora_rank=4, marker_id=5)
  model = ConfidenceModel(mc, HeadConfig(hidden_dims=(16,), dropout=0.0))
  return jax.eval_shape(lambda k: model.init(k, *dummy_inputs())["params"], jax.random.PRNGKey(0))


def test_default_rules_on_the_real_model():
  mesh = shd.make_mesh(shd.MeshConfig(2, 2, 2))
  s = shd.param_shardings(_abstract_params(), mesh)
  layers = s["decoder"]["layers"]
  assert layers["attn"]["q_proj"]["kernel"].spec == P(None, "fsdp", "tensor")
  assert layers["attn"]["q_proj"]["bias"].spec == P(None, "tensor")
  assert layers["attn"]["o_proj"]["kernel"].spec == P(None, "tensor", "fsdp")
  assert layers["mlp"]["down_proj"]["kernel"].spec == P(None, "tensor", "fsdp")
  assert layers["mlp"]["up_proj"]["kernel"].spec == P(None, "fsdp", "tensor")
  assert layers["attn"]["q_proj"]["lora_a"].spec == P(None, "fsdp", None)
  assert layers["input_norm"]["scale"].spec == P(None, None)
  assert s["decoder"]["embed"]["embedding"].spec == P("tensor", "fsdp")
  assert s["decoder"]["embed"]["marker"].spec == P(None)
  assert all(x.spec == P(*([None] * len(x.spec))) for x in jax.tree.leaves(s["head"]))


def test_indivisible_vocab_falls_back_to_replicated_dim():
  mesh = shd.make_mesh(shd.MeshConfig(2, 2, 2))
  s = shd.param_shardings(_abstract_params(vocab=63), mesh)
  assert s["decoder"]["embed"]["embedding"].spec == P(None, "fsdp")


def test_rules_without_catch_all_name_the_parameter():
  mesh = shd.make_mesh(shd.MeshConfig(2, 2, 2))
  with pytest.raises(ValueError, match="no partition rule matches parameter .decoder/embed/marker."):
    shd.param_shardings(_abstract_params(), mesh, rules=shd.DEFAULT_RULES[:-1])


def test_batch_sharding_splits_rows_over_data_and_fsdp():
  mesh = shd.make_mesh(shd.MeshConfig(2, 2, 2))
  assert shd.batch_sharding(mesh).spec == P(("data", "fsdp"))
  assert shd.batch_shards(mesh) == 4
  x = jax.device_put(jax.numpy.zeros((8, 3)), shd.batch_sharding(mesh))
  assert {s.data.shape for s in x.addressable_shards} == {(2, 3)}


def _layout(processes, data, fsdp, tensor):
  return np.asarray(processes).reshape(data, fsdp, tensor)


def test_process_row_blocks_follow_where_each_process_holds_its_batch_shards():
  # 2 processes x 4 devices, data 2 x tensor 2 x fsdp 2: process p holds data row p.
  assert shd.process_row_blocks(_layout([0, 0, 0, 0, 1, 1, 1, 1], 2, 2, 2)) == {0: 0, 1: 1}
  # The mesh may put process 1's devices first: then process 1 feeds the first block.
  assert shd.process_row_blocks(_layout([1, 1, 0, 0], 2, 1, 2)) == {0: 1, 1: 0}
  # 4 processes over data 2 x fsdp 2, one device each (tensor 1).
  assert shd.process_row_blocks(_layout([0, 1, 2, 3], 2, 2, 1)) == {0: 0, 1: 1, 2: 2, 3: 3}


@pytest.mark.parametrize("processes, shape", [
  ([0, 1], (1, 1, 2)),  # tensor across 2 processes: both would hold all rows
  ([0, 1, 0, 1], (2, 1, 2)),  # tensor across processes, data within each
  ([0, 1, 1, 0], (4, 1, 1)),  # process 0 would hold shards 0 and 3: not one block
  ([0, 0, 1], (3, 1, 1)),  # 3 shards do not split over 2 processes
])
def test_process_row_blocks_refuse_meshes_where_processes_share_or_split_rows(processes, shape):
  with pytest.raises(ValueError, match="does not give each of the 2 processes batch rows of its own"):
    shd.process_row_blocks(_layout(processes, *shape))


def test_process_batch_block_of_a_single_process_mesh_is_the_first():
  assert shd.process_batch_block(shd.make_mesh(shd.MeshConfig(2, 2, 2))) == 0
