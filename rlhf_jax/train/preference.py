"""Direct preference optimisation: any loss in PREFERENCE_LOSSES, and KTO on unpaired data.

Pairwise step: one forward pass of the batch through the policy (and, unless precomputed,
through the frozen reference) — by default (data.layout=packed) packed rows where each pair is
one item [prompt | chosen | rejected] and its prompt is computed once; with data.layout=padded
the 2B rows [chosen; rejected] — sequence log-probs [2B] (chosen block, then rejected) by
`logp_reduction` (None: the loss's paper default: sums for DPO-like losses, means for IPO /
SimPO / ORPO), then
  loss = weight · pairwise(pc, pr, rc, rr) + nll_weight · NLL(chosen)
which gives DPO and its family (nll_weight 0), RPO (Pang et al. 2024: nll_weight = α), and ORPO
(Hong et al. 2024: weight = λ, nll_weight = 1). Reference-free losses (SimPO, ORPO) never load a
reference. With `reference="precompute"` the reference scores every example once before training
and is then dropped: the step holds no reference parameters.

Metrics ("chosen and rejected rewards both fall" often confuses users, so all are logged):
  rewards/chosen, rewards/rejected  implicit rewards β·(log π - log π_ref) (β·log π if ref-free)
  rewards/margin, rewards/accuracy  their difference, and how often chosen > rejected
  logps/chosen, logps/rejected      the policy's sequence log-probs: both may fall while the
                                    margin grows — DPO only constrains their difference
  nll                               the chosen completions' token-mean NLL
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import losses, ops, parallel
from rlhf_jax.config import check_choices, require, to_dict
from rlhf_jax.data import BatchStream
from rlhf_jax.train import common, loop, steps
from rlhf_jax.train.state import OptimizerConfig, TrainState, make_optimizer, make_schedule

__all__ = ["PreferenceLossConfig", "PreferenceConfig", "KTOLossConfig", "KTOConfig",
           "make_pair_losses", "build_task", "build_kto_task", "run", "run_kto"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PreferenceLossConfig:
  name: str = "dpo"  # any key of rlhf_jax.losses.PREFERENCE_LOSSES
  beta: float = 0.1
  hparams: dict = dataclasses.field(default_factory=dict)  # the loss's other hyper-parameters
  logp_reduction: Literal["sum", "mean"] | None = None  # None: the loss's paper default
  weight: float = 1.0  # scale of the pairwise term (ORPO's λ)
  nll_weight: float = 0.0  # NLL on the chosen completion (RPO's α; 1 for ORPO)
  # "model": frozen reference in the step | "precompute": once
  reference: Literal["model", "precompute"] = "model"

  def entry(self) -> losses.PreferenceLoss:
    if self.name not in losses.PREFERENCE_LOSSES:
      import difflib
      close = difflib.get_close_matches(self.name, losses.PREFERENCE_LOSSES, n=1)
      raise ValueError(f"unknown preference loss {self.name!r}"
                       + (f"; did you mean {close[0]!r}?" if close else "")
                       + f" (known: {sorted(losses.PREFERENCE_LOSSES)})")
    return losses.PREFERENCE_LOSSES[self.name]

  def loss_hparams(self) -> dict:
    entry = self.entry()
    hparams = dict(self.hparams)
    if "beta" in entry.defaults:
      hparams.setdefault("beta", self.beta)
    elif self.beta != PreferenceLossConfig.beta:
      raise ValueError(f"loss {self.name!r} takes no beta (its hyper-parameters: "
                       f"{sorted(entry.defaults)}); for ORPO's λ set loss.weight")
    entry.check_hparams(hparams)
    return hparams

  def reduction(self) -> str:
    return self.logp_reduction or self.entry().logp_reduction

  def validate(self):
    check_choices(self, "loss.")
    require(self.beta > 0, "loss.beta", "a value > 0", self.beta)
    self.loss_hparams()


@dataclasses.dataclass(frozen=True)
class PreferenceConfig:
  trainer: str = "preference"
  model: common.ModelSpec = common.ModelSpec()
  data: common.DataSpec = common.DataSpec(train="synthetic:pair", max_length=64)
  loss: PreferenceLossConfig = PreferenceLossConfig()
  optimizer: OptimizerConfig = OptimizerConfig(lr=1e-4, warmup_steps=5)
  run: loop.RunConfig = loop.RunConfig(output_dir="runs/dpo")

  def validate(self):
    self.loss.validate()
    self.optimizer.validate()
    self.run.validate()
    self.data.validate()
    self.model.validate()


def _sequence_logps(model, params, batch, reduction, chunk_size):
  """(log-probs by `reduction`, token-mean log-probs) [2B] of a pair batch's sequences, chosen
  block then rejected block, in either layout: padded rows, or packed items (`sequence_ids`)."""
  token_logps = model.token_logps(params, batch["input_ids"], batch["attention_mask"],
                                  chunk_size=chunk_size, segment_ids=batch.get("segment_ids"),
                                  branch_ids=batch.get("branch_ids"),
                                  score_mask=batch["loss_mask"])  # the head skips the prompts
  mask = batch["loss_mask"]
  if "sequence_ids" not in batch:
    return (ops.sequence_logps(token_logps, mask, reduction=reduction),
            ops.sequence_logps(token_logps, mask, reduction="mean"))
  sums = lambda how: ops.packed_sequence_sums(token_logps, mask, batch["sequence_ids"],
                                              batch["sequence_ends"].shape[0], reduction=how)
  return sums(reduction), sums("mean")


def make_pair_losses(model, loss: PreferenceLossConfig, chunk_size: int = 512):
  """per_example(params, batch, ref_logps [2B] or None) -> (loss [B], metrics {name: [B]})."""
  entry, hparams, reduction = loss.entry(), loss.loss_hparams(), loss.reduction()
  beta = hparams.get("beta", loss.beta)

  def per_example(params, batch, ref_logps):
    logps, mean_logps = _sequence_logps(model, params, batch, reduction, chunk_size)
    n = logps.shape[0] // 2
    pc, pr = logps[:n], logps[n:]
    rc = rr = None
    if not entry.reference_free:
      rc, rr = ref_logps[:n], ref_logps[n:]
    # Batch-coupled losses (AOT's sorting, BCO's mean) must not see the padding rows.
    values = loss.weight * entry(pc, pr, rc, rr, where=batch["weight"] > 0, **hparams)
    nll = -mean_logps[:n]
    if loss.nll_weight:
      values = values + loss.nll_weight * nll
    chosen_reward, rejected_reward = losses.implicit_rewards(pc, pr, rc, rr, beta=beta)
    return values, {
        "rewards/chosen": chosen_reward, "rewards/rejected": rejected_reward,
        "rewards/margin": chosen_reward - rejected_reward,
        "rewards/accuracy": (chosen_reward > rejected_reward).astype(jnp.float32),
        "logps/chosen": pc, "logps/rejected": pr, "nll": nll}

  return per_example


def _weighted_mean(x, weight):
  return jnp.sum(x * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def _objective_fns(per_example, reference_logps):
  """loss_fn and eval sums; `reference_logps(batch, *frozen)` gives [2B] or None."""

  def loss_fn(params, batch, *frozen):
    values, metrics = per_example(params, batch, reference_logps(batch, *frozen))
    w = batch["weight"]
    return _weighted_mean(values, w), {k: _weighted_mean(v, w) for k, v in metrics.items()}

  def eval_sums(params, batch, *frozen):
    values, metrics = per_example(params, batch, reference_logps(batch, *frozen))
    w = batch["weight"]
    return {"loss": jnp.sum(values * w), **{k: jnp.sum(v * w) for k, v in metrics.items()},
            "weight": jnp.sum(w)}

  return loss_fn, eval_sums


def precompute_reference(model, ref_params, stream: BatchStream, reduction, chunk_size, put):
  """Scores every record of `stream` once with the reference: [N, 2] (chosen, rejected)."""
  score = jax.jit(lambda p, b: _sequence_logps(model, p, b, reduction, chunk_size)[0])
  out = np.zeros((len(stream.records), 2), np.float32)
  for batch in stream.epoch():
    logps = parallel.host_get(score(ref_params, put(batch)))
    n = len(batch["index"])
    real = batch["weight"] > 0
    out[batch["index"][real], 0] = logps[:n][real]
    out[batch["index"][real], 1] = logps[n:][real]
  return out


def build_task(config: PreferenceConfig) -> loop.Task:
  config.validate()
  run, spec = config.run, config.model
  entry = config.loss.entry()
  common.check_run(run)
  tokenizer = common.load_tokenizer(spec)
  train_records, eval_records, _ = common.load_data("pair", config.data, tokenizer, run.seed)
  model, params = common.load_trained_policy(spec, run.seed, mesh=run.mesh)
  pad, chunk = tokenizer.pad_token_id, spec.logps_chunk_size
  shards = common.batch_shards(run)
  train = common.make_stream(train_records, config.data, run.batch_size, pad, run.seed,
                             row_multiple=shards)
  evaluation = (common.make_stream(eval_records, config.data, run.batch_size, pad, shuffle=False,
                                   row_multiple=shards) if eval_records else None)
  placement = common.make_placement(run.mesh, model.config)
  reduction = config.loss.reduction()
  per_example = make_pair_losses(model, config.loss, chunk)

  frozen, batch_fn, eval_batches = (), train.batch, evaluation.epoch if evaluation else None
  if entry.reference_free:
    reference_logps = lambda batch: None
  else:
    ref_params = common.load_reference(spec, params, placement)
    if config.loss.reference == "model":
      def reference_logps(batch, ref):
        return jax.lax.stop_gradient(_sequence_logps(model, ref, batch, reduction, chunk)[0])
      frozen = (ref_params,)
    else:
      in_order = common.make_stream(train_records, config.data, run.batch_size, pad,
                                    shuffle=False, row_multiple=shards)
      cache = precompute_reference(model, ref_params, in_order, reduction, chunk,
                                   placement.batch)
      eval_cache = (precompute_reference(model, ref_params, evaluation, reduction, chunk,
                                         placement.batch) if evaluation else None)
      del ref_params  # nothing below holds reference parameters
      batch_fn = _with_reference(train.batch, cache)
      if evaluation:
        eval_batches = lambda: (_attach(b, eval_cache) for b in evaluation.epoch())

      def reference_logps(batch):
        return jnp.concatenate([batch["ref_logps"][:, 0], batch["ref_logps"][:, 1]])

  loss_fn, eval_sums = _objective_fns(per_example, reference_logps)
  tx = make_optimizer(config.optimizer, run.steps)
  make_state = lambda p, key: TrainState.create(p, tx, key)
  train_step = steps.make_train_step(loss_fn, make_schedule(config.optimizer, run.steps),
                                     config.optimizer.grad_accumulation)
  task = loop.Task(
      init_state=lambda: placement.state(make_state, params, jax.random.key(run.seed)),
      train_step=steps.bind(train_step, *frozen), batch=batch_fn, put=placement.batch,
      num_steps=run.steps * config.optimizer.grad_accumulation,
      export=common.export_causal_lm(model, tokenizer), config=to_dict(config))
  task.holds_reference = bool(frozen)  # for tests and logs: precompute keeps none
  if evaluation:
    task.eval_step = steps.bind(steps.make_eval_step(eval_sums), *frozen)
    task.eval_batches = eval_batches
  return task


def _attach(batch, cache):
  return {**batch, "ref_logps": cache[batch["index"]]}


def _with_reference(batch_fn, cache):
  return lambda i: _attach(batch_fn(i), cache)


def run(config: PreferenceConfig) -> dict:
  return loop.run_loop(build_task(config), config.run)


# --- KTO -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KTOLossConfig:
  beta: float = 0.1
  desirable_weight: float = 1.0
  undesirable_weight: float = 1.0  # raise when undesirable rows are rarer (the paper's λ_U)

  def validate(self):
    require(self.beta > 0, "loss.beta", "a value > 0", self.beta)
    for name in ("desirable_weight", "undesirable_weight"):
      require(getattr(self, name) > 0, f"loss.{name}", "a weight > 0", getattr(self, name))


@dataclasses.dataclass(frozen=True)
class KTOConfig:
  trainer: str = "kto"
  model: common.ModelSpec = common.ModelSpec()
  data: common.DataSpec = common.DataSpec(train="synthetic:unpaired", max_length=64)
  loss: KTOLossConfig = KTOLossConfig()
  optimizer: OptimizerConfig = OptimizerConfig(lr=1e-4, warmup_steps=5)
  run: loop.RunConfig = loop.RunConfig(output_dir="runs/kto")

  def validate(self):
    self.loss.validate()
    self.optimizer.validate()
    self.run.validate()
    self.data.validate()
    self.model.validate()


def make_kto_losses(model, loss: KTOLossConfig, chunk_size: int = 512):
  """KTO (Ethayarajh et al. 2024): the reference point z0 is estimated in every batch from the
  mismatched (prompt i, completion i+1) rows, detached and clamped at 0 by the loss. Packed
  batches hold prompt i once for its completion and the mismatched one (one forward pass)."""

  def seq(params, batch, prefix=""):
    logps = model.token_logps(params, batch[prefix + "input_ids"],
                              batch[prefix + "attention_mask"], chunk_size=chunk_size,
                              score_mask=batch[prefix + "loss_mask"])
    return ops.sequence_logps(logps, batch[prefix + "loss_mask"], reduction="sum")

  def matched_and_mismatched(params, batch):
    """([B] matched, [B] mismatched) sequence log-probs: two padded row sets, or one packed
    batch whose items hold prompt i with its completion and the mismatched one."""
    if "sequence_ids" not in batch:
      return seq(params, batch), seq(params, batch, "kl_")
    logps = _sequence_logps(model, params, batch, "sum", chunk_size)[0]
    n = logps.shape[0] // 2
    return logps[:n], logps[n:]

  def per_example(params, batch, ref):
    policy, policy_kl = matched_and_mismatched(params, batch)
    ref_logps, ref_kl = jax.lax.stop_gradient(matched_and_mismatched(ref, batch))
    z0 = losses.kto_kl_estimate(policy_kl, ref_kl, where=batch["weight"] > 0)
    desirable = batch["label"] > 0.5
    values = losses.kto(policy, ref_logps, desirable, z0, beta=loss.beta,
                        desirable_weight=loss.desirable_weight,
                        undesirable_weight=loss.undesirable_weight)
    rewards = loss.beta * (policy - ref_logps)
    return values, {"rewards": rewards, "desirable": desirable.astype(jnp.float32),
                    "kl_ref": jnp.broadcast_to(z0, rewards.shape)}

  return per_example


def build_kto_task(config: KTOConfig) -> loop.Task:
  config.validate()
  run, spec = config.run, config.model
  if run.batch_size < 2:
    raise ValueError("KTO needs run.batch_size >= 2 to form mismatched pairs for its KL estimate")
  common.check_run(run)
  tokenizer = common.load_tokenizer(spec)
  train_records, eval_records, _ = common.load_data("unpaired", config.data, tokenizer, run.seed)
  model, params = common.load_trained_policy(spec, run.seed, mesh=run.mesh)
  labels = np.array([r.label for r in train_records])
  log.info("KTO data: %d desirable, %d undesirable rows", labels.sum(), (~labels).sum())
  pad, chunk = tokenizer.pad_token_id, spec.logps_chunk_size
  shards = common.batch_shards(run)
  train = common.make_stream(train_records, config.data, run.batch_size, pad, run.seed,
                             row_multiple=shards)
  placement = common.make_placement(run.mesh, model.config)
  ref_params = common.load_reference(spec, params, placement)
  per_example = make_kto_losses(model, config.loss, chunk)

  def split_metrics(metrics, w):
    d = metrics.pop("desirable")
    rewards = metrics.pop("rewards")
    return {**{k: _weighted_mean(v, w) for k, v in metrics.items()},
            "rewards/desirable": _weighted_mean(rewards, w * d),
            "rewards/undesirable": _weighted_mean(rewards, w * (1 - d))}

  def loss_fn(params, batch, ref):
    values, metrics = per_example(params, batch, ref)
    w = batch["weight"]
    return _weighted_mean(values, w), split_metrics(metrics, w)

  def eval_sums(params, batch, ref):
    values, metrics = per_example(params, batch, ref)
    w = batch["weight"]
    return {"loss": jnp.sum(values * w), "kl_ref": jnp.sum(metrics["kl_ref"] * w),
            "weight": jnp.sum(w)}

  tx = make_optimizer(config.optimizer, run.steps)
  make_state = lambda p, key: TrainState.create(p, tx, key)
  train_step = steps.make_train_step(loss_fn, make_schedule(config.optimizer, run.steps),
                                     config.optimizer.grad_accumulation)
  task = loop.Task(
      init_state=lambda: placement.state(make_state, params, jax.random.key(run.seed)),
      train_step=steps.bind(train_step, ref_params), batch=train.batch, put=placement.batch,
      num_steps=run.steps * config.optimizer.grad_accumulation,
      export=common.export_causal_lm(model, tokenizer), config=to_dict(config),
      count_tokens=lambda b: int(np.sum(b["attention_mask"])
                                 + np.sum(b.get("kl_attention_mask", 0))))
  if eval_records:
    evaluation = common.make_stream(eval_records, config.data, run.batch_size, pad, shuffle=False,
                                    row_multiple=shards)
    task.eval_step = steps.bind(steps.make_eval_step(eval_sums), ref_params)
    task.eval_batches = evaluation.epoch
  return task


def run_kto(config: KTOConfig) -> dict:
  return loop.run_loop(build_kto_task(config), config.run)
