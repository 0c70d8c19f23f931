"""The embedded verifiable task: add two numbers, checked against the row's answer column.

A prompt asks for a sum ("37+45"); the response is the number ("82") followed by the end-of-turn
token. Rows carry the reference answer in an `answer` column, as GSM8K's do, so the reward is a
verifiable one: `rlhf_jax.rewards.math_answer` compares the completion's number with it.

Demonstrations (SFT rows) are right only most of the time: a share `demo_error_rate` of them
carries a plausible slip (a dropped or doubled carry: ±10; a last digit off by one: ±1). A policy
fine-tuned on them reproduces the slips at about that rate, and reinforcement with the checker
can remove them: the right answer is the demonstrations' mode, which is what RL with a verifiable
reward sharpens (the held-out accuracy rising from the SFT policy's is the test).

Operand pairs are split once, by a seeded permutation of all (a, b) pairs, into training pairs
(demonstrations and RL prompts: `sft_rows`, `prompt_rows`) and held-out pairs (`eval_rows`),
so held-out accuracy measures addition, not recall of the training pairs.

The tokenizer reads one character per token (digits, "+", "=", space) with the chat roles as
special tokens, and decodes back to the exact text, so reward functions see "82", not "8 2".
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

__all__ = ["ArithmeticTask", "CHARACTERS", "CHAT_TEMPLATE", "build_tokenizer", "problem_text"]

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>")
CHARACTERS = tuple("0123456789+-*=? ")
# Renders "<|user|>37+45<|assistant|>82<eos>": no spaces around the roles, so every token of
# the response is part of the answer. No BOS here: the tokenizer adds it.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}<eos>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def problem_text(a: int, b: int) -> str:
  return f"{a}+{b}"


@dataclasses.dataclass(frozen=True)
class ArithmeticTask:
  """Seeded generators of the task's rows."""
  seed: int = 0
  min_operand: int = 0  # the first operand is drawn from min_operand..max_operand
  max_operand: int = 9
  max_addend: int = 9  # the second from 0..max_addend
  # Of all operand pairs, never in demonstrations or RL prompts (0: evaluation prompts are
  # fresh rows over the same pairs).
  held_out_fraction: float = 0.0
  demo_error_rate: float = 0.3  # demonstrations with a slip in the answer

  @functools.cached_property
  def _pairs(self) -> tuple[np.ndarray, np.ndarray]:
    """(training pairs [M, 2], held-out pairs [H, 2]), split by a permutation fixed by seed."""
    n = self.max_addend + 1
    pairs = np.stack(np.divmod(np.arange((self.max_operand + 1) * n), n), axis=1)
    pairs = pairs[pairs[:, 0] >= self.min_operand]
    order = np.random.default_rng([self.seed, 77]).permutation(len(pairs))
    held = int(round(len(pairs) * self.held_out_fraction))
    return pairs[order[held:]], pairs[order[:held]]

  def _draw(self, n: int, stream: int, held_out: bool) -> np.ndarray:
    pool = self._pairs[1] if held_out and len(self._pairs[1]) else self._pairs[0]
    rng = np.random.default_rng([self.seed, 500 + stream])
    return pool[rng.integers(len(pool), size=n)]

  def _slip(self, rng: np.random.Generator, total: int) -> int:
    """A wrong but plausible sum: a carry slip (±10) or a last digit off by one (±1)."""
    options = [total + d for d in (-10, 10, -1, 1) if total + d >= 0]
    return int(options[rng.integers(len(options))])

  def sft_rows(self, n: int, stream: int = 0) -> list[dict]:
    """Demonstrations: the sum, or with probability demo_error_rate a slip."""
    rng = np.random.default_rng([self.seed, 600 + stream])
    rows = []
    for a, b in self._draw(n, stream, held_out=False):
      total = int(a + b)
      shown = self._slip(rng, total) if rng.random() < self.demo_error_rate else total
      rows.append({"messages": [{"role": "user", "content": problem_text(a, b)},
                                {"role": "assistant", "content": str(shown)}]})
    return rows

  def prompt_rows(self, n: int, stream: int = 0, *, held_out: bool = False) -> list[dict]:
    """RL prompts with the reference answer in the `answer` column."""
    return [{"prompt": [{"role": "user", "content": problem_text(a, b)}],
             "answer": str(int(a + b))}
            for a, b in self._draw(n, 100 + stream, held_out)]

  def eval_rows(self, n: int, stream: int = 0) -> list[dict]:
    """Prompts on the held-out operand pairs (never in sft_rows or prompt_rows), or with
    held_out_fraction=0 fresh draws over the training pairs (a stream of their own)."""
    return self.prompt_rows(n, 1000 + stream, held_out=True)


def build_tokenizer():
  """A one-character-per-token tokenizer (transformers' fast tokenizer) with CHAT_TEMPLATE.

  Like the review task's, it adds <bos> to every encoding and pads with <pad>; its decoder
  joins tokens without separators, so decoding gives back the text.
  """
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast

  vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
  tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
  tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
  tokenizer.decoder = decoders.Fuse()
  tokenizer.post_processor = processors.TemplateProcessing(
      single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])])
  return PreTrainedTokenizerFast(
      tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
      unk_token="<unk>", additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
      chat_template=CHAT_TEMPLATE, padding_side="right")
