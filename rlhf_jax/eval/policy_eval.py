"""Sample a policy on held-out prompts and measure what alignment is about.

For each prompt: a response sampled at temperature 1 (the policy itself, not a tempered one), its
proxy reward (the reward model or function being optimised), its gold reward when the task has
one (the synthetic task does), the KL to the reference estimated on that sample,
Σ_t log π(y_t) - log π_ref(y_t) (unbiased for KL(π ‖ π_ref) since y ~ π), and its length.
A fixed key per evaluation batch makes evaluations comparable across steps and methods.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import parallel, rollout as rollout_lib
from rlhf_jax.data import BatchStream
from rlhf_jax.eval import diagnostics

__all__ = ["PolicySamples", "evaluate_policy", "summarize", "PolicyEvaluator"]


@dataclasses.dataclass
class PolicySamples:
  prompts: list
  responses: list[str]
  proxy: np.ndarray | None
  gold: np.ndarray | None
  kl: np.ndarray
  length: np.ndarray
  stopped: np.ndarray


@functools.lru_cache(maxsize=16)
def _kl_fn(model, chunk_size):
  def kl(params, ref_params, rollout):
    p = rollout.prompt_length
    logps = model.token_logps(params, rollout.input_ids, rollout.attention_mask,
                              chunk_size=chunk_size)[:, p:]
    ref = model.token_logps(ref_params, rollout.input_ids, rollout.attention_mask,
                            chunk_size=chunk_size)[:, p:]
    return jnp.sum((logps - ref) * rollout.response_mask, axis=1)
  return jax.jit(kl)


def _sampler(model, max_new_tokens, eos_ids, pad_id):
  return rollout_lib.make_sampler(
      model, rollout_lib.GenerationConfig(max_new_tokens=max_new_tokens, temperature=1.0),
      eos_ids, pad_id)


def sample_batch(model, params, ref_params, batch, records, key, *, sampler, tokenizer,
                 proxy=None, gold_fn=None, chunk_size=512) -> PolicySamples:
  """Samples one batch of prompts and scores it; `records` are the batch's prompt records."""
  rollout = sampler(params, batch["prompt_ids"], batch["prompt_mask"], key)
  kl = parallel.host_get(_kl_fn(model, chunk_size)(params, ref_params, rollout))
  ids = rollout_lib.completion_ids(rollout)
  responses = [tokenizer.decode(row, skip_special_tokens=True) for row in ids]
  proxy_scores = None if proxy is None else parallel.host_get(proxy(rollout, records)[0])
  gold = None if gold_fn is None else gold_fn(records, responses, ids)
  return PolicySamples(
      prompts=[r.text for r in records], responses=responses, proxy=proxy_scores, gold=gold,
      kl=kl, length=parallel.host_get(rollout.response_mask.sum(1)),
      stopped=parallel.host_get(rollout.has_stop))


def evaluate_policy(model, params, ref_params, tokenizer, records, *, batch_size, max_new_tokens,
                    eos_ids, key, proxy=None, gold_fn=None, buckets=None, chunk_size=512):
  """Samples one response per record (prompt) and scores it. Returns PolicySamples.

  proxy: a rollout scorer; gold_fn: a `rewards.RewardFunction` (NaN where it does not apply).
  """
  sampler = _sampler(model, max_new_tokens, eos_ids, tokenizer.pad_token_id)
  max_prompt = max(len(r.prompt) for r in records)
  stream = BatchStream(list(records), batch_size, max_prompt, tokenizer.pad_token_id,
                       shuffle=False, buckets=buckets)
  parts = []
  for i, batch in enumerate(stream.epoch()):
    real = batch["weight"] > 0
    part = sample_batch(model, params, ref_params, batch, [records[j] for j in batch["index"]],
                        jax.random.fold_in(key, i), sampler=sampler, tokenizer=tokenizer,
                        proxy=proxy, gold_fn=gold_fn, chunk_size=chunk_size)
    parts.append(_select(part, real))
  return _concat(parts)


def _select(samples: PolicySamples, keep) -> PolicySamples:
  pick = lambda x: None if x is None else np.asarray(x)[keep]  # host: PolicySamples
  return PolicySamples([p for p, k in zip(samples.prompts, keep) if k],
                       [r for r, k in zip(samples.responses, keep) if k], pick(samples.proxy),
                       pick(samples.gold), pick(samples.kl), pick(samples.length),
                       pick(samples.stopped))


def _concat(parts) -> PolicySamples:
  cat = lambda name: (None if getattr(parts[0], name) is None else
                      np.concatenate([getattr(p, name) for p in parts]))
  return PolicySamples(sum((p.prompts for p in parts), []), sum((p.responses for p in parts), []),
                       cat("proxy"), cat("gold"), cat("kl"), cat("length"), cat("stopped"))


def summarize(samples: PolicySamples, baseline: PolicySamples | None = None) -> dict:
  """Means, length bias, and (with a baseline on the same prompts) the gold win rate."""
  out = {"kl": float(samples.kl.mean()), "length": float(samples.length.mean()),
         "stopped": float(samples.stopped.mean())}
  if samples.proxy is not None:
    out["proxy_reward"] = float(samples.proxy.mean())
    out["length_bias"] = diagnostics.length_bias(samples.proxy, samples.length)
  if samples.gold is not None and not np.all(np.isnan(samples.gold)):
    out["gold_reward"] = float(np.nanmean(samples.gold))  # over the rows it applies to
    if baseline is not None and baseline.gold is not None:
      both = ~np.isnan(samples.gold) & ~np.isnan(baseline.gold)
      out["win_rate"] = diagnostics.win_rate(samples.gold[both], baseline.gold[both])
  return out


class PolicyEvaluator:
  """state -> {gold_reward, proxy_reward, kl, length, stopped, length_bias}: samples the policy
  on a fixed set of prompts with a fixed key, so evaluations compare across steps and methods."""

  def __init__(self, model, ref_params, tokenizer, records, *, batch_size, max_new_tokens,
               eos_ids, proxy=None, gold_fn=None, seed=0, params_of=lambda state: state.params,
               chunk_size=512, prefix=""):
    self.model, self.ref_params, self.tokenizer, self.records = model, ref_params, tokenizer, records
    self.kwargs = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                       proxy=proxy, gold_fn=gold_fn, chunk_size=chunk_size)
    self.key = jax.random.fold_in(jax.random.key(seed), 2**20)
    self.params_of, self.prefix = params_of, prefix

  def samples(self, params) -> PolicySamples:
    return evaluate_policy(self.model, params, self.ref_params, self.tokenizer, self.records,
                           key=self.key, **self.kwargs)

  def __call__(self, state) -> dict:
    summary = summarize(self.samples(self.params_of(state)))
    return {self.prefix + k: v for k, v in summary.items()}
