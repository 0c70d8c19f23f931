"""Rollout scoring: reward functions called as users write them (TRL's convention), their
errors, weights and per-function metrics; loading by spec; 'auto' rewards; group selection."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import rewards, rollout
from rlhf_jax.data import arithmetic, prepare, TokenizeConfig


@pytest.fixture(scope="module")
def tokenizer():
  return arithmetic.build_tokenizer()


@dataclasses.dataclass
class Record:  # what the data layer's prompt records carry for reward functions
  text: object
  columns: dict
  row: int


CHAT = [Record(({"role": "user", "content": "1+2"},), {"answer": "3", "level": 1}, 7),
        Record(({"role": "user", "content": "5+5"},), {"answer": "10", "level": 2}, 8)]


def _rollout(tokenizer, responses, has_stop=None):
  """A Rollout whose response rows decode to `responses` (one row per prompt record)."""
  eos = tokenizer.eos_token_id
  ids = [tokenizer(r, add_special_tokens=False)["input_ids"] + [eos] for r in responses]
  n = max(map(len, ids)) + 1
  tokens = np.full((len(ids), n), tokenizer.pad_token_id, np.int32)
  mask = np.zeros((len(ids), n), np.float32)
  for i, row in enumerate(ids):
    tokens[i, :len(row)], mask[i, :len(row)] = row, 1
  prompt = np.full((len(ids), 2), tokenizer.bos_token_id, np.int32)
  return rollout.Rollout(
      input_ids=jnp.asarray(np.concatenate([prompt, tokens], 1)),
      attention_mask=jnp.asarray(np.concatenate([np.ones_like(prompt), mask.astype(np.int32)],
                                                1)),
      response_mask=jnp.asarray(mask), sampler_logps=jnp.zeros(mask.shape),
      has_stop=jnp.asarray(np.ones(len(ids), bool) if has_stop is None else has_stop),
      prompt_index=jnp.arange(len(ids), dtype=jnp.int32))


def test_a_reward_function_sees_prompts_completions_and_every_column(tokenizer):
  seen = {}

  def reward(prompts, completions, **columns):
    seen.update(prompts=prompts, completions=completions, **columns)
    return [float(c[0]["content"] == a) for c, a in zip(completions, columns["answer"])]

  out = rewards.RewardFunction(reward, "check")(CHAT, ["3", "11"], [[1, 2], [3]])
  np.testing.assert_array_equal(out, [1.0, 0.0])
  # Conversational rows: prompts as lists of message dicts, completions as assistant messages.
  assert seen["prompts"] == [[{"role": "user", "content": "1+2"}],
                             [{"role": "user", "content": "5+5"}]]
  assert seen["completions"] == [[{"role": "assistant", "content": "3"}],
                                 [{"role": "assistant", "content": "11"}]]
  assert seen["answer"] == ["3", "10"] and seen["level"] == [1, 2]
  assert seen["completion_ids"] == [[1, 2], [3]]
  # Plain-text prompts get plain-text completions.
  seen.clear()
  plain = rewards.RewardFunction(lambda prompts, completions, **kw: seen.update(
      prompts=prompts, completions=completions) or [0.0], "plain")
  plain([Record("1+2", {}, 0)], ["3"], [[1]])
  assert seen == {"prompts": ["1+2"], "completions": ["3"]}


def test_a_function_without_kwargs_gets_the_columns_it_names(tokenizer):
  def reward(prompts, completions, answer):
    return [float(c[0]["content"] == a) for c, a in zip(completions, answer)]

  np.testing.assert_array_equal(rewards.RewardFunction(reward, "r")(CHAT, ["3", "10"], [[], []]),
                                [1.0, 1.0])

  def needs_solution(prompts, completions, solution):
    return [0.0] * len(prompts)

  with pytest.raises(rewards.RewardError, match=r"'needs_solution' needs the column\(s\) "
                                               r"\['solution'\]"):
    rewards.RewardFunction(needs_solution, "needs_solution")(CHAT, ["3", "10"], [[], []])


@pytest.mark.parametrize("returned, message", [
    ([1.0], "reward function 'bad' returned 1 values for 2 completions"),
    (3.0, "reward function 'bad' returned float"),
    ([1.0, "x"], "row 8: reward function 'bad' returned 'x'; expected a float or None"),
    ([1.0, float("nan")], "row 8: reward function 'bad' returned nan; expected a finite float"),
    ([float("inf"), 1.0], "row 7: reward function 'bad' returned inf; expected a finite float"),
])
def test_bad_reward_values_name_the_function_and_the_row(returned, message):
  fn = rewards.RewardFunction(lambda prompts, completions, **kw: returned, "bad")
  with pytest.raises(rewards.RewardError) as error:
    fn(CHAT, ["3", "10"], [[], []])
  assert str(error.value).startswith(message)


def test_a_raising_reward_function_names_the_row_that_raises():
  def reward(prompts, completions, answer, **kw):
    return [1.0 / (int(a) - 10) for a in answer]  # the second row divides by zero

  with pytest.raises(rewards.RewardError) as error:
    rewards.RewardFunction(reward, "div")(CHAT, ["3", "10"], [[], []])
  assert str(error.value) == ("row 8: reward function 'div' raised ZeroDivisionError: float "
                              "division by zero (completion [{'role': 'assistant', 'content': "
                              "'10'}])")


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_a_reward_error_names_the_prompt_row_as_data_errors_do(tmp_path, tokenizer, suffix):
  """A prompt from a line-based file is named by its line (as a bad data row is); one from
  any other source by its row counted from 0."""
  import datasets

  from rlhf_jax.data import TokenizeConfig, loading
  rows = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "5+5=", "answer": "10"}]
  path = tmp_path / f"prompts{suffix}"
  if suffix == ".jsonl":
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    path.write_text("\n" + path.read_text())  # a blank first line: line 3 holds the second row
    where = f"{path}, line 3"
  elif suffix == ".csv":
    path.write_text("prompt,answer\n1+2=,3\n\n5+5=,10\n")
    where = f"{path}, line 4"
  else:
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    where = f"{path}, row 1"
  records, _ = loading.prepare("prompt", str(path), tokenizer, TokenizeConfig(max_length=12))

  def reward(prompts, completions, answer, **kw):
    return [1.0 if str(a) == "3" else float("nan") for a in answer]

  with pytest.raises(rewards.RewardError) as error:
    rewards.RewardFunction(reward, "nan")(records, ["3", "10"], [[], []])
  assert str(error.value) == (f"{where}: reward function 'nan' returned nan; expected a finite "
                              f"float (None: not applicable)")


def test_none_means_not_applicable():
  fn = rewards.RewardFunction(lambda p, c, **kw: [None, 2.0], "partial")
  out = fn(CHAT, ["3", "10"], [[], []])
  assert np.isnan(out[0]) and out[1] == 2.0


def test_function_scorer_weights_logs_each_function_and_penalises_no_stop(tokenizer):
  exact = lambda prompts, completions, answer, **kw: [
      float(c[0]["content"] == a) for c, a in zip(completions, answer)]
  short = lambda prompts, completions, completion_ids, **kw: [
      None if i == 0 else -len(ids) for i, ids in enumerate(completion_ids)]
  scorer = rollout.FunctionScorer([rewards.RewardFunction(exact, "exact"),
                                   rewards.RewardFunction(short, "short")], tokenizer,
                                  weights=(2.0, 0.5), missing_eos_penalty=1.0)
  scores, metrics = scorer(_rollout(tokenizer, ["3", "10"], has_stop=[True, False]), CHAT)
  # Row 0: 2·1 (short does not apply). Row 1: 2·1 + 0.5·(-3 tokens incl. EOS), minus 1 (no stop).
  np.testing.assert_allclose(np.asarray(scores), [2.0, 2.0 - 1.5 - 1.0])
  assert metrics == {"reward/exact": 1.0, "reward/short": -3.0}


def test_rows_no_function_applies_to_score_zero_and_are_counted(tokenizer):
  scorer = rollout.FunctionScorer([rewards.RewardFunction(
      lambda p, c, **kw: [None, 1.0], "some")], tokenizer)
  scores, metrics = scorer(_rollout(tokenizer, ["3", "10"]), CHAT)
  np.testing.assert_array_equal(np.asarray(scores), [0.0, 1.0])
  assert metrics["reward/unscored"] == 0.5 and metrics["reward/some"] == 1.0


def test_reward_functions_load_by_module_file_and_factory_call(tmp_path, monkeypatch):
  assert rewards.load_function("rlhf_jax.rewards:math_answer").__name__ == "math_answer"
  (tmp_path / "my_rewards.py").write_text(
      "def check(prompts, completions, **kw):\n  return [1.0] * len(prompts)\n")
  monkeypatch.chdir(tmp_path)
  assert rewards.load_function("my_rewards.py:check")(["p"], ["c"]) == [1.0]
  assert rewards.load_function("my_rewards:check")(["p"], ["c"]) == [1.0]  # cwd is importable
  penalty = rewards.load_function(
      "rlhf_jax.rewards:soft_overlong_penalty(max_length=8, cache=4)")
  assert penalty(["p"], ["c"], completion_ids=[[0] * 6]) == [-0.5]


@pytest.mark.parametrize("spec, message", [
    ("no_colon", "must be given as 'module:name'"),
    ("rlhf_jax.rewards:nope", "has no 'nope'"),
    ("no_such_module_xyz:fn", "cannot load reward function .* importable from the working"),
    ("missing.py:fn", "the file 'missing.py' does not exist"),
    ("rlhf_jax.rewards:soft_overlong_penalty(max_length=n)", "factory arguments must be literals"),
    ("rlhf_jax.rewards:soft_overlong_penalty(max_length=4, cache=9)", "the factory raised"),
    ("rlhf_jax.rewards:math_answer.x", "expected a name after ':'"),
])
def test_reward_function_specs_fail_with_a_clear_message(spec, message):
  with pytest.raises(rewards.RewardError, match=message):
    rewards.load_function(spec)


def test_auto_rewards_apply_only_to_the_embedded_tasks_data():
  spec = rollout.RewardSpec(kind="function")
  review = spec.resolved("synthetic:prompt")
  assert review.functions == ("rlhf_jax.data.synthetic:gold_reward_fn",)
  assert review.gold_function == "rlhf_jax.data.synthetic:gold_reward_fn"
  assert spec.resolved("synthetic:arith_prompt").gold_function == "rlhf_jax.rewards:math_answer"
  with pytest.raises(ValueError, match="reward.functions='auto' .* data.train is 'data/q.jsonl'"):
    spec.resolved("data/q.jsonl")
  real = dataclasses.replace(spec, functions=("rlhf_jax.rewards:math_answer",)).resolved(
      "openai/gsm8k")
  assert real.gold_function is None and rollout.gold_function(real) is None
  model = rollout.RewardSpec(kind="model", path="rm").resolved("data/q.jsonl")
  assert model.gold_function is None  # a reward model needs no functions


def test_reward_spec_errors():
  with pytest.raises(ValueError, match="reward.path"):
    rollout.RewardSpec(kind="model").validate()
  with pytest.raises(ValueError, match="2 values for 1 reward.functions"):
    rollout.RewardSpec(kind="function", weights=(1.0, 2.0)).validate()


def test_group_rows_picks_the_best_and_worst_of_each_group():
  scores = jnp.asarray([0.1, 0.9, 0.5, 0.3, 0.3, 0.2])
  np.testing.assert_array_equal(rollout.group_rows(scores, 3), [1, 3])  # ties: the first
  np.testing.assert_array_equal(rollout.group_rows(scores, 3, best=False), [0, 5])


def test_prompt_rows_keep_their_columns_for_the_reward(tokenizer):
  rows = [{"question": "2+2", "answer": "4", "source": "x"}]
  records, _ = prepare("prompt", rows, tokenizer, TokenizeConfig(max_length=16),
                       options={"prompt_column": "question", "chat": True,
                                "system_prompt": "add"})
  assert records[0].text == ({"role": "system", "content": "add"},
                             {"role": "user", "content": "2+2"})
  assert records[0].columns == {"answer": "4", "source": "x"} and records[0].row == 0


def test_the_chat_templates_end_of_turn_token_stops_generation_and_is_exported(tmp_path):
  """A Qwen-style template closes the assistant turn with <|im_end|>, not EOS: the sampler stops
  at both, and the export's generation_config.json lists both for transformers' generate."""
  import json

  from rlhf_jax import embedded, models
  from rlhf_jax.train import common
  directory = embedded.ensure_assets(tmp_path / "tiny", seed=0, hidden_size=32,
                                     intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2)
  tokenizer = common.load_tokenizer(common.ModelSpec(path=directory))
  model, params = models.from_pretrained(directory)
  assert rollout.end_of_turn_id(tokenizer) == tokenizer.eos_token_id  # the embedded template
  tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
  tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                             "{{ m['content'] }}<|im_end|>\n{% endfor %}")
  im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
  assert rollout.end_of_turn_id(tokenizer) == im_end != tokenizer.eos_token_id
  assert set(rollout.stop_ids(tokenizer, model)) == {tokenizer.eos_token_id, im_end}
  common.write_generation_config(model, tokenizer, tmp_path / "out")
  saved = json.loads((tmp_path / "out" / "generation_config.json").read_text())
  assert sorted(saved["eos_token_id"]) == sorted({tokenizer.eos_token_id, im_end})
  assert saved["pad_token_id"] == tokenizer.pad_token_id
  tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
  assert rollout.end_of_turn_id(tokenizer) is None  # the turn ends in plain text
