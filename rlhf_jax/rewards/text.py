"""Text rewards: exact match, the <think>/<answer> format reward, DAPO's over-length penalty.

Also the helpers every reward function here shares: `completion_text` (one completion, plain or
conversational, as a string), `extract_tagged_answer` and the column checks.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "completion_text",
    "extract_tagged_answer",
    "normalize_text",
    "exact_match",
    "format_reward",
    "reasoning_format",
    "soft_overlong_penalty",
]

RewardFn = Callable[..., list]

# Stripped from both ends by `normalize_text`. Signs, `$`, `%` and `#` are kept: "-5" is not "5".
_SURROUNDING = " .,;:!?\"'`*_()[]{}\u201c\u201d\u2018\u2019\u00ab\u00bb\u3002"
_TAG_NAME = re.compile(r"[A-Za-z][\w.-]*")


def completion_text(completion: Any) -> str:
  """The text of one completion: a string as is; for a list of messages, the content of the last
  assistant message (content given as a list of parts, `[{"type": "text", "text": ...}]`, is
  joined; a missing content is "").

  Raises ValueError for anything else, or a message list without an assistant message.
  """
  if isinstance(completion, str):
    return completion
  if isinstance(completion, (list, tuple)):
    for message in reversed(completion):
      if isinstance(message, dict) and message.get("role") == "assistant":
        return _content_text(message.get("content"))
    raise ValueError("completion: expected a string or a list of messages with an assistant "
                     f"message, got roles {[_role(m) for m in completion]}")
  raise ValueError("completion: expected a string or a list of message dicts, "
                   f"got {type(completion).__name__}")


def _role(message: Any) -> Any:
  return message.get("role") if isinstance(message, dict) else type(message).__name__


def _content_text(content: Any) -> str:
  if content is None:
    return ""
  if isinstance(content, str):
    return content
  if isinstance(content, (list, tuple)):  # multimodal message: keep the text parts
    return "".join(part.get("text", "") for part in content
                   if isinstance(part, dict) and part.get("type", "text") == "text")
  raise ValueError(f"completion: message content must be a string or a list of parts, "
                   f"got {type(content).__name__}")


def extract_tagged_answer(text: Any, tag: str = "answer") -> str | None:
  """The stripped content of the last `<tag>...</tag>` in `text` (a string, or a completion in
  either form), or None when there is no closed pair (a truncated `<answer>12` has none).
  """
  _check_tag(tag, "tag")
  text = text if isinstance(text, str) else completion_text(text)
  close = text.rfind(f"</{tag}>")
  if close < 0:
    return None
  open_ = text.rfind(f"<{tag}>", 0, close)
  if open_ < 0:
    return None
  return text[open_ + len(tag) + 2:close].strip()


def _check_tag(tag: Any, argument: str) -> None:
  if not isinstance(tag, str) or not _TAG_NAME.fullmatch(tag):
    raise ValueError(f"{argument}: expected a tag name such as 'answer' (a letter, then letters, "
                     f"digits, '_', '-' or '.'), got {tag!r}")


def normalize_text(text: str) -> str:
  """`text` for exact comparison: whitespace runs collapsed to one space, case-folded, and
  surrounding whitespace and punctuation (`. , ; : ! ? * _`, quotes, brackets) stripped. Signs,
  `$`, `%` and `#` stay, so "-5" and "5" still differ.
  """
  return " ".join(text.casefold().split()).strip(_SURROUNDING)


def _column(name: str, values: Any, completions: Sequence, fn_name: str) -> Sequence:
  """`values`, checked to be a dataset column with one value per completion (ValueError if not)."""
  if values is None:
    raise ValueError(f"{fn_name}: needs the dataset column {name!r} (one value per completion); "
                     "it was not passed")
  if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
    raise ValueError(f"{fn_name}: column {name!r} must hold one value per completion, "
                     f"got {type(values).__name__}")
  if len(values) != len(completions):
    raise ValueError(f"{fn_name}: column {name!r} has {len(values)} values for "
                     f"{len(completions)} completions")
  return values


def _reference_text(value: Any) -> str | None:
  """A reference cell as a string, or None when the row has none (None, NaN, blank)."""
  if value is None or isinstance(value, bool):
    return None
  if isinstance(value, float) and value != value:  # NaN: pandas' missing value
    return None
  text = value if isinstance(value, str) else str(value)
  return text if text.strip() else None


def exact_match(prompts: Sequence, completions: Sequence, answer: Sequence | None = None,
                **kwargs) -> list[float | None]:
  """1.0 where the completion equals the `answer` column after `normalize_text`, else 0.0; None
  where the row has no reference (None or blank).

  The completion's answer is the content of its last `<answer>...</answer>` when it has one
  (so this composes with `reasoning_format`), else the whole completion text.
  """
  references = _column("answer", answer, completions, "exact_match")
  rewards: list[float | None] = []
  for completion, ref in zip(completions, references):
    ref = _reference_text(ref)
    if ref is None or not normalize_text(ref):
      rewards.append(None)
      continue
    text = completion_text(completion)
    tagged = extract_tagged_answer(text)
    predicted = text if tagged is None else tagged
    rewards.append(float(normalize_text(predicted) == normalize_text(ref)))
  return rewards


def format_reward(think: str = "think", answer: str = "answer") -> RewardFn:
  """A reward function: 1.0 where the completion is exactly `<think>...</think>` then
  `<answer>...</answer>` (tag names from the arguments), else 0.0.

  Rules: whitespace is allowed around and between the two blocks, nothing else is; each of the
  four tags appears exactly once; both contents are non-empty after stripping whitespace.
  """
  _check_tag(think, "think")
  _check_tag(answer, "answer")
  if think == answer:
    raise ValueError(f"format_reward: think and answer must be different tags, both are {think!r}")
  tags = (f"<{think}>", f"</{think}>", f"<{answer}>", f"</{answer}>")
  pattern = re.compile(rf"\s*<{re.escape(think)}>(.*)</{re.escape(think)}>"
                       rf"\s*<{re.escape(answer)}>(.*)</{re.escape(answer)}>\s*", re.DOTALL)

  def reward(prompts: Sequence, completions: Sequence, **kwargs) -> list[float]:
    rewards = []
    for completion in completions:
      text = completion_text(completion)
      match = pattern.fullmatch(text)
      ok = (match is not None and all(text.count(tag) == 1 for tag in tags)
            and all(group.strip() for group in match.groups()))
      rewards.append(float(ok))
    return rewards

  default = (think, answer) == ("think", "answer")
  reward.__name__ = reward.__qualname__ = (
      "reasoning_format" if default else f"reasoning_format_{think}_{answer}")
  reward.__doc__ = (f"1.0 where the completion is <{think}>...</{think}> then "
                    f"<{answer}>...</{answer}> and nothing else, else 0.0 (see format_reward).")
  return reward


reasoning_format = format_reward()


def soft_overlong_penalty(*, max_length: int, cache: int) -> RewardFn:
  """A reward function: DAPO's soft over-length punishment (Yu et al. 2025, "DAPO: An Open-Source
  LLM Reinforcement Learning System at Scale", arXiv 2503.14476, eq. 13).

  With L the completion's token count (`len(completion_ids[i])`, stop token included):
    0                                  if L <= max_length - cache
    (max_length - cache - L) / cache   if max_length - cache < L <= max_length
    -1                                 if L > max_length
  so the penalty ramps linearly from 0 to -1 over the last `cache` tokens. It is added to the
  task reward (give it weight 1 next to e.g. `math_answer`).

  Reads the `completion_ids` column (token-id lists, unpadded), which the trainer passes; raises
  ValueError when it is missing. Requires 1 <= cache <= max_length.
  """
  for name, value in (("max_length", max_length), ("cache", cache)):
    if isinstance(value, bool) or not isinstance(value, int):
      raise ValueError(f"soft_overlong_penalty: {name} must be an int, got {value!r}")
  if cache < 1:
    raise ValueError(f"soft_overlong_penalty: cache must be >= 1, got {cache}")
  if cache > max_length:
    raise ValueError(f"soft_overlong_penalty: cache must be <= max_length ({max_length}), "
                     f"got {cache}")
  threshold = max_length - cache

  def reward(prompts: Sequence, completions: Sequence, completion_ids: Sequence | None = None,
             **kwargs) -> list[float]:
    ids = _column("completion_ids", completion_ids, completions, "soft_overlong_penalty")
    rewards = []
    for token_ids in ids:
      length = len(token_ids)
      if length <= threshold:
        rewards.append(0.0)
      elif length <= max_length:
        rewards.append((threshold - length) / cache)
      else:
        rewards.append(-1.0)
    return rewards

  reward.__name__ = reward.__qualname__ = "soft_overlong_penalty"
  reward.__doc__ = (f"DAPO soft over-length penalty: 0 up to {threshold} tokens, linear to -1 at "
                    f"{max_length}, -1 beyond (see soft_overlong_penalty).")
  return reward
