"""Jitted autoregressive sampling with a preallocated KV cache.

What it holds:
  * `generate`: prompts [B, P] (left-padded, 0/1 mask) -> `SampleOutput` with N new tokens per
    row, their mask and the log-prob of each token under the distribution it was drawn from.
  * `sample_from_logits`: one sampling step on [B, V] logits (temperature, top-k, top-p, greedy);
    `filter_logits`: the same truncated distribution written out over the full vocabulary.
  * `generate_text`: strings in, strings out (tokenise, left-pad, optional chat template, decode).

Shape letters: B batch, P prompt length, N new tokens, S cache slots (P + N - 1), V vocabulary,
K candidate tokens (top_k when it is on, else V), D model width, G samples per prompt.

How `generate` runs: ONE jitted function, compiled once per (model, B, P, N, G, params' dtypes,
greedy or not, top_k, top-p on or off); temperature, the top-p value and the stop ids are traced
arguments, so changing them does not recompile.
  0. layout: a CausalLM's stacked [L, ...] layer params are split once per call, before the
     loop, into per-layer arrays (`CausalLM.unstack_layers`, "layers_0" ...; LoRA adapters and
     quantised kernels too), and the KV cache is L separate [B, S, K, H] pairs
     (`init_cache(per_layer=True)`). The model then runs its layers as a Python loop of blocks
     (the unrolled decoder) instead of `nn.scan`: every decode step reads each weight and each
     layer's keys/values in place. With the stacked layout, the step materialises each layer's
     slice of every weight (a dynamic-slice copy per matrix) before the dot reads it: on CPU one
     extra copy of the decoder per generated token. Optimisation barriers at the layer
     boundaries keep the unrolled decoder's numbers equal to the scanned one's (the trainer's;
     bitwise on CPU in bf16 too, where XLA's excess precision otherwise rounds differently).
     Other models (any with the `apply`/`init_cache` contract) run as they are;
  1. prefill: the whole prompt goes through the model once, writing cache slots 0..P-1; the first
     token is drawn from the final hidden state of each row's last real prompt token. With
     num_samples = G > 1 each prompt is prefilled once and its cache, hidden state and masks are
     copied to its G rows (prompt-major: row b·G + g), then decoded as B·G independent rows;
  2. decode: a `lax.while_loop` feeds the previous token ([B·G, 1]) at slot P + t - 1 and draws
     token t (`_decode_step`); it exits as soon as every row has stopped or N tokens exist.
The cache (compute dtype) is allocated inside the jitted function and carried by the loop, so
XLA updates it in place; nothing crosses the jit boundary but prompts, params and the outputs.
Logits come from the final hidden state through `model.logits_from_hidden` (times
`model.unembedding(params)` with float32 accumulation, then the final-logit soft-cap of Gemma 2
if the config has one), the same function of the hidden state `CausalLM.token_logps` scores
with (through `ops.chunked_token_logps`), so the sampler's log-probs and the trainer's agree up
to the truncation described below. A model without `logits_from_hidden` gets the plain product.
The prefill never materialises [B, P, V] logits.

The sampling distribution at each step, in the standard order (as in Hugging Face's warpers):
  1. temperature: z = logits / T;
  2. top-k (k > 0): keep the k largest z (`lax.top_k`: no full sort of the vocabulary);
  3. top-p (p < 1): softmax over what survived, sort descending, keep the smallest prefix whose
     mass is >= p (Holtzman et al., 2019, "The Curious Case of Neural Text Degeneration",
     arXiv:1904.09751), always at least one token; tokens tied with the last kept one are kept
     too, so the result does not depend on how a sort orders ties. With top-k on, the sort is
     `lax.top_k`'s own (K candidates). With top-p alone, no [B, V] sort runs when the nucleus
     is small: `lax.top_k` takes the TOP_P_CANDIDATES (256) best tokens, and if in every row
     they hold mass >= p (under the full-vocabulary softmax) and no token past them reaches
     the cut (no tie spills), the threshold and the draw come from those 256; else
     (`lax.cond`) the full sort runs. Both branches compute the same threshold, so the
     distribution (and `filter_logits`) is the same either way;
  4. renormalise and draw. `logps` is the log-prob of the drawn token under this truncated,
     renormalised distribution. NOTE: with top-k/top-p the trainer's untruncated
     `token_logps(temperature=T)` differs from these on purpose; compare them only when
     both are off, or score with `filter_logits`.
Temperature 0 means greedy decoding: the argmax, with `logps` the untruncated temperature-1
log-softmax of that token (what `token_logps(temperature=1.0)` gives), not the 0 of a point mass.

Randomness: step t uses `fold_in(key, t)`, so a fixed key gives the same tokens whatever the
batch-level early exit does, and two keys give independent samples.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "SampleOutput",
    "generate",
    "generate_text",
    "sample_from_logits",
    "filter_logits",
]


@flax.struct.dataclass
class SampleOutput:
  """What `generate` returns.

  tokens: [B, N] int32 new tokens; after a row's stop token, the pad id (config's, else 0).
  mask:   [B, N] int32, 1 up to and including the stop token, 0 after it.
  logps:  [B, N] float32 log-prob of each token under the distribution it was drawn from
          (temperature-scaled, top-k/top-p truncated, renormalised); 0 where mask is 0.
  """
  tokens: jax.Array
  mask: jax.Array
  logps: jax.Array


# Top-p alone looks for the nucleus among the TOP_P_CANDIDATES most likely tokens first.
TOP_P_CANDIDATES = 256


def _top_p_cut(sorted_z_BK: jax.Array, lse_B1: jax.Array, top_p) -> tuple[jax.Array, jax.Array]:
  """Nucleus truncation of descending `sorted_z_BK` (a prefix of the sorted candidates, whose
  full log-normaliser is lse_B1): (smallest kept value [B, 1], True where the prefix holds the
  whole nucleus [B], i.e. its mass is >= p)."""
  probs_BK = jnp.exp(sorted_z_BK - lse_B1)
  # Mass strictly before each token; token i is kept iff that mass is still < p. This is a prefix
  # (the mass grows along the sort), contains token 0 (mass 0 < p) and reaches mass >= p.
  mass_BK = jnp.cumsum(probs_BK, axis=-1)
  mass_before_BK = mass_BK - probs_BK
  num_kept_B = jnp.sum(mass_before_BK < top_p, axis=-1)
  last_kept_B1 = jnp.maximum(num_kept_B - 1, 0)[:, None]
  return jnp.take_along_axis(sorted_z_BK, last_kept_B1, axis=-1), mass_BK[:, -1] >= top_p


def _sorted_threshold(z_BV, lse_B1, top_p) -> jax.Array:
  """The exact top-p threshold from a full sort of the vocabulary: [B, 1]."""
  # Values-only sort (no index payload); the threshold then masks the unsorted logits.
  sorted_z_BV = jax.lax.sort(z_BV, dimension=1, is_stable=False)[:, ::-1]
  return _top_p_cut(sorted_z_BV, lse_B1, top_p)[0]


def _prefilter(z_BV, lse_B1, top_p, size: int):
  """Top-p from the `size` best tokens: (threshold [B, 1], top z [B, size], their ids,
  hit: scalar bool, True iff every row's nucleus lies inside them and no token past them ties
  its threshold; then the kept tokens are exactly the top ones >= threshold)."""
  # Only whole top_k outputs are used: XLA CPU then runs its partial top-k, while a slice at a
  # nonzero offset of them (e.g. the size+1-th value) turns it back into a full sort.
  top_BC, ids_BC = jax.lax.top_k(z_BV, size)  # sorted descending
  threshold_B1, inside_B = _top_p_cut(top_BC, lse_B1, top_p)
  # No spill: every token >= the threshold is among the top ones (one pass over V, no sort).
  kept_B = jnp.sum(z_BV >= threshold_B1, axis=-1)
  kept_top_B = jnp.sum(top_BC >= threshold_B1, axis=-1)
  hit = jnp.all(inside_B & (kept_B == kept_top_B))
  return threshold_B1, top_BC, ids_BC, hit


def _uses_prefilter(vocab: int, top_k: int, use_top_p: bool, size: int) -> bool:
  return use_top_p and not 0 < top_k < vocab and 0 < size < vocab


def _candidates(logits_BV, temperature, top_p, *, top_k: int, use_top_p: bool,
                prefilter: int = TOP_P_CANDIDATES):
  """Temperature, top-k, top-p: (z_BK with -inf on excluded candidates, ids_BK or None = all V).

  temperature and top_p may be traced scalars; top_k and use_top_p (top_p < 1) fix the program.
  Top-p alone takes its threshold from the `prefilter` best tokens when they hold the nucleus,
  else (lax.cond) from a full sort; both give the same threshold.
  """
  z_BV = logits_BV.astype(jnp.float32) / temperature
  vocab = z_BV.shape[-1]
  if 0 < top_k < vocab:
    z_BK, ids_BK = jax.lax.top_k(z_BV, top_k)  # sorted descending
  else:
    z_BK, ids_BK = z_BV, None
  if not use_top_p:
    return z_BK, ids_BK
  lse_B1 = jax.nn.logsumexp(z_BK, axis=-1, keepdims=True)
  if ids_BK is not None:
    threshold_B1 = _top_p_cut(z_BK, lse_B1, top_p)[0]
  elif _uses_prefilter(vocab, top_k, use_top_p, prefilter):
    threshold_B1, _, _, hit = _prefilter(z_BV, lse_B1, top_p, prefilter)
    threshold_B1 = jax.lax.cond(hit, lambda: threshold_B1,
                                lambda: _sorted_threshold(z_BV, lse_B1, top_p))
  else:
    threshold_B1 = _sorted_threshold(z_BV, lse_B1, top_p)
  return jnp.where(z_BK >= threshold_B1, z_BK, -jnp.inf), ids_BK


def _draw(z_BK, ids_BK, key):
  """One draw per row from softmax(z_BK): (token ids [B] int32, log-probs [B])."""
  choice_B = jax.random.categorical(key, z_BK, axis=-1)
  chosen_z_B = jnp.take_along_axis(z_BK, choice_B[:, None], axis=-1)[:, 0]
  logps_B = chosen_z_B - jax.nn.logsumexp(z_BK, axis=-1)
  if ids_BK is not None:
    choice_B = jnp.take_along_axis(ids_BK, choice_B[:, None], axis=-1)[:, 0]
  return choice_B.astype(jnp.int32), logps_B


def _sample(logits_BV, key, temperature, top_p, *, greedy: bool, top_k: int, use_top_p: bool,
            prefilter: int = TOP_P_CANDIDATES):
  """`sample_from_logits` with temperature / top_p possibly traced (see there)."""
  if greedy:
    logits_BV = logits_BV.astype(jnp.float32)
    tokens_B = jnp.argmax(logits_BV, axis=-1)
    logps_BV = jax.nn.log_softmax(logits_BV, axis=-1)
    logps_B = jnp.take_along_axis(logps_BV, tokens_B[:, None], axis=-1)[:, 0]
    return tokens_B.astype(jnp.int32), logps_B
  if _uses_prefilter(logits_BV.shape[-1], top_k, use_top_p, prefilter):
    # Top-p alone: draw among the prefilter's candidates when they hold every kept token, else
    # from the full vocabulary masked by the sorted threshold. Same distribution either way.
    z_BV = logits_BV.astype(jnp.float32) / temperature
    lse_B1 = jax.nn.logsumexp(z_BV, axis=-1, keepdims=True)
    threshold_B1, top_BC, ids_BC, hit = _prefilter(z_BV, lse_B1, top_p, prefilter)

    def from_candidates():
      return _draw(jnp.where(top_BC >= threshold_B1, top_BC, -jnp.inf), ids_BC, key)

    def from_vocabulary():
      full_threshold_B1 = _sorted_threshold(z_BV, lse_B1, top_p)
      return _draw(jnp.where(z_BV >= full_threshold_B1, z_BV, -jnp.inf), None, key)

    return jax.lax.cond(hit, from_candidates, from_vocabulary)
  z_BK, ids_BK = _candidates(logits_BV, temperature, top_p, top_k=top_k, use_top_p=use_top_p,
                             prefilter=prefilter)
  return _draw(z_BK, ids_BK, key)


def filter_logits(
    logits_BV: chex.Array, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> jax.Array:
  """The sampling distribution's logits over the full vocabulary: [B, V] -> [B, V] float32.

  Returns z = logits / temperature on kept tokens and -inf on tokens top-k / top-p exclude, so
  `jax.nn.log_softmax(filter_logits(...))` is exactly the distribution `sample_from_logits` and
  `generate` draw from (and score `logps` under). Use it to rescore sampled tokens with the
  sampler's own truncation. temperature must be > 0 here (greedy has no distribution to write).
  """
  chex.assert_rank(logits_BV, 2)
  _check_settings(temperature, top_k, top_p)
  if temperature == 0:
    raise ValueError("filter_logits needs temperature > 0 (temperature 0 is greedy decoding)")
  z_BK, ids_BK = _candidates(logits_BV, temperature, top_p, top_k=top_k, use_top_p=top_p < 1)
  if ids_BK is None:
    return z_BK
  full_BV = jnp.full(logits_BV.shape, -jnp.inf, jnp.float32)
  rows_B1 = jnp.arange(logits_BV.shape[0])[:, None]
  return full_BV.at[rows_B1, ids_BK].set(z_BK)


def sample_from_logits(
    logits_BV: chex.Array,
    key: chex.PRNGKey,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
  """Draws one token per row: [B, V] logits -> (tokens [B] int32, logps [B] float32).

  The distribution is softmax(filter_logits(logits)): temperature, then top-k, then top-p,
  renormalised (see the module docstring). logps is the drawn token's log-prob under it.
  temperature == 0: greedy argmax, logps = log_softmax(logits)[argmax] (temperature 1,
  untruncated); top-k / top-p never change the argmax, so they are ignored.
  With only top-k on, no [B, V] sort happens: `lax.top_k` picks K candidates and the draw and
  the top-p sort run over those K. temperature, top_k, top_p are Python numbers.
  """
  chex.assert_rank(logits_BV, 2)
  _check_settings(temperature, top_k, top_p)
  return _sample(logits_BV, key, temperature or 1.0, top_p, greedy=temperature == 0,
                 top_k=top_k, use_top_p=top_p < 1)


def _check_settings(temperature: float, top_k: int, top_p: float) -> None:
  if not temperature >= 0:
    raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
  if top_k < 0:
    raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}")


def _stop_ids(eos_token_id: int | Sequence[int] | None) -> np.ndarray:
  """Stop ids as int32 [4·k], padded with -1 (never a token) so counts 0..4 share one program."""
  if eos_token_id is None:
    ids = []
  elif isinstance(eos_token_id, (int, np.integer)):
    ids = [int(eos_token_id)]
  else:
    ids = sorted({int(i) for i in eos_token_id})
  if any(i < 0 for i in ids):
    raise ValueError(f"stop ids must be >= 0, got {ids}")
  size = max(4, -(-len(ids) // 4) * 4)
  return np.asarray(ids + [-1] * (size - len(ids)), np.int32)


def _check_position_range(config: Any, prompt_len: int, max_new_tokens: int) -> None:
  """Learned positions (GPT-2) index a table of max_position_embeddings rows; beyond it the
  logits are silently NaN. The finished sequence (prompt + completion) must fit, since the
  trainer scores it in one forward. RoPE models have no table and no limit here, except
  longrope (Phi-3), whose frequencies change past rope_original_max_position_embeddings."""
  if getattr(config, "rope_type", None) == "longrope":
    original = config.rope_original_max_position_embeddings
    if prompt_len + max_new_tokens > original:
      # Past the original length longrope switches every position to its long factors; keys
      # cached with the short ones would then be stale (transformers' Phi-3 recomputes its cache
      # at the switch), and the trainer would score the finished sequence with the long ones.
      raise ValueError(
          f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} = "
          f"{prompt_len + max_new_tokens} exceeds the longrope switch "
          f"(rope_original_max_position_embeddings={original}); decoding across it (which "
          f"needs the KV cache recomputed with the long factors) is not implemented")
  if getattr(config, "positions", None) != "learned":
    return
  table = config.max_position_embeddings
  if prompt_len + max_new_tokens > table:
    raise ValueError(
        f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} = "
        f"{prompt_len + max_new_tokens} exceeds the model's learned position table "
        f"(max_position_embeddings={table}); shorten the prompts or max_new_tokens")


def _logits_function(model, params, unembed_DV):
  """hidden [B, D] -> float32 logits [B, V]: the model's own `logits_from_hidden` (CausalLM:
  what `token_logps` scores with, soft-cap included), else hidden·unembedding."""
  if hasattr(model, "logits_from_hidden"):
    return lambda hidden_BD: model.logits_from_hidden(params, hidden_BD)
  return lambda hidden_BD: jnp.dot(hidden_BD, unembed_DV.astype(hidden_BD.dtype),
                                   preferred_element_type=jnp.float32)


def _compute_dtype(model, params, unembed_DV):
  if hasattr(model, "compute_dtype"):
    return model.compute_dtype(params)
  return unembed_DV.dtype


@flax.struct.dataclass
class _DecodeState:
  step: jax.Array      # int32 scalar: index of the token the next `_emit` writes
  cache: Any           # the model's KV cache
  token_B: jax.Array   # the last token written (fed to the model next)
  done_B: jax.Array    # bool: the row has emitted a stop id
  tokens_BN: jax.Array
  mask_BN: jax.Array
  logps_BN: jax.Array


def _emit(state: _DecodeState, logits_BV, key, stop_ids, pad_id, sample) -> _DecodeState:
  """Draws token `state.step` for every row; stopped rows get the pad id, mask 0 and logp 0."""
  token_B, logp_B = sample(logits_BV, jax.random.fold_in(key, state.step))
  live_B = jnp.logical_not(state.done_B)
  token_B = jnp.where(live_B, token_B, pad_id)
  stops_B = jnp.any(token_B[:, None] == stop_ids[None, :], axis=1)
  return state.replace(
      step=state.step + 1, token_B=token_B, done_B=state.done_B | (live_B & stops_B),
      tokens_BN=state.tokens_BN.at[:, state.step].set(token_B),
      mask_BN=state.mask_BN.at[:, state.step].set(live_B.astype(jnp.int32)),
      logps_BN=state.logps_BN.at[:, state.step].set(jnp.where(live_B, logp_B, 0.0)))


def _decode_step(model, params, cache, token_B, slot_mask_BS, position_B, cache_index):
  """One decode step: feed token_B ([B]) at `cache_index` -> (float32 logits [B, V], cache).

  `params` are as `generate` runs them (a CausalLM's after `unstack_layers`, with the per-layer
  cache): each layer's weights and keys/values are their own arrays, read in place."""
  out = model.apply(params, token_B[:, None], slot_mask_BS, positions=position_B[:, None],
                    cache=cache, cache_index=cache_index, compute_logits=False)
  unembed_DV = model.unembedding(params)
  return _logits_function(model, params, unembed_DV)(out.hidden[:, -1]), out.cache


def _decode_layout(model, params, batch: int, slots: int, dtype):
  """(params, empty cache) in the layout the decode loop reads: a CausalLM's layers unstacked
  ("layers_0", ...) with a per-layer cache; any other model's params and cache as they are."""
  if hasattr(model, "unstack_layers"):
    return model.unstack_layers(params), model.init_cache(batch, slots, dtype=dtype,
                                                          per_layer=True)
  return params, model.init_cache(batch, slots, dtype=dtype)


@functools.partial(
    jax.jit, static_argnames=("model", "max_new_tokens", "num_samples", "greedy", "top_k",
                              "use_top_p", "pad_id"))
def _generate(model, params, prompt_ids_BP, prompt_mask_BP, key, temperature, top_p, stop_ids,
              *, max_new_tokens, num_samples, greedy, top_k, use_top_p, pad_id):
  batch, prompt_len = prompt_ids_BP.shape
  num_new, rows = max_new_tokens, batch * num_samples
  prompt_mask_BP = prompt_mask_BP.astype(jnp.int32)
  unembed_DV = model.unembedding(params)
  dtype = _compute_dtype(model, params, unembed_DV)
  # Once per call, outside the loop: each layer's weights become their own arrays.
  params, cache = _decode_layout(model, params, batch, prompt_len + num_new - 1, dtype)
  unembed_DV = model.unembedding(params)
  logits_from_hidden = _logits_function(model, params, unembed_DV)
  sample = functools.partial(_sample, temperature=temperature, top_p=top_p, greedy=greedy,
                             top_k=top_k, use_top_p=use_top_p)
  emit = functools.partial(_emit, key=key, stop_ids=stop_ids, pad_id=pad_id, sample=sample)

  # Slots 0..P-1 hold the prompt, P..P+N-2 the new tokens but the last (never fed back).
  slot_mask_BS = jnp.pad(prompt_mask_BP, ((0, 0), (0, num_new - 1)), constant_values=1)
  num_real_B = jnp.sum(prompt_mask_BP, axis=1)

  # Prefill, once per prompt; the first token comes from each row's last real prompt token (the
  # last slot for left padding, but any padding works).
  out = model.apply(params, prompt_ids_BP.astype(jnp.int32), slot_mask_BS,
                    positions=jnp.maximum(jnp.cumsum(prompt_mask_BP, axis=1) - 1, 0),
                    cache=cache, cache_index=jnp.int32(0), compute_logits=False)
  last_real_B = prompt_len - 1 - jnp.argmax(prompt_mask_BP[:, ::-1], axis=1)
  hidden_BD = jnp.take_along_axis(out.hidden, last_real_B[:, None, None], axis=1)[:, 0]
  cache = out.cache
  if num_samples > 1:
    # Each prompt's cache, hidden state and masks go to its G rows b·G + g (prompt-major).
    copies = lambda x: jnp.repeat(x, num_samples, axis=0)
    cache = jax.tree.map(copies, cache)
    hidden_BD, slot_mask_BS, num_real_B = map(copies, (hidden_BD, slot_mask_BS, num_real_B))
  state = _DecodeState(
      step=jnp.int32(0), cache=cache, token_B=jnp.zeros((rows,), jnp.int32),
      done_B=jnp.zeros((rows,), bool), tokens_BN=jnp.full((rows, num_new), pad_id, jnp.int32),
      mask_BN=jnp.zeros((rows, num_new), jnp.int32),
      logps_BN=jnp.zeros((rows, num_new), jnp.float32))
  state = emit(state, logits_from_hidden(hidden_BD))

  def cond(state):
    return (state.step < num_new) & jnp.logical_not(jnp.all(state.done_B))

  def body(state):
    # Feed token t-1 at slot P+t-1, position (real prompt length + t-1); draw token t.
    fed = state.step - 1
    logits_BV, cache = _decode_step(model, params, state.cache, state.token_B, slot_mask_BS,
                                    num_real_B + fed, prompt_len + fed)
    return emit(state.replace(cache=cache), logits_BV)

  state = jax.lax.while_loop(cond, body, state)
  return SampleOutput(tokens=state.tokens_BN, mask=state.mask_BN, logps=state.logps_BN)


def generate(
    model: Any,
    params: Any,
    prompt_ids: chex.Array,
    prompt_mask: chex.Array,
    key: chex.PRNGKey,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    num_samples: int = 1,
) -> SampleOutput:
  """Samples `max_new_tokens` tokens per prompt (`num_samples` times) with a KV cache, in one
  jitted call.

  Args:
    model: a `rlhf_jax.models.CausalLM` (hashable: it is a static argument of the jit).
    params: its parameters (plain pytree, any float dtype; the cache uses the same dtype).
    prompt_ids: [B, P] int token ids, left-padded (right padding also works, at the cost of
      P - len pad slots in the cache).
    prompt_mask: [B, P] 0/1, 1 = real token. Every row needs at least one real token.
    key: PRNG key; step t draws with fold_in(key, t).
    max_new_tokens: N >= 1.
    temperature: 0 = greedy; else logits are divided by it.
    top_k: keep the k most likely tokens (0 = off).
    top_p: nucleus: keep the smallest most-likely set with mass >= p (1.0 = off).
    eos_token_id: None, a stop id, or several; a row stops after emitting any of them.
    num_samples: G >= 1 samples per prompt. Each prompt is prefilled once and its KV cache
      copied to its G rows, ordered prompt-major (row b·G + g is sample g of prompt b); the
      result is what `generate` on the prompts each repeated G times (jnp.repeat(..., G,
      axis=0)) would draw, with independent randomness per row.

  Raises:
    ValueError: on invalid settings, or, for learned positions (GPT-2), when
      P + max_new_tokens exceeds the model's max_position_embeddings; for longrope (Phi-3),
      when it exceeds rope_original_max_position_embeddings.

  Returns:
    SampleOutput(tokens [B·G, N] int32, mask [B·G, N] int32, logps [B·G, N] float32); see its
    docstring and the module docstring for the distribution `logps` refers to.

  Compiles once per (model, B, P, N, G, params' shapes and dtypes, greedy or not, top_k, top-p
  on or off); calls that change only the prompts, the key, the parameter values, the temperature,
  the top-p value or the stop ids (up to 4 of them) reuse the compiled program. Bucket prompt
  lengths to avoid recompiling.
  """
  chex.assert_rank([prompt_ids, prompt_mask], 2)
  chex.assert_equal_shape([prompt_ids, prompt_mask])
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")
  _check_settings(temperature, top_k, top_p)
  _check_position_range(model.config, prompt_ids.shape[1], max_new_tokens)
  pad_id = getattr(model.config, "pad_token_id", None)
  return _generate(
      model, params, prompt_ids, prompt_mask, key, np.float32(temperature or 1.0),
      np.float32(top_p), _stop_ids(eos_token_id),
      max_new_tokens=int(max_new_tokens), num_samples=int(num_samples), greedy=temperature == 0,
      top_k=int(top_k), use_top_p=top_p < 1, pad_id=0 if pad_id is None else int(pad_id))


def generate_text(
    model: Any,
    params: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    key: chex.PRNGKey,
    *,
    chat: bool = False,
    pad_to_multiple_of: int = 16,
    **kwargs: Any,
) -> list[str]:
  """Strings in, completions out: tokenise (left-padded), `generate`, decode up to the stop.

  chat=True wraps each prompt as one user message and applies the tokenizer's chat template with
  the generation prompt; the template's own special tokens are kept and the tokenizer adds none
  (no double BOS). Prompt lengths are padded to a multiple of `pad_to_multiple_of` so nearby
  lengths share one compiled program. `kwargs` go to `generate` (max_new_tokens is required);
  eos_token_id defaults to the tokenizer's.
  """
  if chat:
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    add_special_tokens = False
  else:
    texts, add_special_tokens = list(prompts), True
  saved = tokenizer.padding_side, tokenizer.pad_token
  tokenizer.padding_side = "left"
  if tokenizer.pad_token is None:  # pad ids are masked out; any token will do
    tokenizer.pad_token = tokenizer.eos_token
  try:
    batch = tokenizer(texts, padding=True, pad_to_multiple_of=pad_to_multiple_of,
                      add_special_tokens=add_special_tokens, return_tensors="np")
  finally:
    tokenizer.padding_side, tokenizer.pad_token = saved
  kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
  out = generate(model, params, batch["input_ids"], batch["attention_mask"], key, **kwargs)
  tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
  return [tokenizer.decode(row[m == 1], skip_special_tokens=True) for row, m in zip(tokens, mask)]
