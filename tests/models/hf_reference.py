"""Reference helpers for the model tests: tiny random transformers (PyTorch) models saved to tmp
dirs, padded batches, and one jitted forward shared by the test files (compiled once per model).

Every family gets non-trivial norm weights and biases (HF initialises them to 1 and 0, which
would hide a missing or mis-mapped norm/bias), so parity tests see every tensor.
"""

import jax
import numpy as np
import torch
import transformers

FAMILIES = ["gpt2", "llama", "qwen2", "mistral", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2"]
VOCAB = 128
PAD_ID = VOCAB - 1  # never drawn as a real token in these batches

_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                # small, so the llama3 rescaling acts on most frequencies of head_dim 8
                "original_max_position_embeddings": 8}


# Phi-3 longrope at a tiny scale: the switch to the long factors after 8 positions.
PHI3_LONGROPE = dict(
    rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                     "short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [2.0, 4.0, 8.0, 16.0],
                     "original_max_position_embeddings": 8},
    original_max_position_embeddings=8, max_position_embeddings=32)


def hf_config(family: str, **overrides):
  """The tiny config of a family: 2 layers, width 32, 4 heads (2 KV heads where GQA).

  Each new family's config switches on what sets it apart, at values that move the logits:
  Qwen3 head_dim 16 != 32 / 4 and untied; Gemma 2 a window of 4 on layer 0 only, query scalar
  12 != head_dim, soft-caps of 1.0 that bend the scores and the logits; Gemma 3
  one local (window 4, base 20) and one global layer (base 10000, linear scaling x2); Phi-3
  fused projections; OLMo 2 post-norms and full-width q/k norms.
  """
  common = dict(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, hidden_size=32, pad_token_id=PAD_ID)
  if family == "gpt2":
    kwargs = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                  pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=2)
  elif family == "llama":  # llama3 rope scaling, untied embeddings, GQA
    kwargs = dict(num_key_value_heads=2, tie_word_embeddings=False,
                  rope_parameters=dict(_LLAMA3_ROPE), **common)
  elif family == "qwen2":  # GQA + q/k/v biases, tied
    kwargs = dict(num_key_value_heads=2, tie_word_embeddings=True, **common)
  elif family == "mistral":  # sliding window (4) smaller than the test sequences
    kwargs = dict(num_key_value_heads=2, sliding_window=4, **common)
  elif family == "qwen3":  # per-head q/k norms, head_dim independent of width / heads, untied
    kwargs = dict(num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, **common)
  elif family == "gemma2":
    kwargs = dict(num_key_value_heads=2, head_dim=8, sliding_window=4, query_pre_attn_scalar=12,
                  attn_logit_softcapping=1.0, final_logit_softcapping=1.0,
                  layer_types=["sliding_attention", "full_attention"], **common)
  elif family == "gemma3_text":
    kwargs = dict(num_key_value_heads=2, head_dim=8, sliding_window=4, query_pre_attn_scalar=12,
                  layer_types=["sliding_attention", "full_attention"],
                  rope_parameters={
                      "sliding_attention": {"rope_type": "default", "rope_theta": 20.0},
                      "full_attention": {"rope_type": "linear", "factor": 2.0,
                                         "rope_theta": 10000.0}}, **common)
  elif family == "phi3":
    kwargs = dict(num_key_value_heads=2, bos_token_id=1, eos_token_id=2, **common)
  elif family == "olmo2":
    kwargs = dict(num_key_value_heads=2, bos_token_id=1, eos_token_id=2, **common)
  else:
    raise ValueError(family)
  kwargs.update(overrides)
  return transformers.AutoConfig.for_model(family, **kwargs)


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """Adds noise to every parameter (norm scales away from 1, biases away from 0)."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for param in model.parameters():
      param.add_(0.05 * torch.randn(param.shape, generator=generator))
  return model.eval()


def make_hf_model(family: str, directory, head: str = "lm", num_labels: int = 1, **overrides):
  """A random torch model of `family` saved to `directory`; returns the torch model."""
  torch.manual_seed(0)
  config = hf_config(family, **overrides)
  if head == "lm":
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
  else:
    config.num_labels = num_labels
    model = transformers.AutoModelForSequenceClassification.from_config(
        config, attn_implementation="eager")
  model = perturbed(model)
  model.save_pretrained(str(directory))
  return model


def padded_batch(seed: int, lengths, total: int, side: str = "left"):
  """(ids [B, total] int32, mask [B, total] int32): random real tokens, PAD_ID padding."""
  rng = np.random.RandomState(seed)
  ids = np.full((len(lengths), total), PAD_ID, np.int32)
  mask = np.zeros((len(lengths), total), np.int32)
  for row, length in enumerate(lengths):
    span = slice(total - length, total) if side == "left" else slice(0, length)
    ids[row, span] = rng.randint(0, PAD_ID, length)
    mask[row, span] = 1
  return ids, mask


def torch_logits(model, ids, mask) -> np.ndarray:
  """HF logits with positions from the mask (HF GPT-2 would count padding as positions)."""
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long),
                position_ids=torch.tensor(positions, dtype=torch.long))
  return out.logits.float().numpy()



# Shared by every test file so a (model, shapes) pair compiles once per session.
forward_logits = jax.jit(lambda model, params, ids, mask: model.apply(params, ids, mask).logits,
                         static_argnums=0)


def max_real_diff(ours, ref, mask) -> float:
  """max |ours - ref| over real (mask 1) positions."""
  return float(np.abs(np.asarray(ours) - np.asarray(ref))[np.asarray(mask).astype(bool)].max())
