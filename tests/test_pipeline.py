"""grain pipelines: exact weighted mix, per-process shards, exact resume in a new process,
bucketed shapes, and evaluation that covers every example of every source once."""

import json
import os
import pathlib
import subprocess
import sys
import threading

import numpy as np
import pytest

from rmjax.data.example import Example, SkipCounter
from rmjax.data.pipeline import NoUsableRecords, PipelineConfig, eval_datasets, train_dataset
from rmjax.data.render import RenderConfig
from rmjax.tokenizer import build_demo_tokenizer, marker_id

ROOT = pathlib.Path(__file__).resolve().parents[1]
RENDER = RenderConfig(max_length=64, max_steps_per_example=4, length_buckets=(16, 32, 64))
TARGET = {"a": 0.25, "b": 0.5, "c": 0.75}  # each source's examples carry its own target value


class ListSource:
  """An in-test random-access source; every 5th record is a skipped one (None). Logs reads."""

  def __init__(self, name: str, n: int):
    self.name, self.n = name, n
    self.reads: list[int] = []
    self._lock = threading.Lock()

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    with self._lock:
      self.reads.append(i)
    if i % 5 == 4:
      return None
    k = 1 + i % 3
    steps = tuple(f"{i} + {j} = {i + j}" for j in range(k))
    return Example(self.name, f"{self.name}-{i}", f"Compute {i}.", steps, (TARGET[self.name],) * k)


@pytest.fixture(scope="module")
def tok():
  return build_demo_tokenizer()


def _sources(weights, sizes=(40, 25, 13)):
  return {n: (ListSource(n, size), w) for n, size, w in zip("abc", sizes, weights)}


def _source_of_rows(batch):
  first = batch["targets"][:, 0]
  return [min(TARGET, key=lambda n: abs(TARGET[n] - t)) for t in first]


def _mix_counts(tok, weights, n_examples=10_000, batch=100):
  it = iter(train_dataset(_sources(weights), RENDER, tok, PipelineConfig(num_threads=2), seed=0,
                          global_batch=batch))
  names = []
  for _ in range(n_examples // batch):
    names += _source_of_rows(next(it))
  return {n: names.count(n) / len(names) for n in "abc"}


def test_weights_set_the_mix_within_one_point_and_changing_them_changes_it(tok):
  mix = _mix_counts(tok, (0.5, 0.3, 0.2))
  for n, w in zip("abc", (0.5, 0.3, 0.2)):
    assert abs(mix[n] - w) <= 0.01, mix
  other = _mix_counts(tok, (1.0, 1.0, 2.0))  # unnormalised weights are normalised
  for n, w in zip("abc", (0.25, 0.25, 0.5)):
    assert abs(other[n] - w) <= 0.01, other


def test_zero_weight_leaves_a_source_out_and_all_zero_is_an_error(tok):
  assert _mix_counts(tok, (1.0, 0.0, 1.0), n_examples=400)["b"] == 0
  with pytest.raises(AssertionError, match="positive weight"):  # spec validation says it to users
    train_dataset(_sources((0, 0, 0)), RENDER, tok, PipelineConfig(), seed=0, global_batch=4)


class _AllSkipped(ListSource):
  """Every record is skipped: by the reader (None), or, with `unsupervised`, by training's
  renderer (no kept step has a target)."""

  def __init__(self, name, n, unsupervised=False):
    super().__init__(name, n)
    self.unsupervised = unsupervised

  def __getitem__(self, i):
    if not self.unsupervised:
      return None
    return Example(self.name, f"{self.name}-{i}", f"Compute {i}.", (f"{i} + 1 = {i + 1}", "so"), (None, 1.0))


@pytest.mark.parametrize("unsupervised", [False, True])
def test_a_training_source_with_no_usable_record_is_an_error_not_a_hang(tok, unsupervised):
  """The mix draws from every source by weight; a source none of whose records survive used to
  make it wait forever (a PRM800K path pointing at another file: every line skipped)."""
  sources = {"a": (ListSource("a", 40), 1.0), "b": (_AllSkipped("b", 30, unsupervised), 1.0)}
  skips = SkipCounter()
  render = RenderConfig(max_length=64, max_steps_per_example=1, length_buckets=(64,))
  it = iter(train_dataset(sources, render, tok, PipelineConfig(num_threads=2), seed=0, global_batch=4, skips=skips))
  outcome = []
  def pull():
    try:
      for _ in range(100):
        next(it)
    except Exception as e:  # noqa: BLE001 -- the test looks at which
      outcome.append(e)
  worker = threading.Thread(target=pull, daemon=True)
  worker.start()
  worker.join(120)
  assert not worker.is_alive(), "the pipeline is still waiting for a usable record"
  assert len(outcome) == 1 and isinstance(outcome[0], NoUsableRecords), outcome
  assert str(outcome[0]).startswith("training source 'b': none of its 30 records can be used")
  if unsupervised:  # counted: each example's kept step (1 of 2) has no target
    assert skips.as_dict()["b"] == {"no_supervised_step": 30}


def test_each_process_reads_only_its_shard(tok):
  for pi in range(2):
    sources = _sources((0.5, 0.3, 0.2))
    it = iter(train_dataset(sources, RENDER, tok, PipelineConfig(num_threads=0), seed=0,
                            global_batch=8, process_index=pi, process_count=2))
    for _ in range(20):
      b = next(it)
      assert b["input_ids"].shape[0] == 4
    for src, _ in sources.values():
      assert src.reads and all(i % 2 == pi for i in src.reads)
  with pytest.raises(AssertionError):  # spec validation says it to users
    train_dataset(_sources((1, 1, 1)), RENDER, tok, PipelineConfig(), seed=0, global_batch=5,
                  process_count=2)


@pytest.mark.parametrize("pack", [False, True])
def test_batches_have_bucketed_lengths_and_markers_on_marker_ids(tok, pack):
  render = RenderConfig(max_length=64, max_steps_per_example=4, length_buckets=(16, 32, 64),
                        max_markers=12 if pack else 0)
  it = iter(train_dataset(_sources((0.5, 0.3, 0.2)), render, tok, PipelineConfig(pack=pack),
                          seed=1, global_batch=6))
  shapes = set()
  for _ in range(30):
    b = next(it)
    assert set(b) == {"input_ids", "positions", "segment_ids", "marker_positions", "targets", "target_mask"}
    assert b["input_ids"].shape[1] in (16, 32, 64) and b["input_ids"].shape[0] == 6
    assert b["marker_positions"].shape == (6, render.markers)
    shapes.add(b["input_ids"].shape)
    ids = np.take_along_axis(b["input_ids"], b["marker_positions"], axis=1)
    assert (ids[b["target_mask"] > 0] == marker_id(tok)).all()
    used = b["segment_ids"] > 0
    longest = used.sum(1).max()
    assert longest > b["input_ids"].shape[1] // 2 or b["input_ids"].shape[1] == 16  # smallest fit
    if pack:
      assert b["segment_ids"].max() > 1
  assert len(shapes) >= 1


def test_packed_pipeline_keeps_the_segment_cap(tok):
  """data.max_segments_per_row reaches the pipeline's packer: rows of at most 2 examples, where
  the same stream uncapped packs more."""
  most = {}
  for cap in (0, 2):
    render = RenderConfig(max_length=64, max_steps_per_example=4, length_buckets=(16, 32, 64), max_markers=12,
                          max_segments=cap)
    it = iter(train_dataset(_sources((0.5, 0.3, 0.2)), render, tok, PipelineConfig(pack=True), seed=1,
                            global_batch=6))
    most[cap] = max(int(next(it)["segment_ids"].max()) for _ in range(10))
  assert most[2] == 2 < most[0]


_CHILD = r"""
import json, sys, numpy as np
sys.path.insert(0, {tests!r})
from test_pipeline import build_for_resume
it = iter(build_for_resume({pack}, {data!r}))
it.set_state(json.loads(open({state!r}).read()))
np.savez({out!r}, **{{f"{{i}}_{{k}}": v for i in range(4) for k, v in next(it).items()}})
"""


def build_for_resume(pack: bool, synthetic_dir: str):
  """The pipeline both processes build: the real PRM800K reader on SYNTHETIC data + a list source."""
  from rmjax.data.prm800k import Prm800kReader
  tok = build_demo_tokenizer()
  render = RenderConfig(max_length=64, max_steps_per_example=4, length_buckets=(32, 64),
                        max_markers=12 if pack else 0)
  sources = {"prm800k": (Prm800kReader(synthetic_dir, split="train", phase=2), 0.6),
             "a": (ListSource("a", 30), 0.4)}
  return train_dataset(sources, render, tok, PipelineConfig(num_threads=2, pack=pack), seed=3,
                       global_batch=4)


@pytest.mark.slow
@pytest.mark.parametrize("pack", [False, True])
def test_state_restored_in_a_new_process_gives_the_same_batches(tmp_path, pack):
  pytest.importorskip("rmjax.data.prm800k")
  from rmjax.data.synthetic import write_synthetic_prm800k_dir
  data = write_synthetic_prm800k_dir(str(tmp_path / "syn"), 60, 5, seed=0)
  it = iter(build_for_resume(pack, data))
  for _ in range(7):  # k batches, crossing the 60-record epoch of the synthetic source
    next(it)
  state = tmp_path / "state.json"
  state.write_text(json.dumps(it.get_state()))
  if pack:  # the lookahead path: examples held over for the next batch are part of the state
    assert json.loads(state.read_text())["pending"]
  expect = [next(it) for _ in range(4)]
  out = tmp_path / "child.npz"
  code = _CHILD.format(tests=str(ROOT / "tests"), pack=pack, data=data, state=str(state), out=str(out))
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
  got = np.load(out)
  fresh = iter(build_for_resume(pack, data))
  assert not all(np.array_equal(next(fresh)["input_ids"], b["input_ids"]) for b in expect)  # test can fail
  for i, batch in enumerate(expect):
    for k, v in batch.items():
      assert got[f"{i}_{k}"].dtype == v.dtype
      np.testing.assert_array_equal(got[f"{i}_{k}"], v, err_msg=f"batch {i} key {k}")


def test_eval_covers_every_source_once_with_equal_batch_counts_per_process(tok):
  sources = {n: ListSource(n, size) for n, size in zip("abc", (23, 10, 5))}
  skips = SkipCounter()
  seen = {n: [] for n in sources}
  counts = []
  for pi in range(2):
    ds = eval_datasets(sources, RENDER, tok, PipelineConfig(eval_batch_size=6), process_index=pi,
                       process_count=2, skips=skips)
    assert list(ds) == ["a", "b", "c"]
    per = {}
    for name, d in ds.items():
      batches = list(d)
      per[name] = len(batches)
      for b in batches:
        assert b["input_ids"].shape[0] == 3 and b["input_ids"].shape[1] in (16, 32, 64)
        assert b["example_index"].tolist() == [[r] * RENDER.markers for r in range(3)]
        for r, ident in enumerate(b["example_ids"].tolist()):
          if ident:
            seen[name].append(ident)
            k = int(b["target_mask"][r].sum())
            assert b["step_index"][r, :k].tolist() == list(range(k))
          else:
            assert b["target_mask"][r].sum() == 0 and b["segment_ids"][r].sum() == 0
    counts.append(per)
  assert counts[0] == counts[1]  # every process runs the same number of eval steps
  for name, src in sources.items():
    expect = [f"{name}-{i}" for i in range(src.n) if i % 5 != 4]
    assert sorted(seen[name]) == sorted(expect)
  capped = eval_datasets(sources, RENDER, tok, PipelineConfig(eval_batch_size=2, max_eval_batches=2))
  assert [len(list(d)) for d in capped.values()] == [2, 2, 2]


def test_epoch_shuffle_is_a_fresh_permutation_each_epoch_and_deterministic():
  import grain
  from rmjax.data.pipeline import EpochShuffle
  ds = EpochShuffle(grain.MapDataset.range(7), seed=5)
  epochs = [[ds[e * 7 + i] for i in range(7)] for e in range(3)]
  assert all(sorted(e) == list(range(7)) for e in epochs)
  assert epochs[0] != epochs[1] or epochs[1] != epochs[2]
  assert [EpochShuffle(grain.MapDataset.range(7), seed=5)[i] for i in range(21)] == sum(epochs, [])


def test_pipeline_config_from_the_real_spec():
  import importlib.util
  spec_file = ROOT / "specs" / "common.py"
  if not spec_file.exists():
    pytest.skip("specs/common.py not written yet")
  mod = importlib.util.spec_from_file_location("specs_common", spec_file)
  common = importlib.util.module_from_spec(mod)
  mod.loader.exec_module(common)
  spec = common.base_spec()
  cfg = PipelineConfig.from_spec(spec)
  assert (cfg.num_threads, cfg.prefetch, cfg.pack) == (spec.data.num_workers, spec.data.prefetch, spec.data.pack)
  assert cfg.eval_batch_size == spec.data.eval_batch_size
  assert PipelineConfig() == cfg  # built without a spec, it means what the spec means
