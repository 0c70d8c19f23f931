"""Rollouts shared by PPO, GRPO, RLOO, best-of-N and iterative DPO: sample, then score.

A rollout samples `num_samples` responses per prompt with the jitted KV-cache sampler (rows are
prompt-major: row i·G + g is sample g of prompt i) and lays each out as one training sequence
[left-padded prompt | right-padded response], so positions from the attention mask are right and
the response's token log-probs are `token_logps(...)[:, P:]`.

Scores come from a reward model (read at the last real token) or from a Python reward function
`fn(prompts, responses) -> [B]` on decoded text (verifiable rewards; the synthetic task's gold
reward). An optional penalty is subtracted from responses that never emitted a stop token.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import parallel, sampling

__all__ = ["GenerationConfig", "RewardSpec", "Rollout", "make_sampler", "ModelScorer",
           "FunctionScorer", "make_scorer", "load_function"]


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  max_new_tokens: int = 32
  temperature: float = 1.0  # the trainer scores with the same temperature (one log-prob function)
  top_k: int = 0
  top_p: float = 1.0
  num_samples: int = 1  # responses per prompt (the group size G of GRPO / RLOO)

  def validate(self):
    if self.temperature <= 0:
      raise ValueError("RL needs a stochastic policy: generation.temperature must be > 0")
    if self.num_samples < 1 or self.max_new_tokens < 1:
      raise ValueError("generation.num_samples and generation.max_new_tokens must be >= 1")


@dataclasses.dataclass(frozen=True)
class RewardSpec:
  kind: str = "model"  # "model": a reward-model checkpoint | "function": a Python function
  path: str | None = None  # the reward model's directory or hub id (kind="model")
  function: str = "rlhf_jax.data.synthetic:gold_reward_fn"  # "module:name" (kind="function")
  # Evaluation only: a function giving the true reward, when one exists (the synthetic task).
  gold_function: str | None = "rlhf_jax.data.synthetic:gold_reward_fn"
  missing_eos_penalty: float | None = None  # subtracted from responses that never stop

  def validate(self):
    if self.kind not in ("model", "function"):
      raise ValueError(f"reward.kind must be 'model' or 'function', got {self.kind!r}")
    if self.kind == "model" and not self.path:
      raise ValueError("reward.kind='model' needs reward.path (a reward-model checkpoint)")


@flax.struct.dataclass
class Rollout:
  input_ids: jax.Array  # [B, P + N] int32
  attention_mask: jax.Array  # [B, P + N] int32
  response_mask: jax.Array  # [B, N] float32: 1 on response tokens, up to and incl. the stop
  sampler_logps: jax.Array  # [B, N]: the sampler's log-probs of its tokens
  has_stop: jax.Array  # [B] bool: the response emitted a stop token
  prompt_index: jax.Array  # [B] int32: which prompt of the batch each row answers

  @property
  def prompt_length(self) -> int:
    return self.input_ids.shape[1] - self.response_mask.shape[1]

  def responses(self) -> jax.Array:
    return self.input_ids[:, self.prompt_length:]


def make_sampler(model, config: GenerationConfig, eos_ids, pad_id: int):
  """sample(params, prompt_ids [B, P], prompt_mask [B, P], key) -> Rollout with B·G rows."""
  stop_ids = tuple(np.atleast_1d(np.asarray(eos_ids, np.int64)).tolist())
  g = config.num_samples

  def sample(params, prompt_ids, prompt_mask, key):
    ids = jnp.repeat(jnp.asarray(prompt_ids), g, axis=0)
    mask = jnp.repeat(jnp.asarray(prompt_mask), g, axis=0)
    out = sampling.generate(model, params, ids, mask, key, max_new_tokens=config.max_new_tokens,
                            temperature=config.temperature, top_k=config.top_k,
                            top_p=config.top_p, eos_token_id=stop_ids)
    return _assemble(ids, mask, out, stop_ids, g)

  return sample


@functools.partial(jax.jit, static_argnums=(3, 4))
def _assemble(ids, mask, out, stop_ids, g):
  response_mask = out.mask.astype(jnp.float32)
  is_stop = jnp.isin(out.tokens, jnp.asarray(stop_ids)) & (out.mask > 0)
  return Rollout(
      input_ids=jnp.concatenate([ids, out.tokens], axis=1),
      attention_mask=jnp.concatenate([mask, out.mask.astype(mask.dtype)], axis=1),
      response_mask=response_mask, sampler_logps=out.logps, has_stop=jnp.any(is_stop, axis=1),
      prompt_index=jnp.repeat(jnp.arange(ids.shape[0] // g, dtype=jnp.int32), g))


def load_function(spec: str) -> Callable:
  """'package.module:name' -> the function."""
  module_name, _, name = spec.partition(":")
  if not name:
    raise ValueError(f"reward function {spec!r} must be given as 'module:name'")
  try:
    return getattr(importlib.import_module(module_name), name)
  except (ImportError, AttributeError) as err:
    raise ValueError(f"cannot load reward function {spec!r}: {err}") from err


def _penalise(scores, rollout: Rollout, penalty):
  if penalty is None:
    return scores
  return jnp.where(rollout.has_stop, scores, scores - penalty)


class ModelScorer:
  """Scores with a reward model (head 0) at each sequence's last real token."""

  def __init__(self, rm, params, missing_eos_penalty=None):
    self.rm, self.params, self.penalty = rm, params, missing_eos_penalty
    self._score = jax.jit(lambda p, ids, mask: rm.apply(p, ids, mask)[:, 0])

  def __call__(self, rollout: Rollout, prompts: list | None = None) -> jax.Array:
    scores = self._score(self.params, rollout.input_ids, rollout.attention_mask)
    return _penalise(scores, rollout, self.penalty)


class FunctionScorer:
  """Scores decoded text with `fn(prompts, responses) -> [B]` on the host."""

  def __init__(self, fn: Callable, tokenizer, missing_eos_penalty=None):
    self.fn, self.tokenizer, self.penalty = fn, tokenizer, missing_eos_penalty

  def decode(self, rollout: Rollout) -> list[str]:
    tokens = parallel.host_get(rollout.responses())
    mask = parallel.host_get(rollout.response_mask) > 0
    return [self.tokenizer.decode(row[keep], skip_special_tokens=True)
            for row, keep in zip(tokens, mask)]

  def __call__(self, rollout: Rollout, prompts: list) -> jax.Array:
    index = parallel.host_get(rollout.prompt_index)
    responses = self.decode(rollout)
    scores = np.asarray(self.fn([prompts[i] for i in index], responses), np.float32)
    if scores.shape != (len(responses),):
      raise ValueError(f"reward function returned shape {scores.shape}, expected "
                       f"({len(responses)},): one score per response")
    if not np.all(np.isfinite(scores)):
      raise ValueError("reward function returned a non-finite score")
    return _penalise(jnp.asarray(scores), rollout, self.penalty)


def make_scorer(spec: RewardSpec, tokenizer, load_reward_model: Callable[[str], Any]):
  spec.validate()
  if spec.kind == "function":
    return FunctionScorer(load_function(spec.function), tokenizer, spec.missing_eos_penalty)
  rm, params = load_reward_model(spec.path)
  return ModelScorer(rm, params, spec.missing_eos_penalty)
