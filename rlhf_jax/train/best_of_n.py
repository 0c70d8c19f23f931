"""Best-of-N reranking and rejection-sampling fine-tuning.

Best-of-N (Stiennon et al. 2020; Nakano et al. 2021): sample N responses per prompt, keep the one
the reward model scores highest. Its KL to the policy is log N - (N-1)/N for a continuous reward
(`rlhf_jax.eval.best_of_n_kl_analytic`), estimated from samples by
`rlhf_jax.eval.best_of_n_kl_estimate`.

Rejection-sampling fine-tuning (Touvron et al. 2023, Llama 2; Dong et al. 2023, RAFT): rounds of
best-of-N on fresh prompts followed by SFT on the winners, each round sampling from the policy the
previous round produced.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from rlhf_jax import ops, rollout as rollout_lib
from rlhf_jax.config import to_dict
from rlhf_jax.train import common, loop, rounds
from rlhf_jax.train.state import OptimizerConfig, TrainState, make_optimizer, make_schedule

__all__ = ["best_of_n", "RejectionSamplingConfig", "build_task", "run"]


def best_of_n(sample, scorer, params, batch, records, key, n: int):
  """(winners: Rollout [B rows], winner scores [B], all scores [B, N]).

  `sample` must draw N responses per prompt (GenerationConfig.num_samples = n); `records` are
  the batch's prompt records, for reward functions.
  """
  rollout = sample(params, batch["prompt_ids"], batch["prompt_mask"], key)
  scores, _ = scorer(rollout, records)
  rows = rollout_lib.group_rows(scores, n)
  return rollout_lib.take_rows(rollout, rows), jnp.take(scores, rows), scores.reshape(-1, n)


@dataclasses.dataclass(frozen=True)
class RejectionSamplingConfig:
  trainer: str = "rejection_sampling"
  model: common.ModelSpec = common.ModelSpec()
  data: common.DataSpec = common.DataSpec(train="synthetic:prompt", max_length=16,
                                          buckets=(16,), eval_fraction=0.05)
  generation: rollout_lib.GenerationConfig = rollout_lib.GenerationConfig(num_samples=8)
  reward: rollout_lib.RewardSpec = rollout_lib.RewardSpec(kind="function")
  rounds: rounds.RoundConfig = rounds.RoundConfig()
  optimizer: OptimizerConfig = OptimizerConfig(lr=1e-4)
  run: loop.RunConfig = loop.RunConfig(output_dir="runs/rejection_sampling", steps=0)

  def validate(self):
    self.generation.validate()
    self.reward.validate()
    self.rounds.validate()
    self.optimizer.validate()
    self.run.validate(steps=False)  # the rounds set run.steps
    self.data.validate()
    self.model.validate()
    self.reward.resolved(self.data.train)

  def resolved(self) -> "RejectionSamplingConfig":
    """Validated, with the reward's 'auto' settings resolved for the data."""
    self.validate()
    return dataclasses.replace(self, reward=self.reward.resolved(self.data.train))


def sft_rows_from(rollout):
  """Training rows (loss on the response only) from sampled sequences."""
  p = rollout.prompt_length
  loss_mask = jnp.concatenate([jnp.zeros_like(rollout.attention_mask[:, :p]),
                               rollout.response_mask.astype(rollout.attention_mask.dtype)], 1)
  return {"input_ids": rollout.input_ids, "attention_mask": rollout.attention_mask,
          "loss_mask": loss_mask, "weight": jnp.ones(rollout.input_ids.shape[0], jnp.float32)}


def build_task(config: RejectionSamplingConfig) -> loop.Task:
  config = config.resolved()
  run, spec, gen, rc = config.run, config.model, config.generation, config.rounds
  # The round's prompts are the batch placed on the mesh.
  common.check_run(run, batch_size=rc.prompts_per_round, key="rounds.prompts_per_round")
  tokenizer = common.load_tokenizer(spec)
  common.check_reward_vocabulary(config.reward, tokenizer, spec)
  records, prompt_length, prompts = common.round_prompts(config.data, tokenizer,
                                                        rc.prompts_per_round, run.seed)
  model, params = common.load_trained_policy(spec, run.seed, mesh=run.mesh)
  scorer = rollout_lib.make_scorer(config.reward, tokenizer,
                                   lambda path: common.load_reward_model(path, spec, mesh=run.mesh))
  sample = rollout_lib.make_sampler(model, gen, rollout_lib.stop_ids(tokenizer, model),
                                    tokenizer.pad_token_id)
  steps_per_round = rc.steps_per_round()
  total = rc.rounds * steps_per_round
  tx = make_optimizer(config.optimizer, total)
  chunk = spec.logps_chunk_size
  length = prompt_length + gen.max_new_tokens

  def generate(state, batch, key):
    winners, best, all_scores = best_of_n(sample, scorer, state.params, batch,
                                          [records[i] for i in batch["index"]], key,
                                          gen.num_samples)
    return sft_rows_from(winners), {"best_score": jnp.mean(best),
                                    "mean_score": jnp.mean(all_scores)}

  def loss_fn(params, batch):
    logps = model.token_logps(params, batch["input_ids"], batch["attention_mask"],
                              chunk_size=chunk)
    mask = batch["loss_mask"].astype(jnp.float32)
    return -ops.masked_sum(logps, mask) / jnp.maximum(jnp.sum(mask), 1.0), {}

  def make_state(params, key):
    m = rc.prompts_per_round
    placeholder = {"input_ids": jnp.zeros((m, length), jnp.int32),
                   "attention_mask": jnp.zeros((m, length), jnp.int32),
                   "loss_mask": jnp.zeros((m, length), jnp.int32),
                   "weight": jnp.zeros((m,), jnp.float32)}
    return TrainState.create(params, tx, key, extra={"round": placeholder})

  placement = common.make_placement(run.mesh, model.config)
  return loop.Task(
      init_state=lambda: placement.state(make_state, params, jax.random.key(run.seed)),
      train_step=rounds.make_round_step(generate=generate, loss_fn=loss_fn,
                                        steps_per_round=steps_per_round,
                                        minibatch_size=rc.minibatch_size,
                                        schedule=make_schedule(config.optimizer, total)),
      batch=lambda i: prompts.batch(i // steps_per_round), put=placement.prompt_batch,
      num_steps=total,
      config=to_dict(config), export=common.export_causal_lm(model, tokenizer),
      count_tokens=lambda b: rc.minibatch_size * length)


def run(config: RejectionSamplingConfig) -> dict:
  return loop.run_loop(build_task(config), config.run)
