"""Supervised fine-tuning: next-token loss on completion tokens only.

The prompt and padding are masked out of the loss (`loss_mask`); aggregation is the token mean
over the whole batch (every completion token weighs the same), or the per-sequence mean then the
batch mean (every example weighs the same) — `loss.aggregation`. With `data.packing`, several
examples share a row: attention and positions stay within each example (segment ids), so the
loss equals the unpacked one while padding nearly disappears.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal

import jax
import jax.numpy as jnp

from rlhf_jax import ops
from rlhf_jax.config import check_choices, to_dict
from rlhf_jax.data.batching import pack_sft
from rlhf_jax.train import common, loop, steps
from rlhf_jax.train.state import OptimizerConfig, TrainState, make_optimizer, make_schedule

__all__ = ["SFTLoss", "SFTConfig", "make_loss_fn", "build_task", "run"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SFTLoss:
  aggregation: Literal["token_mean", "sequence_mean"] = "token_mean"

  def validate(self):
    check_choices(self, "loss.")


@dataclasses.dataclass(frozen=True)
class SFTConfig:
  trainer: str = "sft"
  model: common.ModelSpec = common.ModelSpec()
  data: common.DataSpec = common.DataSpec(train="synthetic:sft", max_length=64)
  loss: SFTLoss = SFTLoss()
  optimizer: OptimizerConfig = OptimizerConfig(lr=1e-3, warmup_steps=10)
  run: loop.RunConfig = loop.RunConfig(output_dir="runs/sft")

  def validate(self):
    self.loss.validate()
    self.optimizer.validate()
    self.run.validate()
    self.data.validate()
    self.model.validate()
    if self.data.packing and self.loss.aggregation != "token_mean":
      raise ValueError("data.packing puts several examples in a row: use "
                       "loss.aggregation=token_mean (a per-row mean would weigh examples by "
                       "their row-mates)")


def completion_nll(model, params, batch, chunk_size: int):
  """(Σ NLL over completion tokens [B], completion token counts [B]); packed rows (with
  `segment_ids`) count every example they hold."""
  logps = model.token_logps(params, batch["input_ids"], batch["attention_mask"],
                            chunk_size=chunk_size, segment_ids=batch.get("segment_ids"))
  mask = batch["loss_mask"].astype(jnp.float32)
  return -ops.masked_sum(logps, mask, axis=-1), jnp.sum(mask, axis=-1)


def make_loss_fn(model, loss: SFTLoss, chunk_size: int = 512):
  def loss_fn(params, batch):
    nll, tokens = completion_nll(model, params, batch, chunk_size)
    weight = batch["weight"]
    if loss.aggregation == "token_mean":
      value = jnp.sum(nll * weight) / jnp.maximum(jnp.sum(tokens * weight), 1.0)
    else:
      per_sequence = nll / jnp.maximum(tokens, 1.0)
      value = jnp.sum(per_sequence * weight) / jnp.maximum(jnp.sum(weight), 1.0)
    return value, {"completion_tokens": jnp.sum(tokens * weight)}
  return loss_fn


def make_eval_sums(model, chunk_size: int = 512):
  def sums(params, batch):
    nll, tokens = completion_nll(model, params, batch, chunk_size)
    tokens = tokens * batch["weight"]
    return {"nll": jnp.sum(nll * batch["weight"]), "weight": jnp.sum(tokens)}  # token-mean NLL
  return sums


def build_task(config: SFTConfig) -> loop.Task:
  config.validate()
  run = config.run
  common.check_run(run)
  tokenizer = common.load_tokenizer(config.model)
  # The data before the weights: a bad file or row fails in seconds, not after the model loads.
  train_records, eval_records, _ = common.load_data("sft", config.data, tokenizer, run.seed)
  model, params = common.load_trained_policy(config.model, run.seed, mesh=run.mesh)
  pad = tokenizer.pad_token_id
  if config.data.packing:
    packed = pack_sft(train_records, config.data.max_length, run.seed)
    log.info("packed %d examples into %d rows of %d tokens", len(train_records), len(packed),
             config.data.max_length)
    train_records = packed
  train = common.make_stream(train_records, config.data, run.batch_size, pad, run.seed)
  tx = make_optimizer(config.optimizer, run.steps)
  placement = common.make_placement(run.mesh, model.config)
  make_state = lambda p, key: TrainState.create(p, tx, key)
  chunk = config.model.logps_chunk_size
  train_step = steps.make_train_step(make_loss_fn(model, config.loss, chunk),
                                     make_schedule(config.optimizer, run.steps),
                                     config.optimizer.grad_accumulation)
  task = loop.Task(
      init_state=lambda: placement.state(make_state, params, jax.random.key(run.seed)),
      train_step=train_step, batch=train.batch, put=placement.batch,
      num_steps=run.steps * config.optimizer.grad_accumulation,
      export=common.export_causal_lm(model, tokenizer), config=to_dict(config))
  if eval_records:
    evaluation = common.make_stream(eval_records, config.data, run.batch_size, pad, shuffle=False)
    task.eval_step = steps.make_eval_step(make_eval_sums(model, chunk))
    task.eval_batches = evaluation.epoch
  return task


def run(config: SFTConfig) -> dict:
  return loop.run_loop(build_task(config), config.run)
