"""Iterative (online) DPO: rounds of sample -> label -> a preference-trainer round.

Each round samples K >= 2 responses per prompt from the current policy, labels them, and trains
any loss in PREFERENCE_LOSSES on the resulting pairs (Xiong et al. 2024, arXiv 2312.11456;
Guo et al. 2024, online AI feedback, arXiv 2402.04792). Labels come from
  "reward": a reward model or Python function; the pair is (best, worst) of the K samples,
            dropped (zero weight) when they tie;
  "judge":  an AI judge (`rlhf_jax.feedback`): every pair of the K samples of a prompt is
            compared (both orders for the constitutional judge), each sample scores its summed
            win probability, and the pair is (best, worst), dropped when they tie; K = 2 is one
            comparison. The synthetic task uses its rule-based judge; any causal LM, with its own
            tokenizer and `labels.constitution`, the constitutional one.
Ties stay in the round at zero weight (the round has a fixed size, so one compilation); losses
whose rows are coupled through the batch (AOT's sorting, BCO's batch mean) get the real-row mask
as `where=` from the preference trainer's per-example losses, so ties leave them alone too.
The reference's log-probs are computed when the round is generated: from the initial policy, or,
with `reset_reference`, from the policy at the start of the round (the reference moves with it).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import feedback, parallel, rewards, rollout as rollout_lib
from rlhf_jax.config import check_choices, to_dict
from rlhf_jax.train import best_of_n, common, loop, preference, rounds
from rlhf_jax.train.state import OptimizerConfig, TrainState, make_optimizer, make_schedule

__all__ = ["LabelConfig", "IterativeDPOConfig", "build_task", "run", "make_labeller", "make_judge",
           "judge_scores"]


@dataclasses.dataclass(frozen=True)
class LabelConfig:
  kind: Literal["reward", "judge"] = "reward"
  # "rule": reward.gold_function as a rule | a causal-LM checkpoint (its own tokenizer is loaded
  # from it): the constitutional judge
  judge: str = "rule"
  constitution: tuple[str, ...] = feedback.DEFAULT_CONSTITUTION  # principles, one per comparison
  answers: tuple[str, str] = ("A", "B")  # the letters the constitutional judge answers with

  def validate(self):
    check_choices(self, "labels.")
    if not self.constitution:
      raise ValueError("labels.constitution needs at least one principle")


@dataclasses.dataclass(frozen=True)
class IterativeDPOConfig:
  trainer: str = "iterative_dpo"
  model: common.ModelSpec = common.ModelSpec()
  data: common.DataSpec = common.DataSpec(train="synthetic:prompt", max_length=16,
                                          buckets=(16,), eval_fraction=0.05)
  generation: rollout_lib.GenerationConfig = rollout_lib.GenerationConfig(num_samples=2)
  reward: rollout_lib.RewardSpec = rollout_lib.RewardSpec(kind="function")
  labels: LabelConfig = LabelConfig()
  loss: preference.PreferenceLossConfig = preference.PreferenceLossConfig()
  rounds: rounds.RoundConfig = rounds.RoundConfig()
  reset_reference: bool = False
  optimizer: OptimizerConfig = OptimizerConfig(lr=1e-4)
  run: loop.RunConfig = loop.RunConfig(output_dir="runs/iterative_dpo", steps=0)

  def validate(self):
    self.generation.validate()
    self.labels.validate()
    self.loss.validate()
    self.rounds.validate()
    self.optimizer.validate()
    self.run.validate(steps=False)  # the rounds set run.steps
    self.data.validate()
    self.model.validate()
    if self.generation.num_samples < 2:
      raise ValueError("iterative DPO needs generation.num_samples >= 2 responses per prompt")
    if self.labels.kind == "reward":
      self.reward.validate()
    self._reward()

  def _reward(self) -> rollout_lib.RewardSpec:
    # A judge labels without the reward's scorer (the rule judge reads only gold_function).
    return self.reward.resolved(self.data.train, scorer=self.labels.kind == "reward")

  def resolved(self) -> "IterativeDPOConfig":
    """Validated, with the reward's 'auto' settings resolved for the data."""
    self.validate()
    return dataclasses.replace(self, reward=self._reward())


def make_judge(labels: LabelConfig, gold_function: str | None):
  """compare(records, responses_a, responses_b, key) -> P(a ≻ b): the rule judge (the gold
  reward on each prompt's whole row), or the constitutional judge (its own tokenizer) on the
  prompts' text."""
  if labels.judge == "rule":
    if gold_function is None:
      raise ValueError("labels.judge='rule' applies reward.gold_function, which is not set (it "
                       "is 'auto' only for synthetic:* data): set reward.gold_function or "
                       "labels.judge=<a judge checkpoint>")
    gold = rewards.RewardFunction.load(gold_function, "gold")
    return feedback.RuleJudge(lambda records, responses: gold(records, responses)).compare
  from rlhf_jax import models
  spec = common.ModelSpec(path=labels.judge)
  judge_model, judge_params = models.from_pretrained(common.resolve_model_path(labels.judge))
  judge = feedback.ConstitutionalJudge(judge_model, judge_params, common.load_tokenizer(spec),
                                       constitution=labels.constitution, answers=labels.answers)
  return lambda records, a, b, key: judge.compare([r.text for r in records], a, b, key)


def judge_scores(compare, prompts, responses, k: int, key) -> np.ndarray:
  """[B, K] summed win probabilities of each of K responses against the others of its prompt.

  `compare(prompts, a, b, key)` is a judge's comparison (`feedback.RuleJudge.compare`, ...);
  `responses` are prompt-major (row i·K + j is response j of prompt i); each of the K(K-1)/2
  pairs of a prompt is one judge comparison (batched over every prompt and pair).
  """
  b = len(prompts)
  first, second = np.triu_indices(k, 1)
  rows_a = (np.arange(b)[:, None] * k + first).ravel()
  rows_b = (np.arange(b)[:, None] * k + second).ravel()
  p_first = parallel.host_get(compare([prompts[i // k] for i in rows_a],
                                      [responses[i] for i in rows_a],
                                      [responses[i] for i in rows_b], key)).astype(np.float64)
  scores = np.zeros(b * k)
  np.add.at(scores, rows_a, p_first)
  np.add.at(scores, rows_b, 1.0 - p_first)
  return scores.reshape(b, k)


def make_labeller(config: IterativeDPOConfig, scorer, tokenizer):
  """labeller(rollout [B·K rows], records [B], key) -> (chosen rows [B], rejected rows [B],
  weight [B]): the best and worst of each prompt's K samples, weight 0 where they tie."""
  k = config.generation.num_samples
  if config.labels.kind == "reward":
    score = lambda rollout, records, key: scorer(rollout, records)[0]
  else:
    compare = make_judge(config.labels, config.reward.gold_function)

    def score(rollout, records, key):
      scores = judge_scores(compare, records, rollout_lib.decode_responses(rollout, tokenizer),
                            k, key)
      return parallel.put_rows(scores.reshape(-1).astype(np.float32),
                               rollout.has_stop.sharding)

  def label(rollout, records, round_key):
    scores = score(rollout, records, round_key)
    grouped = jnp.reshape(scores, (-1, k))
    weight = (jnp.max(grouped, 1) > jnp.min(grouped, 1)).astype(jnp.float32)
    return (rollout_lib.group_rows(scores, k), rollout_lib.group_rows(scores, k, best=False),
            weight)

  return label


def build_task(config: IterativeDPOConfig) -> loop.Task:
  config = config.resolved()
  run, spec, gen, rc = config.run, config.model, config.generation, config.rounds
  # The round's prompts are the batch placed on the mesh.
  common.check_run(run, batch_size=rc.prompts_per_round, key="rounds.prompts_per_round")
  tokenizer = common.load_tokenizer(spec)
  if config.labels.kind == "reward":
    common.check_reward_vocabulary(config.reward, tokenizer, spec)
  records, prompt_length, prompts = common.round_prompts(config.data, tokenizer,
                                                        rc.prompts_per_round, run.seed)
  model, params = common.load_trained_policy(spec, run.seed, mesh=run.mesh)
  placement = common.make_placement(run.mesh, model.config)
  initial_ref = common.load_reference(spec, params, placement)
  scorer = (rollout_lib.make_scorer(config.reward, tokenizer,
                                    lambda path: common.load_reward_model(path, spec, mesh=run.mesh))
            if config.labels.kind == "reward" else None)
  sample = rollout_lib.make_sampler(model, gen, rollout_lib.stop_ids(tokenizer, model),
                                    tokenizer.pad_token_id)
  label = make_labeller(config, scorer, tokenizer)
  reduction, chunk = config.loss.reduction(), spec.logps_chunk_size
  per_example = preference.make_pair_losses(model, config.loss, chunk)
  steps_per_round = rc.steps_per_round()
  total = rc.rounds * steps_per_round
  tx = make_optimizer(config.optimizer, total)
  length = prompt_length + gen.max_new_tokens

  @jax.jit
  def sequence_logps(params, rows):
    return preference._sequence_logps(model, params, rows, reduction, chunk)[0]

  def generate(state, batch, key):
    sample_key, label_key = jax.random.split(key)
    rollout = sample(state.params, batch["prompt_ids"], batch["prompt_mask"], sample_key)
    chosen, rejected, weight = label(rollout, [records[i] for i in batch["index"]], label_key)
    labelled = jnp.sum(weight > 0)
    rows = best_of_n.sft_rows_from(rollout_lib.take_rows(rollout,
                                                         jnp.concatenate([chosen, rejected])))
    reference = state.params if config.reset_reference else initial_ref
    ref_logps = sequence_logps(reference, rows)
    n = chosen.shape[0]
    # One row per pair: [chosen; rejected] stacked on a new axis so minibatches keep pairs.
    pairs = {k: jnp.stack([v[:n], v[n:]], axis=1) for k, v in rows.items() if k != "weight"}
    pairs["ref_logps"] = jnp.stack([ref_logps[:n], ref_logps[n:]], axis=1)
    pairs["weight"] = weight
    return pairs, {"labelled_pairs": labelled, "mean_response_length": jnp.mean(
        jnp.sum(rollout.response_mask, 1))}

  def loss_fn(params, pairs):
    flat = {k: jnp.concatenate([v[:, 0], v[:, 1]]) for k, v in pairs.items()
            if k not in ("weight", "ref_logps")}
    flat["weight"] = pairs["weight"]
    ref = jnp.concatenate([pairs["ref_logps"][:, 0], pairs["ref_logps"][:, 1]])
    values, metrics = per_example(params, flat, ref)
    w = pairs["weight"]
    mean = lambda x: jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)
    return mean(values), {k: mean(v) for k, v in metrics.items()}

  def make_state(params, key):
    m = rc.prompts_per_round
    placeholder = {k: jnp.zeros((m, 2, length), jnp.int32)
                   for k in ("input_ids", "attention_mask", "loss_mask")}
    placeholder["ref_logps"] = jnp.zeros((m, 2), jnp.float32)
    placeholder["weight"] = jnp.zeros((m,), jnp.float32)
    return TrainState.create(params, tx, key, extra={"round": placeholder})

  return loop.Task(
      init_state=lambda: placement.state(make_state, params, jax.random.key(run.seed)),
      train_step=rounds.make_round_step(generate=generate, loss_fn=loss_fn,
                                        steps_per_round=steps_per_round,
                                        minibatch_size=rc.minibatch_size,
                                        schedule=make_schedule(config.optimizer, total)),
      batch=lambda i: prompts.batch(i // steps_per_round), put=placement.prompt_batch,
      num_steps=total,
      config=to_dict(config), export=common.export_causal_lm(model, tokenizer),
      count_tokens=lambda b: 2 * rc.minibatch_size * length)


def run(config: IterativeDPOConfig) -> dict:
  return loop.run_loop(build_task(config), config.run)
