"""Reward models vs transformers' *ForSequenceClassification, last-token reads, value heads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from hf_reference import PAD_ID, make_hf_model, padded_batch
from rlhf_jax.models import (CausalLM, ModelConfig, RewardModel, apply_value_head,
                             from_pretrained_reward_model, init_value_head, last_token_index,
                             save_pretrained_reward_model)
from rlhf_jax.models.hf_io import CheckpointError

_scores = jax.jit(lambda rm, params, ids, mask: rm.apply(params, ids, mask), static_argnums=0)
_scores_all = jax.jit(lambda rm, params, ids, mask: rm.apply_all(params, ids, mask),
                      static_argnums=0)


def _torch_scores(model, ids, mask):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids, dtype=torch.long),
                 attention_mask=torch.tensor(mask, dtype=torch.long)).logits.float().numpy()


# Llama: llama3 rope, untied; GPT-2: fused c_attn, learned positions; Qwen2: GQA + q/k/v biases;
# Mistral: sliding window 4 (< the 9-token batches); Qwen3, Gemma 2, Gemma 3 (text), Phi-3 and
# OLMo 2 with their own norms, soft-caps, fused tensors. See hf_reference.hf_config.
NEW_FAMILIES = ("qwen3", "gemma2", "gemma3_text", "phi3", "olmo2")
RM_KEYS = (("llama", 1), ("llama", 2), ("gpt2", 1), ("qwen2", 1), ("mistral", 1),
           *((family, 1) for family in NEW_FAMILIES))


@pytest.fixture(scope="module")
def reward_models(tmp_path_factory):
  """(family, num_labels) -> (torch *ForSequenceClassification, checkpoint dir)."""
  out = {}
  for family, labels in RM_KEYS:
    directory = tmp_path_factory.mktemp(f"rm_{family}_{labels}")
    out[family, labels] = (make_hf_model(family, directory, head="score", num_labels=labels),
                           directory)
  return out


@pytest.mark.parametrize("key", RM_KEYS, ids=lambda key: f"{key[0]}-{key[1]}")
def test_reward_model_import_matches_transformers(reward_models, key):
  """Right-padded batch, pad id never a real token: HF's "last non-pad" == our mask's last 1."""
  torch_model, directory = reward_models[key]
  rm, params = from_pretrained_reward_model(str(directory))
  assert rm.num_labels == key[1]
  ids, mask = padded_batch(0, lengths=(9, 4, 1), total=9, side="right")
  ours = np.asarray(_scores(rm, params, ids, mask))
  assert ours.shape == (3, key[1])
  np.testing.assert_allclose(ours, _torch_scores(torch_model, ids, mask), atol=1e-4)


@pytest.mark.parametrize("family,labels", [("llama", 2), ("llama", 1), ("gpt2", 2), ("gpt2", 1),
                                           ("qwen2", 1), ("mistral", 2),
                                           *((family, 2) for family in NEW_FAMILIES)])
def test_reward_model_export_loads_in_transformers(tmp_path, family, labels, reward_models):
  """Our RM (fresh score head on a causal LM) -> save -> AutoModelForSequenceClassification."""
  torch_model, directory = reward_models[family, 1]
  rm, params = from_pretrained_reward_model(str(directory))
  model = CausalLM(rm.config)
  lm_params = dict(params["backbone"])
  if not rm.config.tie_embeddings:
    lm_params["lm_head"] = {"kernel": jnp.ones((rm.config.hidden_size, rm.config.vocab_size))}
  rm2, params2 = RewardModel.from_causal_lm(model, lm_params, jax.random.key(3),
                                            num_labels=labels)
  assert "lm_head" not in params2["backbone"] and params2["score"]["kernel"].shape == (32, labels)
  save_pretrained_reward_model(rm2, params2, str(tmp_path))
  hf = transformers.AutoModelForSequenceClassification.from_pretrained(
      str(tmp_path), attn_implementation="eager").eval()
  assert type(hf).__name__.endswith("ForSequenceClassification")
  assert hf.config.num_labels == labels and hf.config.model_type == family
  ids, mask = padded_batch(1, lengths=(9, 4, 1), total=9, side="right")
  ours = np.asarray(_scores(rm2, params2, ids, mask))
  assert ours.shape == (3, labels)
  np.testing.assert_allclose(ours, _torch_scores(hf, ids, mask), atol=1e-4)
  rm3, params3 = from_pretrained_reward_model(str(tmp_path))
  assert rm3 == rm2
  jax.tree_util.tree_map(np.testing.assert_array_equal, params3, params2)


def test_causal_lm_checkpoint_as_reward_model_gets_a_hint(hf_lm_dirs):
  with pytest.raises(CheckpointError, match="RewardModel.from_causal_lm"):
    from_pretrained_reward_model(str(hf_lm_dirs["llama"][1]))


@pytest.mark.parametrize("side", ["left", "right"])
def test_scores_are_batch_size_invariant(reward_models, side):
  """A row scored alone (no padding) equals the same row inside a padded batch."""
  _, directory = reward_models["llama", 2]
  rm, params = from_pretrained_reward_model(str(directory))
  ids, mask = padded_batch(2, lengths=(9, 5, 2), total=9, side=side)
  batch_scores = np.asarray(_scores(rm, params, ids, mask))
  for row in range(3):
    real = mask[row].astype(bool)
    alone = _scores(rm, params, ids[row:row + 1, real], mask[row:row + 1, real])
    np.testing.assert_allclose(batch_scores[row:row + 1], alone, atol=1e-5)


def test_apply_all_at_last_index_equals_apply(reward_models):
  _, directory = reward_models["gpt2", 1]
  rm, params = from_pretrained_reward_model(str(directory))
  ids, mask = padded_batch(3, lengths=(9, 5, 2), total=9, side="left")
  all_BTH = np.asarray(_scores_all(rm, params, ids, mask))
  assert all_BTH.shape == (3, 9, 1)
  np.testing.assert_allclose(all_BTH[:, -1], _scores(rm, params, ids, mask), atol=1e-6)


def test_last_token_index():
  left = np.array([[0, 0, 1, 1], [1, 1, 1, 1]])
  right = np.array([[1, 1, 0, 0], [1, 0, 0, 0]])
  both = np.array([[0, 1, 1, 0]])  # left-padded prompt + right-padded response
  np.testing.assert_array_equal(last_token_index(left), [3, 3])
  np.testing.assert_array_equal(last_token_index(right), [1, 0])
  np.testing.assert_array_equal(last_token_index(both), [2])
  np.testing.assert_array_equal(last_token_index(np.zeros((1, 3), np.int32)), [0])


def test_score_read_at_eos_when_pad_equals_eos(reward_models):
  """pad == eos: the score is read at the (real) eos token the mask marks, not the one before.

  Ours equals HF's score of the same row with the trailing padding cut off, i.e. the last real
  token is the eos. (HF itself, on the padded row, would read one token early here.)
  """
  torch_model, directory = reward_models["llama", 1]
  rm, params = from_pretrained_reward_model(str(directory))
  eos = PAD_ID
  ids = np.array([[5, 6, 7, eos, eos, eos]], np.int32)  # 3 tokens + eos, then eos padding
  mask = np.array([[1, 1, 1, 1, 0, 0]], np.int32)
  ours = _scores(rm, params, ids, mask)
  torch_model.config.pad_token_id = None  # HF then reads the last position of the row
  try:
    truncated = _torch_scores(torch_model, ids[:, :4], mask[:, :4])
  finally:
    torch_model.config.pad_token_id = PAD_ID
  np.testing.assert_allclose(ours, truncated, atol=1e-4)


def test_value_head():
  key = jax.random.key(0)
  head = init_value_head(key, hidden_size=8)
  head["bias"] = jnp.array([0.5])
  hidden = jax.random.normal(jax.random.key(1), (2, 3, 8), jnp.bfloat16)
  values = apply_value_head(head, hidden)
  assert values.shape == (2, 3) and values.dtype == jnp.float32
  expected = np.asarray(hidden, np.float32) @ np.asarray(head["kernel"]) + 0.5
  np.testing.assert_allclose(values, expected[..., 0], rtol=1e-5, atol=1e-5)
  multi = init_value_head(key, hidden_size=8, num_outputs=3)
  assert apply_value_head(multi, hidden).shape == (2, 3, 3)


def test_reward_model_init_layout():
  config = ModelConfig(model_type="llama", vocab_size=32, hidden_size=8, num_layers=1,
                       num_heads=2, num_kv_heads=1, head_dim=4, intermediate_size=8)
  shapes = jax.eval_shape(lambda k: RewardModel(config, num_labels=3).init(k), jax.random.key(0))
  assert set(shapes) == {"backbone", "score"} and "lm_head" not in shapes["backbone"]
  assert shapes["score"]["kernel"].shape == (8, 3)
  assert hash(RewardModel(config, 3)) == hash(RewardModel(config, 3))
