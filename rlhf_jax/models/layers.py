"""Flax Linen building blocks of the decoder: norms, rotary embedding, attention, MLP, block.

Shape letters: B batch, T query tokens, S key slots (T without a cache, the cache length with
one), D model width, N query heads, K key/value heads, H head dim, F MLP width, L layers.

Numerics: matmuls run in the compute dtype `dtype` (bf16 OK); norms, the rotary rotation and the
attention softmax run in float32 and cast back.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlhf_jax.models.config import ModelConfig

__all__ = ["RMSNorm", "LayerNorm", "make_norm", "apply_rope", "Attention", "MLP", "Block",
           "attention_implementation"]

Dtype = Any


def _init(config: ModelConfig):
  return nn.initializers.normal(stddev=config.initializer_range)


def _lift(param_D, x):
  """A [D] parameter as float32 [1, ..., 1, D] matching x's rank (no implicit rank promotion)."""
  return param_D.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))


class RMSNorm(nn.Module):
  """x / sqrt(mean(x²) + eps) · (offset + scale), in float32 (Zhang & Sennrich, 2019,
  arXiv:1910.07467). Gemma stores the weight as w with offset 1; it starts at 0 then."""

  eps: float
  dtype: Dtype
  param_dtype: Dtype = jnp.float32
  weight_offset: float = 0.0

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.zeros if self.weight_offset else nn.initializers.ones
    scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    weight = _lift(scale, x) + self.weight_offset if self.weight_offset else _lift(scale, x)
    return (normed * weight).astype(self.dtype)


class LayerNorm(nn.Module):
  """(x - mean) / sqrt(var + eps) · scale + bias, in float32 (Ba et al., 2016,
  arXiv:1607.06450)."""

  eps: float
  dtype: Dtype
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    normed = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    scale, bias = _lift(scale, x), _lift(bias, x)
    return (normed * scale + bias).astype(self.dtype)


def make_norm(config: ModelConfig, dtype, param_dtype, name: str) -> nn.Module:
  if config.norm == "rmsnorm":
    return RMSNorm(eps=config.norm_eps, dtype=dtype, param_dtype=param_dtype,
                   weight_offset=config.norm_weight_offset, name=name)
  return LayerNorm(eps=config.norm_eps, dtype=dtype, param_dtype=param_dtype, name=name)


def apply_rope(x_BTNH, sin_BTh, cos_BTh):
  """Rotary embedding in the "rotate half" layout of HF Llama: x·cos + rotate_half(x)·sin.

  sin/cos are [B, T, H/2] float32; the rotation runs in float32 and casts back to x's dtype.
  """
  x = x_BTNH.astype(jnp.float32)
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half], x[..., half:]
  sin, cos = sin_BTh[:, :, None, :], cos_BTh[:, :, None, :]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_BTNH.dtype)


SPLASH_BLOCK = 128  # auto picks splash when the sequence is a multiple of this (its min tile)


def attention_implementation(config: ModelConfig, dtype, head_dim: int, has_cache: bool,
                             num_queries: int) -> str:
  """'xla', 'cudnn' or 'splash' (auto: cuDNN where it is supported on a GPU, splash on a TPU
  without a cache when T is a multiple of SPLASH_BLOCK, XLA otherwise and on a CPU)."""
  if config.attention_impl is not None:
    return config.attention_impl
  backend = jax.default_backend()
  cudnn_ok = (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
              and head_dim % 8 == 0 and head_dim <= 128 and num_queries % 2 == 0)
  if backend == "gpu" and cudnn_ok and not has_cache:
    return "cudnn"
  if backend == "tpu" and not has_cache and num_queries % SPLASH_BLOCK == 0:
    return "splash"
  return "xla"


def _dense(features: int, use_bias: bool, config: ModelConfig, dtype, param_dtype, name: str):
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                  kernel_init=_init(config), name=name)


def _attend(q_BTNH, k_BSKH, v_BSKH, mask_B1TS, impl: str, has_cache: bool, auto: bool,
            scale: float | None = None, segment_ids_BT=None, window: int | None = None):
  """softmax(q·kᵀ·scale masked)·v via jax.nn.dot_product_attention (float32 softmax), or the
  TPU splash kernel.

  scale: None = 1/sqrt(H). The dense mask holds everything (causality, padding, segments,
  branches, window) and is what XLA uses. The kernels take a structured description instead,
  valid only when the mask is exactly causal ∧ same-segment ∧ (window over slots):
  segment_ids_BT (no cache: the packed rows' segment ids, or the key mask for unpacked rows;
  None when the mask is anything else, e.g. branch ids or a cache) and window (the sliding
  window in slots on this layer, else None).
  - cudnn: the dense mask (cuDNN adds it as a bias), is_causal (no cache: query slot t is key
    slot t) so it skips blocks above the diagonal, and local_window_size=(window - 1, 0) on a
    sliding layer so it skips blocks left of the window too (only with segment_ids_BT, whose
    presence says the window counts slots). cuDNN's own packed layout (q/kv offsets) is not
    reachable through jax.nn.dot_product_attention, so segments ride in the dense mask.
  - splash: no dense mask; causal (or local, for the window) static mask and the segment ids.
    Needs segment_ids_BT; without it (a cache, branch ids) it falls back to XLA in auto mode and
    raises otherwise. Off a TPU the kernel runs in Pallas interpret mode (slow; for tests).
  In auto mode a shape or dtype a kernel rejects while tracing falls back to XLA.
  """
  scale = q_BTNH.shape[-1] ** -0.5 if scale is None else scale
  kwargs = dict(mask=mask_B1TS, scale=scale)
  if impl == "splash":
    if segment_ids_BT is not None and not has_cache:
      try:
        return _splash_attend(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, window, scale)
      except (NotImplementedError, ValueError):
        if not auto:
          raise
    elif not auto and not has_cache:
      raise ValueError("attention_impl='splash' needs a causal + segment (+ window) mask; this "
                       "one has more structure (e.g. branch ids): use 'xla'")
  if impl == "cudnn":
    if window is not None and segment_ids_BT is not None:
      kwargs["local_window_size"] = _local_window_size(window)
    try:
      return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, is_causal=not has_cache,
                                          implementation="cudnn", **kwargs)
    except (NotImplementedError, ValueError, RuntimeError):
      if not auto:
        raise
    kwargs.pop("local_window_size", None)
  return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, implementation="xla", **kwargs)


def _local_window_size(window: int) -> tuple[int, int]:
  """dot_product_attention's (left, right) window for "a query sees its `window` latest slots,
  itself included" (i - j < window): left = window - 1 (cuDNN then gets window_length = window)."""
  return (window - 1, 0)


def _splash_kernel(length: int, heads: int, window: int | None, interpret: bool):
  """A splash attention kernel (one example: q [N, T, H], k/v [K, T, H]) for a causal, or
  causal sliding-window (a query sees its `window` latest slots), mask. Built per trace, not
  cached: it holds arrays, which would leak from one trace (a scan) into another."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  shape = (length, length)
  base = (splash.CausalMask(shape) if window is None
          else splash.LocalMask(shape, window_size=_local_window_size(window), offset=0))
  block = next((b for b in (512, 256, 128) if length % b == 0), length)  # tiles divide T
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  return splash.make_splash_mha(splash.MultiHeadMask([base] * heads), block_sizes=sizes,
                                head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_attend(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, window: int | None, scale: float):
  """Splash attention (jax.experimental.pallas.ops.tpu.splash_attention) over a batch: q is
  pre-scaled (the kernel has no scale), GQA native (N % K == 0), segment ids mask across
  segments. Padding (segment 0) queries see earlier padding keys instead of only themselves as
  in the dense mask: their outputs differ, and nothing real reads them."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  length, heads = q_BTNH.shape[1], q_BTNH.shape[2]
  kernel = _splash_kernel(length, heads, window, jax.default_backend() != "tpu")
  q_BNTH = (q_BTNH * jnp.asarray(scale, q_BTNH.dtype)).transpose(0, 2, 1, 3)
  k_BKTH, v_BKTH = k_BTKH.transpose(0, 2, 1, 3), v_BTKH.transpose(0, 2, 1, 3)
  segments_BT = segment_ids_BT.astype(jnp.int32)

  def one(q_NTH, k_KTH, v_KTH, segments_T):
    return kernel(q_NTH, k_KTH, v_KTH, segment_ids=splash.SegmentIds(q=segments_T,
                                                                     kv=segments_T))

  return jax.vmap(one)(q_BNTH, k_BKTH, v_BKTH, segments_BT).transpose(0, 2, 1, 3)


def _attend_softcapped(q_BTNH, k_BSKH, v_BSKH, mask_B1TS, scale: float, cap: float):
  """softmax(cap·tanh(q·kᵀ·scale / cap) masked)·v in plain XLA, float32 scores (Gemma 2's
  attention-logit soft-capping, Gemma Team, 2024, arXiv:2408.00118; dot_product_attention has
  no hook between the scores and the softmax). G = N / K query heads per KV head."""
  batch, length, heads, dim = q_BTNH.shape
  kv_heads = k_BSKH.shape[2]
  q_BTKGH = q_BTNH.reshape(batch, length, kv_heads, heads // kv_heads, dim)
  scores_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH,
                            preferred_element_type=jnp.float32) * scale
  scores_BKGTS = cap * jnp.tanh(scores_BKGTS / cap)
  mask_B11TS = mask_B1TS[:, :, None]
  scores_BKGTS = jnp.where(mask_B11TS, scores_BKGTS, jnp.finfo(jnp.float32).min)
  probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v_BSKH.dtype)
  out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", probs_BKGTS, v_BSKH)
  return out_BTKGH.reshape(batch, length, heads, dim)


class Attention(nn.Module):
  """Multi-head / grouped-query attention through `jax.nn.dot_product_attention`.

  GQA is native there (K < N heads, no repeated K/V). The KV cache, when given, is either the
  whole stacked [L, B, S, K, H] pair (scanned decoder, `layer` a traced index): this layer writes
  its T new keys/values at [layer, :, cache_index:cache_index+T] with `lax.dynamic_update_slice`
  and attends over the layer's S slots; or this layer's own [B, S, K, H] pair (unrolled decoder,
  `layer` None): written at [:, cache_index:cache_index+T] and read whole, with no slice.
  q/k norms (config.qk_norm) run before RoPE: "full" over the N·H (K·H) projection (OLMo 2),
  "head" over each head's H (Qwen3, Gemma 3).
  """

  config: ModelConfig
  dtype: Dtype
  param_dtype: Dtype

  @nn.compact
  def __call__(self, x_BTD, rope, mask_B1TS, cache, cache_index, layer, segment_ids_BT=None,
               is_sliding=False):
    cfg = self.config
    batch, length, _ = x_BTD.shape
    n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    dense = lambda f, bias, name: _dense(f, bias, cfg, self.dtype, self.param_dtype, name)
    qk_norm = lambda name: RMSNorm(eps=cfg.norm_eps, dtype=self.dtype,
                                   param_dtype=self.param_dtype,
                                   weight_offset=cfg.norm_weight_offset, name=name)
    q_BTF = dense(n * h, cfg.qkv_bias, "q")(x_BTD)
    k_BTF = dense(k * h, cfg.qkv_bias, "k")(x_BTD)
    if cfg.qk_norm == "full":
      q_BTF, k_BTF = qk_norm("q_norm")(q_BTF), qk_norm("k_norm")(k_BTF)
    q_BTNH = q_BTF.reshape(batch, length, n, h)
    k_BTKH = k_BTF.reshape(batch, length, k, h)
    v_BTKH = dense(k * h, cfg.qkv_bias, "v")(x_BTD).reshape(batch, length, k, h)
    if cfg.qk_norm == "head":
      q_BTNH, k_BTKH = qk_norm("q_norm")(q_BTNH), qk_norm("k_norm")(k_BTKH)
    if rope is not None:
      q_BTNH = apply_rope(q_BTNH, *rope)
      k_BTKH = apply_rope(k_BTKH, *rope)
    has_cache = cache is not None
    if has_cache and layer is None:  # this layer's own [B, S, K, H] arrays
      cache_k, cache_v = cache
      start = (0, cache_index, 0, 0)
      cache_k = jax.lax.dynamic_update_slice(cache_k, k_BTKH.astype(cache_k.dtype), start)
      cache_v = jax.lax.dynamic_update_slice(cache_v, v_BTKH.astype(cache_v.dtype), start)
      k_BSKH, v_BSKH = cache_k.astype(self.dtype), cache_v.astype(self.dtype)
      cache = (cache_k, cache_v)
    elif has_cache:  # the stacked [L, B, S, K, H] arrays
      cache_k, cache_v = cache
      start = (layer, 0, cache_index, 0, 0)
      cache_k = jax.lax.dynamic_update_slice(cache_k, k_BTKH.astype(cache_k.dtype)[None], start)
      cache_v = jax.lax.dynamic_update_slice(cache_v, v_BTKH.astype(cache_v.dtype)[None], start)
      k_BSKH = jax.lax.dynamic_index_in_dim(cache_k, layer, 0, keepdims=False).astype(self.dtype)
      v_BSKH = jax.lax.dynamic_index_in_dim(cache_v, layer, 0, keepdims=False).astype(self.dtype)
      cache = (cache_k, cache_v)
    else:
      k_BSKH, v_BSKH = k_BTKH, v_BTKH
    scale = (h if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar) ** -0.5
    if cfg.attn_logit_softcap is not None:
      out_BTNH = _attend_softcapped(q_BTNH, k_BSKH, v_BSKH, mask_B1TS, scale,
                                    cfg.attn_logit_softcap)
    else:
      impl = attention_implementation(cfg, self.dtype, h, has_cache, length)
      attend = lambda window: _attend(q_BTNH, k_BSKH, v_BSKH, mask_B1TS, impl, has_cache,
                                      auto=cfg.attention_impl is None, scale=scale,
                                      segment_ids_BT=segment_ids_BT, window=window)
      if impl == "xla" or segment_ids_BT is None or cfg.sliding_window is None:
        out_BTNH = attend(None)  # the dense mask alone
      elif isinstance(is_sliding, bool):
        out_BTNH = attend(cfg.sliding_window if is_sliding else None)
      else:  # a traced per-layer flag (scanned layers of a mixed model): both kernels, one runs
        out_BTNH = jax.lax.cond(is_sliding, lambda: attend(cfg.sliding_window),
                                lambda: attend(None))
    out_BTD = dense(cfg.hidden_size, cfg.out_bias, "o")(out_BTNH.reshape(batch, length, n * h))
    return out_BTD, cache


_ACT = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


class MLP(nn.Module):
  """SwiGLU down(act(gate·x) ⊙ up·x) (Shazeer, 2020, arXiv:2002.05202), or down(act(up·x))."""

  config: ModelConfig
  dtype: Dtype
  param_dtype: Dtype

  @nn.compact
  def __call__(self, x_BTD):
    cfg = self.config
    dense = lambda f, name: _dense(f, cfg.mlp_bias, cfg, self.dtype, self.param_dtype, name)
    act = _ACT[cfg.activation]
    if cfg.mlp == "gated":
      h_BTF = act(dense(cfg.intermediate_size, "gate")(x_BTD)) * dense(cfg.intermediate_size,
                                                                        "up")(x_BTD)
    else:
      h_BTF = act(dense(cfg.intermediate_size, "up")(x_BTD))
    return dense(cfg.hidden_size, "down")(h_BTF)


class Block(nn.Module):
  """Decoder block, scanned over layers: per sublayer f (attention, then MLP),
  "pre" x + f(norm(x)); "pre_post" x + post_norm(f(norm(x))); "post" x + post_norm(f(x)).

  carry = (x_BTD, cache or None); per-layer inputs (layer index, uses-sliding-window flag):
  traced under `nn.scan`, or (None, a Python bool) when the decoder is unrolled (the cache is
  then this layer's own pair and the mask and rope table are picked at trace time).
  rope = (sin, cos), or ((sin, cos) global, (sin, cos) local) when the sliding-window layers
  have their own table (Gemma 3): the flag picks one.
  """

  config: ModelConfig
  dtype: Dtype
  param_dtype: Dtype

  @nn.compact
  def __call__(self, carry, rope, masks, cache_index, layer_inputs):
    x_BTD, cache = carry
    layer, is_sliding = layer_inputs
    full_mask, window_mask, *kernel_ids = masks  # kernel_ids: [segment ids for the kernels]
    segment_ids_BT = kernel_ids[0] if kernel_ids else None
    static = isinstance(is_sliding, bool)  # unrolled decoder: the flag is known at trace time
    if window_mask is None:  # every layer alike: whether they slide is static
      mask, layer_slides = full_mask, all(self.config.layer_is_sliding)
    elif static:
      mask, layer_slides = (window_mask if is_sliding else full_mask), is_sliding
    else:
      mask = jnp.where(is_sliding, window_mask, full_mask)
      layer_slides = is_sliding
    cfg, dt, pdt = self.config, self.dtype, self.param_dtype
    if rope is not None and isinstance(rope[0], tuple):
      (sin_global, cos_global), (sin_local, cos_local) = rope
      if static:
        rope = (sin_local, cos_local) if is_sliding else (sin_global, cos_global)
      else:
        rope = (jnp.where(is_sliding, sin_local, sin_global),
                jnp.where(is_sliding, cos_local, cos_global))
    pre = cfg.norm_placement in ("pre", "pre_post")
    post = cfg.norm_placement in ("pre_post", "post")
    norm = lambda name: make_norm(cfg, dt, pdt, name)
    h_BTD = norm("attn_norm")(x_BTD) if pre else x_BTD
    attn_BTD, cache = Attention(cfg, dt, pdt, name="attn")(h_BTD, rope, mask, cache, cache_index,
                                                           layer, segment_ids_BT, layer_slides)
    x_BTD = x_BTD + (norm("post_attn_norm")(attn_BTD) if post else attn_BTD)
    h_BTD = norm("mlp_norm")(x_BTD) if pre else x_BTD
    mlp_BTD = MLP(cfg, dt, pdt, name="mlp")(h_BTD)
    x_BTD = x_BTD + (norm("post_mlp_norm")(mlp_BTD) if post else mlp_BTD)
    return (x_BTD, cache), None
