"""Pure step builders shared by the trainers.

A trainer writes `loss_fn(params, batch, *frozen) -> (loss, metrics)`; `make_train_step` turns it
into the jitted `step(state, batch, *frozen) -> (new_state, metrics)` (the old state donated), and
`bind` closes over the frozen arrays (e.g. reference parameters) so the loop sees
`new_state, metrics = step(state, batch)`. Frozen arrays are jit arguments, never constants baked
into the compiled program.
"""

from __future__ import annotations

from typing import Callable

import jax
import optax

from rlhf_jax.train.state import donating_step, trainable_value_and_grad

__all__ = ["make_train_step", "make_eval_step", "bind"]


def make_train_step(loss_fn: Callable, schedule: optax.Schedule | None = None,
                    grad_accumulation: int = 1):
  """value_and_grad + optimiser update, with grad norm and learning rate in the metrics."""

  @donating_step
  def step(state, batch, *frozen):
    (loss, metrics), grads = trainable_value_and_grad(loss_fn)(state.params, batch, *frozen)
    new_state = state.apply_gradients(grads)
    metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
    if schedule is not None:
      metrics["learning_rate"] = schedule(state.step // grad_accumulation)
    return new_state, metrics

  return step


def make_eval_step(sums_fn: Callable):
  """Jits `sums_fn(params, batch, *frozen) -> {name: weighted sum, "weight": total weight}`."""

  @jax.jit
  def step(state, batch, *frozen):
    return sums_fn(state.params, batch, *frozen)

  return step


def bind(step: Callable, *frozen) -> Callable:
  """step(state, batch, *frozen) -> step(state, batch)."""
  if not frozen:
    return step
  return lambda state, batch: step(state, batch, *frozen)
