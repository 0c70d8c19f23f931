"""`ModelConfig`: the one description of a decoder that every model family here is an instance of.

GPT-2 and the Llama family (Llama 2/3, Qwen2/2.5, Mistral, SmolLM) differ only in these fields:
norm type, position scheme, MLP type, biases, tied embeddings, sliding window. `from_hf` reads a
`transformers` config (5.x `rope_parameters` or 4.x `rope_theta` + `rope_scaling`) and fails
loudly, naming the field, on anything this decoder does not implement; `to_hf` goes back so an
exported checkpoint reloads in `transformers`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

__all__ = ["ModelConfig", "UnsupportedModelError", "SUPPORTED_MODEL_TYPES", "rope_inv_freq",
           "dtype_from_name"]

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "qwen2", "mistral")
# HF activation names -> ours. gelu_new / gelu_pytorch_tanh are the tanh approximation.
_ACTIVATIONS = {
    "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
    "gelu": "gelu", "silu": "silu", "swish": "silu", "relu": "relu",
}
_ACTIVATIONS_TO_HF = {"gelu_tanh": "gelu_new", "gelu": "gelu", "silu": "silu", "relu": "relu"}
_ROPE_TYPES = ("default", "linear", "llama3")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = (None, "xla", "cudnn")


class UnsupportedModelError(ValueError):
  """A checkpoint or config this decoder does not implement (architecture, field value)."""


def _ids(value) -> int | tuple[int, ...] | None:
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
      XLA otherwise) | "xla" | "cudnn".
  """

  model_type: str  # "gpt2" | "llama" | "qwen2" | "mistral": the transformers config family
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  norm: str = "rmsnorm"  # "rmsnorm" | "layernorm"
  norm_eps: float = 1e-6
  positions: str = "rope"  # "rope" | "learned"
  max_position_embeddings: int = 2048
  rope_theta: float = 10000.0
  rope_type: str = "default"  # "default" | "linear" | "llama3"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position_embeddings: int | None = None
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
      object.__setattr__(self, name, _ids(getattr(self, name)))
    if self.sliding_layers is not None:
      object.__setattr__(self, "sliding_layers", tuple(bool(s) for s in self.sliding_layers))
    checks = [
        (self.model_type in SUPPORTED_MODEL_TYPES, "model_type", SUPPORTED_MODEL_TYPES),
        (self.norm in ("rmsnorm", "layernorm"), "norm", ("rmsnorm", "layernorm")),
        (self.positions in ("rope", "learned"), "positions", ("rope", "learned")),
        (self.rope_type in _ROPE_TYPES, "rope_type", _ROPE_TYPES),
        (self.mlp in ("gated", "plain"), "mlp", ("gated", "plain")),
        (self.activation in _ACTIVATIONS_TO_HF, "activation", tuple(_ACTIVATIONS_TO_HF)),
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
    if self.compute_dtype is not None:
      dtype_from_name(self.compute_dtype)  # raises on an unknown name

  @property
  def layer_is_sliding(self) -> tuple[bool, ...]:
    """Per layer: does it use the sliding window."""
    if self.sliding_window is None:
      return (False,) * self.num_layers
    return self.sliding_layers or (True,) * self.num_layers

  # ----------------------------------------------------------------------------------- from HF
  @classmethod
  def from_hf(cls, hf_config: Any, **overrides) -> ModelConfig:
    """Builds a ModelConfig from a `transformers` config object (or its dict).

    Raises UnsupportedModelError naming the architecture or the field value it cannot honour.
    """
    get = (hf_config.get if isinstance(hf_config, dict)
           else lambda name, default=None: getattr(hf_config, name, default))
    model_type = get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise UnsupportedModelError(
          f"unsupported architecture: model_type={model_type!r} (architectures="
          f"{get('architectures')}); supported model types: {SUPPORTED_MODEL_TYPES}")
    fields = _gpt2_fields(get) if model_type == "gpt2" else _llama_fields(get, model_type)
    fields.update(
        model_type=model_type,
        vocab_size=int(get("vocab_size")),
        initializer_range=float(get("initializer_range", 0.02) or 0.02),
        pad_token_id=_ids(get("pad_token_id")),
        bos_token_id=_ids(get("bos_token_id")),
        eos_token_id=_ids(get("eos_token_id")),
        tie_embeddings=bool(get("tie_word_embeddings", model_type == "gpt2")),
    )
    fields.update(overrides)
    return cls(**fields)

  # ------------------------------------------------------------------------------------- to HF
  def to_hf(self, architecture: str = "ForCausalLM", **extra) -> Any:
    """The matching `transformers` config object; `architecture` suffix e.g. "ForCausalLM"."""
    import transformers  # deferred: only export needs it

    common = dict(
        vocab_size=self.vocab_size, pad_token_id=self.pad_token_id,
        bos_token_id=_jsonable(self.bos_token_id), eos_token_id=_jsonable(self.eos_token_id),
        tie_word_embeddings=self.tie_embeddings, initializer_range=self.initializer_range,
    )
    if self.model_type == "gpt2":
      self._require(self.norm == "layernorm" and self.positions == "learned" and self.mlp == "plain"
                    and self.qkv_bias and self.out_bias and self.mlp_bias
                    and self.num_kv_heads == self.num_heads
                    and self.head_dim * self.num_heads == self.hidden_size
                    and self.sliding_window is None, "gpt2")
      hf = transformers.GPT2Config(
          n_embd=self.hidden_size, n_layer=self.num_layers, n_head=self.num_heads,
          n_inner=self.intermediate_size, n_positions=self.max_position_embeddings,
          activation_function=_ACTIVATIONS_TO_HF[self.activation],
          layer_norm_epsilon=self.norm_eps, **common)
    else:
      self._require(self.norm == "rmsnorm" and self.positions == "rope" and self.mlp == "gated",
                    self.model_type)
      rope = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
      if self.rope_type in ("linear", "llama3"):
        rope["factor"] = self.rope_factor
      if self.rope_type == "llama3":
        rope.update(low_freq_factor=self.rope_low_freq_factor,
                    high_freq_factor=self.rope_high_freq_factor,
                    original_max_position_embeddings=self.rope_original_max_position_embeddings)
      kwargs = dict(
          hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
          num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
          num_key_value_heads=self.num_kv_heads, hidden_act=_ACTIVATIONS_TO_HF[self.activation],
          max_position_embeddings=self.max_position_embeddings, rms_norm_eps=self.norm_eps,
          rope_parameters=rope, **common)
      if self.model_type == "llama":
        self._require(self.qkv_bias == self.out_bias and self.sliding_window is None, "llama")
        hf = transformers.LlamaConfig(head_dim=self.head_dim, attention_bias=self.qkv_bias,
                                      mlp_bias=self.mlp_bias, **kwargs)
      elif self.model_type == "qwen2":
        self._require(self.qkv_bias and not self.out_bias and not self.mlp_bias
                      and self.head_dim * self.num_heads == self.hidden_size, "qwen2")
        layer_types = ["sliding_attention" if s else "full_attention"
                       for s in self.layer_is_sliding]
        hf = transformers.Qwen2Config(
            use_sliding_window=self.sliding_window is not None,
            sliding_window=self.sliding_window, layer_types=layer_types, **kwargs)
      else:
        self._require(not (self.qkv_bias or self.out_bias or self.mlp_bias)
                      and all(self.layer_is_sliding) == (self.sliding_window is not None),
                      "mistral")
        hf = transformers.MistralConfig(head_dim=self.head_dim, sliding_window=self.sliding_window,
                                        **kwargs)
    prefix = {"gpt2": "GPT2", "llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}
    name = prefix[self.model_type] + architecture
    hf.architectures = ["GPT2LMHeadModel" if name == "GPT2ForCausalLM" else name]
    for name, value in extra.items():
      setattr(hf, name, value)
    return hf

  def _require(self, ok: bool, family: str) -> None:
    if not ok:
      raise UnsupportedModelError(
          f"this ModelConfig cannot be expressed as a transformers {family!r} config: {self}")


def _jsonable(value):
  return list(value) if isinstance(value, tuple) else value


def dtype_from_name(name: str) -> np.dtype:
  """A dtype from its name ("bfloat16", "float32", ... or the short "bf16", "fp16", "f32")."""
  return jnp.dtype({"bf16": "bfloat16", "fp16": "float16", "f32": "float32"}.get(name, name))


def _activation(get, field: str) -> str:
  name = get(field)
  if name not in _ACTIVATIONS:
    raise UnsupportedModelError(
        f"unsupported activation {field}={name!r}; supported: {sorted(_ACTIVATIONS)}")
  return _ACTIVATIONS[name]


def _gpt2_fields(get) -> dict:
  for field, expected in (("scale_attn_by_inverse_layer_idx", False),
                          ("add_cross_attention", False), ("scale_attn_weights", True)):
    if bool(get(field, expected)) != expected:
      raise UnsupportedModelError(f"unsupported GPT-2 field {field}={get(field)!r}")
  hidden, heads = int(get("n_embd")), int(get("n_head"))
  return dict(
      hidden_size=hidden, num_layers=int(get("n_layer")), num_heads=heads, num_kv_heads=heads,
      head_dim=hidden // heads, intermediate_size=int(get("n_inner") or 4 * hidden),
      norm="layernorm", norm_eps=float(get("layer_norm_epsilon", 1e-5)), positions="learned",
      max_position_embeddings=int(get("n_positions")), mlp="plain",
      activation=_activation(get, "activation_function"),
      qkv_bias=True, out_bias=True, mlp_bias=True)


def _rope_fields(get) -> dict:
  params = get("rope_parameters")
  if params is None:  # transformers 4.x: rope_theta + rope_scaling
    params = dict(get("rope_scaling") or {})
    params.setdefault("rope_theta", get("rope_theta", 10000.0))
  params = dict(params)
  if params and all(isinstance(v, dict) for v in params.values()):
    raise UnsupportedModelError(f"per-layer-type rope_parameters are not supported: {params}")
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type not in _ROPE_TYPES:
    raise UnsupportedModelError(
        f"unsupported rope type rope_parameters['rope_type']={rope_type!r}; "
        f"supported: {_ROPE_TYPES}")
  if float(params.get("partial_rotary_factor", get("partial_rotary_factor", 1.0)) or 1.0) != 1.0:
    raise UnsupportedModelError("unsupported partial_rotary_factor != 1")
  fields = dict(rope_type=rope_type, rope_theta=float(params.get("rope_theta", 10000.0)))
  if rope_type in ("linear", "llama3"):
    fields["rope_factor"] = float(params["factor"])
  if rope_type == "llama3":
    fields.update(
        rope_low_freq_factor=float(params["low_freq_factor"]),
        rope_high_freq_factor=float(params["high_freq_factor"]),
        rope_original_max_position_embeddings=int(
            params.get("original_max_position_embeddings") or get("max_position_embeddings")))
  return fields


def _llama_fields(get, model_type: str) -> dict:
  hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
  attention_bias = bool(get("attention_bias", False))
  qkv_bias = True if model_type == "qwen2" else attention_bias
  out_bias = attention_bias if model_type == "llama" else False
  window = get("sliding_window") if model_type in ("mistral", "qwen2") else None
  if model_type == "qwen2" and not get("use_sliding_window", False):
    window = None
  sliding_layers = None
  layer_types = get("layer_types")
  if layer_types is not None:
    unknown = set(layer_types) - {"full_attention", "sliding_attention"}
    if unknown:
      raise UnsupportedModelError(f"unsupported layer_types values {sorted(unknown)}")
    sliding = tuple(t == "sliding_attention" for t in layer_types)
    if window is None or not any(sliding):
      window = None
    elif not all(sliding):
      sliding_layers = sliding
  return dict(
      hidden_size=hidden, num_layers=int(get("num_hidden_layers")), num_heads=heads,
      num_kv_heads=int(get("num_key_value_heads") or heads),
      head_dim=int(get("head_dim") or hidden // heads),
      intermediate_size=int(get("intermediate_size")), norm="rmsnorm",
      norm_eps=float(get("rms_norm_eps", 1e-6)), positions="rope",
      max_position_embeddings=int(get("max_position_embeddings", 2048)),
      mlp="gated", activation=_activation(get, "hidden_act"), qkv_bias=qkv_bias,
      out_bias=out_bias, mlp_bias=bool(get("mlp_bias", False)),
      sliding_window=None if window is None else int(window), sliding_layers=sliding_layers,
      **_rope_fields(get))


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
  """Inverse frequencies [H/2] (float32) of the rotary embedding, after any scaling.

  default: θ^(-2i/H) (Su et al., 2021, arXiv:2104.09864); linear: divided by `factor`
  (position interpolation, Chen et al., 2023, arXiv:2306.15595); llama3: long wavelengths divided
  by `factor`, short ones kept, a smooth blend between (Llama 3.1, Dubey et al., 2024,
  arXiv:2407.21783).
  """
  dim = config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
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
