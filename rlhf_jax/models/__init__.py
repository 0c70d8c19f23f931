"""Flax causal LMs (GPT-2, the Llama family, Qwen3, Gemma 2/3, Phi-3, OLMo 2), reward/value
heads, HF import/export, KV cache.

config.py (ModelConfig), hf_config.py (transformers configs <-> ModelConfig), layers.py +
transformer.py (the decoder, CausalLM, KVCache), lora.py (LoRA / QLoRA), hf_io.py (safetensors
<-> params), heads.py (reward model, value head), partitioning.py (sharding specs).
"""

from rlhf_jax.models import lora
from rlhf_jax.models.config import ModelConfig, UnsupportedModelError
from rlhf_jax.models.heads import (RewardModel, apply_value_head, from_pretrained_reward_model,
                                   init_value_head, last_token_index, save_pretrained_reward_model)
from rlhf_jax.models.hf_io import CheckpointError, from_pretrained, save_pretrained
from rlhf_jax.models.lora import LoraConfig
from rlhf_jax.models.partitioning import param_partition_specs
from rlhf_jax.models.transformer import CausalLM, KVCache, ModelOutput, TokenScores

__all__ = [
    "ModelConfig", "UnsupportedModelError", "CheckpointError", "CausalLM", "KVCache",
    "ModelOutput", "TokenScores", "from_pretrained", "save_pretrained", "RewardModel",
    "from_pretrained_reward_model", "save_pretrained_reward_model", "last_token_index",
    "init_value_head", "apply_value_head", "param_partition_specs", "lora", "LoraConfig",
]
