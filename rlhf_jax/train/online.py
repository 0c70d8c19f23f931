"""The one online step of PPO, GRPO and RLOO: sample -> score -> prepare -> epochs x minibatches.

    step = make_online_step(algorithm, sample=..., score=..., epochs=E, minibatches=M)
    new_state, metrics = step(state, batch, ref_params)

  1. sample (jitted): G responses per prompt from the current policy, a `Rollout`;
  2. score: a reward model (jitted) or reward functions (on the host), -> scores [B·G];
  3. prepare (the algorithm's, pure): old log-probs, reference log-probs, advantages, ... — every
     array with the rollout's row axis first, detached;
  4. E epochs of M shuffled minibatches of the algorithm's loss, one optimiser update each, in a
     `lax.scan`; then the algorithm's `finish` (PPO's adaptive KL controller).
Steps 3 and 4 are one jitted function with the old state donated, so the update holds one copy
of the train state. With layout="packed" (the trainers' default) steps 3 and 4 run on
padding-free rows planned on the host between 2 and 3 (`packed_rollouts`: each prompt computed
once for the completions sharing its row, the same minibatches as the padded layout, a few fixed
row budgets); layout="padded" runs them on the rollout's [prompt | response] rows.
An algorithm is an `OnlineAlgorithm`: its `prepare`, its per-minibatch `loss`, optionally
`finish`, and where the policy's parameters sit in the state's params (PPO keeps a value head
beside them). Nothing here reads files or holds a model checkpoint: a step is
built from functions and tested on a model made in memory.

Also here, the pieces every online trainer shares: `policy_scores` (the one log-prob function at
the sampling temperature), `shuffled_minibatches`, `rollout_metrics`, and the policy evaluator an
online config asks for (`policy_evaluator`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from rlhf_jax import ops, rollout as rollout_lib
from rlhf_jax.eval import policy_eval
from rlhf_jax.train import packed_rollouts
from rlhf_jax.train.state import donating_step, trainable_value_and_grad

__all__ = ["OnlineAlgorithm", "make_update", "make_online_step", "policy_scores",
           "shuffled_minibatches", "rollout_metrics", "policy_evaluator"]


def policy_scores(model, params, rollout: rollout_lib.Rollout, temperature: float,
                  chunk_size: int):
  """(response log-probs [B, N], entropies [B, N], hidden states [B, P + N, D]) under the policy
  at the sampling temperature, from one forward pass; log-probs and entropies are 0 outside
  `rollout.response_mask`."""
  p = rollout.prompt_length
  # The head scores the response tokens only (the prompt's log-probs are never read).
  score_mask = jnp.pad(rollout.response_mask, ((0, 0), (p, 0)))
  scores = model.score_tokens(params, rollout.input_ids, rollout.attention_mask,
                              temperature=temperature, chunk_size=chunk_size, entropy=True,
                              score_mask=score_mask)
  return scores.logps[:, p:], scores.entropy[:, p:], scores.hidden


def shuffled_minibatches(key, num_rows: int, num_minibatches: int, epochs: int):
  """[epochs · num_minibatches, rows per minibatch] row indices: a fresh permutation per epoch."""
  keys = jax.random.split(key, epochs)
  orders = jax.vmap(lambda k: jax.random.permutation(k, num_rows))(keys)
  return orders.reshape(epochs * num_minibatches, num_rows // num_minibatches)


def rollout_metrics(rollout, scores, old_logps, kl_per_sequence, kl_coef) -> dict:
  """What every online method logs about its samples (call inside jit)."""
  mask = rollout.response_mask
  return {
      "reward": jnp.mean(scores), "kl": jnp.mean(kl_per_sequence), "kl_coef": kl_coef,
      "response_length": jnp.mean(jnp.sum(mask, axis=1)),
      "stopped": jnp.mean(rollout.has_stop.astype(jnp.float32)),
      "sampler_logp_gap": ops.masked_mean(jnp.abs(rollout.sampler_logps - old_logps), mask)}


@dataclasses.dataclass(frozen=True)
class OnlineAlgorithm:
  """What an online method supplies to the shared step (all pure, traced inside jit).

  prepare(state, ref_params, rollout, scores[, layout=]) -> (prepared, metrics): `prepared` is a
    pytree of arrays whose first axis is the rollout's rows (it is minibatched with them);
  loss(params, rollout_rows, prepared_rows[, layout=]) -> (scalar loss, metrics), for one
    minibatch; a packed update passes `layout` (`packed_rollouts.PackedRows`: the whole
    rollout's to prepare, the minibatch's to the loss), and the results must equal the
    padded layout's;
  finish(state, rollout, prepare_metrics) -> state, after the epochs (None: nothing);
  policy(params) -> the policy's parameters (what the sampler runs).
  """
  prepare: Callable
  loss: Callable
  finish: Callable | None = None
  policy: Callable[[Any], Any] = lambda params: params


def make_update(algorithm: OnlineAlgorithm, *, epochs: int, minibatches: int,
                packed: bool = False):
  """update(state, ref_params, rollout, scores, key) -> (state, metrics): prepare, then epochs x
  minibatches of the loss in a `lax.scan`, then finish; jitted with the old state donated.

  packed: update(state, ref_params, rollout, scores, key, layouts) with the rollout's
  `packed_rollouts.RolloutLayouts` (planned on the host for the same minibatch order); prepare
  gets layout=layouts.full and each minibatch's loss layout=its own packed rows.
  """

  @donating_step
  def update(state, ref_params, rollout, scores, key, layouts=None):
    if packed != (layouts is not None):
      raise ValueError("a packed update takes the rollout's layouts, a padded one none")
    extra = {} if layouts is None else {"layout": layouts.full}
    prepared, rollout_stats = algorithm.prepare(state, ref_params, rollout, scores, **extra)
    prepared = jax.lax.stop_gradient(prepared)
    order = shuffled_minibatches(key, rollout.input_ids.shape[0], minibatches, epochs)

    def one_minibatch(state, xs):
      rows, layout = xs
      take = lambda x: jnp.take(x, rows, axis=0)
      batch_rollout, batch_prepared = jax.tree.map(take, (rollout, prepared))
      extra = {} if layout is None else {"layout": layout}
      loss = lambda params, rollout, prepared: algorithm.loss(params, rollout, prepared, **extra)
      (value, metrics), grads = trainable_value_and_grad(loss)(
          state.params, batch_rollout, batch_prepared)
      return state.apply_gradients(grads), {**metrics, "loss": value}

    state, metrics = jax.lax.scan(one_minibatch, state,
                                  (order, None if layouts is None else layouts.minibatches))
    if algorithm.finish is not None:
      state = algorithm.finish(state, rollout, rollout_stats)
    return state, {**jax.tree.map(jnp.mean, metrics), **rollout_stats}

  return update


def make_online_step(algorithm: OnlineAlgorithm, *, sample: Callable, score: Callable,
                     epochs: int, minibatches: int, layout: str = "packed",
                     row_length: int | None = None):
  """step(state, batch, ref_params) -> (state, metrics), the loop's train step.

  sample(policy_params, prompt_ids, prompt_mask, key) -> Rollout (`rollout.make_sampler`);
  score(rollout, batch) -> (scores [B·G] on the mesh, host metrics) (a `rollout` scorer with the
  batch's prompt records). Per-step randomness is fold_in(state.rng, state.step), split between
  sampling and the minibatch order. layout="packed": the scoring and update passes run on
  padding-free rows of `row_length` tokens (None: the rollout's width), each prompt computed
  once per item (`packed_rollouts`); "padded": on the rollout's [prompt | response] rows.
  """
  if layout not in ("packed", "padded"):
    raise ValueError(f"layout must be 'packed' or 'padded', got {layout!r}")
  packed = layout == "packed"
  update = make_update(algorithm, epochs=epochs, minibatches=minibatches, packed=packed)
  order_of = jax.jit(shuffled_minibatches, static_argnums=(1, 2, 3))

  def step(state, batch, ref_params):
    sample_key, shuffle_key = jax.random.split(jax.random.fold_in(state.rng, state.step))
    rollout = sample(algorithm.policy(state.params), batch["prompt_ids"], batch["prompt_mask"],
                     sample_key)
    scores, score_metrics = score(rollout, batch)  # before the update: a failure trains nothing
    if not packed:
      state, metrics = update(state, ref_params, rollout, scores, shuffle_key)
      return state, {**metrics, **score_metrics}
    order = order_of(shuffle_key, rollout.input_ids.shape[0], minibatches, epochs)
    layouts = packed_rollouts.layout_rollout(rollout, order, row_length)
    state, metrics = update(state, ref_params, rollout, scores, shuffle_key, layouts)
    return state, {**metrics, **score_metrics}

  step.update = update  # for tests and memory analysis
  return step


def policy_evaluator(config, model, ref_params, tokenizer, records, proxy, *, params_of):
  """The PolicyEvaluator an online trainer's (resolved) config asks for: proxy = its scorer,
  gold = reward.gold_function where one applies."""
  return policy_eval.PolicyEvaluator(
      model, ref_params, tokenizer, records, batch_size=config.run.batch_size,
      max_new_tokens=config.generation.max_new_tokens,
      eos_ids=rollout_lib.stop_ids(tokenizer, model), proxy=proxy,
      gold_fn=rollout_lib.gold_function(config.reward), seed=config.run.seed,
      params_of=params_of, chunk_size=config.model.logps_chunk_size)
