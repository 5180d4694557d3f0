"""REVEAL reader on a SYNTHETIC CSV (no real REVEAL records may be published; see shared/data/reveal).

tests/fixtures/SYNTHETIC_reveal_eval.csv uses the column names third-party loaders read from
the real file. It has several rows per step (one per evidence passage), step_idx out of order
(including "10" after "2", which a string sort would misplace), answers interleaved, quoted
commas, quotes and newlines, an unknown label value and an answer with no labels.
"""

import pathlib
import shutil

import pytest

from rmjax.data.example import BadRecord
from rmjax.data.reveal import RevealOptions, RevealReader, map_label

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "SYNTHETIC_reveal_eval.csv"
S1 = ("Botanically, a fruit develops from the flower's ovary.",
      "A tomato develops from the flower's ovary,\nso it is a fruit.",
      "So the answer is yes.")
S2 = ("7 + 5 = 12.", "12 is not greater than 11.", "Hence 12 <= 11.", "So the answer is no.")
S4 = ('Water boils at 100 C at "standard" pressure, i.e. at sea level.', "So the answer is maybe.")


def _read(label="correctness", **kw):
  r = RevealReader(str(FIXTURE), options=RevealOptions(label=label), **kw)
  return {e.id: e for e in r}, r


def test_correctness_labels():
  got, r = _read()
  assert list(got) == ["SYNTHETIC-ans-1", "SYNTHETIC-ans-4", "SYNTHETIC-ans-2"]  # file order of first row
  assert got["SYNTHETIC-ans-1"].steps == S1 and got["SYNTHETIC-ans-1"].targets == (1.0, 1.0, 1.0)
  assert got["SYNTHETIC-ans-1"].problem == "[SYNTHETIC] Is a tomato a fruit?"
  assert got["SYNTHETIC-ans-2"].steps == S2 and got["SYNTHETIC-ans-2"].targets == (1.0, 0.0, None, 1.0)
  assert got["SYNTHETIC-ans-4"].steps == S4 and got["SYNTHETIC-ans-4"].targets == (0.0, None)  # "Maybe" unknown
  assert got["SYNTHETIC-ans-4"].problem == '[SYNTHETIC] Does "water, boiling" reach 100 C at sea level?'
  assert r.skips.as_dict() == {"reveal": {"no_supervised_step": 1, "unknown_correctness_label": 1}}


def test_attribution_uses_final_rated_evidence():
  got, r = _read("attribution")
  # ans-1 step 0 has "Partially" (not final) then "Fully" (final) -> 1.0.
  assert got["SYNTHETIC-ans-1"].targets == (1.0, None, None)
  assert got["SYNTHETIC-ans-2"].targets == (0.0, None, None, None)  # Contradictory
  assert got["SYNTHETIC-ans-4"].targets == (0.0, None)  # Unsupported
  assert r.skips.as_dict() == {"reveal": {"no_supervised_step": 1}}


def test_both_takes_the_minimum():
  got, _ = _read("both")
  assert got["SYNTHETIC-ans-1"].targets == (1.0, 1.0, 1.0)
  assert got["SYNTHETIC-ans-2"].targets == (0.0, 0.0, None, 1.0)  # step 0: min(Correct, Contradictory)


def test_label_mapping():
  values = RevealOptions().attribution_values
  assert map_label(" Fully attributable ", values) == (1.0, True)
  assert map_label("partially_supported", values) == (0.5, True)
  assert map_label("", values) == (None, True)
  assert map_label("maybe", values) == (None, False)


def test_missing_column_fails_at_start_with_columns_found(tmp_path):
  text = FIXTURE.read_text().replace("correctness_label", "logic_label", 1)
  (tmp_path / "eval").mkdir()
  (tmp_path / "eval" / "reveal_eval.csv").write_text(text)
  with pytest.raises(ValueError, match=r"lacks required column\(s\) \['correctness_label'\]; columns found: .*logic_label") as e:
    RevealReader(str(tmp_path), split="eval")
  assert "\n" not in str(e.value)
  # A binary file's "header": control bytes escaped, and the list cut short
  (tmp_path / "eval" / "reveal_eval.csv").write_bytes(b",".join(bytes([1, 27, 200, 65 + i % 26]) * 20 for i in range(60)))
  with pytest.raises(ValueError, match=r"columns found: \['\\x01\\x1b.*\.\.\. \(60 columns, is it a CSV file\?\)$") as e:
    RevealReader(str(tmp_path), split="eval")
  assert "\x1b" not in str(e.value) and len(str(e.value)) < 500 + len(str(tmp_path))
  # The attribution column is only required when the label mode uses it.
  no_attr = FIXTURE.read_text().replace("attribution_label", "something_else", 1)
  (tmp_path / "eval" / "reveal_eval.csv").write_text(no_attr)
  assert len(RevealReader(str(tmp_path), split="eval")) == 3
  with pytest.raises(ValueError, match="attribution_label"):
    RevealReader(str(tmp_path), split="eval", options=RevealOptions(label="attribution"))
  named = RevealReader(str(tmp_path), split="eval", options=RevealOptions(label="attribution", attribution_column="something_else"))
  assert len(named) == 3


def test_splits_and_strict(tmp_path):
  with pytest.raises(ValueError, match="unknown split 'test'.*'eval', 'open'"):
    RevealReader(str(tmp_path), split="test")
  with pytest.raises(FileNotFoundError, match="reveal_open.csv"):
    RevealReader(str(tmp_path), split="open")
  shutil.copy(FIXTURE, tmp_path / "reveal_open.csv")
  assert len(RevealReader(str(tmp_path), split="open")) == 3
  with pytest.raises(BadRecord, match=r"SYNTHETIC_reveal_eval\.csv:4: reveal \(unknown_correctness_label\)"):
    RevealReader(str(FIXTURE), strict=True)


def test_bad_rows_poison_their_answer(tmp_path):
  text = FIXTURE.read_text()
  text = text.replace("SYNTHETIC-ans-2,SYNTHETIC-model,SYNTHETIC answer,False,10,",
                      "SYNTHETIC-ans-2,SYNTHETIC-model,SYNTHETIC answer,False,ten,", 1)
  text += "only,three,fields\r\n"  # no answer_id column value: counted as a row
  text += "SYNTHETIC,SYNTHETIC-q1,[SYNTHETIC] Is a tomato a fruit?,SYNTHETIC-ans-1,SYNTHETIC-model\r\n"  # short row
  path = tmp_path / "reveal_eval.csv"
  path.write_text(text)
  r = RevealReader(str(path))
  assert [e.id for e in r] == ["SYNTHETIC-ans-4"]
  assert r.skips.as_dict() == {"reveal": {"bad_step_idx": 1, "wrong_field_count": 2, "no_supervised_step": 1,
                                          "unknown_correctness_label": 1}}
  with pytest.raises(BadRecord, match=r"reveal_eval\.csv:\d+: reveal record rejected \(wrong_field_count\)"):
    RevealReader(str(path), options=RevealOptions(label="attribution"), strict=True)
