"""Round-based online training: generate data with the current policy, train on it, repeat.

Rejection-sampling fine-tuning and iterative DPO both alternate a generation phase (sample from
the current policy, score or judge, build a fixed-shape dataset) with `steps_per_round` gradient
steps on minibatches of it. The round's dataset lives in the train state (`extra["round"]`), so a
checkpoint taken mid-round resumes on exactly the same data, and the run stays a pure function of
the seed. Prompt batches use one length (the largest bucket), so every round has the same shapes.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import parallel
from rlhf_jax.train.steps import make_train_step

__all__ = ["RoundConfig", "make_round_step", "minibatch_rows"]


@dataclasses.dataclass(frozen=True)
class RoundConfig:
  rounds: int = 4
  prompts_per_round: int = 64
  minibatch_size: int = 16  # rows of the round's dataset per gradient step
  epochs_per_round: int = 2  # passes over the round's dataset

  def steps_per_round(self, rows_per_prompt: int = 1) -> int:
    rows = self.prompts_per_round * rows_per_prompt
    if rows % self.minibatch_size:
      raise ValueError(f"a round has {rows} rows, not a multiple of rounds.minibatch_size="
                       f"{self.minibatch_size}")
    return self.epochs_per_round * rows // self.minibatch_size

  def validate(self):
    if min(self.rounds, self.prompts_per_round, self.minibatch_size, self.epochs_per_round) < 1:
      raise ValueError("every rounds.* setting must be >= 1")


def minibatch_rows(key, step_in_round: int, num_rows: int, minibatch_size: int) -> np.ndarray:
  """Rows of minibatch `step_in_round`: a fresh permutation of the round's rows every epoch."""
  per_epoch = num_rows // minibatch_size
  epoch, k = divmod(step_in_round, per_epoch)
  order = parallel.host_get(jax.random.permutation(jax.random.fold_in(key, epoch), num_rows))
  return order[k * minibatch_size:(k + 1) * minibatch_size]


def make_round_step(*, generate: Callable, loss_fn: Callable, steps_per_round: int,
                    minibatch_size: int, schedule=None):
  """train_step(state, prompt_batch) for the loop.

  generate(state, prompt_batch, key) -> (round data: dict of [rows, ...] arrays, metrics dict)
  loss_fn(params, minibatch) -> (loss, metrics)
  """
  sgd_step = make_train_step(loss_fn, schedule)
  take = jax.jit(lambda data, rows: jax.tree.map(lambda x: jnp.take(x, rows, axis=0), data))

  def train_step(state, batch):
    step = int(parallel.host_get(state.step))
    round_index, step_in_round = divmod(step, steps_per_round)
    round_key = jax.random.fold_in(state.rng, round_index)
    generated = {}
    if step_in_round == 0:
      data, generated = generate(state, batch, jax.random.fold_in(round_key, 0))
      state = state.replace(extra={**state.extra, "round": data})
    data = state.extra["round"]
    num_rows = jax.tree.leaves(data)[0].shape[0]
    rows = minibatch_rows(jax.random.fold_in(round_key, 1), step_in_round, num_rows,
                          minibatch_size)
    state, metrics = sgd_step(state, take(data, jnp.asarray(rows)))
    return state, {**metrics, **{f"round/{k}": v for k, v in generated.items()},
                   "round": round_index}

  return train_step
