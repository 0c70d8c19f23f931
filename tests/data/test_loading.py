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


# Checks of a data file before its rows are used: encoding, emptiness, numbers, roles, duplicates.


def _prepare_error(kind, source, tokenizer) -> str:
  """The DataError message `prepare` raises on this source."""
  with pytest.raises(DataError) as info:
    prepare(kind, source, tokenizer, CONFIG)
  return str(info.value)

def test_a_file_that_is_not_utf8_names_the_byte_offset_and_line(tmp_path, word_tokenizer):
  path = tmp_path / "prefs.jsonl"
  first = json.dumps(ROWS[0]) + "\n"
  path.write_bytes(first.encode() + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
  offset = len(first) + len('{"prompt": "caf')
  error = _prepare_error("pair", str(path), word_tokenizer)
  assert error == (f"{path}, line 2: expected UTF-8 text, got the byte 0xe9 at byte "
                  f"offset {offset} (re-save the file as UTF-8)")


def test_a_bad_byte_past_the_first_read_chunk_is_located_exactly(tmp_path, word_tokenizer):
  # "é" (2 bytes) straddles the 1 MiB read boundary; the bad byte comes after it.
  path = tmp_path / "rows.csv"
  head = b"text\n" + b"x" * ((1 << 20) - 6)
  path.write_bytes(head + "é".encode() + b"\n\xff\n")
  error = _prepare_error("sft", str(path), word_tokenizer)
  assert error == (f"{path}, line 3: expected UTF-8 text, got the byte 0xff at byte "
                  f"offset {len(head) + 3} (re-save the file as UTF-8)")


@pytest.mark.parametrize("name, content, message", [
    ("empty.jsonl", "", "the data file is empty (0 bytes)"),
    ("blank.jsonl", "\n  \n", "the data file is empty (whitespace only)"),
    ("header.csv", "prompt,chosen,rejected\n",
     "the data file is empty: it holds no rows (a CSV header or an empty JSON list only)"),
    ("list.json", "[]",
     "the data file is empty: it holds no rows (a CSV header or an empty JSON list only)"),
])
def test_an_empty_data_file_says_it_is_empty(tmp_path, word_tokenizer, name, content, message):
  path = tmp_path / name
  path.write_text(content)
  error = _prepare_error("pair", str(path), word_tokenizer)
  assert error == f"{path}: {message}"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_margin_that_is_not_finite_names_the_line_and_column(tmp_path, word_tokenizer, value):
  path = tmp_path / "prefs.jsonl"
  _jsonl(path, [ROWS[0], {**ROWS[1], "margin": 1.0}, {**ROWS[0], "margin": value}])
  error = _prepare_error("pair", str(path), word_tokenizer)
  assert error == (f"{path}, line 3, field 'margin': expected a finite number, "
                  f"got {value!r}")


def test_a_margin_that_is_not_finite_in_parquet_names_the_row(tmp_path, word_tokenizer):
  path = tmp_path / "prefs.parquet"
  datasets.Dataset.from_list([{**ROWS[0], "margin": 0.5},
                              {**ROWS[1], "margin": float("nan")}]).to_parquet(str(path))
  error = _prepare_error("pair", str(path), word_tokenizer)
  assert error == f"{path}, row 1, field 'margin': expected a finite number, got nan"


@pytest.mark.parametrize("cell, value", [("nan", "nan"), ("NaN", "nan"), ("inf", "inf"),
                                         ("-inf", "-inf"), ("-Inf", "-inf")])
def test_a_csv_margin_that_is_not_finite_names_the_line_and_column(tmp_path, word_tokenizer,
                                                                   cell, value):
  """The CSV reader reads "nan" as a missing value; it is a bad cell, as it is in JSON Lines."""
  path = tmp_path / "prefs.csv"
  path.write_text("prompt,chosen,rejected,margin\n"
                  "review the phone,the screen is good .,the screen is bad .,0.5\n"
                  "\n"  # an empty line holds no row: the line count still names the right line
                  f"review the cafe,the food is great .,the food is ok .,{cell}\n")
  error = _prepare_error("pair", str(path), word_tokenizer)
  assert error == f"{path}, line 4, field 'margin': expected a finite number, got {value}"


def test_an_empty_csv_margin_is_a_missing_margin(tmp_path, word_tokenizer):
  path = tmp_path / "prefs.csv"
  path.write_text("prompt,chosen,rejected,margin\n"
                  "review the phone,the screen is good .,the screen is bad .,0.5\n"
                  "review the cafe,the food is great .,the food is ok .,\n")
  records, stats = prepare("pair", str(path), word_tokenizer, CONFIG)
  assert stats.kept == 2 and [r.margin for r in records] == [0.5, 0.0]  # 0: no margin


TOOL_CHAT = {"messages": [{"role": "user", "content": "review the phone"},
                          {"role": "tool", "content": "the screen"},
                          {"role": "assistant", "content": "the screen is good ."}]}
SFT_CHAT = {"messages": [{"role": "user", "content": "review the cafe"},
                         {"role": "assistant", "content": "the food is good ."}]}
# One branch per known role, as many real templates are: any other role would vanish.
TWO_ROLES = ("{% for m in messages %}{% if m['role'] == 'user' %}<|user|> {{ m['content'] }} "
             "{% elif m['role'] == 'assistant' %}<|assistant|> {{ m['content'] }} <eos> "
             "{% else %}RAISE{% endif %}{% endfor %}"
             "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def _with_template(tokenizer, template):
  import copy
  tokenizer = copy.deepcopy(tokenizer)
  tokenizer.chat_template = template
  return tokenizer


def test_a_role_the_chat_template_writes_as_unk_is_a_data_error(tmp_path, word_tokenizer):
  # The embedded template writes any role as "<|role|>": "<|tool|>" is not in the vocabulary.
  path = tmp_path / "chat.jsonl"
  _jsonl(path, [SFT_CHAT, TOOL_CHAT])
  error = _prepare_error("sft", str(path), word_tokenizer)
  assert error == (
      f"{path}, line 2, field 'messages[1].role': role 'tool' is not one the tokenizer's chat "
      "template handles (the template writes it as text the tokenizer reads as <unk>); it "
      "handles the roles ['assistant', 'system', 'user']")
  records, stats = prepare("sft", str(path), word_tokenizer, CONFIG, on_bad_row="skip")
  assert len(records) == 1 and sum(stats.skipped.values()) == 1


def test_a_role_the_chat_template_drops_or_rejects_is_a_data_error(tmp_path, word_tokenizer):
  path = tmp_path / "chat.jsonl"
  _jsonl(path, [{"messages": [{"role": "system", "content": "be brief"}, *SFT_CHAT["messages"]]}])
  dropping = _with_template(word_tokenizer, TWO_ROLES.replace("RAISE", ""))
  error = _prepare_error("sft", str(path), dropping)
  assert error == (
      f"{path}, line 1, field 'messages[0].role': role 'system' is not one the tokenizer's chat "
      "template handles (the template leaves its content out); it handles the roles "
      "['assistant', 'user']")
  raising = _with_template(word_tokenizer, TWO_ROLES.replace(
      "RAISE", "{{ raise_exception('Only user and assistant roles are supported!') }}"))
  error = _prepare_error("sft", str(path), raising)
  assert error == (
      f"{path}, line 1, field 'messages[0].role': role 'system' is not one the tokenizer's chat "
      "template handles (rendering it raises TemplateError: Only user and assistant roles are "
      "supported!); it handles the roles ['assistant', 'user']")


def test_exact_duplicate_rows_are_counted_and_kept_or_dropped(tmp_path, word_tokenizer):
  path = tmp_path / "prefs.jsonl"
  _jsonl(path, [ROWS[0], ROWS[1], ROWS[0], ROWS[0]])
  records, stats = prepare("pair", str(path), word_tokenizer, CONFIG)
  assert len(records) == 4 and stats.summary() == (
      f"{path}: 4/4 rows kept; truncated 0; skipped: none; exact duplicates: 2 kept")
  records, stats = prepare("pair", str(path), word_tokenizer, CONFIG, duplicates="drop")
  assert len(records) == 2 and stats.summary() == (
      f"{path}: 2/4 rows kept; truncated 0; skipped: none; exact duplicates: 2 dropped")
  # Equal rows only: a row differing in any field (here the margin) is not a duplicate.
  _jsonl(path, [ROWS[0], {**ROWS[0], "margin": 1.0}])
  assert prepare("pair", str(path), word_tokenizer, CONFIG)[1].duplicates == 0


def test_dropped_duplicates_never_land_in_both_train_and_held_out_rows(tmp_path, word_tokenizer):
  from rlhf_jax.train.common import DataSpec, load_data

  rows = [{"prompt": f"review the {item}", "chosen": "the food is good .",
           "rejected": "the food is bad ."} for item in ("phone", "cafe", "show", "hotel")]
  train, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
  _jsonl(train, rows * 3)

  def keys(records):
    return {(r.prompt.tobytes(), r.chosen.tobytes()) for r in records}

  for seed in range(3):
    spec = DataSpec(train=str(train), eval_fraction=0.5, max_length=32, duplicates="drop")
    train_records, eval_records, stats = load_data("pair", spec, word_tokenizer, seed)
    assert stats.duplicates == 8 and len(train_records) + len(eval_records) == 4
    assert not keys(train_records) & keys(eval_records)
  _jsonl(held, [rows[0], {**rows[0], "prompt": "review the camera"}])
  spec = DataSpec(train=str(train), eval=str(held), max_length=32, duplicates="drop")
  _, eval_records, _ = load_data("pair", spec, word_tokenizer, 0)
  assert len(eval_records) == 1 and not keys(eval_records) & keys(train_records)


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Llama 2's: a system turn is written inside the first user turn; roles must alternate.
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set sys = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set sys = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and sys != false %}"
    "{% set content = '<<SYS>>\\n' + sys + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}")


def test_typical_templates_handle_the_roles_they_render(tmp_path, bpe_tokenizer):
  from rlhf_jax.data import tokenize

  chatml = _with_template(bpe_tokenizer, CHATML)  # writes any role: every one is handled
  assert tokenize.template_roles(chatml) == sorted(tokenize.COMMON_ROLES)
  path = tmp_path / "chat.jsonl"
  _jsonl(path, [TOOL_CHAT])
  assert len(prepare("sft", str(path), chatml, TokenizeConfig(max_length=512))[0]) == 1
  llama2 = _with_template(bpe_tokenizer, LLAMA2)
  assert tokenize.template_roles(llama2) == ["assistant", "system", "user"]
  error = _prepare_error("sft", str(path), llama2)
  assert error == (
      f"{path}, line 1, field 'messages[1].role': role 'tool' is not one the tokenizer's chat "
      "template handles (rendering it raises TemplateError: Conversation roles must alternate "
      "user/assistant/user/assistant/...); it handles the roles ['assistant', 'system', 'user']")


@pytest.mark.parametrize("kind, row, field, message", [
    ("unpaired", {**KTO_TEXT[0], "label": float("nan")}, "label",
     "expected a bool (true = desirable), got nan"),
    ("pair", {**ROWS[0], "objective": float("inf")}, "objective",
     "expected a non-negative int (a reward head), got inf"),
    ("ranked", {**RANKED_TEXT[0], "ranks": [0, float("nan")]}, "ranks",
     "expected 2 non-negative ints (one per completion, 0 = best), got [0, nan]"),
])
def test_the_other_numeric_columns_refuse_nan_and_inf(word_tokenizer, kind, row, field, message):
  # margin is the one float the formats read; the label, head and ranks are bools and ints.
  error = _prepare_error(kind, [row], word_tokenizer)
  assert error == f"<rows>, row 0, field {field!r}: {message}"
