"""Text rewards: completion_text, exact_match, the format reward and DAPO's over-length penalty."""

import pytest

from rlhf_jax.rewards import (completion_text, exact_match, extract_tagged_answer, format_reward,
                              normalize_text, reasoning_format, soft_overlong_penalty)


def as_messages(texts):
  return [[{"role": "assistant", "content": text}] for text in texts]


# --- completion_text and tags ---------------------------------------------------------------


def test_completion_text():
  assert completion_text("plain") == "plain"
  assert completion_text([{"role": "assistant", "content": "hi"}]) == "hi"
  conversation = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "first"},
                  {"role": "tool", "content": "42"}, {"role": "assistant", "content": "last"},
                  {"role": "user", "content": "thanks"}]
  assert completion_text(conversation) == "last"
  parts = [{"role": "assistant", "content": [{"type": "text", "text": "a"},
                                             {"type": "image"}, {"type": "text", "text": "b"}]}]
  assert completion_text(parts) == "ab"
  assert completion_text([{"role": "assistant", "content": None}]) == ""


@pytest.mark.parametrize("bad, message", [
    (None, "got NoneType"), (3, "got int"), ([{"role": "user", "content": "q"}], "roles"),
    ([{"role": "assistant", "content": 3}], "content"),
])
def test_completion_text_errors(bad, message):
  with pytest.raises(ValueError, match=message):
    completion_text(bad)


def test_extract_tagged_answer():
  assert extract_tagged_answer("<answer> 12 </answer>") == "12"
  assert extract_tagged_answer("<answer>1</answer> then <answer>2</answer>") == "2"
  assert extract_tagged_answer("<answer>12") is None  # truncated
  assert extract_tagged_answer("no tags") is None
  assert extract_tagged_answer("<sol>x</sol>", tag="sol") == "x"
  assert extract_tagged_answer([{"role": "assistant", "content": "<answer>7</answer>"}]) == "7"
  with pytest.raises(ValueError, match="tag"):
    extract_tagged_answer("x", tag="<answer>")


# --- exact_match ----------------------------------------------------------------------------


def test_normalize_text():
  assert normalize_text("  The   Eiffel\n Tower. ") == "the eiffel tower"
  assert normalize_text('"Paris!"') == "paris"
  assert normalize_text("(A)") == "a"
  assert normalize_text("-5") == "-5"  # a sign is not punctuation to strip


def test_exact_match():
  completions = ["Paris", "  paris. ", "PARIS!", "Lyon", "Paris, France", "-5",
                 "<think>capital</think><answer>Paris</answer>", ""]
  answers = ["Paris"] * 5 + ["5", "paris", "Paris"]
  assert exact_match(["q"] * 8, completions, answer=answers) == \
      [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def test_exact_match_missing_reference_and_errors():
  assert exact_match(["q"] * 3, ["a", "b", "c"], answer=[None, "", " . "]) == [None] * 3
  assert exact_match(["q"], ["3"], answer=[3]) == [1.0]
  with pytest.raises(ValueError, match="'answer'"):
    exact_match(["q"], ["a"])


def test_exact_match_conversational_matches_plain():
  texts, answers = ["Paris", "Lyon"], ["paris", "paris"]
  assert exact_match(None, as_messages(texts), answer=answers) == \
      exact_match(None, texts, answer=answers) == [1.0, 0.0]


# --- format reward --------------------------------------------------------------------------


@pytest.mark.parametrize("completion, expected", [
    ("<think>2+2=4</think><answer>4</answer>", 1.0),
    ("\n <think>\nlong\nreasoning\n</think>\n\n<answer> 4 </answer>\n", 1.0),
    ("<think>2+2=4</think>", 0.0),  # missing answer
    ("<answer>4</answer>", 0.0),  # missing think
    ("<think>a</think><answer>4", 0.0),  # unclosed
    ("<answer>4</answer><think>a</think>", 0.0),  # wrong order
    ("<think>a</think><think>b</think><answer>4</answer>", 0.0),  # think twice
    ("<think>a</think><answer>4</answer><answer>5</answer>", 0.0),  # answer twice
    ("<think>a <answer>3</answer></think><answer>4</answer>", 0.0),  # nested: answer twice
    ("Sure! <think>a</think><answer>4</answer>", 0.0),  # text before
    ("<think>a</think><answer>4</answer> Hope this helps.", 0.0),  # text after
    ("<think>a</think> so <answer>4</answer>", 0.0),  # text between
    ("<think>  </think><answer>4</answer>", 0.0),  # empty think
    ("<think>a</think><answer>\n</answer>", 0.0),  # empty answer
    ("", 0.0),
])
def test_reasoning_format(completion, expected):
  assert reasoning_format(["q"], [completion]) == [expected]
  assert reasoning_format(["q"], as_messages([completion])) == [expected]


def test_format_reward_factory():
  assert reasoning_format.__name__ == "reasoning_format"
  assert format_reward().__name__ == "reasoning_format"
  custom = format_reward(think="reasoning", answer="solution")
  assert custom.__name__ == "reasoning_format_reasoning_solution"
  assert custom(["q"] * 2, ["<reasoning>r</reasoning><solution>s</solution>",
                            "<think>r</think><answer>s</answer>"]) == [1.0, 0.0]
  with pytest.raises(ValueError, match="think"):
    format_reward(think="")
  with pytest.raises(ValueError, match="answer"):
    format_reward(answer="a b")
  with pytest.raises(ValueError, match="different"):
    format_reward(think="x", answer="x")


# --- soft over-length penalty ---------------------------------------------------------------


def test_soft_overlong_penalty_values():
  penalty = soft_overlong_penalty(max_length=20, cache=4)
  lengths = [0, 15, 16, 17, 18, 20, 21, 100]  # max - cache = 16
  ids = [list(range(n)) for n in lengths]
  rewards = penalty(["q"] * len(ids), ["c"] * len(ids), completion_ids=ids, answer=["x"] * 8)
  assert rewards == [0.0, 0.0, 0.0, -0.25, -0.5, -1.0, -1.0, -1.0]
  assert all(type(r) is float for r in rewards)


def test_soft_overlong_penalty_cache_equals_max_length():
  penalty = soft_overlong_penalty(max_length=4, cache=4)
  ids = [[1] * n for n in range(6)]
  assert penalty(None, ["c"] * 6, completion_ids=ids) == [0.0, -0.25, -0.5, -0.75, -1.0, -1.0]


def test_soft_overlong_penalty_errors():
  penalty = soft_overlong_penalty(max_length=8, cache=2)
  assert penalty.__name__ == "soft_overlong_penalty"
  with pytest.raises(ValueError, match="completion_ids"):
    penalty(["q"], ["c"])
  with pytest.raises(ValueError, match="completion_ids' has 1 values for 2"):
    penalty(["q"] * 2, ["c"] * 2, completion_ids=[[1]])
  with pytest.raises(ValueError, match="cache must be >= 1"):
    soft_overlong_penalty(max_length=8, cache=0)
  with pytest.raises(ValueError, match="cache must be <= max_length"):
    soft_overlong_penalty(max_length=8, cache=9)
  with pytest.raises(ValueError, match="max_length must be an int"):
    soft_overlong_penalty(max_length=8.0, cache=2)
  with pytest.raises(TypeError):
    soft_overlong_penalty(8, 2)  # keyword-only: the two ints are easy to swap
