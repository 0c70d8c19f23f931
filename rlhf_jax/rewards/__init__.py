"""Verifiable reward functions for GRPO/RLOO, written the way TRL users write them.

Calling convention (the trainers call every reward function this way):

  fn(prompts, completions, **columns) -> list[float | None]

  prompts      one per completion (a prompt repeats for each of its G samples): a string, or a
               list of `{"role", "content"}` messages for conversational data.
  completions  strings, or for conversational data one list per completion holding the assistant
               message: `[{"role": "assistant", "content": "..."}]` (`completion_text` reads both).
  **columns    every other dataset column, one value per completion (e.g. `answer`), plus
               `completion_ids`: the sampled token ids of each completion, stop token included.
               Functions take the columns they need by name and ignore the rest.

The result has one entry per completion: a float, or None where the function does not apply to
that row (no reference answer, or a reference with no answer in it). None means "no opinion",
not 0: as in TRL, where the rewards of a row are summed over the functions that did score it.
Never NaN. A missing column that a function needs is a ValueError naming the column.

The trainers name reward functions by spec in `reward.functions`: "module:name",
"path/to/file.py:name" (relative to the working directory), or a factory call with literal
arguments, "rlhf_jax.rewards:soft_overlong_penalty(max_length=512,cache=128)".

Loading and calling (`rlhf_jax.rewards.loading`):
  load_function         a spec -> the function
  RewardFunction        calls a function with the convention above and checks what it returns:
                        wrong length, non-numbers, NaN or inf, and exceptions are RewardErrors
                        naming the function and the dataset row

Math (`rlhf_jax.rewards.math`, exact rational arithmetic):
  math_answer           1/0 by the final answer against the `answer` column (GSM8K, MATH, ...)
  math_answer_column    math_answer reading another column (e.g. "solution")
  extract_answer        the final answer of a text: <answer>, ####, \\boxed{}, "the answer is",
                        the last number
  parse_number          a number as a Fraction ("1,000", "3/4", "\\frac{1}{2}", "$18", "50%")
  answers_equal         numeric equality, else normalised string equality

Text (`rlhf_jax.rewards.text`):
  exact_match           1/0 by normalised string equality with the `answer` column
  reasoning_format      1/0: exactly <think>...</think><answer>...</answer>
  format_reward         reasoning_format with other tag names
  soft_overlong_penalty DAPO's soft over-length penalty (a factory: max_length, cache)
  extract_tagged_answer the content of the last <answer>...</answer>
  completion_text       the text of a completion, plain or conversational
  normalize_text        the normalisation exact_match applies
"""

from __future__ import annotations

from rlhf_jax.rewards.loading import RewardError, RewardFunction, load_function
from rlhf_jax.rewards.math import (answers_equal, extract_answer, math_answer, math_answer_column,
                                   parse_number)
from rlhf_jax.rewards.text import (completion_text, exact_match, extract_tagged_answer,
                                   format_reward, normalize_text, reasoning_format,
                                   soft_overlong_penalty)

__all__ = [
    "load_function",
    "RewardFunction",
    "RewardError",
    "math_answer",
    "math_answer_column",
    "extract_answer",
    "parse_number",
    "answers_equal",
    "exact_match",
    "reasoning_format",
    "format_reward",
    "soft_overlong_penalty",
    "extract_tagged_answer",
    "completion_text",
    "normalize_text",
]
