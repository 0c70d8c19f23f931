"""Scalar heads on the decoder: reward models (HF *ForSequenceClassification) and value heads.

Shape letters: B batch, T tokens, D model width, H outputs (labels / heads).

Where the score is read. We read the reward at the mask's last 1 (`last_token_index`), which is
right for left padding, right padding and pad == eos alike. transformers (5.x) reads at "the
rightmost token != pad_token_id": the same on any batch whose pad id never occurs among real
tokens, but one token early when pad == eos and the sequence ends in eos, and it needs
`pad_token_id` set for batches of more than one row. Older transformers (< 4.45) read at the
first pad token minus one, which is wrong for left padding.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models import hf_io, lora
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import CausalLM

__all__ = ["last_token_index", "RewardModel", "from_pretrained_reward_model",
           "save_pretrained_reward_model", "init_value_head", "apply_value_head"]


def last_token_index(attention_mask_BT: jax.Array) -> jax.Array:
  """[B] int32: the last position whose mask is 1 (0 for an all-padding row).

  Reads the mask, never token ids, so it is right for left and right padding and pad == eos.
  """
  chex.assert_rank(attention_mask_BT, 2)
  positions_T = jnp.arange(attention_mask_BT.shape[1], dtype=jnp.int32)
  return jnp.max(jnp.where(attention_mask_BT > 0, positions_T[None], 0), axis=-1)


def init_value_head(key: jax.Array, hidden_size: int, num_outputs: int = 1,
                    dtype=jnp.float32) -> dict:
  """{"kernel": [D, H] ~ normal(1/sqrt(D)), "bias": [H] zeros}."""
  kernel = jax.random.normal(key, (hidden_size, num_outputs), jnp.float32) / np.sqrt(hidden_size)
  return {"kernel": kernel.astype(dtype), "bias": jnp.zeros((num_outputs,), dtype)}


def apply_value_head(head_params: dict, hidden_BTD: jax.Array) -> jax.Array:
  """hidden·kernel (+ bias) in float32: [B, T] when the head has one output, else [B, T, H]."""
  chex.assert_rank(hidden_BTD, 3)
  kernel_DH = head_params["kernel"].astype(jnp.float32)
  values_BTH = jnp.einsum("btd,dh->bth", hidden_BTD.astype(jnp.float32), kernel_DH)
  if "bias" in head_params:
    values_BTH = values_BTH + head_params["bias"].astype(jnp.float32)[None, None]
  return values_BTH[..., 0] if kernel_DH.shape[1] == 1 else values_BTH


@dataclasses.dataclass(frozen=True)
class RewardModel:
  """Decoder backbone (no lm_head) + linear score head [D, H] without bias. Hashable.

  params = {"backbone": <CausalLM params without lm_head>, "score": {"kernel": [D, H]}}.
  """

  config: ModelConfig
  num_labels: int = 1
  lora: Any = None  # LoRA on the backbone: params["backbone"] is a lora.Adapted

  @property
  def backbone(self) -> CausalLM:
    return CausalLM(self.config, self.lora)

  def init(self, key: jax.Array, dtype=jnp.float32) -> dict:
    backbone_key, score_key = jax.random.split(key)
    backbone = dict(self.backbone.init(backbone_key, dtype))
    backbone.pop("lm_head", None)
    return {"backbone": backbone, "score": self._init_score(score_key, dtype)}

  def _init_score(self, key, dtype) -> dict:
    shape = (self.config.hidden_size, self.num_labels)
    kernel = self.config.initializer_range * jax.random.normal(key, shape, jnp.float32)
    return {"kernel": kernel.astype(dtype)}

  def apply_all(self, params, input_ids_BT, attention_mask_BT, *, segment_ids=None,
                branch_ids=None) -> jax.Array:
    """[B, T, H] float32 scores at every position (a per-token value head / critic); packed
    rows take segment_ids and branch_ids as `CausalLM.apply` does."""
    hidden_BTD = self.backbone.apply(params["backbone"], input_ids_BT, attention_mask_BT,
                                     compute_logits=False, segment_ids=segment_ids,
                                     branch_ids=branch_ids).hidden
    return jnp.einsum("btd,dh->bth", hidden_BTD.astype(jnp.float32),
                      params["score"]["kernel"].astype(jnp.float32))

  def apply(self, params, input_ids_BT, attention_mask_BT, *, segment_ids=None, branch_ids=None,
            sequence_ends=None) -> jax.Array:
    """[B, H] float32 scores read at each row's last real token (`last_token_index`).

    Packed rows (`rlhf_jax.data.packing`; segment_ids, branch_ids as in `CausalLM.apply`):
    [N, H] scores read at sequence_ends [N], each sequence's last slot (row · T + column), the
    score of [prefix | continuation] alone.
    """
    chex.assert_equal_shape([input_ids_BT, attention_mask_BT])
    hidden_BTD = self.backbone.apply(params["backbone"], input_ids_BT, attention_mask_BT,
                                     compute_logits=False, segment_ids=segment_ids,
                                     branch_ids=branch_ids).hidden
    if sequence_ends is not None:
      hidden_ND = hidden_BTD.reshape(-1, hidden_BTD.shape[-1])[sequence_ends]
      return hidden_ND.astype(jnp.float32) @ params["score"]["kernel"].astype(jnp.float32)
    last_B = last_token_index(attention_mask_BT)
    hidden_BD = jnp.take_along_axis(hidden_BTD, last_B[:, None, None], axis=1)[:, 0]
    return hidden_BD.astype(jnp.float32) @ params["score"]["kernel"].astype(jnp.float32)

  @classmethod
  def from_causal_lm(cls, model: CausalLM, params: dict, key: jax.Array,
                     num_labels: int = 1) -> tuple[RewardModel, dict]:
    """A reward model on a causal LM's backbone (its lm_head dropped), with a fresh score head."""
    rm = cls(model.config, num_labels)
    backbone = {k: v for k, v in params.items() if k != "lm_head"}
    dtype = params["embed"]["embedding"].dtype
    return rm, {"backbone": backbone, "score": rm._init_score(key, dtype)}


def from_pretrained_reward_model(path_or_repo_id: str, dtype=jnp.float32, num_labels=None, *,
                                 revision: str | None = None, mesh=None, shardings=None,
                                 **config_overrides):
  """(RewardModel, params) from an HF *ForSequenceClassification checkpoint (local or hub).

  num_labels: None reads the config's (id2label); an int must match the checkpoint's score.
  mesh, shardings: as in `from_pretrained` (streamed into the shards of the mesh).
  """
  directory = hf_io.resolve_checkpoint_dir(path_or_repo_id, revision)
  hf_config = hf_io.load_hf_config(directory)
  config = ModelConfig.from_hf(hf_config, **config_overrides)
  rm = RewardModel(config, int(num_labels or hf_config.num_labels))
  tensors = hf_io.open_checkpoint(directory)
  if "score.weight" not in tensors.keys() and "lm_head.weight" in tensors.keys():
    raise hf_io.CheckpointError(
        f"{path_or_repo_id!r} is a causal-LM checkpoint (lm_head.weight, no score.weight): load it "
        "with from_pretrained and make a reward model with RewardModel.from_causal_lm")
  shapes = jax.eval_shape(lambda k: rm.init(k, dtype), jax.random.key(0))
  flat_shapes = {**shapes["backbone"], "score": shapes["score"]}
  shardings = hf_io.mesh_shardings(shapes, config, mesh, shardings)
  if shardings is not None:
    shardings = {**shardings["backbone"], "score": shardings["score"]}
  params = hf_io.params_from_hf_tensors(
      hf_io.tensor_map(config, head="score"), tensors, flat_shapes, config.num_layers,
      base_prefix=hf_io.base_prefix(config), dtype=dtype, shardings=shardings)
  score = params.pop("score")
  return rm, {"backbone": params, "score": score}


def save_pretrained_reward_model(rm: RewardModel, params: dict, out_dir: str, *, dtype=None,
                                 max_shard_size=hf_io.safetensors_io.DEFAULT_MAX_SHARD_BYTES
                                 ) -> None:
  """config.json + safetensors loadable by AutoModelForSequenceClassification, streamed tensor
  by tensor as in `save_pretrained` (every process calls it; process 0 writes).

  The config's pad_token_id is what transformers reads the score at (see the module docstring);
  set it (e.g. to the tokenizer's pad id) before scoring batches of more than one row there.
  """
  config = rm.config
  write = jax.process_index() == 0
  if isinstance(params["backbone"], lora.Adapted):  # LoRA: adapters folded into the kernels
    params = {**params, "backbone": lora.merged_params(rm.backbone, params["backbone"])}
  if write:
    hf_config = config.to_hf("ForSequenceClassification", num_labels=rm.num_labels)
    hf_config.dtype = hf_io.dtype_string(params, dtype)
    hf_config.save_pretrained(out_dir)
  flat = {**params["backbone"], "score": params["score"]}
  flat.pop("lm_head", None)
  entries = hf_io.hf_entries(hf_io.tensor_map(config, head="score"), flat, config.num_layers,
                             dtype)
  hf_io.safetensors_io.write_checkpoint(
      entries, out_dir, max_shard_bytes=hf_io.safetensors_io.parse_size(max_shard_size),
      write=write)
