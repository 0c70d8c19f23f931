"""`ModelConfig`: the one description of a decoder that every model family here is an instance of.

GPT-2, the Llama family (Llama 2/3, Qwen2/2.5, Mistral, SmolLM), Qwen3, Gemma 2, Gemma 3 (text),
Phi-3 and OLMo 2 differ only in these fields:
  * norm type, where the norms sit (`norm_placement`: "pre" Llama, "pre_post" Gemma's sandwich,
    "post" OLMo 2), the (1 + w) weight of Gemma's RMSNorm (`norm_weight_offset`);
  * q/k norms (`qk_norm`: "head" per head as in Qwen3 / Gemma 3, "full" over the whole
    projection as in OLMo 2), the query scale (`query_pre_attn_scalar`, Gemma), attention-logit
    and final-logit soft-capping (Gemma 2), embeddings times sqrt(D) (`embed_scale`, Gemma);
  * position scheme and RoPE scaling, a separate RoPE base for sliding-window layers
    (`rope_local_theta`, Gemma 3), MLP type, biases, tied embeddings, sliding window (all layers
    or a per-layer pattern).
Fused checkpoint tensors (Phi-3's qkv_proj, gate_up_proj) are a matter of the tensor map
(hf_io.py), not of the model. `from_hf` reads a `transformers` config (5.x `rope_parameters`,
per layer type for Gemma 3, or 4.x `rope_theta` + `rope_scaling`) and fails loudly, naming the
field, on anything this decoder does not implement (MoE families are other model_types and are
refused as such); `to_hf` goes back so an exported checkpoint reloads in `transformers`. Both
live in hf_config.py; this module holds the fields, their checks and the RoPE tables.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from rlhf_jax.errors import UserError

__all__ = ["ModelConfig", "UnsupportedModelError", "SUPPORTED_MODEL_TYPES", "ROPE_TYPES",
           "ACTIVATIONS", "rope_inv_freq", "dtype_from_name", "ids_tuple"]

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "qwen2", "mistral", "qwen3", "gemma2", "gemma3_text",
                         "phi3", "olmo2")
ACTIVATIONS = ("gelu_tanh", "gelu", "silu", "relu")
ROPE_TYPES = ("default", "linear", "llama3", "longrope")
NORM_PLACEMENTS = ("pre", "pre_post", "post")
QK_NORMS = ("none", "head", "full")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = (None, "xla", "cudnn", "splash")


class UnsupportedModelError(UserError):
  """A checkpoint or config this decoder does not implement (architecture, field value)."""


def ids_tuple(value) -> int | tuple[int, ...] | None:
  """A token id, or several as a tuple (hashable), or None."""
  if value is None or isinstance(value, int):
    return value
  return tuple(int(v) for v in value)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder hyper-parameters plus speed switches. Frozen and hashable (a jit static arg).

  Speed switches (not part of the checkpoint):
    compute_dtype: None computes in the params' dtype; "bfloat16" casts float32 master params to
      bf16 at use (mixed precision). Softmax, norms and logits are float32 either way.
    remat_policy: "none" | "full" (recompute the whole block) | "dots" (save matmul outputs) |
      "dots_no_batch" (save only matmuls without batch dims, i.e. the weight matmuls).
    attention_impl: None = auto (cuDNN flash attention on GPU for bf16/fp16 without a cache,
      splash attention on TPU without a cache, XLA otherwise) | "xla" | "cudnn" | "splash"
      (off a TPU, splash runs in Pallas interpret mode: for tests only).
  """

  model_type: str  # one of SUPPORTED_MODEL_TYPES: the transformers config family
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  norm: str = "rmsnorm"  # "rmsnorm" | "layernorm"
  norm_eps: float = 1e-6
  # "pre": x + f(norm(x)) (GPT-2, Llama); "pre_post": x + norm(f(norm(x))) (Gemma 2/3);
  # "post": x + norm(f(x)) (OLMo 2). f is attention, then the MLP.
  norm_placement: str = "pre"
  norm_weight_offset: float = 0.0  # RMSNorm scales by (offset + w): Gemma stores w with offset 1
  qk_norm: str = "none"  # RMSNorm of q and k before RoPE: "head" (over H) | "full" (over N·H)
  embed_scale: float = 1.0  # embeddings times this (Gemma: sqrt(D), cast to the compute dtype)
  query_pre_attn_scalar: float | None = None  # scores scaled by this ** -0.5; None = head_dim
  attn_logit_softcap: float | None = None  # scores -> cap·tanh(scores / cap) before the mask
  final_logit_softcap: float | None = None  # logits -> cap·tanh(logits / cap), before temperature
  positions: str = "rope"  # "rope" | "learned"
  max_position_embeddings: int = 2048
  rope_theta: float = 10000.0
  rope_type: str = "default"  # "default" | "linear" | "llama3" | "longrope" (Phi-3)
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position_embeddings: int | None = None
  # longrope: per-frequency divisors [H/2] for short (<= original length) and long sequences, and
  # the factor sin/cos are multiplied by (sqrt(1 + ln(factor) / ln(original)) unless given).
  rope_short_factor: tuple[float, ...] | None = None
  rope_long_factor: tuple[float, ...] | None = None
  rope_attention_factor: float = 1.0
  rope_local_theta: float | None = None  # sliding-window layers: default RoPE with this base
  mlp: str = "gated"  # "gated" (SwiGLU: down(act(gate x) * up x)) | "plain" (down(act(up x)))
  activation: str = "silu"  # "silu" | "gelu" | "gelu_tanh" | "relu"
  qkv_bias: bool = False
  out_bias: bool = False  # bias of the attention output projection
  mlp_bias: bool = False
  tie_embeddings: bool = False
  sliding_window: int | None = None  # a query sees the `sliding_window` latest slots, itself incl.
  sliding_layers: tuple[bool, ...] | None = None  # which layers use it; None = all
  initializer_range: float = 0.02
  pad_token_id: int | None = None
  bos_token_id: int | tuple[int, ...] | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  compute_dtype: str | None = None
  remat_policy: str = "none"
  attention_impl: str | None = None

  def __post_init__(self):
    # Lists (e.g. Llama 3's several eos ids) become tuples so the config stays hashable.
    for name in ("bos_token_id", "eos_token_id"):
      object.__setattr__(self, name, ids_tuple(getattr(self, name)))
    if self.sliding_layers is not None:
      object.__setattr__(self, "sliding_layers", tuple(bool(s) for s in self.sliding_layers))
    for name in ("rope_short_factor", "rope_long_factor"):
      if getattr(self, name) is not None:
        object.__setattr__(self, name, tuple(float(f) for f in getattr(self, name)))
    checks = [
        (self.model_type in SUPPORTED_MODEL_TYPES, "model_type", SUPPORTED_MODEL_TYPES),
        (self.norm in ("rmsnorm", "layernorm"), "norm", ("rmsnorm", "layernorm")),
        (self.norm_placement in NORM_PLACEMENTS, "norm_placement", NORM_PLACEMENTS),
        (self.qk_norm in QK_NORMS, "qk_norm", QK_NORMS),
        (self.positions in ("rope", "learned"), "positions", ("rope", "learned")),
        (self.rope_type in ROPE_TYPES, "rope_type", ROPE_TYPES),
        (self.mlp in ("gated", "plain"), "mlp", ("gated", "plain")),
        (self.activation in ACTIVATIONS, "activation", ACTIVATIONS),
        (self.remat_policy in REMAT_POLICIES, "remat_policy", REMAT_POLICIES),
        (self.attention_impl in ATTENTION_IMPLS, "attention_impl", ATTENTION_IMPLS),
    ]
    for ok, name, allowed in checks:
      if not ok:
        raise UnsupportedModelError(
            f"ModelConfig.{name}={getattr(self, name)!r} is not supported; "
            f"expected one of {allowed}")
    if self.num_heads % self.num_kv_heads:
      raise UnsupportedModelError(
          f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.positions == "rope" and self.head_dim % 2:
      raise UnsupportedModelError(f"RoPE needs an even head_dim, got {self.head_dim}")
    if self.sliding_layers is not None and len(self.sliding_layers) != self.num_layers:
      raise UnsupportedModelError(
          f"sliding_layers has {len(self.sliding_layers)} entries for {self.num_layers} layers")
    for name in ("attn_logit_softcap", "final_logit_softcap", "query_pre_attn_scalar"):
      value = getattr(self, name)
      if value is not None and not value > 0:
        raise UnsupportedModelError(f"ModelConfig.{name}={value!r} must be None or > 0")
    if self.qk_norm != "none" and self.norm != "rmsnorm":
      raise UnsupportedModelError(f"qk_norm={self.qk_norm!r} needs norm='rmsnorm'")
    if self.rope_type == "longrope":
      for name in ("rope_short_factor", "rope_long_factor"):
        if len(getattr(self, name) or ()) != self.head_dim // 2:
          raise UnsupportedModelError(f"longrope needs {name} of head_dim / 2 = "
                                      f"{self.head_dim // 2} numbers, got {getattr(self, name)}")
      if self.rope_original_max_position_embeddings is None:
        raise UnsupportedModelError("longrope needs rope_original_max_position_embeddings")
    if self.compute_dtype is not None:
      dtype_from_name(self.compute_dtype)  # raises on an unknown name

  @property
  def layer_is_sliding(self) -> tuple[bool, ...]:
    """Per layer: does it use the sliding window."""
    if self.sliding_window is None:
      return (False,) * self.num_layers
    return self.sliding_layers or (True,) * self.num_layers

  # ---------------------------------------------------------------------------- from / to HF
  @classmethod
  def from_hf(cls, hf_config: Any, **overrides) -> ModelConfig:
    """Builds a ModelConfig from a `transformers` config object (or its dict).

    Raises UnsupportedModelError naming the architecture or the field value it cannot honour.
    overrides replace fields (e.g. remat_policy="full"). The reading lives in hf_config.py.
    """
    from rlhf_jax.models import hf_config as conversion  # deferred: it imports this module

    return cls(**{**conversion.fields_from_hf(hf_config), **overrides})

  def to_hf(self, architecture: str = "ForCausalLM", **extra) -> Any:
    """The matching `transformers` config object; `architecture` suffix e.g. "ForCausalLM".

    Raises UnsupportedModelError when no transformers family holds this config (hf_config.py).
    """
    from rlhf_jax.models import hf_config as conversion

    return conversion.to_hf_config(self, architecture, **extra)



def dtype_from_name(name: str) -> np.dtype:
  """A dtype from its name ("bfloat16", "float32", ... or the short "bf16", "fp16", "f32")."""
  return jnp.dtype({"bf16": "bfloat16", "fp16": "float16", "f32": "float32"}.get(name, name))


def rope_inv_freq(config: ModelConfig, local: bool = False, long: bool = False) -> np.ndarray:
  """Inverse frequencies [H/2] (float32) of the rotary embedding, after any scaling.

  local=True: the sliding-window layers' table when `rope_local_theta` is set (Gemma 3: default
  RoPE with that base, no scaling). longrope: θ^(-2i/H) / short_factor[i], or / long_factor[i]
  with long=True (LongRoPE, Ding et al., 2024, arXiv:2402.13753); the decoder picks the long
  table for a call whose largest position + 1 exceeds the original length, as transformers does.

  default: θ^(-2i/H) (Su et al., 2021, arXiv:2104.09864); linear: divided by `factor`
  (position interpolation, Chen et al., 2023, arXiv:2306.15595); llama3: long wavelengths divided
  by `factor`, short ones kept, a smooth blend between (Llama 3.1, Dubey et al., 2024,
  arXiv:2407.21783).
  """
  dim = config.head_dim
  exponents = np.arange(0, dim, 2, dtype=np.float64) / dim
  if local:
    return (1.0 / (config.rope_local_theta ** exponents)).astype(np.float32)
  inv_freq = 1.0 / (config.rope_theta ** exponents)
  if config.rope_type == "longrope":
    factors = config.rope_long_factor if long else config.rope_short_factor
    # as transformers: float32 factors times the float32 power, then the reciprocal
    powers = (config.rope_theta ** exponents.astype(np.float32)).astype(np.float32)
    return (1.0 / (np.asarray(factors, np.float32) * powers)).astype(np.float32)
  if config.rope_type == "linear":
    inv_freq = inv_freq / config.rope_factor
  elif config.rope_type == "llama3":
    factor = config.rope_factor
    low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
    old_context = config.rope_original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    inv_freq = np.where(medium, blended, scaled)
  return inv_freq.astype(np.float32)
