"""PPO against a reward model with a KL penalty to the frozen reference (Ziegler et al. 2019;
Stiennon et al. 2020; Ouyang et al. 2022).

One training step is:
  1. rollout: sample a response per prompt with the jitted KV-cache sampler (temperature T);
  2. score: the reward model at the last token (or a Python reward function), minus a penalty
     for responses that never stop (optional);
  3. prepare (jitted): the policy's log-probs at temperature T — the same function the update
     uses, so the ratio starts at exactly 1 — the reference's, and the values;
     per-token rewards r_t = -kl_coef·KL_t (+ the score at the last token), GAE, whitening;
  4. update (jitted): `epochs` passes over `minibatches` shuffled minibatches, each a clipped
     policy loss + vf_coef · clipped value loss (- entropy_coef · entropy), in one `lax.scan`;
  5. the KL coefficient follows the adaptive controller when `loss.kl_target` is set.

The value function is a linear head on the policy's final hidden states (`value_head="shared"`,
one forward pass for both) or a separate critic initialised from the reward model
(`value_head="separate"`, as InstructGPT). Metrics: reward (score), KL (the estimator used in the
rewards, summed over tokens), kl_coef, clip fraction, approximate KL between the rollout and the
updated policy, entropy, value explained variance, response length, the share of responses that
stopped, and the sampler-vs-trainer log-prob gap (0 unless top-k/top-p truncate sampling).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import losses, models, ops, rollout as rollout_lib
from rlhf_jax.config import check_choices, require, to_dict
from rlhf_jax.train import common, loop, online, packed_rollouts
from rlhf_jax.train.state import OptimizerConfig, TrainState, make_optimizer

__all__ = ["PPOLoss", "PPOConfig", "ValueFunction", "make_ppo_algorithm", "init_params",
           "build_task", "run"]


@dataclasses.dataclass(frozen=True)
class PPOLoss:
  clip_eps: float = 0.2
  value_clip_eps: float = 0.2
  vf_coef: float = 0.1
  entropy_coef: float = 0.0
  kl_coef: float = 0.05  # the initial coefficient when adaptive
  kl_estimator: Literal["k1", "k2", "k3"] = "k1"  # the per-token KL in the reward
  kl_target: float | None = None  # set: the adaptive controller of Ziegler et al. 2019
  kl_horizon: int = 10000
  gamma: float = 1.0
  lam: float = 0.95
  whiten_advantages: bool = True
  epochs: int = 4
  minibatches: int = 2
  aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm", "grpo",
                       "dapo", "dr_grpo"] = "token_mean"  # see rlhf_jax.losses.aggregate
  # "shared": a head on the policy | "separate": a critic from the RM
  value_head: Literal["shared", "separate"] = "shared"

  def validate(self):
    check_choices(self, "loss.")
    if self.epochs < 1 or self.minibatches < 1:
      raise ValueError("loss.epochs and loss.minibatches must be >= 1")
    for name in ("clip_eps", "value_clip_eps"):
      require(getattr(self, name) > 0, f"loss.{name}", "a clip range > 0", getattr(self, name))
    for name in ("vf_coef", "entropy_coef", "kl_coef"):
      require(getattr(self, name) >= 0, f"loss.{name}", "a coefficient >= 0", getattr(self, name))
    for name in ("gamma", "lam"):
      require(0 <= getattr(self, name) <= 1, f"loss.{name}", "a value in [0, 1]",
              getattr(self, name))


@dataclasses.dataclass(frozen=True)
class PPOConfig:
  trainer: str = "ppo"
  model: common.ModelSpec = common.ModelSpec()  # the SFT policy; also the reference by default
  data: common.DataSpec = common.DataSpec(train="synthetic:prompt", max_length=16,
                                          buckets=(16,), eval_fraction=0.05)
  generation: rollout_lib.GenerationConfig = rollout_lib.GenerationConfig()
  reward: rollout_lib.RewardSpec = rollout_lib.RewardSpec(kind="function")
  loss: PPOLoss = PPOLoss()
  optimizer: OptimizerConfig = OptimizerConfig(lr=1e-5, max_grad_norm=1.0)
  run: loop.RunConfig = loop.RunConfig(output_dir="runs/ppo", batch_size=32)
  # The scoring and update passes' rows. "packed" (default): padding-free rows of
  # packed_row_length tokens (None: the rollout's width, prompt + max_new_tokens), each prompt
  # computed once for the completions that share a row with it, row counts from 8 budgets up to
  # the padded token count (rounded to the data-parallel size), so the update compiles once per
  # budget (`train/packed_rollouts.py`); "padded": the rollout's [prompt | response] rows.
  layout: Literal["packed", "padded"] = "packed"
  packed_row_length: int | None = None

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
    if self.loss.value_head == "separate" and self.reward.kind != "model":
      raise ValueError("loss.value_head='separate' initialises the critic from the reward model; "
                       "it needs reward.kind='model'")
    rows = self.run.batch_size * self.generation.num_samples
    if rows % self.loss.minibatches:
      raise ValueError(f"{rows} rollout rows do not split into loss.minibatches="
                       f"{self.loss.minibatches}")
    self.reward.resolved(self.data.train)

  def resolved(self) -> "PPOConfig":
    """Validated, with the reward's 'auto' settings resolved for the data."""
    self.validate()
    return dataclasses.replace(self, reward=self.reward.resolved(self.data.train))


def explained_variance(values, returns, mask):
  """1 - Var(returns - values) / Var(returns) over the valid tokens."""
  def var(x):
    mean = ops.masked_mean(x, mask)
    return ops.masked_mean((x - mean) ** 2, mask)
  return 1.0 - var(returns - values) / jnp.maximum(var(returns), 1e-8)


class ValueFunction:
  """The value estimates V(s_t) for each response token, shared head or separate critic."""

  def __init__(self, kind: str, critic=None):
    self.kind, self.critic = kind, critic

  def __call__(self, params, hidden, rollout):
    p, n = rollout.prompt_length, rollout.response_mask.shape[1]
    if self.kind == "shared":
      values = models.apply_value_head(params["value_head"], hidden)  # [B, P + N]
    else:
      values = self.critic.apply_all(params["critic"], rollout.input_ids,
                                     rollout.attention_mask)[..., 0]
    # Token t of the response is chosen in the state ending at position P + t - 1.
    return values[:, p - 1:p + n - 1]

  def packed(self, params, hidden_RLD, rollout, layout):
    """[R, L] values in packed slots: V of the state each response token is chosen in, read at
    its predictor slot. The shared head reads the policy's packed hidden states; the separate
    critic runs its own pass over the same packed rows."""
    if self.kind == "shared":
      values_RL = models.apply_value_head(params["value_head"], hidden_RLD)
    else:
      values_RL = self.critic.apply_all(
          params["critic"], layout.tokens(rollout.input_ids), layout.attention_mask,
          segment_ids=layout.segment_ids, branch_ids=layout.branch_ids)[..., 0]
    return packed_rollouts.packed_predictor_values(values_RL, layout)


def make_ppo_algorithm(model, loss: PPOLoss, value_fn: ValueFunction, *, temperature: float,
                       chunk_size: int = 512) -> online.OnlineAlgorithm:
  """PPO's prepare (KL-penalised rewards, GAE, whitening), its clipped policy + value loss, and
  the adaptive KL controller, for `online.make_online_step`. Params are {"policy", "value_head"
  or "critic"}; the reference is the policy's structure; the KL coefficient is
  state.extra["kl"]."""
  scores_of = lambda params, rollout: online.policy_scores(model, params, rollout, temperature,
                                                           chunk_size)

  packed_scores_of = lambda params, rollout, layout: packed_rollouts.packed_scores(
      model, params, rollout, layout, temperature, chunk_size)

  def prepare(state, ref_params, rollout, scores, layout=None):
    mask, kl_coef = rollout.response_mask, state.extra["kl"].kl_coef
    if layout is None:
      old_logps, _, hidden = scores_of(state.params["policy"], rollout)
      values = value_fn(state.params, hidden, rollout) * mask
      ref_logps, _, _ = scores_of(ref_params, rollout)
    else:  # packed passes; GAE runs on the per-sequence view [S, N], as the padded layout's
      unpack = lambda x: layout.unpack(x, *mask.shape)
      old_RL, _, hidden_RLD = packed_scores_of(state.params["policy"], rollout, layout)
      values = unpack(value_fn.packed(state.params, hidden_RLD, rollout, layout))
      old_logps = unpack(old_RL)
      ref_logps = unpack(packed_scores_of(ref_params, rollout, layout)[0])
    rewards, kl = losses.kl_penalized_rewards(scores, old_logps, ref_logps, mask,
                                              kl_coef=kl_coef, estimator=loss.kl_estimator)
    advantages, returns = losses.gae(rewards, values, mask, gamma=loss.gamma, lam=loss.lam)
    if loss.whiten_advantages:
      advantages = losses.whiten(advantages, mask)
    metrics = online.rollout_metrics(rollout, scores, old_logps, jnp.sum(kl, axis=1), kl_coef)
    metrics["value_explained_variance"] = explained_variance(values, returns, mask)
    return (old_logps, values, advantages, returns), metrics

  def minibatch_loss(params, rollout, prepared, layout=None):
    old_logps, old_values, advantages, returns = prepared
    if layout is None:
      mask = rollout.response_mask
      logps, entropy, hidden = scores_of(params["policy"], rollout)
      values = value_fn(params, hidden, rollout)
      reduce = lambda per_token: losses.aggregate(per_token, mask, mode=loss.aggregation)
    else:  # packed slots: the minibatch's per-sequence view laid into its rows
      mask = layout.loss_mask
      logps, entropy, hidden_RLD = packed_scores_of(params["policy"], rollout, layout)
      values = value_fn.packed(params, hidden_RLD, rollout, layout)
      old_logps, old_values, advantages, returns = (
          layout.pack(x) for x in (old_logps, old_values, advantages, returns))
      num_sequences, width = rollout.response_mask.shape
      # the padded default constant of seq_mean_token_sum_norm: the response width
      norm = ({"normalizer": width} if losses.AGGREGATION_ALIASES.get(
          loss.aggregation, loss.aggregation) == "seq_mean_token_sum_norm" else {})
      reduce = lambda per_token: losses.aggregate_packed(
          per_token, mask, layout.sequence_ids, num_sequences, mode=loss.aggregation, **norm)
    policy_loss = reduce(losses.ppo_policy(logps, old_logps, advantages, clip_eps=loss.clip_eps))
    value_loss = reduce(losses.ppo_value(values, old_values, returns,
                                         clip_eps=loss.value_clip_eps))
    mean_entropy = ops.masked_mean(entropy, mask)
    total = policy_loss + loss.vf_coef * value_loss - loss.entropy_coef * mean_entropy
    return total, {
        "loss/policy": policy_loss, "loss/value": value_loss, "entropy": mean_entropy,
        "clip_fraction": losses.ppo_clip_fraction(logps, old_logps, advantages, mask,
                                                  clip_eps=loss.clip_eps),
        "approx_kl": losses.approx_kl(logps, old_logps, mask)}

  def finish(state, rollout, rollout_stats):
    if loss.kl_target is None:
      return state
    # Ziegler et al.'s controller, on the rollout's KL.
    controller = losses.update_kl_controller(
        state.extra["kl"], rollout_stats["kl"], rollout.input_ids.shape[0],
        target=loss.kl_target, horizon=loss.kl_horizon)
    return state.replace(extra={**state.extra, "kl": controller})

  return online.OnlineAlgorithm(prepare=prepare, loss=minibatch_loss, finish=finish,
                                policy=lambda params: params["policy"])


def init_params(model, policy_params, loss: PPOLoss, key, critic_params=None) -> dict:
  """The optimised params: the policy with a fresh value head, or with the critic."""
  if loss.value_head == "shared":
    return {"policy": policy_params,
            "value_head": models.init_value_head(key, model.config.hidden_size)}
  return {"policy": policy_params, "critic": critic_params}


def build_task(config: PPOConfig) -> loop.Task:
  """Loading and wiring: tokenizer, model, data, reference, reward, then the shared step."""
  config = config.resolved()
  run, spec, loss, gen = config.run, config.model, config.loss, config.generation
  setup = common.load_online(config)
  model, tokenizer, records = setup.model, setup.tokenizer, setup.records
  scorer = rollout_lib.make_scorer(config.reward, tokenizer, setup.load_reward_model)
  key = jax.random.key(run.seed)
  if loss.value_head == "shared":
    value_fn, critic_params = ValueFunction("shared"), None
  else:
    critic, critic_params = setup.load_reward_model(config.reward.path)
    value_fn = ValueFunction("separate", critic)
  params = init_params(model, setup.params, loss, jax.random.fold_in(key, 1), critic_params)
  tx = make_optimizer(config.optimizer, run.steps * loss.epochs * loss.minibatches)
  make_state = lambda params, key: TrainState.create(
      params, tx, key, extra={"kl": losses.init_kl_controller(loss.kl_coef)})
  step = online.make_online_step(
      make_ppo_algorithm(model, loss, value_fn, temperature=gen.temperature,
                         chunk_size=spec.logps_chunk_size),
      sample=rollout_lib.make_sampler(model, gen, rollout_lib.stop_ids(tokenizer, model),
                                      tokenizer.pad_token_id),
      score=lambda rollout, batch: scorer(rollout, [records[i] for i in batch["index"]]),
      epochs=loss.epochs, minibatches=loss.minibatches, layout=config.layout,
      row_length=config.packed_row_length)
  task = loop.Task(
      init_state=lambda: setup.placement.state(make_state, params, key),
      train_step=lambda state, batch: step(state, batch, setup.ref_params),
      batch=setup.stream.batch, put=setup.placement.prompt_batch, num_steps=run.steps,
      config=to_dict(config),
      export=common.export_causal_lm(model, tokenizer, params_of=lambda s: s.params["policy"]),
      count_tokens=lambda b: int(np.sum(b["prompt_mask"])) * gen.num_samples)
  if setup.eval_records:
    task.evaluators.append(online.policy_evaluator(
        config, model, setup.ref_params, tokenizer, setup.eval_records, scorer,
        params_of=lambda state: state.params["policy"]))
  return task


def run(config: PPOConfig) -> dict:
  return loop.run_loop(build_task(config), config.run)
