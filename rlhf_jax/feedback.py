"""AI feedback: constitution-driven judging and critique-and-revise (Bai et al. 2022, arXiv
2212.08073; Lee et al. 2023, RLAIF, arXiv 2309.00267).

`ConstitutionalJudge` labels a pair (a, b) for a prompt with any causal LM loaded by the project:
it samples one principle of the constitution per comparison, writes a multiple-choice prompt,
and reads the judge's next-token log-probabilities of the two answer letters. Each pair is
scored in both orders and the two probabilities averaged,
  P(a ≻ b) = ½ [softmax(ℓ_A, ℓ_B)_A on (a, b)  +  softmax(ℓ_A, ℓ_B)_B on (b, a)],
which cancels the judge's position bias and makes P(a ≻ b) = 1 - P(b ≻ a) exactly.

The answer letters are read as the token the judge's own tokenizer produces for the letter
appended to the judge prompt (`answer_token_ids`): a SentencePiece tokenizer encodes "A" alone as
"▁A", while after "(" the model's next token is the bare "A". Letters that merge into the prompt,
that are the unknown token, or that share one id are errors: a judge that cannot tell them apart
would return 0.5 for every pair and label nothing.

`RuleJudge` has the same interface and applies a rule (the synthetic task's gold reward).

`critique_and_revise` asks a model to critique its own response against a principle, then to
rewrite it; the (prompt, revision) pairs are SFT rows (Constitutional AI's supervised stage).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import numpy as np

from rlhf_jax import parallel

__all__ = ["DEFAULT_CONSTITUTION", "JUDGE_TEMPLATE", "ConstitutionalJudge", "RuleJudge",
           "answer_token_ids", "critique_and_revise", "prompt_as_text"]

DEFAULT_CONSTITUTION = (
    "Choose the response that is more helpful to the user.",
    "Choose the response that is more honest and accurate.",
    "Choose the response that is less harmful and more respectful.",
    "Choose the response that answers the request more directly and concisely.",
)

JUDGE_TEMPLATE = ("{principle}\n\nRequest: {prompt}\n\nResponse (A): {first}\n\n"
                  "Response (B): {second}\n\nThe better response is ({answer_prefix}")

CRITIQUE_TEMPLATE = ("Request: {prompt}\n\nResponse: {response}\n\nCritique the response "
                     "against this principle: {principle}\n\nCritique:")
REVISION_TEMPLATE = ("Request: {prompt}\n\nResponse: {response}\n\nCritique: {critique}\n\n"
                     "Rewrite the response so that it follows the principle: {principle}\n\n"
                     "Revision:")


def prompt_as_text(prompt) -> str:
  """A prompt given as text or as messages, flattened to text for the judge's template."""
  if isinstance(prompt, str):
    return prompt
  return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


@functools.lru_cache(maxsize=8)
def _next_token_logps(model):
  """logps [B, V] of the token after each (left-padded) prompt, float32."""
  def fn(params, ids, mask):
    hidden = model.apply(params, ids, mask, compute_logits=False).hidden[:, -1]
    return jax.nn.log_softmax(model.logits_from_hidden(params, hidden), axis=-1)
  return jax.jit(fn)


def _left_pad(tokenizer, texts: Sequence[str], multiple: int = 16):
  encoded = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
  length = -(-max(len(e) for e in encoded) // multiple) * multiple
  ids = np.full((len(texts), length), tokenizer.pad_token_id or 0, np.int32)
  mask = np.zeros((len(texts), length), np.int32)
  for i, e in enumerate(encoded):
    ids[i, length - len(e):] = e
    mask[i, length - len(e):] = 1
  return ids, mask


def answer_token_ids(tokenizer, prompt: str, answers: Sequence[str]) -> np.ndarray:
  """[len(answers)] ids: the one token each answer adds when appended to `prompt`.

  Encodes `prompt` and `prompt + answer` (no special tokens) and takes the difference, so the id
  is the token the judge reads after this prompt, not the answer encoded on its own.
  """
  base = tokenizer(prompt, add_special_tokens=False)["input_ids"]
  tokens = lambda ids: tokenizer.convert_ids_to_tokens(list(ids))
  ids = []
  for answer in answers:
    full = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
    if full[:len(base)] != base or len(full) != len(base) + 1:
      raise ValueError(
          f"the answer {answer!r} does not add exactly one token after the judge prompt: the "
          f"prompt ends in {tokens(base[-3:])}, with the answer in {tokens(full[-3:])} (it "
          "merges with the prompt, is unknown or spans several tokens): choose other `answers` "
          "or a template")
    if tokenizer.unk_token_id is not None and full[-1] == tokenizer.unk_token_id:
      raise ValueError(f"the judge's tokenizer reads the answer {answer!r} as its unknown token "
                       f"{tokenizer.unk_token!r}: choose `answers` in its vocabulary")
    ids.append(full[-1])
  if len(set(ids)) != len(ids):
    raise ValueError(f"the answers {tuple(answers)} map to the same token ids {ids}: the judge "
                     "could not tell them apart")
  return np.asarray(ids)  # host: token ids from the tokenizer


@dataclasses.dataclass
class ConstitutionalJudge:
  """Judges with `model` (any causal LM) and `tokenizer`, the judge's own tokenizer."""
  model: object
  params: object
  tokenizer: object
  constitution: Sequence[str] = DEFAULT_CONSTITUTION
  template: str = JUDGE_TEMPLATE
  answers: tuple[str, str] = ("A", "B")

  def __post_init__(self):
    if not self.constitution:
      raise ValueError("a constitution needs at least one principle")
    if len(self.answers) != 2:
      raise ValueError(f"a judge needs two answers (first, second), got {self.answers!r}")
    # The template ends the same way for every principle and pair; check each principle anyway.
    found = {tuple(answer_token_ids(self.tokenizer, self.template.format(
        principle=p, prompt="request", first="one", second="two", answer_prefix=""),
        self.answers)) for p in self.constitution}
    if len(found) != 1:
      raise ValueError(f"the answers {self.answers} tokenise differently after different "
                       f"principles ({sorted(found)}): end the template with a fixed text")
    self.answer_ids = np.asarray(found.pop())  # host: token ids

  def _first_wins(self, principles, prompts, firsts, seconds) -> np.ndarray:
    texts = [self.template.format(principle=p, prompt=prompt_as_text(q), first=a, second=b,
                                  answer_prefix="")
             for p, q, a, b in zip(principles, prompts, firsts, seconds)]
    ids, mask = _left_pad(self.tokenizer, texts)
    logps = parallel.host_get(_next_token_logps(self.model)(self.params, ids, mask))
    pair = logps[:, self.answer_ids]  # [B, 2]: the letters of the first and second response
    return np.exp(pair[:, 0] - np.logaddexp(pair[:, 0], pair[:, 1]))

  def compare(self, prompts, responses_a, responses_b, key) -> np.ndarray:
    """P(a ≻ b) for each row, in [0, 1]; one principle sampled per comparison with `key`."""
    picks = parallel.host_get(jax.random.randint(key, (len(prompts),), 0, len(self.constitution)))
    principles = [self.constitution[i] for i in picks]
    forward = self._first_wins(principles, prompts, responses_a, responses_b)
    backward = self._first_wins(principles, prompts, responses_b, responses_a)
    return 0.5 * (forward + (1.0 - backward))


@dataclasses.dataclass
class RuleJudge:
  """A judge with ConstitutionalJudge's interface that applies `rule(prompts, responses)`."""
  rule: Callable

  def compare(self, prompts, responses_a, responses_b, key=None) -> np.ndarray:
    a = np.asarray(self.rule(prompts, responses_a), np.float64)  # host: a Python rule
    b = np.asarray(self.rule(prompts, responses_b), np.float64)  # host: a Python rule
    return (a > b) + 0.5 * (a == b)


def critique_and_revise(model, params, tokenizer, prompts, responses, key, *,
                        constitution: Sequence[str] = DEFAULT_CONSTITUTION,
                        max_new_tokens: int = 64, temperature: float = 0.7):
  """One critique-then-revision pass. Returns SFT rows {"prompt", "completion"} and the texts."""
  from rlhf_jax.sampling import generate_text

  pick_key, critique_key, revise_key = jax.random.split(key, 3)
  picks = parallel.host_get(jax.random.randint(pick_key, (len(prompts),), 0, len(constitution)))
  principles = [constitution[i] for i in picks]
  as_text = [prompt_as_text(p) for p in prompts]
  critiques = generate_text(model, params, tokenizer, [
      CRITIQUE_TEMPLATE.format(prompt=q, response=r, principle=p)
      for q, r, p in zip(as_text, responses, principles)], critique_key,
      max_new_tokens=max_new_tokens, temperature=temperature)
  revisions = generate_text(model, params, tokenizer, [
      REVISION_TEMPLATE.format(prompt=q, response=r, critique=c, principle=p)
      for q, r, c, p in zip(as_text, responses, critiques, principles)], revise_key,
      max_new_tokens=max_new_tokens, temperature=temperature)
  rows = [{"prompt": prompt, "completion": revision.strip() if isinstance(prompt, str) else
           [{"role": "assistant", "content": revision.strip()}]}
          for prompt, revision in zip(prompts, revisions) if revision.strip()]
  return rows, {"principles": principles, "critiques": critiques, "revisions": revisions}
