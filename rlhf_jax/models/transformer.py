"""The decoder (`Decoder`, Flax Linen) and its user-facing wrapper `CausalLM`, plus the KV cache.

Shape letters: B batch, T tokens of this call, S key slots (T without a cache, the cache length
with one), D model width, V vocabulary, K key/value heads, H head dim, L layers.

`CausalLM` hides the Linen `{"params": ...}` wrapper: `params` is the plain nested dict
  {"embed": {"embedding": [V, D]}, "pos_embed": {"embedding": [P, D]} (learned positions only),
   "layers": {... every leaf with a leading [L] axis ...}, "final_norm": {...},
   "lm_head": {"kernel": [D, V]} (untied models only)}.
`unstack_layers(params)` rewrites "layers" as "layers_0" ... "layers_{L-1}" (each layer's own
arrays, no [L] axis); `apply` on such params runs the layers as a Python loop (the unrolled
decoder) instead of `nn.scan`, with a per-layer KV cache (`init_cache(..., per_layer=True)`).
The sampler decodes that way so that no step slices a layer's weights or cache out of a stacked
array (on CPU such a slice is a copy of every weight per generated token).
Logits are computed outside the Linen module from `unembedding(params)`, so the reward model
reuses the same decoder without an lm_head; `logits_from_hidden` is that product plus the
final-logit soft-cap (Gemma 2), the one place logits are made: `apply`, `score_tokens` (through
`ops.chunked_token_logps(logit_softcap=...)`) and the sampler all apply the same cap.

Attention masking (one boolean [B, 1, T, S] mask): a query in slot i sees slot j iff j <= i,
the key slot is real (mask 1), and, on sliding-window layers, i - j < window. A query also always
sees its own slot, so a padding query has a well-defined (ignored) output instead of a softmax
over nothing. Positions come from the mask, clip(cumsum(mask) - 1, 0), so left padding is exact.
Packed rows (no cache) add segment ids (keys of the query's own segment only) and optionally
branch ids (a segment [prefix | branch 1 | branch 2 | ...] whose branches each see the prefix
and themselves, never a sibling); positions then restart per segment and each branch continues
from its prefix's end, and the sliding window counts positions instead of slots.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from rlhf_jax import ops
from rlhf_jax.models.config import ModelConfig, dtype_from_name, rope_inv_freq
from rlhf_jax.models import lora as lora_lib
from rlhf_jax.models.layers import Block, make_norm

__all__ = ["Decoder", "CausalLM", "KVCache", "ModelOutput", "TokenScores",
           "positions_from_mask", "positions_from_segments", "predictor_slots",
           "attention_mask_B1TS"]

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@flax.struct.dataclass
class KVCache:
  """Preallocated keys and values, each [L, B, S, K, H] in the cache dtype (scanned decoder), or
  each a tuple of L arrays [B, S, K, H] (per-layer cache of the unrolled decoder).

  Holds no index or mask: the caller passes `attention_mask` [B, S] (1 = slot holds, or will
  hold, a real token) and `cache_index` (slot of the first new token) to every `apply`.
  """

  k: jax.Array
  v: jax.Array


@flax.struct.dataclass
class TokenScores:
  """What `CausalLM.score_tokens` returns: logps [B, T], entropy [B, T] or None, hidden
  [B, T, D]."""

  logps: jax.Array
  entropy: jax.Array | None
  hidden: jax.Array


@flax.struct.dataclass
class ModelOutput:
  """logits [B, T, V] float32 (None unless computed), hidden [B, T, D] (final normed hidden
  states, compute dtype), cache (the updated KVCache, or None)."""

  logits: jax.Array | None
  hidden: jax.Array
  cache: KVCache | None = None


def positions_from_mask(mask_BT: jax.Array) -> jax.Array:
  """clip(cumsum(mask) - 1, 0): the position of each real token counting only real tokens."""
  return jnp.maximum(jnp.cumsum(mask_BT.astype(jnp.int32), axis=-1) - 1, 0)


def attention_mask_B1TS(key_mask_BS, query_slots_T, window: int | None,
                        segment_ids_BS=None, branch_ids_BS=None, positions_BS=None) -> jax.Array:
  """Boolean [B, 1, T, S]: causal over slots, real keys only, optional window, diagonal always;
  with segment ids (packed rows, no cache), only keys of the query's own segment; with branch
  ids too, only keys of the segment's shared prefix (branch 0) or of the query's own branch.

  The window counts slots, or, with branches, positions (positions_BS, required then), which
  differ from slots once a branch follows a sibling: its prefix is further in slots than in
  positions. (Inside one segment without branches the two differ by a constant.)
  """
  key_slots_S = jnp.arange(key_mask_BS.shape[-1], dtype=jnp.int32)
  q, k = query_slots_T[:, None], key_slots_S[None, :]
  allowed_TS = k <= q
  if window is not None and branch_ids_BS is None:
    allowed_TS = allowed_TS & (q - k < window)
  allowed_BTS = allowed_TS[None] & (key_mask_BS[:, None, :] > 0)
  if segment_ids_BS is not None:
    allowed_BTS = allowed_BTS & (segment_ids_BS[:, :, None] == segment_ids_BS[:, None, :])
  if branch_ids_BS is not None:
    if window is not None:
      allowed_BTS = allowed_BTS & (positions_BS[:, :, None] - positions_BS[:, None, :] < window)
    key_branch_B1S = branch_ids_BS[:, None, :]
    allowed_BTS = allowed_BTS & ((key_branch_B1S == 0)
                                 | (key_branch_B1S == branch_ids_BS[:, :, None]))
  allowed_BTS = allowed_BTS | (k == q)[None]
  return allowed_BTS[:, None]


def _run_starts(ids_BT: jax.Array) -> jax.Array:
  """[B, T] slot of the first token of each token's run of equal ids."""
  t = jnp.arange(ids_BT.shape[-1], dtype=jnp.int32)
  previous = jnp.pad(ids_BT[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
  return jax.lax.cummax(jnp.where(ids_BT != previous, t[None], 0), axis=1)


def _last_prefix_slot(segment_ids_BT, branch_ids_BT) -> jax.Array:
  """[B, T] slot of the latest shared-prefix token (branch 0) of the token's own segment at or
  before it, or -1 when its segment has none there."""
  t = jnp.arange(segment_ids_BT.shape[-1], dtype=jnp.int32)[None]
  is_prefix = (branch_ids_BT == 0) & (segment_ids_BT > 0)
  last_BT = jax.lax.cummax(jnp.where(is_prefix, t, -1), axis=1)
  return jnp.where(last_BT >= _run_starts(segment_ids_BT), last_BT, -1)


def positions_from_segments(segment_ids_BT: jax.Array, branch_ids_BT=None) -> jax.Array:
  """Position of each token within its segment (packed rows): 0 at every segment start.

  With branch ids (each segment laid out [prefix | branch 1 | branch 2 | ...], branch 0 being
  the prefix), a branch's positions continue from the end of the prefix, as if it followed the
  prefix alone.
  """
  t = jnp.arange(segment_ids_BT.shape[-1], dtype=jnp.int32)[None]
  if branch_ids_BT is None:
    return t - _run_starts(segment_ids_BT)
  run_ids_BT = segment_ids_BT * (jnp.max(branch_ids_BT) + 1) + branch_ids_BT
  in_run_BT = t - _run_starts(run_ids_BT)
  prefix_length_BT = _last_prefix_slot(segment_ids_BT, branch_ids_BT) + 1 - _run_starts(
      segment_ids_BT)
  return jnp.where(branch_ids_BT > 0, in_run_BT + jnp.maximum(prefix_length_BT, 0), in_run_BT)


def predictor_slots(segment_ids_BT: jax.Array, branch_ids_BT=None) -> jax.Array:
  """[B, T] slot whose hidden state predicts each token of packed rows, -1 for none.

  The previous slot when the token sees it (same segment and, with branches, the prefix or the
  same branch); else, for a branch's first token, its segment's last prefix token; else none (a
  segment's first token, padding). Without branches: t - 1 inside a segment, else -1.
  """
  t = jnp.arange(segment_ids_BT.shape[-1], dtype=jnp.int32)[None]
  previous_segment = jnp.pad(segment_ids_BT[:, :-1], ((0, 0), (1, 0)))
  sees_previous = (segment_ids_BT == previous_segment) & (segment_ids_BT > 0)
  if branch_ids_BT is None:
    return jnp.where(sees_previous, t - 1, -1)
  previous_branch = jnp.pad(branch_ids_BT[:, :-1], ((0, 0), (1, 0)))
  sees_previous = sees_previous & ((previous_branch == 0) | (previous_branch == branch_ids_BT))
  fallback = jnp.where(branch_ids_BT > 0, _last_prefix_slot(segment_ids_BT, branch_ids_BT), -1)
  return jnp.where(sees_previous, t - 1, fallback)


class Decoder(nn.Module):
  """Embeddings (times embed_scale) -> L blocks -> final norm. Returns (hidden_BTD, cache).

  The blocks are one `nn.scan` over stacked [L, ...] params ("layers"), or, with unrolled=True,
  a Python loop of L blocks with their own params ("layers_0", ...) and per-layer cache arrays.

  Gemma's sqrt(D) embedding scale is cast to the compute dtype before the product, as
  transformers casts it to the weights' dtype (in bf16, sqrt(3072) becomes 55.5).
  """

  config: ModelConfig
  dtype: Any = jnp.float32  # compute dtype
  param_dtype: Any = jnp.float32  # only used by init
  unrolled: bool = False

  @nn.compact
  def __call__(self, input_ids_BT, positions_BT, key_mask_BS, cache=None, cache_index=None,
               segment_ids_BS=None, branch_ids_BS=None):
    cfg = self.config
    init = nn.initializers.normal(stddev=cfg.initializer_range)
    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype,
                     param_dtype=self.param_dtype, embedding_init=init, name="embed")
    x_BTD = embed(input_ids_BT)
    if cfg.embed_scale != 1.0:
      x_BTD = x_BTD * jnp.asarray(cfg.embed_scale, x_BTD.dtype)
    rope = None
    if cfg.positions == "learned":
      pos_embed = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype,
                           param_dtype=self.param_dtype, embedding_init=init, name="pos_embed")
      x_BTD = x_BTD + pos_embed(positions_BT)
    else:
      def table(local):
        inv_freq_h = jnp.asarray(rope_inv_freq(cfg, local=local))
        if cfg.rope_type == "longrope" and not local:
          # transformers' choice for the whole call: long factors once any position + 1
          # exceeds the original length (so a KV cache crossing it keeps older short-rotated keys)
          use_long = jnp.max(positions_BT) + 1 > cfg.rope_original_max_position_embeddings
          inv_freq_h = jnp.where(use_long, jnp.asarray(rope_inv_freq(cfg, long=True)), inv_freq_h)
        angles_BTh = positions_BT.astype(jnp.float32)[..., None] * inv_freq_h[None, None]
        scale = cfg.rope_attention_factor if cfg.rope_type == "longrope" and not local else 1.0
        return jnp.sin(angles_BTh) * scale, jnp.cos(angles_BTh) * scale
      rope = table(False)
      if cfg.rope_local_theta is not None and any(cfg.layer_is_sliding):
        rope = (rope, table(True))  # the block picks one by its sliding-window flag

    length = input_ids_BT.shape[1]
    start = 0 if cache_index is None else cache_index
    query_slots_T = start + jnp.arange(length, dtype=jnp.int32)
    sliding = cfg.layer_is_sliding
    full = (attention_mask_B1TS(key_mask_BS, query_slots_T, None, segment_ids_BS, branch_ids_BS)
            if not all(sliding) else None)
    window = (attention_mask_B1TS(key_mask_BS, query_slots_T, cfg.sliding_window, segment_ids_BS,
                                  branch_ids_BS, positions_BT)
              if any(sliding) else None)
    if full is None:
      masks = (window, None)
    elif window is None:
      masks = (full, None)
    else:
      masks = (full, window)
    # The same mask as the attention kernels (splash, cuDNN's window) take it: segment ids of the
    # no-cache path, where the mask is exactly causal ∧ same segment (∧ window over slots; within
    # a segment without branches, positions and slots differ by a constant). Branches (a prefix
    # shared by siblings) are beyond those kernels: the dense mask alone then.
    if cache is None and branch_ids_BS is None:
      masks = masks + ((key_mask_BS > 0).astype(jnp.int32) if segment_ids_BS is None
                       else segment_ids_BS,)

    cache_index = None if cache is None else jnp.asarray(cache_index, jnp.int32)
    if self.unrolled:
      new_k, new_v = [], []
      for i in range(cfg.num_layers):
        layer_cache = None if cache is None else (cache.k[i], cache.v[i])
        # Layer boundaries as in the scan, whose carry is stored in the compute dtype: without
        # the barrier XLA's excess precision may skip rounding the residual stream there (a
        # bf16 -> f32 round trip inside one fusion), and bf16 results would drift from the
        # scanned decoder's (the trainer's) by ~0.05 in log-prob.
        x_BTD = jax.lax.optimization_barrier(x_BTD)
        (x_BTD, layer_cache), _ = Block(cfg, self.dtype, self.param_dtype, name=f"layers_{i}")(
            (x_BTD, layer_cache), rope, masks, cache_index, (None, bool(sliding[i])))
        if cache is not None:
          new_k.append(layer_cache[0])
          new_v.append(layer_cache[1])
      x_BTD = jax.lax.optimization_barrier(x_BTD)
      hidden_BTD = make_norm(cfg, self.dtype, self.param_dtype, "final_norm")(x_BTD)
      return hidden_BTD, None if cache is None else KVCache(tuple(new_k), tuple(new_v))

    block = Block
    if cfg.remat_policy != "none":
      block = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)
    blocks = nn.scan(
        block, variable_axes={"params": 0}, split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0), length=cfg.num_layers)
    layer_inputs = (jnp.arange(cfg.num_layers, dtype=jnp.int32), jnp.asarray(sliding))
    cache_kv = None if cache is None else (cache.k, cache.v)
    (x_BTD, cache_kv), _ = blocks(cfg, self.dtype, self.param_dtype, name="layers")(
        (x_BTD, cache_kv), rope, masks, cache_index, layer_inputs)
    hidden_BTD = make_norm(cfg, self.dtype, self.param_dtype, "final_norm")(x_BTD)
    return hidden_BTD, None if cache is None else KVCache(*cache_kv)


def _merge(tree: dict, extra: dict) -> dict:
  """tree with extra's leaves added at their paths (the LoRA params beside their kernels)."""
  out = dict(tree)
  for key, value in extra.items():
    out[key] = _merge(tree[key], value) if isinstance(value, dict) else value
  return out


@dataclasses.dataclass(frozen=True)
class CausalLM:
  """A causal LM: config + pure functions of a plain params dict. Hashable (jit static arg)."""

  config: ModelConfig
  lora: Any = None  # a models.lora.LoraConfig when the params are lora.Adapted (see lora.py)

  def compute_dtype(self, params) -> Any:
    if self.config.compute_dtype is not None:
      return dtype_from_name(self.config.compute_dtype)
    return lora_lib.parts(params)[0]["embed"]["embedding"].dtype

  def _decoder(self, dtype, param_dtype=jnp.float32, unrolled: bool = False) -> Decoder:
    return Decoder(self.config, dtype=dtype, param_dtype=param_dtype, unrolled=unrolled)

  def unstack_layers(self, params):
    """params (plain or lora.Adapted) with "layers" [L, ...] split into "layers_0" ...
    "layers_{L-1}" (in the base and in the adapters): the layout `apply` runs unrolled. Each
    leaf is sliced once here; inside a jitted function that is one copy of the layer weights."""
    def split(tree):
      if tree is None or "layers" not in tree:
        return tree
      out = {k: v for k, v in tree.items() if k != "layers"}
      for i in range(self.config.num_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], tree["layers"])
      return out
    base, adapters = lora_lib.parts(params)
    if isinstance(params, lora_lib.Adapted):
      return lora_lib.Adapted(split(base), split(adapters))
    return split(base)

  def init(self, key: jax.Array, dtype=jnp.float32) -> dict:
    """Random params (normal(initializer_range) weights, unit norms, zero biases) in `dtype`."""
    return _jitted_init(self, key, jnp.dtype(dtype))

  def _init(self, key: jax.Array, dtype) -> dict:
    decoder_key, head_key = jax.random.split(key)
    ids = jnp.zeros((1, 1), jnp.int32)
    variables = self._decoder(dtype, dtype).init(decoder_key, ids, ids, jnp.ones_like(ids))
    params = dict(variables["params"])
    if not self.config.tie_embeddings:
      shape = (self.config.hidden_size, self.config.vocab_size)
      kernel = self.config.initializer_range * jax.random.normal(head_key, shape, jnp.float32)
      params["lm_head"] = {"kernel": kernel.astype(dtype)}
    return params

  def unembedding(self, params) -> jax.Array:
    """[D, V]: the lm_head kernel, or the embedding transposed when tied."""
    params = lora_lib.parts(params)[0]
    if self.config.tie_embeddings:
      return params["embed"]["embedding"].T
    return params["lm_head"]["kernel"]

  def logits_from_hidden(self, params, hidden_BxD: jax.Array) -> jax.Array:
    """[..., V] float32 logits of final hidden states [..., D]: hidden·unembedding in the
    compute dtype with float32 accumulation, then the final-logit soft-cap if the config has one.
    """
    unembed_DV = self.unembedding(params).astype(hidden_BxD.dtype)
    logits = jnp.einsum("...d,dv->...v", hidden_BxD, unembed_DV,
                        preferred_element_type=jnp.float32)
    return ops.softcap(logits, self.config.final_logit_softcap)

  def init_cache(self, batch_size: int, max_length: int, dtype=None,
                 per_layer: bool = False) -> KVCache:
    """Zeros [L, B, S, K, H] for k and v (per_layer: tuples of L zeros [B, S, K, H], the cache
    of `unstack_layers` params); dtype None = compute_dtype if set, else float32."""
    cfg = self.config
    if dtype is None:
      dtype = dtype_from_name(cfg.compute_dtype) if cfg.compute_dtype else jnp.float32
    shape = (batch_size, max_length, cfg.num_kv_heads, cfg.head_dim)
    if per_layer:
      zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
      return KVCache(k=zeros(), v=zeros())
    shape = (cfg.num_layers, *shape)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

  def apply(self, params, input_ids_BT, attention_mask=None, *, positions=None, cache=None,
            cache_index=None, compute_logits: bool = True, segment_ids=None,
            branch_ids=None) -> ModelOutput:
    """Forward pass. See the module docstring and the models contract for mask semantics.

    Without a cache: attention_mask [B, T] (None = all ones); positions default to the mask's.
    With a cache: attention_mask [B, S] over the cache slots, cache_index = slot of
    input_ids[:, 0] (int32, may be traced; the caller keeps cache_index + T <= S, since
    dynamic_update_slice clamps instead of failing); positions default to the mask's positions
    at those slots. out.cache holds the T new keys/values.
    Packed rows (no cache): segment_ids [B, T] int, 0 = padding, 1, 2, ... = the examples packed
    into a row; tokens attend only within their segment and positions restart at each segment.
    Shared prefixes (packed rows only): branch_ids [B, T] int lays each segment out as
    [prefix (0) | branch 1 | branch 2 | ...], each part contiguous; a branch token sees the
    prefix and its own branch only, and its positions continue from the prefix's end, so the
    prefix is computed once for all its continuations (a preference pair's prompt, a group's
    prompt). Branch ids must be 0 on padding.
    Learned positions (GPT-2): raises ValueError when T (or S with a cache) exceeds
    max_position_embeddings (explicit `positions` must stay below it too; they are not checked).
    """
    chex.assert_rank(input_ids_BT, 2)
    batch, length = input_ids_BT.shape
    slots = None if cache is None else jax.tree.leaves(cache.k)[0].shape[-3]
    self._check_position_range(length if cache is None else slots)
    if segment_ids is not None:
      if cache is not None:
        raise ValueError("segment_ids (packed rows) cannot be combined with a KV cache")
      chex.assert_shape(segment_ids, (batch, length))
      attention_mask = (segment_ids > 0).astype(jnp.int32)
      if positions is None:
        positions = positions_from_segments(segment_ids, branch_ids)
    elif branch_ids is not None:
      raise ValueError("branch_ids (shared prefixes) need segment_ids (packed rows)")
    if cache is None:
      key_mask = (jnp.ones((batch, length), jnp.int32) if attention_mask is None
                  else attention_mask)
      chex.assert_shape(key_mask, (batch, length))
      if positions is None:
        positions = positions_from_mask(key_mask)
    else:
      if cache_index is None:
        raise ValueError("apply with a cache needs cache_index (slot of input_ids[:, 0])")
      key_mask = (jnp.ones((batch, slots), jnp.int32) if attention_mask is None
                  else attention_mask)
      chex.assert_shape(key_mask, (batch, slots))
      if positions is None:
        positions = jax.lax.dynamic_slice_in_dim(positions_from_mask(key_mask),
                                                 jnp.asarray(cache_index, jnp.int32), length, 1)
    chex.assert_shape(positions, (batch, length))
    dtype = self.compute_dtype(params)
    base, adapters = lora_lib.parts(params)
    decoder_params = {k: v for k, v in base.items() if k != "lm_head"}
    decoder = self._decoder(dtype, unrolled="layers" not in decoder_params)
    if self.lora is not None:
      decoder = lora_lib.decoder_module(decoder, self.lora, adapters is not None)
      if adapters is not None:
        decoder_params = _merge(decoder_params, adapters)
    hidden_BTD, new_cache = decoder.apply(
        {"params": decoder_params}, input_ids_BT, positions.astype(jnp.int32), key_mask,
        cache, cache_index, segment_ids, branch_ids)
    logits = self.logits_from_hidden(params, hidden_BTD) if compute_logits else None
    return ModelOutput(logits=logits, hidden=hidden_BTD, cache=new_cache)

  def _check_position_range(self, num_slots: int) -> None:
    """Learned positions (GPT-2): fail at trace time on a sequence the position table cannot hold.

    Positions are at most num_slots - 1 (tokens, or cache slots); past the table, nn.Embed's
    out-of-range gather would silently give NaN logits. RoPE has no table, so no limit here.
    """
    table = self.config.max_position_embeddings
    if self.config.positions == "learned" and num_slots > table:
      raise ValueError(
          f"a sequence of {num_slots} tokens (or cache slots) is longer than the learned position "
          f"table (max_position_embeddings={table}); truncate inputs to {table} tokens")

  def score_tokens(self, params, input_ids_BT, attention_mask_BT, *, temperature: float = 1.0,
                   chunk_size: int = 512, entropy: bool = False,
                   segment_ids=None, branch_ids=None, score_mask=None) -> "TokenScores":
    """Token log-probs (and optionally entropies) plus the hidden states, from one forward pass.

    logps [B, T] float32: [:, t] = log softmax(logits_{t-1} / temperature)[ids[:, t]]; [:, 0] = 0,
    and 0 wherever attention_mask_BT is 0 (padding scores nothing). entropy [B, T] (or None):
    the entropy of the distribution that predicts token t, aligned like logps. Uses
    ops.chunked_token_logps on the final hidden states, never a full float32 [B, T, V]
    log-softmax: the one log-prob function of trainer, reference, sampler checks and scoring.
    Packed rows (segment_ids, optionally branch_ids; see `apply`): token t is predicted by the
    hidden state at `predictor_slots` (the previous slot, or for a branch's first token its
    prefix's last one), and a segment's first token scores 0.
    score_mask [B, T] (optional, aligned like logps; e.g. a batch's `loss_mask`): score only
    these tokens (`ops.scored_token_logps`), so the head's cost follows the completions, not
    the prompts; logps and entropy are 0 elsewhere, and equal to the unmasked call where it is 1.
    """
    chex.assert_rank([input_ids_BT, attention_mask_BT], 2)
    chex.assert_equal_shape([input_ids_BT, attention_mask_BT])
    hidden_BTD = self.apply(params, input_ids_BT, attention_mask_BT, compute_logits=False,
                            segment_ids=segment_ids, branch_ids=branch_ids).hidden
    unembed_DV = self.unembedding(params).astype(hidden_BTD.dtype)
    options = dict(unembed_DV=unembed_DV, temperature=temperature, chunk_size=chunk_size,
                   return_entropy=entropy, logit_softcap=self.config.final_logit_softcap)
    if score_mask is None:
      score = lambda hidden, labels, where: ops.chunked_token_logps(hidden, labels=labels,
                                                                    **options)
    else:
      chex.assert_equal_shape([score_mask, input_ids_BT])
      score = lambda hidden, labels, where: ops.scored_token_logps(
          hidden, labels_BT=labels, where_BT=where, **options)
      score_mask = score_mask * attention_mask_BT
    mask = attention_mask_BT.astype(jnp.float32)
    if branch_ids is None:
      scored = score(hidden_BTD[:, :-1], labels=input_ids_BT[:, 1:],
                     where=None if score_mask is None else score_mask[:, 1:] > 0)
      if segment_ids is not None:  # a segment's first token is predicted by nothing in it
        mask = mask * (predictor_slots(segment_ids) >= 0).astype(jnp.float32)
      align = lambda x: jnp.pad(x, ((0, 0), (1, 0))) * mask
    else:
      predictor_BT = predictor_slots(segment_ids, branch_ids)
      predicting_BTD = jnp.take_along_axis(hidden_BTD, jnp.maximum(predictor_BT, 0)[..., None],
                                           axis=1)
      mask = mask * (predictor_BT >= 0).astype(jnp.float32)
      scored = score(predicting_BTD, labels=input_ids_BT,
                     where=None if score_mask is None else (score_mask * mask) > 0)
      align = lambda x: x * mask
    logps, token_entropy = scored if entropy else (scored, None)
    return TokenScores(logps=align(logps),
                       entropy=None if token_entropy is None else align(token_entropy),
                       hidden=hidden_BTD)

  def token_logps(self, params, input_ids_BT, attention_mask_BT, *, temperature: float = 1.0,
                  chunk_size: int = 512, segment_ids=None, branch_ids=None,
                  score_mask=None) -> jax.Array:
    """[B, T] float32 token log-probs: `score_tokens(...).logps`."""
    return self.score_tokens(params, input_ids_BT, attention_mask_BT, temperature=temperature,
                             chunk_size=chunk_size, segment_ids=segment_ids,
                             branch_ids=branch_ids, score_mask=score_mask).logps


# One compiled init per (model, dtype): eager Flax init dispatches hundreds of tiny ops.
_jitted_init = jax.jit(CausalLM._init, static_argnums=(0, 2))
