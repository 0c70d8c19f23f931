"""`transformers` configs <-> `ModelConfig`: what `ModelConfig.from_hf` and `.to_hf` run.

Reading (`fields_from_hf`): GPT-2's fields, then the Llama layout every RoPE family shares
(sizes, RMSNorm, gated MLP, biases, sliding window with `layer_types`, RoPE with 5.x
`rope_parameters` or 4.x `rope_theta` + `rope_scaling`), then what sets each family apart
(Qwen3 and Gemma 3 per-head q/k norms, Gemma's sandwich norms with (1 + w) weights, sqrt(D)
embedding scale, query scalar and soft-caps, Gemma 3's per-layer-type RoPE, OLMo 2's post-norms
and full-width q/k norms, Phi-3's longrope). Every value the decoder cannot honour raises
UnsupportedModelError naming the field. Writing (`to_hf_config`) checks that the config is
expressible as its family's transformers config, then builds that config.
"""

from __future__ import annotations

import math
from typing import Any

from rlhf_jax.models.config import (ROPE_TYPES, SUPPORTED_MODEL_TYPES, ModelConfig,
                                    UnsupportedModelError, ids_tuple)

__all__ = ["fields_from_hf", "to_hf_config", "HF_CLASS_PREFIX"]

# The transformers class-name prefix of each family.
HF_CLASS_PREFIX = {"gpt2": "GPT2", "llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral",
                   "qwen3": "Qwen3", "gemma2": "Gemma2", "gemma3_text": "Gemma3", "phi3": "Phi3",
                   "olmo2": "Olmo2"}
_GEMMA = ("gemma2", "gemma3_text")
# HF activation names -> ours. gelu_new / gelu_pytorch_tanh are the tanh approximation.
_ACTIVATIONS = {
    "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
    "gelu": "gelu", "silu": "silu", "swish": "silu", "relu": "relu",
}
_ACTIVATIONS_TO_HF = {"gelu_tanh": "gelu_new", "gelu": "gelu", "silu": "silu", "relu": "relu"}


def fields_from_hf(hf_config: Any) -> dict:
  """ModelConfig fields from a `transformers` config object (or its dict)."""
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
      pad_token_id=ids_tuple(get("pad_token_id")),
      bos_token_id=ids_tuple(get("bos_token_id")),
      eos_token_id=ids_tuple(get("eos_token_id")),
      tie_embeddings=bool(get("tie_word_embeddings", model_type == "gpt2")),
  )
  return fields


def to_hf_config(config: ModelConfig, architecture: str = "ForCausalLM", **extra) -> Any:
  """The matching `transformers` config object; `architecture` suffix e.g. "ForCausalLM"."""
  import transformers  # deferred: only export needs it

  common = dict(
      vocab_size=config.vocab_size, pad_token_id=config.pad_token_id,
      bos_token_id=_jsonable(config.bos_token_id), eos_token_id=_jsonable(config.eos_token_id),
      tie_word_embeddings=config.tie_embeddings, initializer_range=config.initializer_range,
  )
  if config.model_type == "gpt2":
    gpt2_layout = (config.norm == "layernorm" and config.positions == "learned"
                   and config.mlp == "plain" and config.qkv_bias and config.out_bias
                   and config.mlp_bias and config.num_kv_heads == config.num_heads
                   and config.head_dim * config.num_heads == config.hidden_size
                   and config.sliding_window is None and _plain_blocks(config))
    _require(config, gpt2_layout, "gpt2")
    hf = transformers.GPT2Config(
        n_embd=config.hidden_size, n_layer=config.num_layers, n_head=config.num_heads,
        n_inner=config.intermediate_size, n_positions=config.max_position_embeddings,
        activation_function=_ACTIVATIONS_TO_HF[config.activation],
        layer_norm_epsilon=config.norm_eps, **common)
  else:
    hf = _rope_family_to_hf(config, common)
  prefix = HF_CLASS_PREFIX[config.model_type]
  if config.model_type == "gemma3_text" and architecture != "ForCausalLM":
    prefix = "Gemma3Text"  # Gemma3TextForSequenceClassification; Gemma3ForCausalLM
  name = prefix + architecture
  hf.architectures = ["GPT2LMHeadModel" if name == "GPT2ForCausalLM" else name]
  for name, value in extra.items():
    setattr(hf, name, value)
  return hf


def _plain_blocks(config: ModelConfig) -> bool:
  """None of the Qwen3 / Gemma / OLMo 2 extras: GPT-2's and Llama's block."""
  return (config.norm_placement == "pre" and config.qk_norm == "none"
          and config.embed_scale == 1.0 and config.norm_weight_offset == 0.0
          and config.query_pre_attn_scalar is None and config.attn_logit_softcap is None
          and config.final_logit_softcap is None and config.rope_local_theta is None)


def _layout_matches_family(config: ModelConfig) -> bool:
  """Norms, q/k norms, scales and caps as the config's RoPE family has them in transformers."""
  family = config.model_type
  gemma = family in _GEMMA
  wanted = dict(
      norm="rmsnorm", positions="rope", mlp="gated",
      norm_placement={"gemma2": "pre_post", "gemma3_text": "pre_post",
                      "olmo2": "post"}.get(family, "pre"),
      qk_norm={"qwen3": "head", "gemma3_text": "head", "olmo2": "full"}.get(family, "none"),
      norm_weight_offset=1.0 if gemma else 0.0,
      embed_scale=float(config.hidden_size) ** 0.5 if gemma else 1.0)
  if not gemma:
    wanted.update(query_pre_attn_scalar=None, attn_logit_softcap=None, final_logit_softcap=None)
  if family == "gemma3_text":  # transformers' Gemma 3 attention has no soft-cap
    wanted.update(attn_logit_softcap=None)
  return (all(getattr(config, name) == value for name, value in wanted.items())
          and (config.rope_local_theta is not None) == (family == "gemma3_text"))


def _rope_family_to_hf(config: ModelConfig, common: dict) -> Any:
  """The transformers config of every RoPE family (all but GPT-2)."""
  import transformers

  family = config.model_type
  gemma = family in _GEMMA
  _require(config, _layout_matches_family(config), family)
  rope = {"rope_type": config.rope_type, "rope_theta": config.rope_theta}
  if config.rope_type in ("linear", "llama3"):
    rope["factor"] = config.rope_factor
  if config.rope_type == "llama3":
    rope.update(low_freq_factor=config.rope_low_freq_factor,
                high_freq_factor=config.rope_high_freq_factor,
                original_max_position_embeddings=config.rope_original_max_position_embeddings)
  if config.rope_type == "longrope":
    _require(config, family == "phi3", family)
    rope.update(short_factor=list(config.rope_short_factor),
                long_factor=list(config.rope_long_factor), factor=config.rope_factor,
                attention_factor=config.rope_attention_factor,
                original_max_position_embeddings=config.rope_original_max_position_embeddings)
  if family == "gemma3_text":
    rope = {"full_attention": rope, "sliding_attention": {"rope_type": "default",
                                                           "rope_theta": config.rope_local_theta}}
  layer_types = ["sliding_attention" if s else "full_attention" for s in config.layer_is_sliding]
  kwargs = dict(
      hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
      num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
      num_key_value_heads=config.num_kv_heads,
      max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.norm_eps,
      rope_parameters=rope, **common)
  act = _ACTIVATIONS_TO_HF[config.activation]
  if gemma:
    kwargs["hidden_activation"] = "gelu_pytorch_tanh" if config.activation == "gelu_tanh" else act
  else:
    kwargs["hidden_act"] = act
  shared_bias = config.qkv_bias == config.out_bias and not config.mlp_bias
  whole_width = config.head_dim * config.num_heads == config.hidden_size  # no head_dim field
  if family == "llama":
    _require(config, config.qkv_bias == config.out_bias and config.sliding_window is None, family)
    return transformers.LlamaConfig(head_dim=config.head_dim, attention_bias=config.qkv_bias,
                                    mlp_bias=config.mlp_bias, **kwargs)
  if family == "qwen2":
    _require(config, config.qkv_bias and not config.out_bias and not config.mlp_bias
             and whole_width, family)
    return transformers.Qwen2Config(use_sliding_window=config.sliding_window is not None,
                                    sliding_window=config.sliding_window,
                                    layer_types=layer_types, **kwargs)
  if family == "qwen3":
    _require(config, shared_bias, family)
    return transformers.Qwen3Config(
        head_dim=config.head_dim, attention_bias=config.qkv_bias,
        use_sliding_window=config.sliding_window is not None,
        sliding_window=config.sliding_window, layer_types=layer_types, **kwargs)
  if family in _GEMMA:
    _require(config, shared_bias and config.sliding_window is not None, family)
    config_class = (transformers.Gemma2Config if family == "gemma2"
                    else transformers.Gemma3TextConfig)
    scalar = config.query_pre_attn_scalar
    return config_class(
        head_dim=config.head_dim, attention_bias=config.qkv_bias,
        query_pre_attn_scalar=config.head_dim if scalar is None else _integral(scalar),
        sliding_window=config.sliding_window, layer_types=layer_types,
        final_logit_softcapping=config.final_logit_softcap,
        attn_logit_softcapping=config.attn_logit_softcap, **kwargs)
  if family == "olmo2":
    _require(config, shared_bias and whole_width and config.sliding_window is None, family)
    return transformers.Olmo2Config(attention_bias=config.qkv_bias, **kwargs)
  no_bias = not (config.qkv_bias or config.out_bias or config.mlp_bias)
  all_or_none = all(config.layer_is_sliding) == (config.sliding_window is not None)
  if family == "phi3":
    _require(config, no_bias and whole_width and all_or_none, family)
    if config.rope_type == "longrope":
      kwargs["original_max_position_embeddings"] = config.rope_original_max_position_embeddings
    return transformers.Phi3Config(sliding_window=config.sliding_window, **kwargs)
  _require(config, no_bias and all_or_none, "mistral")
  return transformers.MistralConfig(head_dim=config.head_dim, sliding_window=config.sliding_window,
                                    **kwargs)


def _require(config: ModelConfig, ok: bool, family: str) -> None:
  if not ok:
    raise UnsupportedModelError(
        f"this ModelConfig cannot be expressed as a transformers {family!r} config: {config}")


def _integral(value: float) -> int | float:
  return int(value) if float(value).is_integer() else value


def _jsonable(value):
  return list(value) if isinstance(value, tuple) else value


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


def _rope_params(get, model_type: str) -> tuple[dict, dict | None]:
  """(the global RoPE parameters, the sliding-window layers' own or None), as plain dicts."""
  params = get("rope_parameters")
  if params is None:  # transformers 4.x: rope_theta + rope_scaling (+ Gemma 3's local base)
    default_theta = 1_000_000.0 if model_type == "gemma3_text" else 10000.0
    params = dict(get("rope_scaling") or {})
    params.setdefault("rope_theta", get("rope_theta", default_theta))
    if model_type == "gemma3_text":
      params = {"full_attention": params, "sliding_attention": {
          "rope_type": "default", "rope_theta": get("rope_local_base_freq", 10000.0)}}
  params = dict(params)
  per_type = bool(params) and all(isinstance(v, dict) for v in params.values())
  if model_type != "gemma3_text":
    if per_type:
      raise UnsupportedModelError(f"per-layer-type rope_parameters are not supported for "
                                  f"model_type={model_type!r}: {params}")
    return params, None
  if not per_type or set(params) - {"full_attention", "sliding_attention"}:
    raise UnsupportedModelError(
        "gemma3_text rope_parameters must be {'full_attention': {...}, 'sliding_attention': "
        f"{{...}}}}, got {params}")
  local = dict(params.get("sliding_attention") or {"rope_type": "default", "rope_theta": 10000.0})
  local_type = local.get("rope_type", local.get("type", "default"))
  if local_type != "default":
    raise UnsupportedModelError(
        f"unsupported rope type rope_parameters['sliding_attention']['rope_type']={local_type!r}"
        " (local layers support only 'default')")
  return dict(params.get("full_attention") or {"rope_type": "default"}), local


def _rope_fields(get, model_type: str) -> dict:
  params, local = _rope_params(get, model_type)
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type not in ROPE_TYPES:
    raise UnsupportedModelError(
        f"unsupported rope type rope_parameters['rope_type']={rope_type!r}; "
        f"supported: {ROPE_TYPES}")
  partial = params.get("partial_rotary_factor", get("partial_rotary_factor", 1.0))
  if float(partial if partial is not None else 1.0) != 1.0:
    raise UnsupportedModelError(
        f"unsupported partial_rotary_factor={partial!r} (only 1.0: RoPE on the whole head)")
  default_theta = 1_000_000.0 if model_type == "gemma3_text" else 10000.0
  fields = dict(rope_type=rope_type, rope_theta=float(params.get("rope_theta", default_theta)))
  if local is not None:
    fields["rope_local_theta"] = float(local.get("rope_theta", 10000.0))
  if rope_type in ("linear", "llama3"):
    fields["rope_factor"] = float(params["factor"])
  if rope_type == "llama3":
    fields.update(
        rope_low_freq_factor=float(params["low_freq_factor"]),
        rope_high_freq_factor=float(params["high_freq_factor"]),
        rope_original_max_position_embeddings=int(
            params.get("original_max_position_embeddings") or get("max_position_embeddings")))
  if rope_type == "longrope":
    fields.update(_longrope_fields(get, params))
  return fields


def _longrope_fields(get, params: dict) -> dict:
  """Phi-3's longrope (LongRoPE, Ding et al., 2024, arXiv:2402.13753) as transformers does it:
  factor defaults to max_position_embeddings / original; the attention factor to
  sqrt(1 + ln(factor) / ln(original)) (1 when factor <= 1)."""
  original = params.get("original_max_position_embeddings",
                        get("original_max_position_embeddings"))
  if original is None:
    raise UnsupportedModelError("longrope without original_max_position_embeddings")
  original = int(original)
  factor = params.get("factor")
  factor = float(get("max_position_embeddings")) / original if factor is None else float(factor)
  attention = params.get("attention_factor")
  if attention is None:
    attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
  return dict(rope_factor=factor, rope_attention_factor=float(attention),
              rope_original_max_position_embeddings=original,
              rope_short_factor=tuple(params["short_factor"]),
              rope_long_factor=tuple(params["long_factor"]))


# Families whose attention projections all share one `attention_bias` flag (q, k, v and o).
_SHARED_ATTENTION_BIAS = ("llama", "qwen3", "gemma2", "gemma3_text", "olmo2")
_WINDOWED = ("mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")


def _llama_fields(get, model_type: str) -> dict:
  hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
  attention_bias = bool(get("attention_bias", False))
  qkv_bias = True if model_type == "qwen2" else attention_bias
  out_bias = attention_bias if model_type in _SHARED_ATTENTION_BIAS else False
  window = get("sliding_window") if model_type in _WINDOWED else None
  if model_type in ("qwen2", "qwen3") and not get("use_sliding_window", False):
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
  activation_field = "hidden_activation" if model_type in _GEMMA else "hidden_act"
  fields = dict(
      hidden_size=hidden, num_layers=int(get("num_hidden_layers")), num_heads=heads,
      num_kv_heads=int(get("num_key_value_heads") or heads),
      head_dim=int(get("head_dim") or hidden // heads),
      intermediate_size=int(get("intermediate_size")), norm="rmsnorm",
      norm_eps=float(get("rms_norm_eps", 1e-6)), positions="rope",
      max_position_embeddings=int(get("max_position_embeddings", 2048)),
      mlp="gated", activation=_activation(get, activation_field), qkv_bias=qkv_bias,
      out_bias=out_bias, mlp_bias=bool(get("mlp_bias", False)),
      sliding_window=None if window is None else int(window), sliding_layers=sliding_layers,
      **_rope_fields(get, model_type))
  fields.update(_family_fields(get, model_type, hidden))
  return fields


def _family_fields(get, model_type: str, hidden: int) -> dict:
  """The fields that set Qwen3, Gemma 2/3 and OLMo 2 apart from the Llama layout."""
  if model_type == "qwen3":
    return dict(qk_norm="head")
  if model_type == "olmo2":
    return dict(norm_placement="post", qk_norm="full")
  if model_type not in _GEMMA:
    return {}
  if get("use_bidirectional_attention", False):
    raise UnsupportedModelError(
        f"unsupported use_bidirectional_attention={get('use_bidirectional_attention')!r} "
        "(this decoder is causal)")
  attn_cap = get("attn_logit_softcapping")
  if model_type == "gemma3_text" and attn_cap is not None:
    raise UnsupportedModelError(
        f"unsupported attn_logit_softcapping={attn_cap!r} for gemma3_text: transformers' Gemma 3 "
        "attention ignores it, so the checkpoint's intended behaviour is ambiguous")
  final_cap = get("final_logit_softcapping")
  return dict(
      norm_placement="pre_post", norm_weight_offset=1.0, embed_scale=float(hidden) ** 0.5,
      qk_norm="head" if model_type == "gemma3_text" else "none",
      query_pre_attn_scalar=float(get("query_pre_attn_scalar", 256)),
      attn_logit_softcap=None if attn_cap is None else float(attn_cap),
      final_logit_softcap=None if final_cap is None else float(final_cap))


