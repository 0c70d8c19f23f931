"""AI feedback mechanics: the constitutional judge is symmetric by construction, the rule judge
prefers what its rule says, and critique-and-revise produces SFT rows."""

import jax
import numpy as np
import pytest
from transformers import AutoTokenizer

from rlhf_jax import feedback, models
from rlhf_jax.data import formats, synthetic

PROMPTS = [({"role": "user", "content": "review the phone"},),
           ({"role": "user", "content": "review the cafe"},),
           ({"role": "user", "content": "review the movie"},)]
GOOD = ["the screen is great .", "the food is lovely .", "the plot was superb ."]
BAD = ["the screen is awful .", "the food is poor .", "the plot is ok ."]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  path = synthetic.ensure_assets(tmp_path_factory.mktemp("judge"), hidden_size=32,
                                 intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)
  model, params = models.from_pretrained(path)
  return model, params, AutoTokenizer.from_pretrained(path)


def test_rule_judge_prefers_what_its_rule_says_and_is_symmetric():
  judge = feedback.RuleJudge(synthetic.gold_reward_fn)
  np.testing.assert_array_equal(judge.compare(PROMPTS, GOOD, BAD), [1.0, 1.0, 1.0])
  np.testing.assert_array_equal(judge.compare(PROMPTS, BAD, GOOD), [0.0, 0.0, 0.0])
  np.testing.assert_array_equal(judge.compare(PROMPTS, GOOD, GOOD), [0.5, 0.5, 0.5])


def test_constitutional_judge_is_exactly_symmetric_under_swapping(tiny):
  model, params, tokenizer = tiny
  judge = feedback.ConstitutionalJudge(model, params, tokenizer,
                                       constitution=("review the plot .", "review the food ."),
                                       answers=("great", "awful"))
  key = jax.random.key(0)
  forward = judge.compare(PROMPTS, GOOD, BAD, key)
  backward = judge.compare(PROMPTS, BAD, GOOD, key)
  assert np.all((forward > 0) & (forward < 1))
  np.testing.assert_allclose(forward + backward, 1.0, atol=1e-6)
  # A random model has a position bias; averaging both orders removes it: P(a > a) = 1/2.
  np.testing.assert_allclose(judge.compare(PROMPTS, GOOD, GOOD, key), 0.5, atol=1e-6)


def test_constitutional_judge_reads_the_judge_s_answer_log_probs(tiny):
  model, params, tokenizer = tiny
  judge = feedback.ConstitutionalJudge(model, params, tokenizer, constitution=("review",),
                                       answers=("great", "awful"))
  texts = [feedback.JUDGE_TEMPLATE.format(principle="review", prompt=feedback.prompt_as_text(p),
                                          first=a, second=b, answer_prefix="")
           for p, a, b in zip(PROMPTS, GOOD, BAD)]
  ids, mask = feedback._left_pad(tokenizer, texts)
  logits = np.asarray(model.apply(params, ids, mask).logits[:, -1], np.float64)
  a, b = judge.answer_ids
  expected = 1 / (1 + np.exp(logits[:, b] - logits[:, a]))
  np.testing.assert_allclose(judge._first_wins(["review"] * 3, PROMPTS, GOOD, BAD), expected,
                             rtol=1e-5)


def test_multi_token_answers_are_rejected(tiny):
  model, params, tokenizer = tiny
  with pytest.raises(ValueError, match="must be one token"):
    feedback.ConstitutionalJudge(model, params, tokenizer, answers=("great plot", "awful"))


@pytest.mark.slow
def test_critique_and_revise_produces_sft_rows(tiny):
  model, params, tokenizer = tiny
  rows, trace = feedback.critique_and_revise(model, params, tokenizer, list(PROMPTS), BAD,
                                             jax.random.key(1), max_new_tokens=8,
                                             constitution=("be positive",))
  assert len(trace["critiques"]) == len(trace["revisions"]) == 3
  assert trace["principles"] == ["be positive"] * 3
  for row in rows:  # every row is valid SFT data in the conversational format
    example = formats.normalize_sft(row)
    assert example.prompt in PROMPTS and example.completion[0]["role"] == "assistant"
