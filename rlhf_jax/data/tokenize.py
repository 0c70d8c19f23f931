"""Examples -> token arrays, with a `transformers` tokenizer and its chat template.

The prompt and each completion are tokenised separately and concatenated, so the boundary between
them is exact (a merge across the boundary can never move a prompt token into the loss). For
conversational examples the chat template renders prompt + completion; the completion text is what
the full rendering adds after the prompt rendered with the generation prompt.

BOS: added once, only if the tokenizer adds one by default and the rendered prompt does not already
start with it (chat templates often include it: no double BOS). EOS: appended to plain-text
completions that do not end with it; conversational completions end with the template's own
end-of-turn text.

Truncation, one rule for every completion of a row: the prompt is cut to `max_prompt_length` (its
start is dropped; the end, next to the response, is kept); every completion gets the same budget
`max_length - len(prompt)`, and a completion over budget is cut (counted), or the row skipped or
rejected, as `on_overflow` says. A prompt that alone leaves no room is a bad row. A cut prompt keeps its BOS.

A chat template that fails on a row (none set, a `raise_exception`, a prompt it does not render as
a prefix of the conversation) is a `DataError` naming the source and row, like any bad row.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import numpy as np

from rlhf_jax.data.formats import (DataError, PairExample, PromptExample, RankedExample,
                                   SFTExample, Text, UnpairedExample)

__all__ = [
    "TokenizeConfig",
    "TokenizedSFT",
    "TokenizedPair",
    "TokenizedUnpaired",
    "TokenizedRanked",
    "TokenizedPrompt",
    "encode_text",
    "render",
    "role_problem",
    "template_roles",
    "COMMON_ROLES",
    "tokenize_example",
]


@dataclasses.dataclass(frozen=True)
class TokenizeConfig:
  max_length: int = 512  # prompt + completion tokens
  max_prompt_length: int | None = None  # None: prompts are never cut (too long -> bad row)
  on_overflow: Literal["truncate", "skip", "error"] = "truncate"  # completion over budget

  def __post_init__(self):
    from rlhf_jax.config import check_choices  # noqa: PLC0415 — config imports nothing of data
    check_choices(self)


@dataclasses.dataclass(frozen=True)
class TokenizedSFT:
  prompt: np.ndarray  # int32 [P]
  completion: np.ndarray  # int32 [C]
  truncated: bool = False


@dataclasses.dataclass(frozen=True)
class TokenizedPair:
  prompt: np.ndarray
  chosen: np.ndarray
  rejected: np.ndarray
  margin: float = 0.0
  truncated: bool = False
  objective: int = 0


@dataclasses.dataclass(frozen=True)
class TokenizedUnpaired:
  prompt: np.ndarray
  completion: np.ndarray
  label: bool
  truncated: bool = False


@dataclasses.dataclass(frozen=True)
class TokenizedRanked:
  prompt: np.ndarray
  completions: tuple  # of int32 arrays
  ranks: tuple
  truncated: bool = False


@dataclasses.dataclass(frozen=True)
class TokenizedPrompt:
  prompt: np.ndarray
  text: Text  # the normalised prompt, for reward functions that read text
  truncated: bool = False
  columns: dict = dataclasses.field(default_factory=dict)  # the row's other columns
  row: int | None = None  # the row's index in its source, for error messages
  source: str | None = None  # the source's name, for error messages (a reward function's)
  line: int | None = None  # the file's line where the row starts, in a line-based file

  def where(self) -> str:
    """The row as data errors name it: "<source>, line <N>" or "<source>, row <N>"."""
    from rlhf_jax.data.formats import row_where  # noqa: PLC0415
    return row_where(self.source, self.row, self.line)


class SkipRow(Exception):
  """Raised for a row that `on_overflow="skip"` drops; carries the reason for the counts."""


@functools.lru_cache(maxsize=32)
def _special_ids(tokenizer):
  bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
  with_special = tokenizer("x", add_special_tokens=True)["input_ids"]
  without = tokenizer("x", add_special_tokens=False)["input_ids"]
  adds_bos = bos is not None and with_special[:1] == [bos] and without[:1] != [bos]
  return (bos if adds_bos else None), eos


def render(tokenizer, prompt: Text, completion: Text | None) -> tuple[str, str]:
  """Prompt and completion as the strings the model sees (chat template for messages).

  completion None renders the prompt alone, as the policy sees it when it generates.
  """
  if isinstance(prompt, str) and (completion is None or isinstance(completion, str)):
    return prompt, completion or ""
  if completion is None:
    if tokenizer.chat_template is None:
      raise ValueError("conversational prompts need a tokenizer with a chat template")
    return tokenizer.apply_chat_template(list(prompt), tokenize=False,
                                         add_generation_prompt=True), ""
  if tokenizer.chat_template is None:
    raise ValueError("conversational data needs a tokenizer with a chat template "
                     "(tokenizer.chat_template is None)")
  prompt_text = tokenizer.apply_chat_template(list(prompt), tokenize=False,
                                              add_generation_prompt=True)
  full_text = tokenizer.apply_chat_template(list(prompt) + list(completion), tokenize=False)
  if not full_text.startswith(prompt_text):
    raise ValueError("the chat template does not render the prompt as a prefix of the full "
                     f"conversation:\nprompt:  {prompt_text!r}\nfull:    {full_text!r}")
  return prompt_text, full_text[len(prompt_text):]


# Roles probed to say which ones a chat template handles, when a role of the data is not one.
COMMON_ROLES = ("system", "user", "assistant", "tool", "function", "ipython", "developer")
_PROBE = "probe-text"  # a message's content in the probe conversations
# The turns (before, after) the probed message: some templates want a user turn first, or
# alternation, or render a system turn only in front of the user turn that follows it.
_USER, _ASSISTANT = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}
_PROBE_CONTEXTS = (((), ()), ((), (_USER,)), ((_USER,), ()), ((_USER, _ASSISTANT), ()))


def role_problem(tokenizer, role: str) -> str | None:
  """Why the tokenizer's chat template does not handle messages of `role`; None when it does.

  A probe conversation with a `role` message (alone, before a user turn, after a user turn, or
  after a user and an assistant turn) must render without raising, show the message's content
  (a template with one branch per known role drops the others silently), and its markup must
  not tokenise to <unk> (a template that writes any role as a token the vocabulary lacks, like
  the embedded task's `<|role|>`): the rendering may hold no more <unk> tokens than the contents
  alone.
  """
  return _role_problem(tokenizer, tokenizer.chat_template, role)


@functools.lru_cache(maxsize=256)
def _role_problem(tokenizer, template: str, role: str) -> str | None:
  del template  # a key of the cache only: a tokenizer whose template is replaced is probed again
  reasons = []
  for before, after in _PROBE_CONTEXTS:
    messages = [*before, {"role": role, "content": _PROBE}, *after]
    try:
      text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as err:  # noqa: BLE001 — a template's raise_exception is jinja2's, or any
      reasons.append(f"rendering it raises {type(err).__name__}: {' '.join(str(err).split())}"
                     [:200])
      continue
    if _PROBE not in text:
      reasons.append("the template leaves its content out")
      continue
    unk = tokenizer.unk_token_id
    if unk is not None:
      in_contents = sum(int((encode_text(tokenizer, m["content"]) == unk).sum()) for m in messages)
      if int((encode_text(tokenizer, text) == unk).sum()) > in_contents:
        reasons.append(f"the template writes it as text the tokenizer reads as "
                       f"{tokenizer.unk_token}")
        continue
    return None
  return reasons[-1]


def template_roles(tokenizer, also=()) -> list[str]:
  """The roles among COMMON_ROLES (and `also`) the tokenizer's chat template handles."""
  return sorted(role for role in {*COMMON_ROLES, *also} if role_problem(tokenizer, role) is None)


def encode_text(tokenizer, text: str) -> np.ndarray:
  return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)


def _render_row(tokenizer, prompt: Text, completion: Text | None, where) -> tuple[str, str]:
  """`render`, with a template failure reported as a DataError naming the source and row."""
  try:
    return render(tokenizer, prompt, completion)
  except Exception as err:  # ours are ValueErrors; a template's raise_exception is jinja2's
    if not (isinstance(err, ValueError) or type(err).__module__.startswith("jinja2")):
      raise
    source, row = where
    raise DataError(source, row, None, f"chat template: {err}") from err


def _encode(tokenizer, prompt: Text, completions: list[Text], where=("<rows>", 0)):
  bos, eos = _special_ids(tokenizer)
  texts = [_render_row(tokenizer, prompt, completion, where) for completion in completions]
  prompt_ids = encode_text(tokenizer, texts[0][0])
  if bos is not None and (prompt_ids.size == 0 or prompt_ids[0] != bos):
    prompt_ids = np.concatenate([[bos], prompt_ids]).astype(np.int32)
  completion_ids = []
  for (_, completion_text), completion in zip(texts, completions):
    ids = encode_text(tokenizer, completion_text)
    if isinstance(completion, str) and eos is not None and (ids.size == 0 or ids[-1] != eos):
      ids = np.concatenate([ids, [eos]]).astype(np.int32)
    completion_ids.append(ids)
  return prompt_ids, completion_ids, bos


def _truncate(prompt_ids, completion_ids, config: TokenizeConfig, where, bos=None):
  """Applies the one truncation rule to a prompt and all its completions."""
  source, row = where
  if config.max_prompt_length is not None and len(prompt_ids) > config.max_prompt_length:
    keep_bos = bos is not None and prompt_ids[0] == bos  # the BOS survives; the start goes
    tail = prompt_ids[len(prompt_ids) - config.max_prompt_length + keep_bos:]
    prompt_ids = np.concatenate([[bos], tail]).astype(np.int32) if keep_bos else tail
  budget = config.max_length - len(prompt_ids)
  if budget <= 0:
    raise DataError(source, row, "prompt",
                    f"the prompt alone is {len(prompt_ids)} tokens, leaving no room for a response "
                    f"within max_length={config.max_length} (set data.max_prompt_length to cut "
                    f"prompts, or raise data.max_length)")
  longest = max(len(ids) for ids in completion_ids)
  truncated = longest > budget
  if truncated:
    if config.on_overflow == "error":
      raise DataError(source, row, None,
                      f"prompt ({len(prompt_ids)}) + response ({longest}) tokens exceed "
                      f"max_length={config.max_length} (data.on_overflow='error')")
    if config.on_overflow == "skip":
      raise SkipRow("over max_length")
    completion_ids = [ids[:budget] for ids in completion_ids]
  return prompt_ids, completion_ids, truncated


def tokenize_example(example, tokenizer, config: TokenizeConfig, source="<rows>", row=0):
  """One normalised example -> its tokenised record (DataError / SkipRow for bad rows)."""
  where = (source, row)

  def encode_and_truncate(prompt, completions):
    prompt_ids, completion_ids, bos = _encode(tokenizer, prompt, completions, where)
    return _truncate(prompt_ids, completion_ids, config, where, bos)

  if isinstance(example, SFTExample):
    prompt, (completion,), truncated = encode_and_truncate(
        example.prompt, [example.completion])
    return TokenizedSFT(prompt, completion, truncated)
  if isinstance(example, PairExample):
    prompt, (chosen, rejected), truncated = encode_and_truncate(
        example.prompt, [example.chosen, example.rejected])
    if np.array_equal(chosen, rejected):
      raise DataError(source, row, "rejected", "chosen and rejected are identical after "
                      f"truncation to max_length={config.max_length}: no preference left")
    return TokenizedPair(prompt, chosen, rejected, example.margin or 0.0, truncated,
                         example.objective)
  if isinstance(example, UnpairedExample):
    prompt, (completion,), truncated = encode_and_truncate(
        example.prompt, [example.completion])
    return TokenizedUnpaired(prompt, completion, example.label, truncated)
  if isinstance(example, PromptExample):
    prompt_ids, _, bos = _encode(tokenizer, example.prompt, [None], where)
    limit = config.max_prompt_length or config.max_length
    truncated = len(prompt_ids) > limit
    if truncated:
      if config.max_prompt_length is None or config.on_overflow == "error":
        raise DataError(source, row, "prompt", f"the prompt is {len(prompt_ids)} tokens, over "
                        f"the limit of {limit} (set data.max_prompt_length to cut its start)")
      if config.on_overflow == "skip":
        raise SkipRow("prompt over max_prompt_length")
      prompt_ids, _, _ = _truncate(prompt_ids, [prompt_ids[:1]], dataclasses.replace(
          config, max_length=limit + 1), where, bos)
    return TokenizedPrompt(prompt_ids, example.prompt, truncated, example.columns, row,
                           None if source == "<rows>" else source)
  if isinstance(example, RankedExample):
    prompt, completions, truncated = encode_and_truncate(
        example.prompt, list(example.completions))
    return TokenizedRanked(prompt, tuple(completions), example.ranks, truncated)
  raise TypeError(f"not an example: {type(example).__name__}")
