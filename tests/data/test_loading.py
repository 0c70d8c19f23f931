"""Sources through `datasets`: files, Dataset objects, synthetic; bad rows raise or are counted."""

import json

import datasets
import numpy as np
import pytest

from rlhf_jax.data import DataError, TokenizeConfig, load_rows, prepare

ROWS = [
    {"prompt": "review the phone", "chosen": "the screen is good .", "rejected": "the screen is bad ."},
    {"prompt": "review the cafe", "chosen": "the food is great .", "rejected": "the food is ok ."},
]
CONFIG = TokenizeConfig(max_length=32)


def _jsonl(path, rows):
  path.write_text("".join(json.dumps(row) + "\n" for row in rows))
  return str(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_every_file_type_gives_the_same_records(tmp_path, word_tokenizer, suffix):
  path = tmp_path / f"prefs{suffix}"
  frame = datasets.Dataset.from_list(ROWS)
  if suffix == ".jsonl":
    _jsonl(path, ROWS)
  elif suffix == ".json":
    path.write_text(json.dumps(ROWS))
  elif suffix == ".parquet":
    frame.to_parquet(str(path))
  else:
    frame.to_csv(str(path), index=False)
  records, stats = prepare("pair", str(path), word_tokenizer, CONFIG)
  reference, _ = prepare("pair", frame, word_tokenizer, CONFIG)
  assert stats.kept == 2 and stats.rows == 2
  for got, want in zip(records, reference):
    assert (got.prompt == want.prompt).all() and (got.chosen == want.chosen).all()


def _write(path, rows):
  frame = datasets.Dataset.from_list(rows)
  if path.suffix == ".jsonl":
    _jsonl(path, rows)
  elif path.suffix == ".parquet":
    frame.to_parquet(str(path))
  else:
    frame.to_csv(str(path), index=False)
  return str(path)


def _same_records(got, want):
  assert len(got) == len(want)
  for a, b in zip(got, want):
    assert type(a) is type(b)
    for field in ("prompt", "completion", "label", "ranks"):
      if hasattr(a, field):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    for x, y in zip(getattr(a, "completions", ()), getattr(b, "completions", ())):
      assert np.array_equal(x, y)


USER_CAFE = {"role": "user", "content": "review the cafe"}
KTO_TEXT = [{"prompt": "review the cafe", "completion": "the food is good .", "label": True},
            {"prompt": "review the show", "completion": "the plot is bad .", "label": False}]
KTO_CHAT = [{"prompt": [USER_CAFE], "completion": [{"role": "assistant",
                                                   "content": "the food is good ."}],
             "label": True}]
RANKED_TEXT = [{"prompt": "review the cafe", "completions": ["the food is good .",
                                                             "the food is bad ."], "ranks": [0, 1]}]
RANKED_CHAT = [{"prompt": [USER_CAFE], "completions": [
    [{"role": "assistant", "content": "the food is good ."}],
    [{"role": "assistant", "content": "the food is bad ."}]], "ranks": [1, 0]}]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".csv"])
@pytest.mark.parametrize("kind, rows", [("unpaired", KTO_TEXT), ("unpaired", KTO_CHAT),
                                        ("ranked", RANKED_TEXT), ("ranked", RANKED_CHAT)])
def test_kto_and_ranked_rows_from_files(tmp_path, word_tokenizer, suffix, kind, rows):
  path = _write(tmp_path / f"rows{suffix}", rows)
  lists = kind == "ranked" or isinstance(rows[0]["prompt"], list)
  if suffix == ".csv" and lists:
    # CSV cells are scalars: the lists arrive as their text, a bad row rather than training text.
    with pytest.raises(DataError, match=r"rows\.csv, line 2, field '(prompt|completions)'.*CSV "
                                        r"cannot hold lists"):
      prepare(kind, path, word_tokenizer, CONFIG)
    return
  records, stats = prepare(kind, path, word_tokenizer, CONFIG)
  assert stats.kept == len(rows)
  _same_records(records, prepare(kind, rows, word_tokenizer, CONFIG)[0])


def test_saved_dataset_directory(tmp_path, word_tokenizer):
  datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
  records, _ = prepare("pair", str(tmp_path / "saved"), word_tokenizer, CONFIG)
  assert len(records) == 2


def test_saved_dataset_dict_split_and_the_trainers_eval_split(tmp_path, word_tokenizer):
  from rlhf_jax.train import common

  path = str(tmp_path / "saved_dict")
  datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(ROWS),
                        "test_prefs": datasets.Dataset.from_list(ROWS[:1])}).save_to_disk(path)
  records, _ = prepare("pair", path, word_tokenizer, CONFIG, split="test_prefs")
  assert len(records) == 1
  with pytest.raises(ValueError, match=r"splits \['test_prefs', 'train_prefs'\], not 'train'"):
    prepare("pair", path, word_tokenizer, CONFIG)
  # A hub-style layout: train on one split, evaluate on another of the same dataset.
  spec = common.DataSpec(train=path, split="train_prefs", eval=path, eval_split="test_prefs",
                         max_length=32)
  train, evaluation, _ = common.load_data("pair", spec, word_tokenizer, seed=0)
  assert (len(train), len(evaluation)) == (2, 1)


def test_bad_row_error_names_file_line_and_field(tmp_path, word_tokenizer):
  # A JSON Lines file is located by its (1-based) line: the third row is on line 3.
  rows = ROWS + [{"prompt": "review the show", "chosen": "the plot is ok .",
                  "rejected": "the plot is ok ."}]
  path = _jsonl(tmp_path / "prefs.jsonl", rows)
  with pytest.raises(DataError, match=r"prefs\.jsonl, line 3, field 'rejected': chosen and "
                                      r"rejected are identical") as info:
    prepare("pair", path, word_tokenizer, CONFIG)
  assert (info.value.row, info.value.line) == (2, 3)
  assert ", row " not in str(info.value)  # one numbering in the message, not rows next to lines


def test_blank_lines_hold_no_row_but_count_as_lines(tmp_path, word_tokenizer):
  path = tmp_path / "prefs.jsonl"
  bad = {"prompt": "review the show", "chosen": "the plot is ok ."}
  path.write_text("\n".join([json.dumps(ROWS[0]), "", "  ", json.dumps(ROWS[1]), json.dumps(bad)])
                  + "\n")
  with pytest.raises(DataError, match=r"prefs\.jsonl, line 5, field 'rejected': missing"):
    prepare("pair", str(path), word_tokenizer, CONFIG)


def test_a_csv_row_is_located_by_the_line_it_starts_on(tmp_path, word_tokenizer):
  # Line 1 is the header, line 3 is empty, the row on line 4 has a cell spanning two lines: the
  # third row, whose "rejected" is empty, starts on line 6.
  path = tmp_path / "prefs.csv"
  path.write_text('prompt,chosen,rejected\nreview the phone,the screen is good .,the screen is '
                  'bad .\n\n"review\nthe cafe",the food is great .,the food is ok .\n'
                  'review the cafe,the food is great .,\n')
  with pytest.raises(DataError, match=r"prefs\.csv, line 6, field 'rejected': missing"):
    prepare("pair", str(path), word_tokenizer, CONFIG)


def test_a_json_array_file_is_located_by_row(tmp_path, word_tokenizer):
  path = tmp_path / "prefs.json"  # one JSON array: its rows have no lines of their own
  path.write_text(json.dumps(ROWS + [{"prompt": "review the show", "chosen": "ok ."}], indent=2))
  with pytest.raises(DataError, match=r"prefs\.json, row 2, field 'rejected': missing"):
    prepare("pair", str(path), word_tokenizer, CONFIG)


def test_missing_field_in_a_file(tmp_path, word_tokenizer):
  rows = ROWS + [{"prompt": "review the show", "chosen": "the plot is ok ."}]
  path = _jsonl(tmp_path / "prefs.jsonl", rows)
  with pytest.raises(DataError, match=r"line 3, field 'rejected': missing"):
    prepare("pair", path, word_tokenizer, CONFIG)


def test_a_field_whose_type_changes_between_rows_is_located(tmp_path, word_tokenizer):
  rows = ROWS + [{"prompt": "review the show", "chosen": "the plot is ok .", "rejected": 7}]
  path = _jsonl(tmp_path / "prefs.jsonl", rows)
  with pytest.raises(DataError, match=r"prefs\.jsonl, line 3, field 'rejected': expected a string"):
    prepare("pair", path, word_tokenizer, CONFIG)


def test_when_arrow_rejects_a_file_the_row_is_still_located(tmp_path, word_tokenizer, monkeypatch):
  # Older `datasets` releases fail on a column whose type changes; the file is then re-read
  # line by line so the error still names the line and the field.
  rows = ROWS + [{"prompt": "review the show", "chosen": "the plot is ok .", "rejected": 7}]
  path = _jsonl(tmp_path / "prefs.jsonl", rows)

  def arrow_fails(*args, **kwargs):
    raise datasets.exceptions.DatasetGenerationError("An error occurred while generating")

  monkeypatch.setattr(datasets, "load_dataset", arrow_fails)
  with pytest.raises(DataError, match=r"prefs\.jsonl, line 3, field 'rejected': expected str as "
                                      r"on line 1 \(every row must use the same type for a "
                                      r"field\), got int"):
    prepare("pair", path, word_tokenizer, CONFIG)


def test_invalid_json_line_is_located(tmp_path, word_tokenizer):
  path = tmp_path / "prefs.jsonl"
  path.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
  with pytest.raises(DataError, match=r"prefs\.jsonl, line 2: expected a JSON object, got invalid "
                                      r"JSON \("):
    prepare("pair", str(path), word_tokenizer, CONFIG)


def test_skip_mode_drops_and_counts_each_reason(tmp_path, word_tokenizer, caplog):
  rows = ROWS + [
      {"prompt": "review the show", "chosen": "the plot is ok .", "rejected": "the plot is ok ."},
      {"prompt": "review the show", "chosen": "", "rejected": "the plot is ok ."},
      {"prompt": "review the show " * 20, "chosen": "the plot is ok .", "rejected": "the end ."},
  ]
  records, stats = prepare("pair", rows, word_tokenizer, CONFIG, on_bad_row="skip")
  assert len(records) == 2 and stats.rows == 5 and stats.kept == 2
  assert sum(stats.skipped.values()) == 3 and len(stats.skipped) == 3
  assert "3 skipped" not in stats.summary() and "2/5 rows kept" in stats.summary()
  assert sum("skipping bad row" in r.message for r in caplog.records) == 3


def test_all_rows_bad_is_an_error_even_when_skipping(word_tokenizer):
  with pytest.raises(DataError, match="no usable rows"):
    prepare("pair", [{"prompt": "p", "chosen": "a"}], word_tokenizer, CONFIG, on_bad_row="skip")


def test_over_length_rows_are_truncated_and_counted(word_tokenizer):
  rows = [{"prompt": "review the show", "chosen": "the plot is ok . " * 10,
           "rejected": "the plot is bad ."}]
  records, stats = prepare("pair", rows, word_tokenizer, TokenizeConfig(max_length=20))
  assert stats.truncated == 1 and len(records[0].prompt) + len(records[0].chosen) == 20
  _, stats = prepare("pair", rows + ROWS, word_tokenizer,
                     TokenizeConfig(max_length=20, on_overflow="skip"))
  assert stats.kept == 2 and stats.skipped["over max_length"] == 1


def test_synthetic_sources(word_tokenizer):
  for kind in ("sft", "pair", "unpaired", "ranked"):
    records, stats = prepare(kind, f"synthetic:{kind}", word_tokenizer, CONFIG, num_rows=16)
    assert stats.kept == 16
  rows_a, _ = load_rows("synthetic:pair:3", num_rows=8)
  rows_b, _ = load_rows("synthetic:pair:3", num_rows=8)
  assert rows_a.to_list() == rows_b.to_list()  # seeded


def test_unknown_file_type_is_an_error(tmp_path):
  path = tmp_path / "prefs.txt"
  path.write_text("hello")
  with pytest.raises(ValueError, match="unsupported data file type"):
    load_rows(str(path))
