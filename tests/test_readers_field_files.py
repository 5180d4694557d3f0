"""How the field readers find and store records: parquet, JSON arrays, split directories, the
Hugging Face cache, and the preview CLI round trip through the `rmjax` reader."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rmjax.data import preview
from rmjax.data.example import BadRecord
from rmjax.data.sources import build_source

REAL = {  # reader -> the real records it reads, under shared/data
    "processbench": "processbench/processbench_olympiadbench.subset.jsonl",
    "math_shepherd": "math_shepherd/openr_samples_math-shepherd.subset.jsonl",
    "stepwise": "trl_stepwise/prm800k_phase1_to_trl.derived.jsonl",
}


def _records(path):
  return [json.loads(line) for line in open(path, encoding="utf-8")]


def _same(a, b):
  """Equal examples apart from the source name (a run names its sources itself)."""
  return [(e.id, e.problem, e.steps, e.targets, e.meta) for e in a] == \
      [(e.id, e.problem, e.steps, e.targets, e.meta) for e in b]


@pytest.mark.parametrize("reader", sorted(REAL))
def test_parquet_and_json_array_copies_read_like_the_jsonl(shared_data, tmp_path, reader):
  """The hub's storage forms of the same records: a parquet shard directory and a JSON array."""
  jsonl = shared_data / REAL[reader]
  records = _records(jsonl)
  (tmp_path / "data").mkdir()
  pq.write_table(pa.Table.from_pylist(records), tmp_path / "data" / "train-00000-of-00001.parquet")
  (tmp_path / "test.json").write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")
  base = list(build_source(reader, {"path": str(jsonl)}))
  from_parquet = list(build_source(reader, {"path": str(tmp_path)}, split="train"))
  from_array = list(build_source(reader, {"path": str(tmp_path)}, split="test"))
  assert len(base) == len(records)
  # Ids fall back to "<file stem>:<n>" where records have none; the rest is identical.
  strip = lambda xs: [(e.problem, e.steps, e.targets, e.meta) for e in xs]  # noqa: E731
  assert strip(from_parquet) == strip(base) == strip(from_array)
  assert from_parquet[0].id in (base[0].id, "train-00000-of-00001:1")


def test_broken_array_tail_and_jsonl_named_json(tmp_path):
  rows = [{"problem": "p", "steps": ["a"], "targets": [1.0]}] * 3
  text = json.dumps(rows)
  (tmp_path / "cut.json").write_text(text[:-20])
  reader = build_source("rmjax", {"path": str(tmp_path / "cut.json")})
  assert len(list(reader)) == 2 and reader.skips.as_dict() == {"rmjax": {"bad_json": 1}}
  with pytest.raises(BadRecord, match="cut.json"):
    build_source("rmjax", {"path": str(tmp_path / "cut.json")}, strict=True)
  (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in rows))
  assert len(list(build_source("rmjax", {"path": str(tmp_path / "lines.json")}))) == 3
  (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
  with pytest.raises(ValueError, match="bad.parquet: cannot read parquet"):
    build_source("rmjax", {"path": str(tmp_path / "bad.parquet")})
  (tmp_path / "x.csv").write_text("problem,steps\n")
  with pytest.raises(ValueError, match="is not a .jsonl/.json/.parquet file"):
    build_source("rmjax", {"path": str(tmp_path / "x.csv")})


def test_hf_paths_resolve_offline_in_the_local_cache(tmp_path, monkeypatch):
  import huggingface_hub.constants as hf_constants
  monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
  repo = tmp_path / "datasets--Qwen--ProcessBench"
  (repo / "refs").mkdir(parents=True)
  (repo / "refs" / "main").write_text("0123abc")
  snap = repo / "snapshots" / "0123abc"
  snap.mkdir(parents=True)
  (snap / "gsm8k.json").write_text(json.dumps([{"id": "gsm8k-0", "problem": "p", "steps": ["a", "b"], "label": 1}]))
  reader = build_source("pb", {"reader": "processbench", "path": "hf://datasets/Qwen/ProcessBench"}, split="gsm8k")
  assert reader[0].id == "gsm8k-0" and reader[0].targets == (1.0, 0.0)
  one_file = build_source("pb", {"reader": "processbench", "path": "hf://datasets/Qwen/ProcessBench/gsm8k.json"})
  assert len(one_file) == 1
  with pytest.raises(FileNotFoundError) as e:
    build_source("ms", {"reader": "math_shepherd", "path": "hf://datasets/peiyi9979/Math-Shepherd"})
  assert str(e.value).count("\n") == 0
  assert "peiyi9979/Math-Shepherd is not in the local Hugging Face cache" in str(e.value)
  assert "huggingface-cli download --repo-type dataset peiyi9979/Math-Shepherd" in str(e.value)
  with pytest.raises(ValueError, match="expected hf://datasets/<owner>/<name>"):
    build_source("ms", {"reader": "math_shepherd", "path": "hf://models/x"})


@pytest.mark.parametrize("reader", sorted(REAL))
def test_preview_prints_jsonl_that_reads_back_the_same(shared_data, tmp_path, capsys, reader):
  assert preview.main(["--source", reader, "--path", str(shared_data / REAL[reader])]) == 0
  out, err = capsys.readouterr()
  rows = [json.loads(line) for line in out.splitlines()]
  assert len(rows) == len(_records(shared_data / REAL[reader])) and "skipped records" in err
  assert all(r["source"] == reader and len(r["steps"]) == len(r["targets"]) for r in rows)
  printed = tmp_path / "printed.jsonl"
  printed.write_text(out, encoding="utf-8")
  assert preview.main(["--source", "rmjax", "--path", str(printed)]) == 0
  again, _ = capsys.readouterr()
  assert [dict(json.loads(l), source=reader) for l in again.splitlines()] == rows  # the JSONL itself
  assert _same(build_source("rmjax", {"path": str(printed)}), build_source(reader, {"path": str(shared_data / REAL[reader])}))


def test_preview_of_a_field_reader_names_its_format_when_nothing_reads(tmp_path, capsys):
  path = tmp_path / "other.jsonl"
  path.write_text('{"question": "q"}\n')
  assert preview.main(["--source", "stepwise", "--path", str(path)]) == 0
  assert "prompt, completions and labels" in capsys.readouterr().err
  assert preview.main(["--source", "math_shepherd", "--path", str(path), "--set", "step_tagg=x"]) == 2
  assert "unknown --set option(s) step_tagg" in capsys.readouterr().err


def test_random_access_from_threads_matches_file_order(shared_data, tmp_path):
  """grain reads a source from a thread pool: concurrent reads give file order's examples and
  count each bad record once."""
  from concurrent.futures import ThreadPoolExecutor
  records = _records(shared_data / REAL["stepwise"])
  rows = records + [{"prompt": "p", "completions": ["a"], "labels": [2.0]}]
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
  (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  for name in ("rows.parquet", "rows.jsonl"):
    reader = build_source("stepwise", {"path": str(tmp_path / name)})
    order = list(range(len(reader))) * 4
    with ThreadPoolExecutor(8) as pool:
      got = list(pool.map(lambda i: reader[i], order))
    assert got[:len(reader)] == [reader[i] for i in range(len(reader))] and got[-1] is None
    assert reader.skips.as_dict() == {"stepwise": {"bad_labels": 1}}
