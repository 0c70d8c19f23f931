"""Reward-model training: Bradley-Terry on pairs (with margins) or K-wise rankings.

The reward model is a causal-LM backbone with a linear score head read at the last real token
(`rlhf_jax.models.RewardModel`; with data.layout=packed, the default, a pair is one packed item
[prompt | chosen | rejected], a ranked row one item [prompt | completion 1 | ... | K], and each
score is read at its completion's last token, the score of the row [prompt | completion] alone);
it starts from a causal LM (a fresh head) or from a
`*ForSequenceClassification` checkpoint, and is exported as one, so it loads in transformers/TRL.

Objectives (`loss.objective`):
  bradley_terry  -log σ(r_c - r_r - m), m the row's margin when `use_margin` (Touvron et al. 2023)
  ranking        InstructGPT's K-wise loss: the mean over every ordered pair of a row's ranking
Optional reward centering (Eisenstein et al. 2023, arXiv 2312.09244) adds c·(r_c + r_r)² per pair,
pinning the rewards to zero mean so a downstream KL-penalised RL sees comparable values; for a
K-wise ranking it adds c·(2 r̄)², r̄ the mean reward of the row's valid completions (the same
term when K = 2).
Several heads (`num_heads` > 1) learn several objectives; a pair's `objective` picks its head.
Ranked rows carry no objective, so the ranking objective trains a single head.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from rlhf_jax import losses, models, parallel
from rlhf_jax.config import check_choices, to_dict
from rlhf_jax.train import common, loop, steps
from rlhf_jax.train.state import OptimizerConfig, TrainState, make_optimizer, make_schedule

__all__ = ["RewardLoss", "RewardConfig", "load_reward_model", "build_task", "run"]


@dataclasses.dataclass(frozen=True)
class RewardLoss:
  objective: Literal["bradley_terry", "ranking"] = "bradley_terry"  # pair | ranked data
  use_margin: bool = False
  center_coef: float = 0.0  # reward centering; 0 disables (TRL uses 1e-2 when on)
  num_heads: int = 1

  def validate(self):
    check_choices(self, "loss.")
    if self.num_heads < 1:
      raise ValueError(f"loss.num_heads must be >= 1, got {self.num_heads}")
    if self.objective == "ranking" and self.num_heads != 1:
      raise ValueError("loss.objective=ranking trains one head (ranked rows name no objective); "
                       f"got loss.num_heads={self.num_heads}")
    if self.objective == "ranking" and self.use_margin:
      raise ValueError("loss.use_margin applies to bradley_terry pairs; ranked rows have no margin")


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  trainer: str = "reward"
  model: common.ModelSpec = common.ModelSpec()
  data: common.DataSpec = common.DataSpec(train="synthetic:pair", max_length=64)
  loss: RewardLoss = RewardLoss()
  optimizer: OptimizerConfig = OptimizerConfig(lr=3e-4, warmup_steps=10)
  run: loop.RunConfig = loop.RunConfig(output_dir="runs/reward")

  def validate(self):
    self.loss.validate()
    self.optimizer.validate()
    self.run.validate()
    self.data.validate()
    self.model.validate()


def load_reward_model(spec: common.ModelSpec, num_heads: int, seed: int, mesh=None):
  """A reward model from a sequence-classification checkpoint, or a causal LM plus a new head."""
  return common.load_reward_model(spec.path, spec, num_heads, seed, mesh=mesh)


def _pair_rewards(rm, params, batch):
  if "sequence_ids" in batch:  # packed: each pair one item, scores read at each sequence's end
    rewards = rm.apply(params, batch["input_ids"], batch["attention_mask"],
                       segment_ids=batch["segment_ids"], branch_ids=batch["branch_ids"],
                       sequence_ends=batch["sequence_ends"])  # [2B, H], chosen block first
  else:
    rewards = rm.apply(params, batch["input_ids"], batch["attention_mask"])  # [2B, H]
  n = rewards.shape[0] // 2
  head = batch["objective"][:, None]
  chosen = jnp.take_along_axis(rewards[:n], head, axis=1)[:, 0]
  rejected = jnp.take_along_axis(rewards[n:], head, axis=1)[:, 0]
  return chosen, rejected


def make_losses(rm, loss: RewardLoss):
  """per_example(params, batch) -> (loss [B], metrics {name: [B]})."""

  def pairwise(params, batch):
    chosen, rejected = _pair_rewards(rm, params, batch)
    margin = batch["margin"] if loss.use_margin else 0.0
    per_example = losses.bradley_terry(chosen, rejected, margin=margin)
    if loss.center_coef:
      per_example = per_example + loss.center_coef * (chosen + rejected) ** 2
    return per_example, {
        "accuracy": (chosen > rejected).astype(jnp.float32),
        "reward_margin": chosen - rejected, "reward_chosen": chosen, "reward_rejected": rejected}

  def ranked(params, batch):
    b, k = batch["ranks"].shape
    if "sequence_ids" in batch:  # packed: one item per row of the ranking, block order [K·B]
      rewards = rm.apply(params, batch["input_ids"], batch["attention_mask"],
                         segment_ids=batch["segment_ids"], branch_ids=batch["branch_ids"],
                         sequence_ends=batch["sequence_ends"])[:, 0].reshape(k, b).T
    else:
      rewards = rm.apply(params, batch["input_ids"], batch["attention_mask"])[:, 0].reshape(b, k)
    per_example = losses.ranking(rewards, batch["ranks"], batch["rank_mask"])
    mean_reward = (jnp.sum(rewards * batch["rank_mask"], 1)
                   / jnp.maximum(jnp.sum(batch["rank_mask"], 1), 1))
    if loss.center_coef:
      per_example = per_example + loss.center_coef * (2.0 * mean_reward) ** 2
    better = (batch["ranks"][:, :, None] < batch["ranks"][:, None, :])
    valid = better & (batch["rank_mask"][:, :, None] > 0) & (batch["rank_mask"][:, None, :] > 0)
    correct = valid & (rewards[:, :, None] > rewards[:, None, :])
    accuracy = jnp.sum(correct, (1, 2)) / jnp.maximum(jnp.sum(valid, (1, 2)), 1)
    return per_example, {"accuracy": accuracy.astype(jnp.float32), "reward_mean": mean_reward}

  return pairwise if loss.objective == "bradley_terry" else ranked


def _weighted_mean(x, weight):
  return jnp.sum(x * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def build_task(config: RewardConfig) -> loop.Task:
  config.validate()
  run = config.run
  common.check_run(run)
  tokenizer = common.load_tokenizer(config.model)
  kind = "pair" if config.loss.objective == "bradley_terry" else "ranked"
  train_records, eval_records, _ = common.load_data(kind, config.data, tokenizer, run.seed)
  rm, params = common.adapt_reward_model(
      config.model, *load_reward_model(config.model, config.loss.num_heads, run.seed, run.mesh),
      run.seed)
  too_high = [r.objective for r in train_records + eval_records
              if getattr(r, "objective", 0) >= config.loss.num_heads]
  if too_high:
    raise ValueError(f"data has preferences for objective {max(too_high)} but the reward model "
                     f"has loss.num_heads={config.loss.num_heads}")
  per_example = make_losses(rm, config.loss)

  def loss_fn(params, batch):
    values, metrics = per_example(params, batch)
    return _weighted_mean(values, batch["weight"]), {
        k: _weighted_mean(v, batch["weight"]) for k, v in metrics.items()}

  def eval_sums(params, batch):
    values, metrics = per_example(params, batch)
    w = batch["weight"]
    return {"loss": jnp.sum(values * w), **{k: jnp.sum(v * w) for k, v in metrics.items()},
            "weight": jnp.sum(w)}

  pad, shards = tokenizer.pad_token_id, common.batch_shards(run)
  train = common.make_stream(train_records, config.data, run.batch_size, pad, run.seed,
                             row_multiple=shards)
  tx = make_optimizer(config.optimizer, run.steps)
  placement = common.make_placement(run.mesh, rm.config)
  make_state = lambda p, key: TrainState.create(p, tx, key)

  def export(state, out_dir):
    # Every process joins the tensor-by-tensor gathers; process 0 writes.
    models.save_pretrained_reward_model(rm, state.params, out_dir)
    if parallel.is_main_process():
      tokenizer.save_pretrained(out_dir)

  task = loop.Task(
      init_state=lambda: placement.state(make_state, params, jax.random.key(run.seed)),
      train_step=steps.make_train_step(loss_fn, make_schedule(config.optimizer, run.steps),
                                       config.optimizer.grad_accumulation),
      batch=train.batch, put=placement.batch,
      num_steps=run.steps * config.optimizer.grad_accumulation, export=export,
      config=to_dict(config))
  if eval_records:
    evaluation = common.make_stream(eval_records, config.data, run.batch_size, pad, shuffle=False,
                                    row_multiple=shards)
    task.eval_step, task.eval_batches = steps.make_eval_step(eval_sums), evaluation.epoch
  return task


def run(config: RewardConfig) -> dict:
  return loop.run_loop(build_task(config), config.run)
