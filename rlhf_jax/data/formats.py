"""Rows -> normalised examples: the dataset formats users already have (TRL's conventions).

Text is either plain (`str`) or conversational (a tuple of `{"role", "content"}` messages). Every
format that carries the same content normalises to the same example, so a dataset can be written
in whichever form is at hand:

  SFT         {"text"} | {"prompt", "completion"} | {"messages"}
  pairwise    {"prompt", "chosen", "rejected"} (optional "margin", and "objective": the
              reward head a preference is about, for multi-objective reward models)
              | {"chosen", "rejected"} sharing a prefix (implicit prompt)
              | either with message lists (conversational)
              | a string prompt with message-list chosen/rejected: either only the assistant
                turn(s), or whole conversations (their shared leading turns are the prompt, whose
                last user turn must be the prompt string: HuggingFaceH4/ultrafeedback_binarized)
              | Anthropic HH text ("\\n\\nHuman: ... \\n\\nAssistant: ...", turned into messages)
  unpaired    {"prompt", "completion", "label"} (KTO; label is a bool)
  ranked      {"prompt", "completions", "ranks"} (rank 0 is best; equal ranks are ties)
  prompt      {"prompt"} | {"messages"} ending in a user turn (RL: the policy writes the response)

SFT prompt/completion, unpaired and ranked rows take a string prompt with message-list completions
the same way as pairs do.

Errors name the source, the row and the field, and say what was expected (`DataError`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Union

from rlhf_jax.errors import UserError

__all__ = [
    "DataError",
    "Messages",
    "Text",
    "SFTExample",
    "PairExample",
    "UnpairedExample",
    "RankedExample",
    "PromptExample",
    "normalize_sft",
    "normalize_pair",
    "normalize_unpaired",
    "normalize_ranked",
    "normalize_prompt",
    "NORMALIZERS",
    "parse_hh",
]

Messages = tuple  # tuple of {"role": str, "content": str} dicts
Text = Union[str, Messages]


class DataError(UserError):
  """A row that cannot become an example: says where (source, row, field) and what was expected.

  `row` is the 0-based index of the row in its dataset; `line`, for line-based files (JSON
  Lines, CSV), is the 1-based line of the file where it starts, and replaces the row in the
  message:
  "data.jsonl, line 3, field 'chosen': ...".
  """

  def __init__(self, source: str, row: int | None, field: str | None, message: str, *,
               line: int | None = None):
    where = row_where(source, row, line)
    where += f", field {field!r}" if field else ""
    super().__init__(message, where=where)
    self.source, self.row, self.field, self.line = source, row, field, line

  def at_line(self, line: int) -> "DataError":
    """The same error, located by the file's line number instead of the row index."""
    return DataError(self.source, self.row, self.field, self.what, line=line)


def row_where(source: str | None, row: int | None, line: int | None = None) -> str:
  """The one way a message names a row: "<source>, line <N>" (the 1-based line of a line-based
  file where the row starts) when the line is known, else "<source>, row <N>" (the 0-based
  index of the row in its dataset); without a source, just the line or row."""
  parts = [source] if source else []
  if line is not None:
    parts.append(f"line {line}")
  elif row is not None:
    parts.append(f"row {row}")
  return ", ".join(parts)


@dataclasses.dataclass(frozen=True)
class SFTExample:
  prompt: Text  # "" for plain text: the loss then covers every token
  completion: Text


@dataclasses.dataclass(frozen=True)
class PairExample:
  prompt: Text
  chosen: Text
  rejected: Text
  margin: float | None = None  # optional preference strength for Bradley-Terry with margin
  objective: int = 0  # which reward head this preference is about (multi-objective RMs)


@dataclasses.dataclass(frozen=True)
class UnpairedExample:
  prompt: Text
  completion: Text
  label: bool  # True: desirable


@dataclasses.dataclass(frozen=True)
class RankedExample:
  prompt: Text
  completions: tuple
  ranks: tuple  # ints, 0 is best


@dataclasses.dataclass(frozen=True)
class PromptExample:
  prompt: Text
  # Every other column of the row (e.g. a reference answer), for reward functions.
  columns: dict = dataclasses.field(default_factory=dict)


class _Row:
  """A row plus where it came from, for error messages."""

  def __init__(self, row: Any, source: str, index: int):
    if not isinstance(row, dict):
      raise DataError(source, index, None, f"expected a mapping of fields, got {type(row).__name__}")
    self.row, self.source, self.index = row, source, index

  def error(self, field, message):
    return DataError(self.source, self.index, field, message)

  def has(self, field):
    return self.row.get(field) is not None

  def get(self, field, kind: str):
    """Reads a field that must be text ("str", "messages" or "text": either)."""
    if not self.has(field):
      raise self.error(field, f"missing (expected {_KIND_NAMES[kind]})")
    return self.coerce(self.row[field], field, kind)

  def coerce(self, value, field, kind):
    if kind in ("str", "text") and isinstance(value, str):
      return value
    if kind in ("messages", "text") and isinstance(value, (list, tuple)):
      return self.messages(value, field)
    raise self.error(field, f"expected {_KIND_NAMES[kind]}, got {type(value).__name__}")

  def messages(self, value, field) -> Messages:
    out = []
    for i, message in enumerate(value):
      if not (isinstance(message, dict) and isinstance(message.get("role"), str)
              and isinstance(message.get("content"), str)):
        raise self.error(field, f"message {i} must be {{'role': str, 'content': str}}, "
                                f"got {message!r}"[:300])
      out.append({"role": message["role"], "content": message["content"]})
    if not out:
      raise self.error(field, "empty message list")
    return tuple(out)


_KIND_NAMES = {
    "str": "a string",
    "messages": "a list of {role, content} messages",
    "text": "a string or a list of {role, content} messages",
}


def _check_nonempty(row: _Row, field: str, text: Text):
  if isinstance(text, str):
    empty = not text.strip()
  else:
    empty = not any(m["content"].strip() for m in text)
  if empty:
    raise row.error(field, "empty response (nothing to train on)")


def _check_same_kind(row: _Row, fields: dict):
  kinds = {name: isinstance(value, str) for name, value in fields.items() if value != ""}
  if len(set(kinds.values())) > 1:
    described = ", ".join(f"{k}: {'string' if v else 'messages'}" for k, v in kinds.items())
    raise row.error(None, f"fields mix plain strings and message lists ({described}); "
                          "use one form per row")


def _common_prefix(conversations) -> int:
  common = 0
  for turns in zip(*conversations):
    if any(turn != turns[0] for turn in turns):
      break
    common += 1
  return common


def _with_prompt(row: _Row, prompt: Text, completions: dict) -> tuple[Text, tuple]:
  """(prompt, completions) in one form: a string prompt with message-list completions becomes
  messages (TRL's maybe_extract_prompt); otherwise the fields must already share a form.

  Completions that are only assistant turns get the prompt as one user turn. Completions that are
  whole conversations start with the same turns; those (up to the last shared non-assistant turn)
  are the prompt, and their last user turn must say what the prompt string says.
  """
  values = tuple(completions.values())
  if not (isinstance(prompt, str) and prompt and values
          and all(isinstance(v, tuple) for v in values)):
    _check_same_kind(row, {"prompt": prompt, **completions})
    return prompt, values
  starts = {name: v[0]["role"] == "assistant" for name, v in completions.items()}
  if all(starts.values()):
    return ({"role": "user", "content": prompt},), values
  if any(starts.values()):
    described = ", ".join(f"{k}: {'assistant turns' if v else 'a conversation'}"
                          for k, v in starts.items())
    raise row.error(None, f"with a string prompt, the message lists must all be assistant "
                          f"turns or all whole conversations; got {described}")
  common = _common_prefix(values)
  if len(values) == 1:  # one conversation: the prompt is everything before its last answer
    common = len(values[0])
  while common > 0 and values[0][common - 1]["role"] == "assistant":
    common -= 1
  users = [turn["content"] for turn in values[0][:common] if turn["role"] == "user"]
  first = next(iter(completions))
  if not users:
    raise row.error(first, "the string prompt needs a user turn shared by every conversation, "
                           "but they share none")
  if users[-1].strip() != prompt.strip():
    raise row.error("prompt", f"does not match the last user turn the conversations in "
                              f"{', '.join(map(repr, completions))} share: {prompt!r} vs "
                              f"{users[-1]!r}"[:400])
  for name, value in completions.items():
    if len(value) == common:
      raise row.error(name, "the conversation has no response after the prompt's turns")
  return values[0][:common], tuple(v[common:] for v in values)


def normalize_sft(raw, source: str = "<rows>", index: int = 0) -> SFTExample:
  row = _Row(raw, source, index)
  if row.has("messages"):
    messages = row.get("messages", "messages")
    if messages[-1]["role"] != "assistant":
      raise row.error("messages", f"the last message must be the assistant's response, got role "
                                  f"{messages[-1]['role']!r}")
    example = SFTExample(prompt=messages[:-1], completion=messages[-1:])
    # The response is the last message: name it as the row has it.
    _check_nonempty(row, f"messages[{len(messages) - 1}].content", example.completion)
    return example
  if row.has("prompt") or row.has("completion"):
    prompt, (completion,) = _with_prompt(row, row.get("prompt", "text"),
                                         {"completion": row.get("completion", "text")})
    example = SFTExample(prompt=prompt, completion=completion)
    field = "completion"
  elif row.has("text"):
    example, field = SFTExample(prompt="", completion=row.get("text", "str")), "text"
  else:
    raise row.error(None, f"no SFT fields: expected 'text', 'prompt'+'completion' or 'messages'; "
                          f"the row has {sorted(row.row)}")
  _check_nonempty(row, field, example.completion)
  return example


# Anthropic HH: "\n\nHuman: ...\n\nAssistant: ..." turns.
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def parse_hh(text: str) -> Messages | None:
  """Parses Anthropic HH text into messages; None when the text is not in that format."""
  if not text.startswith("\n\nHuman: "):
    return None
  parts = _HH_TURN.split(text)
  roles = {"Human": "user", "Assistant": "assistant"}
  messages = tuple({"role": roles[parts[i]], "content": parts[i + 1].strip()}
                   for i in range(1, len(parts), 2))
  return messages


def _split_common_prefix(row: _Row, chosen: Text, rejected: Text):
  """(prompt, chosen_completion, rejected_completion) for rows without an explicit prompt."""
  _check_same_kind(row, {"chosen": chosen, "rejected": rejected})
  if isinstance(chosen, str):
    chosen_hh, rejected_hh = parse_hh(chosen), parse_hh(rejected)
    if chosen_hh is None or rejected_hh is None:
      common = 0
      for a, b in zip(chosen, rejected):
        if a != b:
          break
        common += 1
      # Cut before the whitespace that starts the diverging word: BPE tokenisers attach the space
      # to the next word, so " no" stays one completion token instead of "" + " no".
      cut = max(chosen.rfind(" ", 0, common + 1), chosen.rfind("\n", 0, common + 1), 0)
      if cut == 0:
        raise row.error("chosen", "no 'prompt' field and chosen/rejected share no prefix to use "
                                  "as the prompt")
      return chosen[:cut], chosen[cut:], rejected[cut:]
    chosen, rejected = chosen_hh, rejected_hh  # HH text becomes messages
  common = 0
  for a, b in zip(chosen, rejected):
    if a != b:
      break
    common += 1
  # The prompt ends after the last shared non-assistant turn; each completion is what follows.
  while common > 0 and chosen[common - 1]["role"] == "assistant":
    common -= 1
  if common == 0:
    raise row.error("chosen", "no 'prompt' field and chosen/rejected share no leading messages")
  return chosen[:common], chosen[common:], rejected[common:]


def normalize_pair(raw, source: str = "<rows>", index: int = 0) -> PairExample:
  row = _Row(raw, source, index)
  chosen, rejected = row.get("chosen", "text"), row.get("rejected", "text")
  if row.has("prompt"):
    prompt, (chosen, rejected) = _with_prompt(row, row.get("prompt", "text"),
                                              {"chosen": chosen, "rejected": rejected})
  else:
    prompt, chosen, rejected = _split_common_prefix(row, chosen, rejected)
  _check_nonempty(row, "chosen", chosen)
  _check_nonempty(row, "rejected", rejected)
  if chosen == rejected:
    raise row.error("rejected", "chosen and rejected are identical (no preference to learn)")
  margin = raw.get("margin")
  if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
    raise row.error("margin", f"expected a number, got {type(margin).__name__}")
  if margin is not None and not math.isfinite(margin):
    raise row.error("margin", f"expected a finite number, got {margin!r}")
  objective = raw.get("objective", 0)
  if objective is None:
    objective = 0
  if isinstance(objective, bool) or not isinstance(objective, int) or objective < 0:
    raise row.error("objective", f"expected a non-negative int (a reward head), got {objective!r}")
  return PairExample(prompt, chosen, rejected, None if margin is None else float(margin),
                     objective)


def normalize_unpaired(raw, source: str = "<rows>", index: int = 0) -> UnpairedExample:
  row = _Row(raw, source, index)
  prompt, (completion,) = _with_prompt(row, row.get("prompt", "text"),
                                       {"completion": row.get("completion", "text")})
  _check_nonempty(row, "completion", completion)
  if not row.has("label"):
    raise row.error("label", "missing (expected a bool: true = desirable)")
  label = raw["label"]
  if not isinstance(label, bool):
    raise row.error("label", f"expected a bool (true = desirable), got {label!r}")
  return UnpairedExample(prompt, completion, label)


def normalize_ranked(raw, source: str = "<rows>", index: int = 0) -> RankedExample:
  row = _Row(raw, source, index)
  prompt = row.get("prompt", "text")
  completions, ranks = raw.get("completions"), raw.get("ranks")
  if not isinstance(completions, (list, tuple)) or len(completions) < 2:
    raise row.error("completions", f"expected a list of at least 2 responses, got "
                                   f"{completions!r}"[:300] + _list_hint(completions))
  completions = {f"completions[{j}]": row.coerce(c, f"completions[{j}]", "text")
                 for j, c in enumerate(completions)}
  prompt, completions = _with_prompt(row, prompt, completions)
  for j, completion in enumerate(completions):
    _check_nonempty(row, f"completions[{j}]", completion)
  if (not isinstance(ranks, (list, tuple)) or len(ranks) != len(completions)
      or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in ranks)):
    raise row.error("ranks", f"expected {len(completions)} non-negative ints (one per completion, "
                             f"0 = best), got {ranks!r}"[:300] + _list_hint(ranks))
  if len(set(ranks)) < 2:
    raise row.error("ranks", "all completions tied: no ordered pair to learn from")
  return RankedExample(prompt, completions, tuple(ranks))


def _list_hint(value) -> str:
  if isinstance(value, str):
    return " (a list written as text: CSV cannot hold lists; use JSON Lines or Parquet)"
  return ""


def normalize_prompt(raw, source: str = "<rows>", index: int = 0, *,
                     prompt_column: str | None = None, chat: bool = False,
                     system_prompt: str | None = None) -> PromptExample:
  """An RL prompt: the `prompt` (or `messages`, or `prompt_column`) field; every other field of
  the row is kept as `columns`. With `chat`, a string prompt becomes one user turn (after a
  system turn holding `system_prompt`, if given), so the tokenizer's chat template renders it."""
  row = _Row(raw, source, index)
  if prompt_column is not None:
    if not row.has(prompt_column):
      raise row.error(prompt_column, f"missing (data.prompt_column names it as the prompt); the "
                                     f"row has {sorted(row.row)}")
    field, prompt = prompt_column, row.get(prompt_column, "text")
  elif row.has("prompt"):
    field, prompt = "prompt", row.get("prompt", "text")
  elif row.has("messages"):
    field, prompt = "messages", row.get("messages", "messages")
  else:
    raise row.error(None, f"no prompt: expected 'prompt' or 'messages' (or set "
                          f"data.prompt_column); the row has {sorted(row.row)}")
  if isinstance(prompt, tuple) and prompt[-1]["role"] == "assistant":
    raise row.error(field, "ends with an assistant turn: an RL prompt ends where the policy "
                           "answers")
  _check_nonempty(row, field, prompt)
  if chat and isinstance(prompt, str):
    system = ({"role": "system", "content": system_prompt},) if system_prompt else ()
    prompt = (*system, {"role": "user", "content": prompt})
  return PromptExample(prompt, {k: v for k, v in raw.items() if k != field})


NORMALIZERS = {
    "sft": normalize_sft,
    "pair": normalize_pair,
    "unpaired": normalize_unpaired,
    "ranked": normalize_ranked,
    "prompt": normalize_prompt,
}
