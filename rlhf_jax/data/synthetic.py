"""The embedded synthetic task: a tiny review language whose gold reward is known exactly.

Prompts ask for a review of an item ("review the phone"); a response is a few sentences
"the <aspect> is|was [very|really|quite] <adjective> ." followed by the end-of-turn token. Every
item belongs to a category with its own aspects (a phone has a screen, not a plot), so the response
must depend on the prompt. The gold reward of a response, in [-1, 1], is the mean over its
sentences of:
  +1 / 0 / -1   a well-formed sentence about a new, valid aspect with a positive / neutral /
                negative adjective;
   0            a well-formed sentence about an aspect already reviewed (repetition earns nothing);
  -1            a malformed sentence, or an aspect the item does not have.
A response with no sentence scores -1. Length is not rewarded; repetition and nonsense are
punished. That is what makes over-optimisation visible: a proxy reward model trained on labels of
ordinary samples can like "the screen is great ." five times over, or longer answers, where gold
does not.

"Human" labels are Bradley-Terry draws on the gold reward, with a temperature (noise) and an
optional length bias (labellers who prefer longer answers), all seeded and generated locally.
Demonstrations (SFT data) come from the base distribution: mixed sentiment, 1-3 sentences, so a
policy fine-tuned on them has gold reward near 0 and room to improve.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = [
    "SyntheticTask",
    "CATEGORIES",
    "ITEMS",
    "gold_reward",
    "gold_reward_fn",
    "prompt_text",
    "completion_text",
    "sample_response",
    "prompt_messages",
    "build_tokenizer",
    "CHAT_TEMPLATE",
    "TINY_MODEL",
]

CATEGORIES = {
    "media": (("movie", "film", "show"), ("plot", "acting", "music", "ending")),
    "device": (("phone", "laptop", "tablet"), ("screen", "battery", "price", "design")),
    "venue": (("cafe", "hotel", "restaurant"), ("food", "service", "price", "staff")),
}
ITEMS = tuple(item for items, _ in CATEGORIES.values() for item in items)
ASPECTS = tuple(sorted({a for _, aspects in CATEGORIES.values() for a in aspects}))
ADJECTIVES = {
    **{word: 1 for word in ("good", "great", "excellent", "lovely", "superb", "fine")},
    **{word: -1 for word in ("bad", "awful", "poor", "boring", "terrible", "weak")},
    **{word: 0 for word in ("ok", "average", "plain")},
}
INTENSIFIERS = ("very", "really", "quite")
VERBS = ("is", "was")
WORDS = ("review", "the", ".") + VERBS + INTENSIFIERS + ITEMS + ASPECTS + tuple(ADJECTIVES)
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>")
# Renders "<|user|> review the phone <|assistant|> the screen is good . <eos>". The assistant turn
# ends with <eos>, the model's stop token. No BOS here: the tokenizer adds it.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} "
    "{% if message['role'] == 'assistant' %}<eos> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}")

# The embedded model (rlhf_jax.embedded builds it): a 0.56M-parameter Llama-family model
# (transformers LlamaConfig fields): GQA, RMSNorm, RoPE, SwiGLU and tied embeddings as in the real
# ones, sized so the whole pipeline fits ~3 minutes on 2 CPU cores (the task's 50-token
# vocabulary needs no more).
TINY_MODEL = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rope_theta=10000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)


def _category(item: str) -> str:
  for name, (items, _) in CATEGORIES.items():
    if item in items:
      return name
  raise ValueError(f"unknown item {item!r}; items are {ITEMS}")


def item_of(prompt: str) -> str:
  """The item a prompt asks about ("review the phone" -> "phone")."""
  words = prompt.split()
  if len(words) != 3 or words[:2] != ["review", "the"]:
    raise ValueError(f"not a synthetic prompt: {prompt!r} (expected 'review the <item>')")
  return words[2]


def gold_reward(prompt: str, response: str) -> float:
  """The exact gold reward of `response` (plain text, no special tokens) to `prompt`."""
  aspects = CATEGORIES[_category(item_of(prompt))][1]
  words = response.replace("<eos>", " ").split()
  sentences, current = [], []
  for word in words:
    current.append(word)
    if word == ".":
      sentences.append(current)
      current = []
  if current:  # trailing words without a full stop: a malformed sentence
    sentences.append(current)
  if not sentences:
    return -1.0
  seen, total = set(), 0.0
  for sentence in sentences:
    body = sentence[:-1] if sentence[-1] == "." else None
    ok = (body is not None and len(body) in (4, 5) and body[0] == "the" and body[1] in aspects
          and body[2] in VERBS and body[-1] in ADJECTIVES
          and (len(body) == 4 or body[3] in INTENSIFIERS))
    if not ok:
      total -= 1.0
    elif body[1] not in seen:
      seen.add(body[1])
      total += ADJECTIVES[body[-1]]
  return total / len(sentences)


def prompt_text(prompt) -> str:
  """The user's request from a prompt given as text or as messages (last user turn)."""
  if isinstance(prompt, str):
    return prompt
  return [m["content"] for m in prompt if m["role"] == "user"][-1]


def completion_text(completion) -> str:
  """A completion given as text or as messages (the last assistant turn's content)."""
  if isinstance(completion, str):
    return completion
  return [m["content"] for m in completion if m["role"] == "assistant"][-1]


def gold_reward_fn(prompts, completions, **columns) -> list[float]:
  """The gold reward as a reward function (TRL's convention: prompts and completions as the
  trainer passes them, text or messages; other columns ignored)."""
  return [gold_reward(prompt_text(p), completion_text(c)) for p, c in zip(prompts, completions)]


def prompt_messages(item: str) -> tuple:
  return ({"role": "user", "content": f"review the {item}"},)


def sample_response(rng: np.random.Generator, item: str, *, positive_rate: float = 0.4,
                    negative_rate: float = 0.4, max_sentences: int = 3) -> str:
  """A response from the base (demonstration) distribution: distinct valid aspects."""
  aspects = CATEGORIES[_category(item)][1]
  num = int(rng.integers(1, max_sentences + 1))
  chosen_aspects = rng.choice(len(aspects), size=num, replace=False)
  by_sign = {s: [w for w, v in ADJECTIVES.items() if v == s] for s in (1, 0, -1)}
  sentences = []
  for a in chosen_aspects:
    u = rng.random()
    sign = 1 if u < positive_rate else (-1 if u < positive_rate + negative_rate else 0)
    words = ["the", aspects[a], VERBS[rng.integers(2)]]
    if rng.random() < 0.3:
      words.append(INTENSIFIERS[rng.integers(len(INTENSIFIERS))])
    words += [by_sign[sign][rng.integers(len(by_sign[sign]))], "."]
    sentences.append(" ".join(words))
  return " ".join(sentences)


def _sentences(response: str) -> int:
  return max(response.count("."), 1)


@dataclasses.dataclass(frozen=True)
class SyntheticTask:
  """Seeded generators for every data format, labelled from the gold reward."""
  seed: int = 0
  label_temperature: float = 0.25  # BT noise: P(a > b) = σ((g_a - g_b) / T + bias·(n_a - n_b))
  length_bias: float = 0.0  # labellers' preference per extra sentence (0: unbiased labels)

  def _rng(self, stream: int) -> np.random.Generator:
    return np.random.default_rng([self.seed, stream])

  def prompts(self, n: int, stream: int = 0) -> list[str]:
    rng = self._rng(1000 + stream)
    return [ITEMS[i] for i in rng.integers(len(ITEMS), size=n)]

  def prefers_first(self, rng, item: str, a: str, b: str) -> bool:
    prompt = f"review the {item}"
    logit = (gold_reward(prompt, a) - gold_reward(prompt, b)) / self.label_temperature
    logit += self.length_bias * (_sentences(a) - _sentences(b))
    return bool(rng.random() < 1.0 / (1.0 + np.exp(-logit)))

  def prompt_rows(self, n: int, stream: int = 0) -> list[dict]:
    """RL prompts: the policy writes the review."""
    return [{"prompt": list(prompt_messages(item))} for item in self.prompts(n, 400 + stream)]

  def sft_rows(self, n: int, stream: int = 0) -> list[dict]:
    rng = self._rng(stream)
    return [{"messages": [*prompt_messages(item),
                          {"role": "assistant", "content": sample_response(rng, item)}]}
            for item in self.prompts(n, stream)]

  def preference_rows(self, n: int, stream: int = 0) -> list[dict]:
    rng = self._rng(100 + stream)
    rows = []
    for item in self.prompts(n, 100 + stream):
      a = sample_response(rng, item)
      b = sample_response(rng, item)
      while b == a:
        b = sample_response(rng, item)
      chosen, rejected = (a, b) if self.prefers_first(rng, item, a, b) else (b, a)
      rows.append({"prompt": list(prompt_messages(item)),
                   "chosen": [{"role": "assistant", "content": chosen}],
                   "rejected": [{"role": "assistant", "content": rejected}]})
    return rows

  def unpaired_rows(self, n: int, stream: int = 0) -> list[dict]:
    """KTO rows: a response is desirable when a labeller prefers it to a fresh base sample."""
    rng = self._rng(200 + stream)
    rows = []
    for item in self.prompts(n, 200 + stream):
      response = sample_response(rng, item)
      label = self.prefers_first(rng, item, response, sample_response(rng, item))
      rows.append({"prompt": list(prompt_messages(item)),
                   "completion": [{"role": "assistant", "content": response}], "label": label})
    return rows

  def ranked_rows(self, n: int, num_completions: int = 4, stream: int = 0) -> list[dict]:
    """K-wise rows ranked by noisy gold (Plackett-Luce through Gumbel noise on the BT logits)."""
    rng = self._rng(300 + stream)
    rows = []
    for item in self.prompts(n, 300 + stream):
      completions = [sample_response(rng, item) for _ in range(num_completions)]
      prompt = f"review the {item}"
      utility = np.array([gold_reward(prompt, c) / self.label_temperature
                          + self.length_bias * _sentences(c) for c in completions])
      order = np.argsort(-(utility + rng.gumbel(size=num_completions)), kind="stable")
      ranks = np.empty(num_completions, int)
      ranks[order] = np.arange(num_completions)
      rows.append({"prompt": list(prompt_messages(item)),
                   "completions": [[{"role": "assistant", "content": c}] for c in completions],
                   "ranks": ranks.tolist()})
    return rows


def build_tokenizer():
  """A word-level tokenizer trained with `tokenizers` on the language, as a transformers tokenizer.

  It adds <bos> to every encoding (so the data pipeline's single-BOS logic is exercised), pads
  with <pad>, and carries CHAT_TEMPLATE.
  """
  from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast

  tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
  tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS), min_frequency=1)
  # Every word once, in a fixed order, so the vocabulary (and ids) are deterministic.
  tokenizer.train_from_iterator([" ".join(WORDS)], trainer=trainer)
  tokenizer.post_processor = processors.TemplateProcessing(
      single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", tokenizer.token_to_id(
          "<bos>"))])
  return PreTrainedTokenizerFast(
      tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
      unk_token="<unk>", additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
      chat_template=CHAT_TEMPLATE, padding_side="right")
