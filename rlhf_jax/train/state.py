"""Train state pytrees and optax optimisers from config.

A `TrainState` is immutable: a step returns a new one. It holds everything a run needs to continue
bit-exactly — step, params, optimiser state, RNG key, and a trainer-specific `extra` pytree (the
KL controller, a running reward mean, ...). Frozen reference parameters never live in it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal

import flax.struct
import jax
import jax.numpy as jnp
import optax

from rlhf_jax.config import check_choices, require
from rlhf_jax.models import lora

__all__ = ["TrainState", "OptimizerConfig", "make_optimizer", "make_schedule",
           "trainable_value_and_grad", "donating_step"]


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: micro-steps taken (= batches consumed)
  params: Any
  opt_state: Any
  rng: jax.Array  # a typed PRNG key; per-step randomness is fold_in(rng, step)
  extra: Any = None
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False, default=None)

  @classmethod
  def create(cls, params, tx: optax.GradientTransformation, rng, extra=None) -> "TrainState":
    """The optimiser state covers the trainable part only (`lora.split`: adapters and heads of
    a LoRA model, everything otherwise)."""
    return cls(step=jnp.zeros((), jnp.int32), params=params,
               opt_state=tx.init(lora.trainable(params)), rng=rng, extra=extra, tx=tx)

  def apply_gradients(self, grads, **changes) -> "TrainState":
    """grads: of the trainable part (what `trainable_value_and_grad` differentiates)."""
    trainable, join = lora.split(self.params)
    updates, opt_state = self.tx.update(grads, self.opt_state, trainable)
    params = join(optax.apply_updates(trainable, updates))
    return self.replace(step=self.step + 1, params=params, opt_state=opt_state, **changes)

  def step_key(self) -> jax.Array:
    return jax.random.fold_in(self.rng, self.step)


def trainable_value_and_grad(loss_fn):
  """value_and_grad(loss_fn, has_aux=True) w.r.t. the trainable part of its first argument
  (`lora.split`): frozen LoRA bases get no gradient, not even zeros."""
  def fn(params, *args):
    trainable, join = lora.split(params)
    return jax.value_and_grad(lambda t: loss_fn(join(t), *args), has_aux=True)(trainable)
  return fn


def donating_step(fn):
  """jit(fn) with the state (first argument) donated — except the frozen LoRA bases in it, which
  go in as a separate undonated argument: the reference (`Adapted(base, None)`) shares those
  buffers, and donating them would invalidate it. Without LoRA: jit(fn, donate_argnums=0)."""
  @functools.partial(jax.jit, donate_argnums=0)
  def inner(state, bases, *args):
    new_state, out = fn(lora.attach_bases(state, bases), *args)
    return lora.detach_bases(new_state)[0], out

  @functools.wraps(fn)
  def step(state, *args):
    detached, bases = lora.detach_bases(state)
    new_state, out = inner(detached, bases, *args)
    return lora.attach_bases(new_state, bases), out

  def lower(state, *args):
    detached, bases = lora.detach_bases(state)
    return inner.lower(detached, bases, *args)

  step.lower = lower  # for memory analysis; step.__wrapped__ is fn itself
  return step


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  name: Literal["adamw", "adam", "sgd"] = "adamw"
  lr: float = 1e-5
  schedule: Literal["constant", "cosine", "linear"] = "cosine"  # after the warmup
  warmup_steps: int = 0
  min_lr_ratio: float = 0.0  # the decay ends at lr * min_lr_ratio
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  max_grad_norm: float | None = 1.0  # None: no clipping
  grad_accumulation: int = 1  # micro-batches per optimiser update (optax.MultiSteps)

  def validate(self):
    check_choices(self, "optimizer.")
    if self.grad_accumulation < 1:
      raise ValueError(f"optimizer.grad_accumulation must be >= 1, got {self.grad_accumulation}")
    require(self.lr > 0, "optimizer.lr", "a learning rate > 0", self.lr)
    require(self.warmup_steps >= 0, "optimizer.warmup_steps", "an integer >= 0",
            self.warmup_steps)
    require(0 <= self.min_lr_ratio <= 1, "optimizer.min_lr_ratio", "a ratio in [0, 1]",
            self.min_lr_ratio)
    require(self.weight_decay >= 0, "optimizer.weight_decay", "a value >= 0", self.weight_decay)
    for name in ("b1", "b2"):
      value = getattr(self, name)
      require(0 <= value < 1, f"optimizer.{name}", "a decay rate in [0, 1)", value)
    require(self.eps > 0, "optimizer.eps", "a value > 0", self.eps)
    require(self.max_grad_norm is None or self.max_grad_norm > 0, "optimizer.max_grad_norm",
            "a norm > 0 (or None: no clipping)", self.max_grad_norm)


def make_schedule(config: OptimizerConfig, total_updates: int) -> optax.Schedule:
  """Linear warmup from 0, then constant / cosine / linear decay to lr * min_lr_ratio."""
  peak, end = config.lr, config.lr * config.min_lr_ratio
  decay_steps = max(total_updates - config.warmup_steps, 1)
  if config.schedule == "constant":
    decay = optax.constant_schedule(peak)
  elif config.schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=config.min_lr_ratio)
  else:
    decay = optax.linear_schedule(peak, end, decay_steps)
  if config.warmup_steps == 0:
    return decay
  warmup = optax.linear_schedule(0.0, peak, config.warmup_steps)
  return optax.join_schedules([warmup, decay], [config.warmup_steps])


def make_optimizer(config: OptimizerConfig, total_updates: int) -> optax.GradientTransformation:
  """Clipping, the optimiser with its schedule, and gradient accumulation, from config."""
  config.validate()
  schedule = make_schedule(config, total_updates)
  if config.name == "sgd":
    optimizer = optax.sgd(schedule)
  elif config.name == "adam":
    optimizer = optax.adam(schedule, b1=config.b1, b2=config.b2, eps=config.eps)
  else:
    optimizer = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                            weight_decay=config.weight_decay)
  if config.max_grad_norm is not None:
    optimizer = optax.chain(optax.clip_by_global_norm(config.max_grad_norm), optimizer)
  if config.grad_accumulation > 1:
    optimizer = optax.MultiSteps(optimizer, every_k_schedule=config.grad_accumulation)
  return optimizer
