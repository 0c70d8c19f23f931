"""Tokenisation: exact prompt/completion boundary, one BOS, EOS, one truncation rule per row."""

import numpy as np
import pytest

from rlhf_jax.data import formats
from rlhf_jax.data.formats import DataError, PairExample, SFTExample
from rlhf_jax.data.tokenize import SkipRow, TokenizeConfig, tokenize_example

CONFIG = TokenizeConfig(max_length=64)


def test_boundary_is_exact_even_where_a_merge_would_cross_it(bpe_tokenizer):
  joint = bpe_tokenizer("say hello", add_special_tokens=False)["input_ids"]
  record = tokenize_example(SFTExample("say hel", "lo"), bpe_tokenizer, CONFIG)
  # Tokenised jointly, "hello" is one token; split, the prompt keeps exactly "say hel".
  assert len(joint) < len(record.prompt) + len(record.completion)
  assert bpe_tokenizer.decode(record.prompt) == "say hel"
  assert bpe_tokenizer.decode(record.completion[:-1]) == "lo"
  assert record.completion[-1] == bpe_tokenizer.eos_token_id  # plain text: EOS appended


def test_single_bos_with_and_without_a_template_bos(word_tokenizer):
  bos = word_tokenizer.bos_token_id
  example = PairExample(({"role": "user", "content": "review the phone"},),
                        ({"role": "assistant", "content": "the screen is good ."},),
                        ({"role": "assistant", "content": "the screen is bad ."},))
  record = tokenize_example(example, word_tokenizer, CONFIG)
  assert record.prompt[0] == bos and np.sum(record.prompt == bos) == 1
  # A template that writes the BOS itself: still exactly one.
  template = word_tokenizer.chat_template
  try:
    word_tokenizer.chat_template = "<bos> " + template
    record = tokenize_example(example, word_tokenizer, CONFIG)
  finally:
    word_tokenizer.chat_template = template
  assert np.sum(record.prompt == bos) == 1 and record.prompt[0] == bos
  # The conversational completion ends with the template's end-of-turn (<eos>), not two.
  assert record.chosen[-1] == word_tokenizer.eos_token_id
  assert np.sum(record.chosen == word_tokenizer.eos_token_id) == 1


def test_chat_template_renders_prompt_and_completion(word_tokenizer):
  example = formats.normalize_sft({"messages": [{"role": "user", "content": "review the cafe"},
                                                {"role": "assistant", "content": "the food is ok ."}]})
  record = tokenize_example(example, word_tokenizer, CONFIG)
  tokens = word_tokenizer.convert_ids_to_tokens
  assert tokens(record.prompt.tolist()) == ["<bos>", "<|user|>", "review", "the", "cafe",
                                            "<|assistant|>"]
  assert tokens(record.completion.tolist()) == ["the", "food", "is", "ok", ".", "<eos>"]


def test_prompt_keeps_its_end_and_completions_share_one_budget(word_tokenizer):
  prompt = "the plot is good . " * 3 + "the movie"
  example = PairExample(prompt, "the plot is good . the music is bad .", "the plot is bad .")
  config = TokenizeConfig(max_length=12, max_prompt_length=5)
  record = tokenize_example(example, word_tokenizer, config)
  # The start was dropped, the end (next to the response) and the BOS kept.
  assert word_tokenizer.convert_ids_to_tokens(record.prompt.tolist()) == [
      "<bos>", "good", ".", "the", "movie"]
  assert record.truncated
  # Both completions are cut to the same budget, 12 - 5 = 7 tokens.
  assert len(record.chosen) == 7 and len(record.rejected) == 6  # rejected fit (5 words + <eos>)
  with pytest.raises(DataError, match="exceed max_length=12"):
    tokenize_example(example, word_tokenizer, TokenizeConfig(12, 5, on_overflow="error"), "f", 3)
  with pytest.raises(SkipRow):
    tokenize_example(example, word_tokenizer, TokenizeConfig(12, 5, on_overflow="skip"))


def test_prompt_alone_over_max_length_is_a_bad_row(word_tokenizer):
  example = SFTExample("the plot is good . " * 4, "the movie")
  with pytest.raises(DataError, match="prompt alone is .* tokens") as info:
    tokenize_example(example, word_tokenizer, TokenizeConfig(max_length=10), "sft.jsonl", 5)
  assert info.value.field == "prompt" and "sft.jsonl, row 5" in str(info.value)


def test_pair_identical_after_truncation_is_rejected(word_tokenizer):
  example = PairExample("review", "the plot is good . the music", "the plot is good . the movie")
  with pytest.raises(DataError, match="identical after truncation"):
    tokenize_example(example, word_tokenizer, TokenizeConfig(max_length=5))


@pytest.mark.parametrize("template, message", [
    (None, "needs a tokenizer with a chat template"),
    ("{{ raise_exception('Conversation roles must alternate') }}", "roles must alternate"),
])
def test_chat_template_errors_name_the_file_and_row(word_tokenizer, template, message):
  example = formats.normalize_sft({"messages": [
      {"role": "user", "content": "review the cafe"},
      {"role": "assistant", "content": "the food is ok ."}]})
  original = word_tokenizer.chat_template
  try:
    word_tokenizer.chat_template = template
    with pytest.raises(DataError, match=message) as info:
      tokenize_example(example, word_tokenizer, CONFIG, "chat.jsonl", 3)
  finally:
    word_tokenizer.chat_template = original
  assert str(info.value).startswith("chat.jsonl, row 3: chat template: ")
