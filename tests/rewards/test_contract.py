"""Every reward function keeps the trainer's contract: one float or None per completion, a name."""

import math

import pytest

import rlhf_jax.rewards as rewards
from rlhf_jax.rewards import (exact_match, math_answer, math_answer_column, reasoning_format,
                              soft_overlong_penalty)

GSM8K = "3 + 4 = <<3+4=7>>7\n#### 7"
COMPLETIONS = [
    "#### 7",
    "<think>3 + 4</think>\n<answer>7</answer>",
    "\\boxed{8}",
    "",
    "no digits here",
    "The answer is \\frac{14}{2}.",
]
COLUMNS = {
    "answer": [GSM8K, "7", "7", "7", None, "7"],
    "solution": ["\\boxed{7}"] * 6,
    "completion_ids": [[1] * n for n in (3, 9, 10, 1, 12, 5)],
    "difficulty": ["easy"] * 6,  # a column nobody reads
}
FUNCTIONS = {
    "math_answer": math_answer,
    "math_answer_solution": math_answer_column("solution"),
    "exact_match": exact_match,
    "reasoning_format": reasoning_format,
    "soft_overlong_penalty": soft_overlong_penalty(max_length=10, cache=4),
}


@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("conversational", [False, True])
def test_contract(name, conversational):
  fn = FUNCTIONS[name]
  assert fn.__name__ == name
  completions = COMPLETIONS
  prompts = ["What is 3 + 4?"] * len(COMPLETIONS)
  if conversational:
    completions = [[{"role": "assistant", "content": c}] for c in COMPLETIONS]
    prompts = [[{"role": "user", "content": p}] for p in prompts]
  result = fn(prompts, completions, **COLUMNS)
  assert isinstance(result, list) and len(result) == len(COMPLETIONS)
  for value in result:
    assert value is None or (type(value) is float and not math.isnan(value))
  # Plain and conversational completions score alike.
  assert result == fn(["What is 3 + 4?"] * len(COMPLETIONS), COMPLETIONS, **COLUMNS)


def test_expected_scores():
  prompts = ["q"] * len(COMPLETIONS)
  assert math_answer(prompts, COMPLETIONS, **COLUMNS) == [1.0, 1.0, 0.0, 0.0, None, 1.0]
  assert reasoning_format(prompts, COMPLETIONS, **COLUMNS) == [0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
  assert FUNCTIONS["soft_overlong_penalty"](prompts, COMPLETIONS, **COLUMNS) == \
      [0.0, -0.75, -1.0, 0.0, -1.0, 0.0]


def test_empty_batch():
  for fn in FUNCTIONS.values():
    assert fn([], [], **{k: [] for k in COLUMNS}) == []


def test_public_api():
  assert sorted(rewards.__all__) == sorted(set(rewards.__all__))
  for name in rewards.__all__:
    obj = getattr(rewards, name)
    assert callable(obj) and obj.__doc__, name
