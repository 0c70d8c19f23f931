"""The decoder vs transformers' PyTorch models: logits, KV cache, token log-probs, bf16, remat."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from hf_reference import (FAMILIES, PHI3_LONGROPE, forward_logits, hf_config, make_hf_model,
                          max_real_diff, padded_batch, torch_logits)
from rlhf_jax import ops
from rlhf_jax.models import CausalLM, ModelConfig, from_pretrained, save_pretrained
from rlhf_jax.models.config import rope_inv_freq
from rlhf_jax.models.transformer import positions_from_mask

@pytest.fixture(scope="module")
def loaded(hf_lm_dirs):
  """family -> (torch model, CausalLM, params float32)."""
  return {family: (torch_model, *from_pretrained(str(directory)))
          for family, (torch_model, directory) in hf_lm_dirs.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_on_left_padded_batch(loaded, family):
  torch_model, model, params = loaded[family]
  ids, mask = padded_batch(0, lengths=(10, 7, 3), total=10, side="left")
  ref = torch_logits(torch_model, ids, mask)
  diff = max_real_diff(forward_logits(model, params, ids, mask), ref, mask)
  print(f"{family}: max |logits - transformers| = {diff:.2e}")
  assert diff <= 1e-4


def test_mistral_sliding_window_is_active(loaded):
  """The window (4 < 10 tokens) changes the logits, so the parity test above covers it."""
  _, model, params = loaded["mistral"]
  assert model.config.sliding_window == 4
  ids, mask = padded_batch(0, lengths=(10,), total=10)
  no_window = CausalLM(dataclasses.replace(model.config, sliding_window=None))
  gap = np.abs(np.asarray(forward_logits(model, params, ids, mask))
               - np.asarray(forward_logits(no_window, params, ids, mask)))
  assert gap[:, :4].max() < 1e-6  # within the window nothing differs
  assert gap[:, 4:].max() > 1e-3


# Each family's distinguishing field, switched off, moves the logits well past the 1e-4 parity
# bar: the parity test above really checks it (it is not a no-op at these tiny sizes).
@pytest.mark.parametrize("family,field,off", [
    ("gemma2", "attn_logit_softcap", None), ("gemma2", "final_logit_softcap", None),
    ("gemma2", "sliding_window", None), ("gemma2", "query_pre_attn_scalar", None),
    ("gemma2", "embed_scale", 1.0), ("gemma3_text", "rope_local_theta", None),
    ("gemma3_text", "rope_type", "default"), ("gemma3_text", "sliding_window", None)])
def test_family_features_are_active(loaded, family, field, off):
  _, model, params = loaded[family]
  ids, mask = padded_batch(0, lengths=(10, 7, 3), total=10)
  changed = CausalLM(dataclasses.replace(model.config, **{field: off}))
  gap = max_real_diff(forward_logits(model, params, ids, mask),
                      forward_logits(changed, params, ids, mask), mask)
  assert gap > 1e-3, (family, field, gap)


def test_phi3_longrope_matches_transformers_short_and_long(tmp_path):
  """longrope: short factors while every position + 1 <= 8 (6 tokens), long ones past it (10),
  times the attention factor sqrt(1 + ln 4 / ln 8); exported, transformers gives the same."""
  torch_model = make_hf_model("phi3", tmp_path / "hf", **PHI3_LONGROPE)
  model, params = from_pretrained(str(tmp_path / "hf"))
  cfg = model.config
  assert cfg.rope_type == "longrope" and cfg.rope_factor == 4.0
  np.testing.assert_allclose(cfg.rope_attention_factor, np.sqrt(1 + np.log(4) / np.log(8)))
  assert ModelConfig.from_hf(cfg.to_hf()) == cfg
  save_pretrained(model, params, str(tmp_path / "ours"))
  exported = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path / "ours"), attn_implementation="eager").eval()
  for total, lengths in ((6, (6, 4, 2)), (10, (10, 7, 3))):
    ids, mask = padded_batch(0, lengths=lengths, total=total)
    ours = forward_logits(model, params, ids, mask)
    assert max_real_diff(ours, torch_logits(torch_model, ids, mask), mask) <= 1e-4, total
    assert max_real_diff(ours, torch_logits(exported, ids, mask), mask) <= 1e-4, total
  ids, mask = padded_batch(0, lengths=(10, 7, 3), total=10)
  short = CausalLM(dataclasses.replace(cfg, rope_long_factor=cfg.rope_short_factor))
  assert max_real_diff(forward_logits(short, params, ids, mask), ours, mask) > 1e-3


def test_gemma_layer_patterns_and_rope_tables():
  """Gemma 2 alternates local/global from layer 0; Gemma 3's default layer_types are 5 local :
  1 global; its local layers use rope_local_theta, the global ones rope_theta and scaling."""
  gemma2 = ModelConfig.from_hf(transformers.Gemma2Config(num_hidden_layers=4, head_dim=8))
  assert gemma2.layer_is_sliding == (True, False, True, False)
  hf3 = transformers.Gemma3TextConfig(num_hidden_layers=12, head_dim=8, rope_local_base_freq=5.0,
                                      rope_scaling={"rope_type": "linear", "factor": 8.0})
  gemma3 = ModelConfig.from_hf(hf3)
  assert gemma3.layer_is_sliding == ((True,) * 5 + (False,)) * 2
  assert gemma3.rope_local_theta == 5.0 and gemma3.rope_theta == 1e6
  np.testing.assert_allclose(rope_inv_freq(gemma3, local=True), 5.0 ** -(np.arange(4) / 4))
  np.testing.assert_allclose(rope_inv_freq(gemma3), 1e6 ** -(np.arange(4) / 4) / 8, rtol=1e-6)
  assert ModelConfig.from_hf(gemma3.to_hf()) == gemma3


def test_qwen2_mixed_sliding_layers_match_transformers(tmp_path):
  """Qwen2 with use_sliding_window: layer 0 full attention, layer 1 windowed (max_window_layers)."""
  torch_model = make_hf_model("qwen2", tmp_path, use_sliding_window=True, sliding_window=3,
                              max_window_layers=1)
  model, params = from_pretrained(str(tmp_path))
  assert model.config.layer_is_sliding == (False, True)
  ids, mask = padded_batch(1, lengths=(9, 6), total=9)
  ours = forward_logits(model, params, ids, mask)
  assert max_real_diff(ours, torch_logits(torch_model, ids, mask), mask) <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_decoding_matches_full_forward(loaded, family):
  """Prefill a left-padded prompt in two chunks of 3 (the second at cache_index 3), then feed
  tokens one at a time: the same logits as one full forward (window 4 < 10 slots for Mistral)."""
  _, model, params = loaded[family]
  prompt_len, total = 6, 10  # the shape of the parity test: the full forward is compiled once
  ids, mask = padded_batch(2, lengths=(6, 4, 2), total=prompt_len)
  rest = np.random.RandomState(3).randint(0, 100, (3, total - prompt_len)).astype(np.int32)
  ids = np.concatenate([ids, rest], axis=1)
  mask = np.concatenate([mask, np.ones_like(rest)], axis=1)
  full = np.asarray(forward_logits(model, params, ids, mask))

  step = jax.jit(lambda p, tokens, cache, index: model.apply(p, tokens, mask, cache=cache,
                                                             cache_index=index))
  cache = model.init_cache(3, total)
  start, errors = 0, []
  for size in (3, 3, 1, 1, 1, 1):
    out = step(params, ids[:, start:start + size], cache, jnp.int32(start))
    cache = out.cache
    real = mask[:, start:start + size].astype(bool)
    errors.append(np.abs(np.asarray(out.logits) - full[:, start:start + size])[real].max())
    start += size
  assert start == total
  assert max(errors) <= 1e-5, errors


def test_cache_positions_default_to_mask_positions(loaded):
  """apply with a cache and no positions uses clip(cumsum(mask) - 1, 0) at the new slots."""
  _, model, params = loaded["gpt2"]  # learned positions: a wrong position changes the logits
  ids, mask = padded_batch(4, lengths=(5, 2), total=5)
  cache = model.init_cache(2, 5)
  prefill = jax.jit(lambda p, positions: model.apply(p, ids, mask, cache=cache, cache_index=0,
                                                    positions=positions).logits)
  np.testing.assert_array_equal(prefill(params, positions_from_mask(mask)),
                                prefill(params, None))
  assert not np.allclose(prefill(params, positions_from_mask(mask)),
                         prefill(params, np.zeros_like(mask)))


def test_positions_from_mask():
  mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0]])
  np.testing.assert_array_equal(positions_from_mask(mask),
                                [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2], [0, 0, 1, 2, 2]])


@pytest.mark.parametrize("rope", [
    {"rope_type": "default", "rope_theta": 500.0},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
])
def test_rope_frequencies_match_transformers(rope):
  hf = transformers.LlamaConfig(hidden_size=256, num_attention_heads=2, num_key_value_heads=2,
                                intermediate_size=8, vocab_size=8, num_hidden_layers=1,
                                rope_parameters=dict(rope))
  ref, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf) if rope["rope_type"] != "default" else (
      1.0 / (rope["rope_theta"] ** (torch.arange(0, 128, 2).float() / 128)), 1.0)
  np.testing.assert_allclose(rope_inv_freq(ModelConfig.from_hf(hf)), ref.numpy(), rtol=1e-6)


# ------------------------------------------------------------------------------- token log-probs
def _reference_token_logps(model, params, ids, mask, temperature):
  logits = model.apply(params, ids, mask).logits
  logps = ops.token_logps_from_logits(logits[:, :-1], ids[:, 1:], temperature=temperature)
  return jnp.pad(logps, ((0, 0), (1, 0))) * mask


# Gemma 2: the final-logit soft-cap applies in score_tokens (chunked) as in apply, before the
# temperature.
@pytest.mark.parametrize("family,temperature", [("llama", 1.0), ("llama", 0.7), ("gemma2", 0.7)])
def test_token_logps_equal_log_softmax_of_logits(loaded, family, temperature):
  _, model, params = loaded[family]
  ids, mask = padded_batch(5, lengths=(9, 6, 2), total=9, side="right")
  # chunk_size 5 over 3·8 tokens: several chunks and a padded last one.
  got = jax.jit(lambda p: model.token_logps(p, ids, mask, temperature=temperature,
                                            chunk_size=5))(params)
  want = jax.jit(lambda p: _reference_token_logps(model, p, ids, mask, temperature))(params)
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert np.all(np.asarray(got)[:, 0] == 0) and np.all(np.asarray(got)[mask == 0] == 0)
  assert np.all(np.asarray(got)[:, 1:][mask[:, 1:] == 1] < 0)


def _weighted_logps_loss(model, params, ids, mask, weights):
  return jnp.sum(weights * model.token_logps(params, ids, mask, temperature=0.7, chunk_size=5))


_loss_grad = jax.jit(jax.grad(_weighted_logps_loss, argnums=1), static_argnums=0)


@pytest.fixture(scope="module")
def llama_grads(loaded):
  """(model, params, batch, d loss / d params) of a weighted token_logps sum, no remat."""
  _, model, params = loaded["llama"]
  ids, mask = padded_batch(5, lengths=(9, 6, 2), total=9, side="right")
  weights = jnp.asarray(np.random.RandomState(6).randn(*ids.shape), jnp.float32)
  batch = (ids, mask, weights)
  return model, params, batch, _loss_grad(model, params, *batch)


def _assert_trees_close(got, want, atol, rtol):
  jax.tree_util.tree_map_with_path(
      lambda path, a, b: np.testing.assert_allclose(a, b, atol=atol, rtol=rtol,
                                                    err_msg=jax.tree_util.keystr(path)),
      got, want)


def test_token_logps_gradient_equals_full_logits_gradient(llama_grads):
  model, params, (ids, mask, weights), grads = llama_grads
  reference = lambda p: jnp.sum(weights * _reference_token_logps(model, p, ids, mask, 0.7))
  _assert_trees_close(grads, jax.jit(jax.grad(reference))(params), atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------- bf16
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bf16_forward_close_to_float32(loaded, family):
  """bf16 params/compute vs float32: no worse than transformers' own bf16 vs float32 gap.

  bf16 keeps 8 significant bits (relative rounding 2^-9 ≈ 2e-3 per op), so logits of size ~1
  after 2 blocks move by ~1e-2; the fair bar is the reference implementation's own bf16 error
  on the same weights and batch, with 2x headroom for different (but equally valid) rounding
  orders, plus an absolute bound of a few bf16 ulps of the logits' scale.
  """
  torch_model, model, params = loaded[family]
  ids, mask = padded_batch(7, lengths=(10, 6), total=10)
  f32 = np.asarray(forward_logits(model, params, ids, mask))
  params_bf16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
  bf16 = np.asarray(forward_logits(model, params_bf16, ids, mask))
  assert bf16.dtype == np.float32  # logits are float32 whatever the compute dtype
  ours = max_real_diff(bf16, f32, mask)
  torch_gap = max_real_diff(torch_logits(torch_model.to(torch.bfloat16), ids, mask),
                             torch_logits(torch_model.to(torch.float32), ids, mask), mask)
  scale = np.abs(f32[mask.astype(bool)]).max()
  print(f"{family}: bf16 gap ours {ours:.3e}, transformers {torch_gap:.3e}, |logits| {scale:.2f}")
  assert ours <= max(2 * torch_gap, 4 * 2.0 ** -8 * scale)


def test_mixed_precision_compute_dtype(loaded):
  """compute_dtype="bfloat16" on float32 params: bf16 activations and cache, float32 logits."""
  _, model, params = loaded["qwen2"]
  ids, mask = padded_batch(8, lengths=(10, 5), total=10)
  mixed = CausalLM(dataclasses.replace(model.config, compute_dtype="bfloat16"))
  hidden, logits = jax.jit(lambda p: (lambda o: (o.hidden, o.logits))(mixed.apply(p, ids, mask))
                           )(params)
  assert hidden.dtype == jnp.bfloat16 and logits.dtype == jnp.float32
  assert mixed.init_cache(1, 4).k.dtype == jnp.bfloat16
  f32 = np.asarray(forward_logits(model, params, ids, mask))
  scale = np.abs(f32[mask.astype(bool)]).max()
  assert max_real_diff(logits, f32, mask) <= 4 * 2.0 ** -8 * scale  # as in the bf16 test


# -------------------------------------------------------------------------------------- remat
@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
def test_remat_gives_the_same_gradients(llama_grads, policy):
  model, params, batch, plain_grads = llama_grads
  remat = CausalLM(dataclasses.replace(model.config, remat_policy=policy))
  _assert_trees_close(_loss_grad(remat, params, *batch), plain_grads, atol=1e-6, rtol=1e-5)


def test_init_shapes_and_dtype():
  config = ModelConfig(model_type="llama", vocab_size=64, hidden_size=16, num_layers=3,
                       num_heads=4, num_kv_heads=2, head_dim=4, intermediate_size=24)
  params = jax.eval_shape(lambda key: CausalLM(config).init(key, jnp.bfloat16), jax.random.key(0))
  assert params["layers"]["attn"]["k"]["kernel"].shape == (3, 16, 8)
  assert params["lm_head"]["kernel"].shape == (16, 64)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(params))


def test_attention_implementation_choice():
  """Auto picks XLA off-GPU; an auto cuDNN request that cuDNN rejects falls back to XLA."""
  from rlhf_jax.models.layers import _attend, attention_implementation

  config = ModelConfig(model_type="llama", vocab_size=8, hidden_size=16, num_layers=1,
                       num_heads=2, num_kv_heads=1, head_dim=8, intermediate_size=8)
  if jax.default_backend() != "gpu":
    assert attention_implementation(config, jnp.bfloat16, 8, False, 4) == "xla"
  assert attention_implementation(config, jnp.float32, 8, False, 4) == "xla"
  q = jax.random.normal(jax.random.key(0), (1, 4, 2, 8))
  kv = q[:, :, :1]
  mask = jnp.tril(jnp.ones((4, 4), bool))[None, None]
  expected = jax.nn.dot_product_attention(q, kv, kv, mask=mask, implementation="xla")
  np.testing.assert_allclose(_attend(q, kv, kv, mask, "cudnn", False, auto=True), expected,
                             atol=1e-6)


def test_score_tokens_gives_logps_entropy_and_hidden_from_one_pass(loaded):
  _, model, params = loaded["llama"]
  ids, mask = padded_batch(3, lengths=(9, 5), total=9, side="right")
  scores = model.score_tokens(params, ids, mask, temperature=0.8, entropy=True)
  np.testing.assert_array_equal(scores.logps, model.token_logps(params, ids, mask,
                                                                temperature=0.8))
  logits = np.asarray(model.apply(params, ids, mask).logits, np.float64) / 0.8
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)
                         ) - logits.max(-1, keepdims=True)
  entropy = -(np.exp(logp) * logp).sum(-1)  # entropy of the distribution at each position
  m = np.asarray(mask, bool)
  want = np.where(m[:, 1:], entropy[:, :-1], 0.0)  # predicts token t from position t - 1
  np.testing.assert_allclose(np.asarray(scores.entropy)[:, 1:], want, atol=1e-5)
  assert np.all(np.asarray(scores.entropy)[:, 0] == 0)
  np.testing.assert_array_equal(scores.hidden,
                                model.apply(params, ids, mask, compute_logits=False).hidden)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_segments_score_like_separate_rows(loaded, family):
  """Two examples packed in one row (segment ids) give each example's own log-probs: no
  attention across the boundary, positions restart."""
  _, model, params = loaded[family]
  rng = np.random.default_rng(5)
  a = rng.integers(3, model.config.vocab_size, size=6)
  b = rng.integers(3, model.config.vocab_size, size=4)
  packed = np.concatenate([a, b, [0, 0]])[None].astype(np.int32)
  segments = np.array([[1] * 6 + [2] * 4 + [0, 0]], np.int32)
  got = np.asarray(model.token_logps(params, packed, (segments > 0).astype(np.int32),
                                     segment_ids=segments))[0]
  alone_a = np.asarray(model.token_logps(params, a[None], np.ones((1, 6), np.int32)))[0]
  alone_b = np.asarray(model.token_logps(params, b[None], np.ones((1, 4), np.int32)))[0]
  np.testing.assert_allclose(got[:6], alone_a, atol=1e-5)
  np.testing.assert_allclose(got[6:10], alone_b, atol=1e-5)  # b's first token: 0, unpredicted
  assert got[6] == 0 and np.all(got[10:] == 0)


def test_positions_from_segments():
  from rlhf_jax.models.transformer import positions_from_segments
  segments = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(positions_from_segments(segments)[0, :6], [0, 1, 2, 0, 1, 0])
  np.testing.assert_array_equal(positions_from_segments(segments)[1, 2:], [0, 1, 2, 3, 4, 5])


def test_sequences_longer_than_the_learned_position_table_fail_at_trace_time():
  """GPT-2 (learned positions, table of 8): 8 tokens run, 9 tokens or 9 cache slots raise
  (nn.Embed would otherwise give NaN logits silently); RoPE models have no table to outgrow."""
  config = ModelConfig.from_hf(hf_config("gpt2", n_positions=8))
  model = CausalLM(config)
  params = jax.eval_shape(model.init, jax.random.key(0))  # the check needs shapes only
  ids = jax.ShapeDtypeStruct((2, 8), jnp.int32)
  assert jax.eval_shape(model.apply, params, ids, ids).logits.shape == (2, 8, 128)
  long_ids = jax.ShapeDtypeStruct((2, 9), jnp.int32)
  with pytest.raises(ValueError, match=r"9 tokens .*\(max_position_embeddings=8\)"):
    jax.eval_shape(model.apply, params, long_ids, long_ids)
  one_id = jax.ShapeDtypeStruct((2, 1), jnp.int32)
  decode = lambda p, i, c: model.apply(p, i, cache=c, cache_index=0)
  assert jax.eval_shape(decode, params, one_id, jax.eval_shape(lambda: model.init_cache(2, 8)))
  with pytest.raises(ValueError, match=r"9 tokens \(or cache slots\)"):
    jax.eval_shape(decode, params, one_id, jax.eval_shape(lambda: model.init_cache(2, 9)))
  rope = CausalLM(ModelConfig.from_hf(hf_config("llama", max_position_embeddings=8)))
  rope_params = jax.eval_shape(rope.init, jax.random.key(0))
  assert jax.eval_shape(rope.apply, rope_params, long_ids, long_ids).logits.shape == (2, 9, 128)
