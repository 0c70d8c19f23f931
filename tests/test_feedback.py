"""AI feedback mechanics: the constitutional judge is symmetric by construction and reads the
answer token its own tokenizer produces after the prompt (and refuses answers it cannot tell
apart), the rule judge prefers what its rule says, K-way judging picks best and worst, iterative
DPO labels pairs with a model judge, and critique-and-revise produces SFT rows."""

import jax
import numpy as np
import pytest
from transformers import AutoTokenizer

from rlhf_jax import embedded, feedback, models
from rlhf_jax.data import formats, synthetic
from rlhf_jax.parallel import MeshConfig
from rlhf_jax import rollout
from rlhf_jax.train import common, iterative, loop, rounds

PROMPTS = [({"role": "user", "content": "review the phone"},),
           ({"role": "user", "content": "review the cafe"},),
           ({"role": "user", "content": "review the movie"},)]
GOOD = ["the screen is great .", "the food is lovely .", "the plot was superb ."]
BAD = ["the screen is awful .", "the food is poor .", "the plot is ok ."]


TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1)
# The synthetic tokenizer is word-level on whitespace: " great" after "(" is its own word.
ANSWERS = (" great", " awful")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  path = embedded.ensure_assets(tmp_path_factory.mktemp("judge"), **TINY)
  model, params = models.from_pretrained(path)
  return model, params, AutoTokenizer.from_pretrained(path)


def metaspace_tokenizer(words=()):
  """A SentencePiece-like tokenizer: Metaspace marks word starts with "▁"; WordPiece continues a
  word with "##". "A" alone is "▁A", but after "(" it is "##A"."""
  from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  vocab = ["[UNK]", "[PAD]", "▁A", "▁B", "##A", "##B", "▁(", "▁is"]
  vocab += [f"▁{w}" for w in words if f"▁{w}" not in vocab]
  tokenizer = Tokenizer(tok_models.WordPiece({t: i for i, t in enumerate(vocab)},
                                             unk_token="[UNK]", continuing_subword_prefix="##"))
  tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
  return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]",
                                 pad_token="[PAD]")


def test_rule_judge_prefers_what_its_rule_says_and_is_symmetric():
  judge = feedback.RuleJudge(synthetic.gold_reward_fn)
  np.testing.assert_array_equal(judge.compare(PROMPTS, GOOD, BAD), [1.0, 1.0, 1.0])
  np.testing.assert_array_equal(judge.compare(PROMPTS, BAD, GOOD), [0.0, 0.0, 0.0])
  np.testing.assert_array_equal(judge.compare(PROMPTS, GOOD, GOOD), [0.5, 0.5, 0.5])


def test_constitutional_judge_is_exactly_symmetric_under_swapping(tiny):
  model, params, tokenizer = tiny
  judge = feedback.ConstitutionalJudge(model, params, tokenizer,
                                       constitution=("review the plot .", "review the food ."),
                                       answers=ANSWERS)
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
                                       answers=ANSWERS)
  texts = [feedback.JUDGE_TEMPLATE.format(principle="review", prompt=feedback.prompt_as_text(p),
                                          first=a, second=b, answer_prefix="")
           for p, a, b in zip(PROMPTS, GOOD, BAD)]
  ids, mask = feedback._left_pad(tokenizer, texts)
  logits = np.asarray(model.apply(params, ids, mask).logits[:, -1], np.float64)
  a, b = judge.answer_ids
  assert (a, b) == tuple(tokenizer.convert_tokens_to_ids(["great", "awful"]))
  expected = 1 / (1 + np.exp(logits[:, b] - logits[:, a]))
  np.testing.assert_allclose(judge._first_wins(["review"] * 3, PROMPTS, GOOD, BAD), expected,
                             rtol=1e-5)


def test_answers_the_judge_cannot_read_are_clear_errors(tiny):
  model, params, tokenizer = tiny
  # "(A" is one unknown word for this tokenizer: "A" and "B" would both be <unk>, the judge would
  # answer 0.5 for every pair and label nothing.
  with pytest.raises(ValueError, match="does not add exactly one token"):
    feedback.ConstitutionalJudge(model, params, tokenizer)
  with pytest.raises(ValueError, match="unknown token"):
    feedback.ConstitutionalJudge(model, params, tokenizer, answers=(" A", " B"))
  with pytest.raises(ValueError, match="does not add exactly one token"):
    feedback.ConstitutionalJudge(model, params, tokenizer, answers=(" great plot", " awful"))
  with pytest.raises(ValueError, match="same token"):
    feedback.ConstitutionalJudge(model, params, tokenizer, answers=(" great", " great"))


def test_answer_token_is_the_one_after_the_prompt_not_the_letter_alone():
  tokenizer = metaspace_tokenizer()
  standalone = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in ("A", "B")]
  assert tokenizer.convert_ids_to_tokens([i[0] for i in standalone]) == ["▁A", "▁B"]
  judge = feedback.ConstitutionalJudge(None, None, tokenizer)  # the ids need no model
  assert tokenizer.convert_ids_to_tokens(list(judge.answer_ids)) == ["##A", "##B"]
  prompt = "The better response is ("
  assert tokenizer(prompt + "A", add_special_tokens=False)["input_ids"][-1] == judge.answer_ids[0]


def test_judge_scores_pick_best_and_worst_of_k_responses():
  judge = feedback.RuleJudge(synthetic.gold_reward_fn)
  prompts = PROMPTS[:2]
  # Prompt-major, K = 3: the good answer is response 1 of prompt 0 and response 2 of prompt 1.
  responses = [BAD[0], GOOD[0], "the screen is ok .", BAD[1], "the food is ok .", GOOD[1]]
  scores = iterative.judge_scores(judge.compare, prompts, responses, 3, None)
  assert scores.shape == (2, 3)
  np.testing.assert_array_equal(np.argmax(scores, 1), [1, 2])
  np.testing.assert_array_equal(np.argmin(scores, 1), [0, 0])
  np.testing.assert_allclose(scores.sum(1), 3.0)  # each of the 3 comparisons hands out 1


@pytest.mark.slow
def test_iterative_dpo_round_with_a_model_judge_labels_pairs(tmp_path):
  """The judge loads its own tokenizer from its checkpoint: here one whose "A"/"B" are real
  tokens, while the policy's (synthetic, word-level) tokenizer reads them as <unk>."""
  policy = embedded.ensure_assets(tmp_path / "policy", **TINY)
  judge_dir = embedded.ensure_assets(tmp_path / "judge", seed=1, **TINY)
  judge_tokenizer = metaspace_tokenizer(synthetic.WORDS)
  assert len(judge_tokenizer) <= models.from_pretrained(judge_dir)[0].config.vocab_size
  judge_tokenizer.save_pretrained(judge_dir)
  config = iterative.IterativeDPOConfig(
      model=common.ModelSpec(path=policy),
      data=common.DataSpec(train="synthetic:prompt", num_rows=64, max_length=16, buckets=(16,),
                           eval_fraction=0.0),
      generation=rollout.GenerationConfig(max_new_tokens=6, num_samples=3),
      labels=iterative.LabelConfig(kind="judge", judge=judge_dir,
                                   constitution=("Choose the better review.",)),
      rounds=rounds.RoundConfig(rounds=1, prompts_per_round=16, minibatch_size=16,
                                epochs_per_round=1),
      run=loop.RunConfig(steps=0, output_dir=str(tmp_path / "run"), progress=False,
                         async_checkpoint=False, mesh=MeshConfig(1, 1, 1)))
  task = iterative.build_task(config)
  state, metrics = task.train_step(task.init_state(), task.batch(0))
  assert metrics["round/labelled_pairs"] > 0
  assert float(metrics["grad_norm"]) > 0
  with pytest.raises(ValueError, match="does not add exactly one token"):
    feedback.ConstitutionalJudge(None, None, common.load_tokenizer(config.model))


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
