"""Every row format normalises to the same examples; every kind of bad row gets its error."""

import pytest

from rlhf_jax.data import formats
from rlhf_jax.data.formats import (DataError, PairExample, RankedExample, SFTExample,
                                   UnpairedExample)

SYSTEM = {"role": "system", "content": "Answer briefly."}
USER = {"role": "user", "content": "What is 2+2?"}
GOOD = {"role": "assistant", "content": "4"}
BAD = {"role": "assistant", "content": "5"}


def test_sft_formats_agree():
  from_messages = formats.normalize_sft({"messages": [USER, GOOD]})
  from_prompt_completion = formats.normalize_sft({"prompt": [USER], "completion": [GOOD]})
  assert from_messages == from_prompt_completion == SFTExample((USER,), (GOOD,))
  assert formats.normalize_sft({"text": "hello"}) == SFTExample("", "hello")
  assert formats.normalize_sft({"prompt": "Q:", "completion": " A"}) == SFTExample("Q:", " A")


def test_pair_string_formats_agree():
  explicit = formats.normalize_pair(
      {"prompt": "The answer is", "chosen": " yes", "rejected": " no"})
  implicit = formats.normalize_pair({"chosen": "The answer is yes", "rejected": "The answer is no"})
  assert explicit == implicit == PairExample("The answer is", " yes", " no")


def test_pair_conversational_formats_agree():
  explicit = formats.normalize_pair({"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]})
  implicit = formats.normalize_pair({"chosen": [USER, GOOD], "rejected": [USER, BAD]})
  hh = formats.normalize_pair({"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4",
                               "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 5"})
  assert explicit == implicit == hh == PairExample((USER,), (GOOD,), (BAD,))


def test_string_prompt_with_conversational_pairs_agrees_with_the_explicit_form():
  explicit = formats.normalize_pair({"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]})
  # HuggingFaceH4/ultrafeedback_binarized: whole conversations that repeat the user turn.
  whole = formats.normalize_pair({"prompt": "What is 2+2?", "chosen": [USER, GOOD],
                                  "rejected": [USER, BAD]})
  # Only the assistant turns: the string prompt becomes the user turn.
  answers = formats.normalize_pair({"prompt": "What is 2+2?", "chosen": [GOOD], "rejected": [BAD]})
  assert explicit == whole == answers == PairExample((USER,), (GOOD,), (BAD,))
  # A shared system turn stays in the prompt; the prompt string is its last user turn.
  with_system = formats.normalize_pair({"prompt": "What is 2+2?", "chosen": [SYSTEM, USER, GOOD],
                                        "rejected": [SYSTEM, USER, BAD]})
  assert with_system == PairExample((SYSTEM, USER), (GOOD,), (BAD,))


@pytest.mark.parametrize("row, field, message", [
    ({"prompt": "What is 3+3?", "chosen": [USER, GOOD], "rejected": [USER, BAD]}, "prompt",
     "does not match the last user turn"),
    ({"prompt": "What is 2+2?", "chosen": [GOOD], "rejected": [USER, BAD]}, None,
     "all be assistant turns or all whole conversations"),
    ({"prompt": "What is 2+2?", "chosen": [USER, GOOD], "rejected": [SYSTEM, BAD]}, "chosen",
     "share none"),
    ({"prompt": "What is 2+2?", "chosen": [USER, GOOD], "rejected": [USER]}, "rejected",
     "no response after the prompt"),
])
def test_string_prompt_that_disagrees_with_the_conversations(row, field, message):
  with pytest.raises(DataError, match=message) as info:
    formats.normalize_pair(row, "uf.jsonl", 4)
  assert str(info.value).startswith("uf.jsonl, row 4") and info.value.field == field


def test_unpaired_forms_agree():
  want = UnpairedExample((USER,), (GOOD,), True)
  assert formats.normalize_unpaired({"prompt": [USER], "completion": [GOOD], "label": True}) == want
  assert formats.normalize_unpaired(
      {"prompt": "What is 2+2?", "completion": [GOOD], "label": True}) == want
  assert formats.normalize_unpaired(
      {"prompt": "What is 2+2?", "completion": [USER, GOOD], "label": True}) == want
  assert formats.normalize_unpaired({"prompt": "Q:", "completion": " 4", "label": False}) == (
      UnpairedExample("Q:", " 4", False))
  with pytest.raises(DataError, match="mix plain strings"):
    formats.normalize_unpaired({"prompt": [USER], "completion": "4", "label": True})


def test_ranked_forms_agree():
  want = RankedExample((USER,), ((GOOD,), (BAD,)), (0, 1))
  for prompt, completions in (([USER], [[GOOD], [BAD]]), ("What is 2+2?", [[GOOD], [BAD]]),
                              ("What is 2+2?", [[USER, GOOD], [USER, BAD]])):
    assert formats.normalize_ranked({"prompt": prompt, "completions": completions,
                                     "ranks": [0, 1]}) == want
  assert formats.normalize_ranked({"prompt": "Q:", "completions": [" 4", " 5"], "ranks": [0, 1]}
                                  ) == RankedExample("Q:", (" 4", " 5"), (0, 1))
  # A string among message lists (or the reverse) is one row mixing forms.
  for prompt, completions in (("What is 2+2?", [[GOOD], "5"]), ([USER], [[GOOD], "5"])):
    with pytest.raises(DataError, match="mix plain strings"):
      formats.normalize_ranked({"prompt": prompt, "completions": completions, "ranks": [0, 1]})
  with pytest.raises(DataError, match="CSV cannot hold lists") as info:
    formats.normalize_ranked({"prompt": "Q:", "completions": "['a' 'b']", "ranks": "[0 1]"})
  assert info.value.field == "completions"


def test_hh_multi_turn_keeps_the_history_in_the_prompt():
  text = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant: "
  example = formats.normalize_pair({"chosen": text + "4", "rejected": text + "5"})
  assert [m["role"] for m in example.prompt] == ["user", "assistant", "user"]
  assert example.chosen == ({"role": "assistant", "content": "4"},)


def test_pair_margin_and_unpaired_and_ranked():
  assert formats.normalize_pair({"prompt": "p", "chosen": "a", "rejected": "b",
                                 "margin": 2}).margin == 2.0
  unpaired = formats.normalize_unpaired({"prompt": "p", "completion": "a", "label": False})
  assert unpaired.label is False
  ranked = formats.normalize_ranked({"prompt": "p", "completions": ["a", "b", "c"],
                                     "ranks": [1, 0, 1]})
  assert ranked.completions == ("a", "b", "c") and ranked.ranks == (1, 0, 1)


@pytest.mark.parametrize("row, field, message", [
    ({"prompt": "p", "chosen": "a"}, "rejected", "missing"),
    ({"prompt": "p", "chosen": "a", "rejected": None}, "rejected", "missing"),
    ({"prompt": "p", "chosen": "a", "rejected": 3}, "rejected", "expected a string or a list"),
    ({"prompt": "p", "chosen": "  ", "rejected": "b"}, "chosen", "empty response"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "rejected", "identical"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}, "margin", "number"),
    ({"prompt": [USER], "chosen": "a", "rejected": "b"}, None, "mix plain strings"),
    ({"prompt": [{"role": "user"}], "chosen": [GOOD], "rejected": [BAD]}, "prompt", "message 0"),
])
def test_bad_pair_rows_name_source_row_and_field(row, field, message):
  with pytest.raises(DataError, match=message) as info:
    formats.normalize_pair(row, "prefs.jsonl", 7)
  assert str(info.value).startswith("prefs.jsonl, row 7")
  assert info.value.field == field


@pytest.mark.parametrize("normalize, row, field, message", [
    (formats.normalize_sft, {"messages": [USER]}, "messages", "last message"),
    (formats.normalize_sft, {"input": "x"}, None, "no SFT fields"),
    (formats.normalize_sft, {"prompt": "p", "completion": ""}, "completion", "empty"),
    (formats.normalize_sft, {"messages": [USER, {"role": "assistant", "content": " "}]},
     "messages[1].content", "empty"),
    (formats.normalize_ranked, {"prompt": "p", "completions": ["a", " "], "ranks": [0, 1]},
     "completions[1]", "empty"),
    (formats.normalize_unpaired, {"prompt": "p", "completion": "a", "label": 1}, "label", "bool"),
    (formats.normalize_unpaired, {"prompt": "p", "completion": "a"}, "label", "missing"),
    (formats.normalize_ranked, {"prompt": "p", "completions": ["a"], "ranks": [0]},
     "completions", "at least 2"),
    (formats.normalize_ranked, {"prompt": "p", "completions": ["a", "b"], "ranks": [0]},
     "ranks", "non-negative ints"),
    (formats.normalize_ranked, {"prompt": "p", "completions": ["a", "b"], "ranks": [1, 1]},
     "ranks", "tied"),
])
def test_bad_rows_of_other_kinds(normalize, row, field, message):
  with pytest.raises(DataError, match=message) as info:
    normalize(row, "data.jsonl", 2)
  assert info.value.field == field and info.value.row == 2


def test_prompt_rows():
  assert formats.normalize_prompt({"prompt": "Q: 2+2?"}).prompt == "Q: 2+2?"
  assert formats.normalize_prompt({"messages": [USER]}).prompt == (USER,)
  with pytest.raises(DataError, match="ends with an assistant turn"):
    formats.normalize_prompt({"messages": [USER, GOOD]}, "p.jsonl", 1)
  with pytest.raises(DataError, match="no prompt"):
    formats.normalize_prompt({"text": "x"})
