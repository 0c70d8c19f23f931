"""Critic-free policy optimisation: GRPO (Shao et al. 2024) and RLOO (Ahmadian et al. 2024).

Both sample G responses per prompt with the shared online step (`train/online.py`) and replace the value function with a
baseline from the group:
  GRPO   A = (r - mean_group) / std_group           (`advantage="group"`)
  Dr.GRPO A = r - mean_group                        (`advantage="group_no_std"`, Liu et al. 2025)
  RLOO   A = r - mean of the other G-1 samples      (`advantage="leave_one_out"`)
A sequence's advantage applies to each of its tokens. The policy loss is PPO's clipped surrogate
(asymmetric "clip-higher" when `clip_eps_high` is set, DAPO, Yu et al. 2025); with one epoch of
one minibatch the ratio is 1 and it is plain REINFORCE with the baseline. The KL to the reference
enters either the loss, β·k3 per token (`kl_in="loss"`, GRPO), or the reward, r - β·Σ_t k1
(`kl_in="reward"`, RLOO). Token aggregation (`aggregation`): "grpo" (per-sequence mean, then batch
mean), "dr_grpo" (token sum over a constant, max_new_tokens), "dapo" (token mean over the batch).
Rewards come from a reward model or a Python function (verifiable rewards).

`trainer="rloo"` is this trainer with the leave-one-out baseline: it implies
`advantage="leave_one_out"` (the default, None, resolves to it) and rejects any other; `"grpo"`
takes the group baselines (default "group").

Metrics (the KL logged is the one trained on): `kl` is the KL term of the objective per
sequence at the rollout, Σ_t k3 with `kl_in="loss"` and Σ_t k1 with `kl_in="reward"`; `kl_k1` is
the summed k1 diagnostic in both cases; `kl_k3` the token-mean k3 of the policy being updated, in
the minibatches (the loss's term when `kl_in="loss"`).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import losses, ops, rollout as rollout_lib
from rlhf_jax.config import check_choices, require, to_dict
from rlhf_jax.train import common, loop, online, packed_rollouts
from rlhf_jax.train.state import OptimizerConfig, TrainState, make_optimizer

__all__ = ["GRPOLoss", "GRPOConfig", "sequence_advantages", "make_grpo_algorithm", "build_task",
           "run"]


@dataclasses.dataclass(frozen=True)
class GRPOLoss:
  # None: the trainer's ("rloo": leave_one_out; "grpo": group)
  advantage: Literal["group", "group_no_std", "leave_one_out"] | None = None
  clip_eps: float = 0.2
  clip_eps_high: float | None = None  # DAPO's clip-higher (e.g. 0.28)
  kl_coef: float = 0.04
  # "loss": β·k3 per token (GRPO) | "reward": r - β·Σ k1 (RLOO)
  kl_in: Literal["loss", "reward"] = "loss"
  aggregation: Literal["grpo", "dr_grpo", "dapo"] = "grpo"
  epochs: int = 1
  minibatches: int = 1

  def validate(self):
    check_choices(self, "loss.")
    require(self.clip_eps > 0, "loss.clip_eps", "a clip range > 0", self.clip_eps)
    require(self.clip_eps_high is None or self.clip_eps_high > 0, "loss.clip_eps_high",
            "a clip range > 0 (or None: loss.clip_eps)", self.clip_eps_high)
    require(self.kl_coef >= 0, "loss.kl_coef", "a coefficient >= 0", self.kl_coef)
    for name in ("epochs", "minibatches"):
      require(getattr(self, name) >= 1, f"loss.{name}", "an integer >= 1", getattr(self, name))


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  trainer: str = "grpo"  # or "rloo": the same trainer with the leave-one-out advantage
  model: common.ModelSpec = common.ModelSpec()
  data: common.DataSpec = common.DataSpec(train="synthetic:prompt", max_length=16,
                                          buckets=(16,), eval_fraction=0.05)
  generation: rollout_lib.GenerationConfig = rollout_lib.GenerationConfig(num_samples=4)
  reward: rollout_lib.RewardSpec = rollout_lib.RewardSpec(kind="function")
  loss: GRPOLoss = GRPOLoss()
  optimizer: OptimizerConfig = OptimizerConfig(lr=1e-5)
  run: loop.RunConfig = loop.RunConfig(output_dir="runs/grpo", batch_size=16)
  # The scoring and update passes' rows. "packed" (default): padding-free rows of
  # packed_row_length tokens (None: the rollout's width, prompt + max_new_tokens), each prompt
  # computed once for the completions that share a row with it, row counts from 8 budgets up to
  # the padded token count (rounded to the data-parallel size), so the update compiles once per
  # budget (`train/packed_rollouts.py`); "padded": the rollout's [prompt | response] rows.
  layout: Literal["packed", "padded"] = "packed"
  packed_row_length: int | None = None

  def advantage(self) -> str:
    """The advantage kind: loss.advantage, or the trainer's default when it is None."""
    if self.trainer not in ("grpo", "rloo"):
      raise ValueError(f"trainer must be 'grpo' or 'rloo', got {self.trainer!r}")
    if self.trainer == "rloo":
      if self.loss.advantage not in (None, "leave_one_out"):
        raise ValueError(f"trainer='rloo' uses the leave-one-out baseline, but loss.advantage="
                         f"{self.loss.advantage!r}: drop it, or use trainer='grpo'")
      return "leave_one_out"
    if self.loss.advantage == "leave_one_out":
      raise ValueError("loss.advantage='leave_one_out' is RLOO's baseline: set trainer='rloo'")
    return self.loss.advantage or "group"

  def validate(self):
    self.loss.validate()
    check_choices(self)
    require(self.packed_row_length is None or self.packed_row_length >= 1, "packed_row_length",
            "a row length >= 1 (or None: the rollout's width)", self.packed_row_length)
    self.generation.validate()
    self.reward.validate()
    self.optimizer.validate()
    self.run.validate()
    self.data.validate()
    self.model.validate()
    self.advantage()
    require(self.generation.num_samples >= 2, "generation.num_samples",
            f"an integer >= 2 (the group size: {self.trainer}'s advantage compares each sample "
            f"with the others drawn for its prompt)", self.generation.num_samples)
    rows = self.run.batch_size * self.generation.num_samples
    if rows % self.loss.minibatches:
      raise ValueError(f"{rows} rollout rows do not split into loss.minibatches="
                       f"{self.loss.minibatches}")
    self.reward.resolved(self.data.train)

  def resolved(self) -> "GRPOConfig":
    """Validated, with the reward's 'auto' settings resolved for the data."""
    self.validate()
    return dataclasses.replace(self, reward=self.reward.resolved(self.data.train))


def sequence_advantages(scores, group_size: int, kind: str):
  if kind == "leave_one_out":
    return losses.leave_one_out_advantages(scores, group_size)
  return losses.group_advantages(scores, group_size, scale_by_std=kind == "group")


def make_grpo_algorithm(model, loss: GRPOLoss, *, advantage: str, group_size: int,
                        temperature: float, max_new_tokens: int,
                        chunk_size: int = 512) -> online.OnlineAlgorithm:
  """GRPO's / RLOO's prepare (group baselines, the KL in the reward or the loss) and clipped
  per-minibatch loss, for `online.make_online_step`. Params are the policy's."""
  scores_of = lambda params, rollout: online.policy_scores(model, params, rollout, temperature,
                                                           chunk_size)
  packed_scores_of = lambda params, rollout, layout: packed_rollouts.packed_scores(
      model, params, rollout, layout, temperature, chunk_size)
  # dr_grpo's constant, the same in both layouts (packed rows have no response width)
  normalizer = {"normalizer": max_new_tokens} if loss.aggregation == "dr_grpo" else {}

  def prepare(state, ref_params, rollout, scores, layout=None):
    mask = rollout.response_mask
    num_sequences, width = mask.shape
    if layout is None:
      old_tokens, _, _ = scores_of(state.params, rollout)
      ref_tokens, _, _ = scores_of(ref_params, rollout)
      old_logps, ref_logps = old_tokens, ref_tokens
      sequence_sum = lambda x: jnp.sum(x * mask, axis=1)
    else:  # packed slots; kept for the minibatches in the per-sequence view [S, N]
      old_tokens, _, _ = packed_scores_of(state.params, rollout, layout)
      ref_tokens, _, _ = packed_scores_of(ref_params, rollout, layout)
      old_logps, ref_logps = (layout.unpack(x, num_sequences, width)
                              for x in (old_tokens, ref_tokens))
      sequence_sum = lambda x: layout.sequence_sums(x, num_sequences)
    rewards = scores
    kl_k1 = sequence_sum(old_tokens - ref_tokens)
    if loss.kl_in == "reward":
      rewards = scores - loss.kl_coef * kl_k1
      trained_kl = kl_k1
    else:
      trained_kl = sequence_sum(losses.kl(old_tokens, ref_tokens, estimator="k3"))
    advantages = sequence_advantages(rewards, group_size, advantage)
    metrics = online.rollout_metrics(rollout, scores, old_logps, trained_kl, loss.kl_coef)
    metrics["kl_k1"] = jnp.mean(kl_k1)
    return (old_logps, ref_logps, advantages), metrics

  def minibatch_loss(params, rollout, prepared, layout=None):
    old_logps, ref_logps, advantages = prepared
    if layout is None:
      mask = rollout.response_mask
      logps, entropy, _ = scores_of(params, rollout)
      token_advantages = advantages[:, None] * jnp.ones_like(logps)
      reduce = lambda per_token: losses.aggregate(per_token, mask, mode=loss.aggregation,
                                                  **normalizer)
    else:  # packed slots: the minibatch's per-sequence view laid into its rows
      mask = layout.loss_mask
      logps, entropy, _ = packed_scores_of(params, rollout, layout)
      old_logps, ref_logps = layout.pack(old_logps), layout.pack(ref_logps)
      token_advantages = layout.pack_sequences(advantages)
      reduce = lambda per_token: losses.aggregate_packed(
          per_token, mask, layout.sequence_ids, advantages.shape[0], mode=loss.aggregation,
          **normalizer)
    per_token = losses.ppo_policy(logps, old_logps, token_advantages, clip_eps=loss.clip_eps,
                                  clip_eps_high=loss.clip_eps_high)
    kl_k3 = losses.kl(logps, ref_logps, estimator="k3")
    if loss.kl_in == "loss":
      per_token = per_token + loss.kl_coef * kl_k3
    return reduce(per_token), {
        "entropy": ops.masked_mean(entropy, mask), "kl_k3": ops.masked_mean(kl_k3, mask),
        "clip_fraction": losses.ppo_clip_fraction(
            logps, old_logps, token_advantages, mask, clip_eps=loss.clip_eps,
            clip_eps_high=loss.clip_eps_high),
        "approx_kl": losses.approx_kl(logps, old_logps, mask)}

  return online.OnlineAlgorithm(prepare=prepare, loss=minibatch_loss)


def build_task(config: GRPOConfig) -> loop.Task:
  """Loading and wiring: tokenizer, model, data, reference, reward, then the shared step."""
  config = config.resolved()
  run, spec, loss, gen = config.run, config.model, config.loss, config.generation
  setup = common.load_online(config)
  model, tokenizer, records = setup.model, setup.tokenizer, setup.records
  scorer = rollout_lib.make_scorer(config.reward, tokenizer, setup.load_reward_model)
  tx = make_optimizer(config.optimizer, run.steps * loss.epochs * loss.minibatches)
  make_state = lambda p, key: TrainState.create(p, tx, key)
  step = online.make_online_step(
      make_grpo_algorithm(model, loss, advantage=config.advantage(),
                          group_size=gen.num_samples, temperature=gen.temperature,
                          max_new_tokens=gen.max_new_tokens, chunk_size=spec.logps_chunk_size),
      sample=rollout_lib.make_sampler(model, gen, rollout_lib.stop_ids(tokenizer, model),
                                      tokenizer.pad_token_id),
      score=lambda rollout, batch: scorer(rollout, [records[i] for i in batch["index"]]),
      epochs=loss.epochs, minibatches=loss.minibatches, layout=config.layout,
      row_length=config.packed_row_length)
  task = loop.Task(
      init_state=lambda: setup.placement.state(make_state, setup.params,
                                               jax.random.key(run.seed)),
      train_step=lambda state, batch: step(state, batch, setup.ref_params),
      batch=setup.stream.batch, put=setup.placement.prompt_batch, num_steps=run.steps,
      config=to_dict(config), export=common.export_causal_lm(model, tokenizer),
      count_tokens=lambda b: int(np.sum(b["prompt_mask"])) * gen.num_samples)
  if setup.eval_records:
    task.evaluators.append(online.policy_evaluator(
        config, model, setup.ref_params, tokenizer, setup.eval_records, scorer,
        params_of=lambda state: state.params))
  return task


def run(config: GRPOConfig) -> dict:
  return loop.run_loop(build_task(config), config.run)
