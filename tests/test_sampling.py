"""rlhf_jax.sampling: the per-step distribution, the decode loop, and parity with transformers.

Three layers of checks:
  * `sample_from_logits` / `filter_logits` on hand-made logits against an independent NumPy
    reference of temperature -> top-k -> top-p, including chi-square tests of draw frequencies;
  * `generate` on a toy bag-of-words LM defined here (it follows the CausalLM cache contract and
    its no-cache forward is a few lines), so the loop's slots, positions, masks, stops and RNG are
    checked against a full recomputation independently of rlhf_jax.models;
  * `generate` on real tiny GPT-2 / Llama (llama3 rope, untied) / Qwen2 (GQA, biases) / Mistral
    (sliding window), Qwen3, Gemma 2 / Gemma 3 (local/global layers with windows shorter than
    the prompts, soft-caps, per-layer RoPE), Phi-3 and OLMo 2 checkpoints: greedy output equals
    transformers' `generate` on a left-padded batch, and the sampler's log-probs equal
    `model.token_logps` on the finished sequences (KV-cache decode == full forward).
"""

from __future__ import annotations

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import sampling

# ----------------------------------------------------------------------------------------------
# NumPy reference of the sampling distribution.


def _np_log_softmax(z):
  z = z - np.max(z, axis=-1, keepdims=True)
  return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def _np_filter(logits, temperature, top_k, top_p):
  """Reference: float64, one row at a time, explicit argsort. Returns z with -inf on excluded."""
  z = np.asarray(logits, np.float64) / temperature
  out = np.full_like(z, -np.inf)
  for b in range(z.shape[0]):
    order = np.argsort(-z[b], kind="stable")
    kept = order if top_k == 0 else order[:top_k]
    if top_p < 1.0:
      probs = np.exp(_np_log_softmax(z[b, kept]))
      # smallest prefix with mass >= p
      num = int(np.searchsorted(np.cumsum(probs), top_p) + 1)
      kept = kept[:min(num, len(kept))]
    out[b, kept] = z[b, kept]
  return out


def _chi2_pvalue(counts, probs):
  expected = probs * counts.sum()
  stat = np.sum((counts - expected) ** 2 / expected)
  return float(jax.scipy.stats.chi2.sf(stat, len(probs) - 1))


# ----------------------------------------------------------------------------------------------
# sample_from_logits / filter_logits


SETTINGS = [
    (1.0, 0, 1.0),
    (0.7, 0, 1.0),
    (1.0, 5, 1.0),
    (1.3, 0, 0.8),
    (0.8, 9, 0.6),
    (1.0, 3, 0.999),
    (1.0, 0, 1e-6),  # top-p this small keeps exactly the argmax
]


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_filter_logits_matches_numpy_reference(temperature, top_k, top_p):
  logits = np.random.default_rng(0).normal(size=(6, 40)).astype(np.float32) * 2
  got = np.asarray(jax.jit(functools.partial(
      sampling.filter_logits, temperature=temperature, top_k=top_k, top_p=top_p))(logits))
  want = _np_filter(logits, temperature, top_k, top_p)
  np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
  np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-6)
  if top_p == 1e-6:
    assert np.all(np.isfinite(got).sum(-1) == 1)


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_sample_from_logits_stays_in_support_and_scores_its_distribution(temperature, top_k, top_p):
  logits = np.random.default_rng(1).normal(size=(512, 40)).astype(np.float32) * 2
  sample = jax.jit(functools.partial(sampling.sample_from_logits, temperature=temperature,
                                     top_k=top_k, top_p=top_p))
  tokens, logps = sample(jnp.asarray(logits), jax.random.key(0))
  assert tokens.dtype == jnp.int32 and logps.dtype == jnp.float32
  reference = _np_log_softmax(_np_filter(logits, temperature, top_k, top_p))
  chosen = reference[np.arange(512), np.asarray(tokens)]
  assert np.all(np.isfinite(chosen)), "emitted a token the filters exclude"
  np.testing.assert_allclose(logps, chosen, atol=1e-5)


def test_greedy_is_argmax_with_temperature_one_logps():
  logits = np.random.default_rng(2).normal(size=(16, 30)).astype(np.float32)
  tokens, logps = sampling.sample_from_logits(jnp.asarray(logits), jax.random.key(0),
                                              temperature=0.0, top_k=3, top_p=0.5)
  np.testing.assert_array_equal(tokens, logits.argmax(-1))
  np.testing.assert_allclose(logps, _np_log_softmax(logits.astype(np.float64)).max(-1), atol=1e-6)


@pytest.mark.parametrize("top_k,top_p,sorts", [(4, 1.0, False), (4, 0.5, False), (0, 0.5, True)])
def test_only_top_p_alone_sorts_the_vocabulary(top_k, top_p, sorts):
  hlo = jax.jit(functools.partial(sampling.sample_from_logits, temperature=1.0, top_k=top_k,
                                  top_p=top_p)).lower(jnp.zeros((2, 1000)), jax.random.key(0))
  assert ("stablehlo.sort" in hlo.as_text()) == sorts


# Draw frequencies: 50k rows sharing one distribution; chi-square over the kept tokens. The
# expected probabilities come from the NumPy reference, and the same counts must REJECT the
# untruncated temperature-1 softmax, so the test can tell the distributions apart.
BASE_PROBS = np.array([0.3, 0.2, 0.15, 0.12, 0.1, 0.08, 0.04, 0.01])


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0),    # plain softmax (compared with the reference's: the power check skips it)
    (0.6, 0, 1.0),
    (1.7, 0, 0.75),   # top-p renormalisation after a flattening temperature
    (0.9, 5, 0.8),    # all three
    (1.4, 4, 1.0),
])
def test_draw_frequencies_match_the_truncated_softmax(temperature, top_k, top_p):
  draws = 50_000
  logits = np.log(BASE_PROBS).astype(np.float32)
  tokens, logps = jax.jit(functools.partial(
      sampling.sample_from_logits, temperature=temperature, top_k=top_k, top_p=top_p))(
          jnp.broadcast_to(jnp.asarray(logits), (draws, logits.size)), jax.random.key(42))
  counts = np.bincount(np.asarray(tokens), minlength=logits.size)
  probs = np.exp(_np_log_softmax(_np_filter(logits[None], temperature, top_k, top_p)))[0]
  kept = probs > 0
  assert counts[~kept].sum() == 0
  assert _chi2_pvalue(counts[kept], probs[kept]) > 1e-4
  np.testing.assert_allclose(np.exp(np.asarray(logps)), probs[np.asarray(tokens)], rtol=1e-5)
  if (temperature, top_k, top_p) != (1.0, 0, 1.0):
    untruncated = counts.copy()
    untruncated[~kept] = 1  # keep the statistic finite; the base softmax has mass there
    assert _chi2_pvalue(untruncated, BASE_PROBS) < 1e-6


def test_settings_are_validated():
  logits = jnp.zeros((1, 5))
  with pytest.raises(ValueError, match="top_p"):
    sampling.filter_logits(logits, top_p=0.0)
  with pytest.raises(ValueError, match="top_k"):
    sampling.filter_logits(logits, top_k=-1)
  with pytest.raises(ValueError, match="temperature"):
    sampling.filter_logits(logits, temperature=0.0)


# ----------------------------------------------------------------------------------------------
# A toy LM following the CausalLM cache contract: hidden_i = mean of the embeddings of the tokens
# slot i attends to (slots j <= i with mask 1) + a position embedding; logits = hidden @ W_out.


@dataclasses.dataclass(frozen=True)
class _ToyConfig:
  vocab_size: int = 48
  hidden_size: int = 16
  max_positions: int = 64
  pad_token_id: int | None = 1


@dataclasses.dataclass(frozen=True)
class BagOfWordsLM:
  config: _ToyConfig = _ToyConfig()

  def init(self, key):
    c = self.config
    k1, k2, k3 = jax.random.split(key, 3)
    return {"embed": jax.random.normal(k1, (c.vocab_size, c.hidden_size)),
            "pos": jax.random.normal(k2, (c.max_positions, c.hidden_size)),
            "out": jax.random.normal(k3, (c.hidden_size, c.vocab_size)) * 0.7}

  def unembedding(self, params):
    return params["out"]

  def init_cache(self, batch_size, max_length, dtype=None):
    return jnp.zeros((batch_size, max_length, self.config.hidden_size), dtype or jnp.float32)

  def apply(self, params, input_ids, attention_mask=None, *, positions=None, cache=None,
            cache_index=None, compute_logits=True):
    batch, length = input_ids.shape
    emb_BTD = params["embed"][input_ids]
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if cache is None:
      keys_BSD, query_slots_T = emb_BTD, jnp.arange(length)
      if positions is None:
        positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
    else:
      cache = jax.lax.dynamic_update_slice(cache, emb_BTD.astype(cache.dtype), (0, cache_index, 0))
      keys_BSD, query_slots_T = cache, cache_index + jnp.arange(length)
    slots_S = jnp.arange(keys_BSD.shape[1])
    allowed_BTS = ((slots_S[None, None, :] <= query_slots_T[None, :, None])
                   & (attention_mask[:, None, :] == 1)).astype(jnp.float32)
    summed_BTD = jnp.einsum("bts,bsd->btd", allowed_BTS, keys_BSD)
    count_BT1 = jnp.maximum(allowed_BTS.sum(-1, keepdims=True), 1.0)
    hidden = summed_BTD / count_BT1 + params["pos"][positions]
    logits = hidden @ params["out"] if compute_logits else None
    return types.SimpleNamespace(logits=logits, hidden=hidden, cache=cache)


TOY = BagOfWordsLM()
PROMPT_LENS = (5, 2, 7, 1)
P, N = 7, 12


@pytest.fixture(scope="module")
def toy_setup():
  params = TOY.init(jax.random.key(0))
  rng = np.random.default_rng(0)
  ids = np.full((len(PROMPT_LENS), P), TOY.config.pad_token_id, np.int32)
  mask = np.zeros_like(ids)
  for b, n in enumerate(PROMPT_LENS):
    ids[b, P - n:] = rng.integers(2, TOY.config.vocab_size, n)
    mask[b, P - n:] = 1
  return params, jnp.asarray(ids), jnp.asarray(mask)


def _full_forward_logps(model, params, prompt_ids, prompt_mask, out, temperature, top_k, top_p):
  """Reference: one no-cache forward on prompt + completion; log-probs under the filter."""
  ids = jnp.concatenate([prompt_ids, out.tokens], axis=1)
  mask = jnp.concatenate([prompt_mask, out.mask], axis=1)
  logits = np.asarray(model.apply(params, ids, mask).logits)[:, P - 1:-1]
  batch, num_new, vocab = logits.shape
  flat = logits.reshape(-1, vocab)
  if temperature == 0:
    logps = _np_log_softmax(flat.astype(np.float64))
  else:
    logps = _np_log_softmax(_np_filter(flat, temperature, top_k, top_p))
  tokens = np.asarray(out.tokens).reshape(-1)
  return logps[np.arange(tokens.size), tokens].reshape(batch, num_new), logits


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (1.3, 6, 0.7), (0.0, 0, 1.0),
                                                     (0.8, 0, 0.9)])
def test_toy_generate_matches_full_recomputation(toy_setup, temperature, top_k, top_p):
  params, ids, mask = toy_setup
  out = sampling.generate(TOY, params, ids, mask, jax.random.key(3), max_new_tokens=N,
                          temperature=temperature, top_k=top_k, top_p=top_p)
  assert out.tokens.shape == out.mask.shape == out.logps.shape == (len(PROMPT_LENS), N)
  assert out.tokens.dtype == out.mask.dtype == jnp.int32 and out.logps.dtype == jnp.float32
  np.testing.assert_array_equal(out.mask, 1)  # no stop ids: every token is real
  want, logits = _full_forward_logps(TOY, params, ids, mask, out, temperature, top_k, top_p)
  assert np.all(np.isfinite(want)), "emitted a token outside the top-k/top-p set"
  np.testing.assert_allclose(out.logps, want, atol=2e-5)
  if temperature == 0:
    np.testing.assert_array_equal(out.tokens, logits.argmax(-1))


def test_toy_right_padded_prompt_gives_the_same_tokens(toy_setup):
  # The first token is read at each row's last real prompt token, so padding side does not matter.
  params, ids, mask = toy_setup
  right_ids, right_mask = np.asarray(ids).copy(), np.asarray(mask).copy()
  for b, n in enumerate(PROMPT_LENS):
    right_ids[b] = np.roll(right_ids[b], n - P)
    right_mask[b] = np.roll(right_mask[b], n - P)
  kw = dict(max_new_tokens=N, temperature=1.0)
  left = sampling.generate(TOY, params, ids, mask, jax.random.key(5), **kw)
  right = sampling.generate(TOY, params, right_ids, right_mask, jax.random.key(5), **kw)
  np.testing.assert_array_equal(left.tokens, right.tokens)
  np.testing.assert_allclose(left.logps, right.logps, atol=1e-5)


def _first_stop(row, stop_ids):
  hits = np.flatnonzero(np.isin(row, stop_ids))
  return int(hits[0]) if hits.size else None


@pytest.mark.parametrize("stop_ids", [7, (7, 11, 30)])
def test_rows_stop_at_any_stop_id_and_stay_stopped(toy_setup, stop_ids):
  params, ids, mask = toy_setup
  batch = 32
  ids, mask = jnp.tile(ids, (8, 1)), jnp.tile(mask, (8, 1))
  kw = dict(max_new_tokens=N, temperature=3.0)  # flat distribution: stops are common
  free = sampling.generate(TOY, params, ids, mask, jax.random.key(9), **kw)
  out = sampling.generate(TOY, params, ids, mask, jax.random.key(9), eos_token_id=stop_ids, **kw)
  tokens, out_mask = np.asarray(out.tokens), np.asarray(out.mask)
  stopped = 0
  for b in range(batch):
    s = _first_stop(np.asarray(free.tokens[b]), stop_ids)
    end = N if s is None else s + 1
    # Same key => same tokens up to the stop: per-step keys do not depend on early exit.
    np.testing.assert_array_equal(tokens[b, :end], free.tokens[b, :end])
    np.testing.assert_allclose(out.logps[b, :end], free.logps[b, :end], atol=1e-6)
    np.testing.assert_array_equal(out_mask[b, :end], 1)  # includes the stop token
    np.testing.assert_array_equal(out_mask[b, end:], 0)
    np.testing.assert_array_equal(tokens[b, end:], TOY.config.pad_token_id)
    np.testing.assert_array_equal(out.logps[b, end:], 0.0)
    stopped += s is not None
  assert 0 < stopped < batch  # the test exercises both kinds of rows


def test_all_rows_stopping_early_exits_with_padding(toy_setup):
  params, ids, mask = toy_setup
  # Every token is a stop id: every row stops after its first token.
  out = sampling.generate(TOY, params, ids, mask, jax.random.key(0), max_new_tokens=N,
                          eos_token_id=range(TOY.config.vocab_size))
  np.testing.assert_array_equal(out.mask[:, 0], 1)
  np.testing.assert_array_equal(out.mask[:, 1:], 0)
  np.testing.assert_array_equal(out.tokens[:, 1:], TOY.config.pad_token_id)


def test_pad_id_defaults_to_zero(toy_setup):
  params, ids, mask = toy_setup
  model = BagOfWordsLM(_ToyConfig(pad_token_id=None))
  out = sampling.generate(model, params, ids, mask, jax.random.key(0), max_new_tokens=3,
                          eos_token_id=range(TOY.config.vocab_size))
  np.testing.assert_array_equal(out.tokens[:, 1:], 0)


def test_fixed_key_reproduces_and_keys_differ(toy_setup):
  params, ids, mask = toy_setup
  gen = functools.partial(sampling.generate, TOY, params, ids, mask, max_new_tokens=N)
  a, b, c = gen(jax.random.key(1)), gen(jax.random.key(1)), gen(jax.random.key(2))
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.logps, b.logps)
  assert np.mean(np.asarray(a.tokens) != np.asarray(c.tokens)) > 0.5


def test_single_new_token(toy_setup):
  params, ids, mask = toy_setup
  out = sampling.generate(TOY, params, ids, mask, jax.random.key(0), max_new_tokens=1,
                          temperature=0.0)
  logits = np.asarray(TOY.apply(params, ids, mask).logits)[:, -1]
  np.testing.assert_array_equal(out.tokens[:, 0], logits.argmax(-1))


def _assert_no_compilation(call):
  """Runs `call` (a generate) and asserts it neither compiled nor grew the jit cache."""
  compiles = []

  def listener(event, duration, **_):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(duration)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    size = sampling._generate._cache_size()
    call().tokens.block_until_ready()
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert sampling._generate._cache_size() == size
  assert not compiles


def test_no_recompilation_for_same_shapes(toy_setup):
  params, ids, mask = toy_setup
  kw = dict(max_new_tokens=N, temperature=0.9, top_k=10, eos_token_id=[3, 4])
  sampling.generate(TOY, params, ids, mask, jax.random.key(0), **kw)  # compile (or cache hit)
  # Inputs made before listening: building them runs small eager computations that compile.
  new_ids = jnp.asarray(np.random.default_rng(1).integers(2, 40, ids.shape), jnp.int32)
  new_params = jax.tree.map(lambda x: x * 1.5, params)
  new_key = jax.random.key(1)
  _assert_no_compilation(lambda: sampling.generate(TOY, new_params, new_ids, mask, new_key, **kw))


def test_generate_validates_arguments(toy_setup):
  params, ids, mask = toy_setup
  with pytest.raises(ValueError, match="max_new_tokens"):
    sampling.generate(TOY, params, ids, mask, jax.random.key(0), max_new_tokens=0)
  with pytest.raises(ValueError, match="top_p"):
    sampling.generate(TOY, params, ids, mask, jax.random.key(0), max_new_tokens=2, top_p=1.5)


# ----------------------------------------------------------------------------------------------
# Real tiny checkpoints: parity with transformers' PyTorch generate, and cache vs full forward.

HF_P, HF_N, HF_LENS = 6, 10, (6, 3, 1, 4)
HF_FAMILIES = ["gpt2", "llama", "qwen2", "mistral", "qwen3", "gemma2", "gemma3_text", "phi3",
               "olmo2"]
# Family-independent sampler checks (top-k/top-p filtering, bf16 rounding) run on the first four
# families and Gemma 2 (soft-capped logits) only: the others add test time, not coverage.
_FILTER_FAMILIES = ["gpt2", "llama", "qwen2", "mistral", "gemma2"]
# Copying a prompt's cache to its G rows (num_samples) depends on how the cache is laid out and
# read, not on the rest of the family: learned positions (GPT-2), one window shorter than the
# rows (Mistral), sliding and global layers with their own rope tables (Gemma 3).
_CACHE_FAMILIES = ["gpt2", "mistral", "gemma3_text"]
# initializer_range 0.3 gives logits of ~6: a final-logit cap of 1 would flatten them into ties.
_SAMPLING_OVERRIDES = {"gemma2": dict(final_logit_softcapping=10.0)}


def _hf_reference():
  """tests/models/hf_reference.py: the model tests' tiny configs (one module for both dirs)."""
  import os
  import sys

  models_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models")
  if models_dir not in sys.path:
    sys.path.insert(0, models_dir)
  import hf_reference

  return hf_reference


@pytest.fixture(scope="module", params=HF_FAMILIES)
def hf_pair(request, tmp_path_factory):
  """(torch model, our model, params, prompt ids [B, P], prompt mask [B, P], jitted token_logps).

  The model tests' tiny configs (hf_reference.hf_config): GPT-2 (learned positions, fused
  c_attn), Llama with llama3 rope scaling, untied embeddings and GQA, Qwen2 with GQA and q/k/v
  biases (tied), Mistral with a sliding window of 4 (< P + N, so the window is exercised);
  noise on every parameter. initializer_range 0.3 peaks the logits: no near-ties in greedy.
  Gemma 2 / Gemma 3: layer 0 has a window of 4 (< P = 6), layer 1 is global.
  """
  pytest.importorskip("torch")
  from rlhf_jax import models

  hf_reference = _hf_reference()
  directory = tmp_path_factory.mktemp(request.param)
  hf_model = hf_reference.make_hf_model(request.param, directory, initializer_range=0.3,
                                        **_SAMPLING_OVERRIDES.get(request.param, {}))
  hf_model.generation_config.eos_token_id = None  # a "free" run never stops early
  model, params = models.from_pretrained(str(directory))
  assert model.config.pad_token_id == hf_reference.PAD_ID
  ids, mask = hf_reference.padded_batch(0, HF_LENS, HF_P, side="left")
  token_logps = jax.jit(model.token_logps)  # temperature traced: one compile for both tests
  return hf_model, model, params, ids, mask, token_logps


def test_hf_pair_configs_have_the_features_under_test(hf_pair):
  _, model, _, _, _, _ = hf_pair
  cfg = model.config
  features = {
      "gpt2": cfg.positions == "learned" and cfg.qkv_bias,
      "llama": (cfg.rope_type == "llama3" and not cfg.tie_embeddings
                and cfg.num_kv_heads < cfg.num_heads),
      "qwen2": cfg.qkv_bias and cfg.num_kv_heads < cfg.num_heads,
      "mistral": cfg.sliding_window is not None and cfg.sliding_window < HF_P + HF_N,
      "qwen3": cfg.qk_norm == "head" and cfg.head_dim * cfg.num_heads != cfg.hidden_size,
      "gemma2": (cfg.layer_is_sliding == (True, False) and cfg.sliding_window < HF_P
                 and cfg.attn_logit_softcap is not None and cfg.final_logit_softcap is not None),
      "gemma3_text": (cfg.layer_is_sliding == (True, False) and cfg.sliding_window < HF_P
                      and cfg.rope_local_theta != cfg.rope_theta and cfg.qk_norm == "head"),
      "phi3": cfg.num_kv_heads < cfg.num_heads,
      "olmo2": cfg.norm_placement == "post" and cfg.qk_norm == "full",
  }
  assert features[cfg.model_type]


def _hf_greedy(hf_model, ids, mask, eos):
  import torch

  pad_id = hf_model.config.pad_token_id
  with torch.no_grad():
    out = hf_model.generate(torch.tensor(ids, dtype=torch.long),
                            attention_mask=torch.tensor(mask, dtype=torch.long), do_sample=False,
                            max_new_tokens=HF_N, eos_token_id=eos, pad_token_id=pad_id)
  new = out[:, ids.shape[1]:].numpy()
  return np.pad(new, ((0, 0), (0, HF_N - new.shape[1])), constant_values=pad_id)  # HF stops early


def test_greedy_matches_transformers_on_a_left_padded_batch(hf_pair):
  hf_model, model, params, ids, mask, _ = hf_pair
  free = _hf_greedy(hf_model, ids, mask, None)
  ours_free = sampling.generate(model, params, ids, mask, jax.random.key(0),
                                max_new_tokens=HF_N, temperature=0.0)
  np.testing.assert_array_equal(ours_free.tokens, free)
  # Stop ids taken from the free run, so rows stop at different steps (and one maybe never).
  stop_ids = [int(free[0, 3]), int(free[1, 6])]
  want = _hf_greedy(hf_model, ids, mask, stop_ids)
  out = sampling.generate(model, params, ids, mask, jax.random.key(0), max_new_tokens=HF_N,
                          temperature=0.0, eos_token_id=stop_ids)
  np.testing.assert_array_equal(out.tokens, want)
  assert np.asarray(out.mask).sum() < out.mask.size  # the stop path was exercised
  for b in range(len(HF_LENS)):
    s = _first_stop(want[b], stop_ids)
    np.testing.assert_array_equal(out.mask[b], np.arange(HF_N) <= (HF_N if s is None else s))


def test_phi3_longrope_greedy_matches_transformers_and_refuses_the_switch(tmp_path):
  """longrope (switch after 8 positions): prompts of 6 + 2 new tokens stay on the short factors
  and decode like transformers; 6 + 3 would cross the switch and is refused."""
  import torch
  from rlhf_jax import models

  hf_reference = _hf_reference()
  hf_model = hf_reference.make_hf_model("phi3", tmp_path, initializer_range=0.3,
                                        **hf_reference.PHI3_LONGROPE)
  model, params = models.from_pretrained(str(tmp_path))
  ids, mask = hf_reference.padded_batch(0, HF_LENS, HF_P, side="left")
  with torch.no_grad():
    want = hf_model.generate(torch.tensor(ids, dtype=torch.long),
                             attention_mask=torch.tensor(mask, dtype=torch.long), do_sample=False,
                             max_new_tokens=2, eos_token_id=None,
                             pad_token_id=hf_reference.PAD_ID)[:, HF_P:].numpy()
  out = sampling.generate(model, params, ids, mask, jax.random.key(0), max_new_tokens=2,
                          temperature=0.0)
  np.testing.assert_array_equal(out.tokens, want)
  with pytest.raises(ValueError, match=r"6 \+ max_new_tokens 3 = 9 exceeds the longrope switch"):
    sampling.generate(model, params, ids, mask, jax.random.key(0), max_new_tokens=3)


@pytest.fixture(scope="module")
def tiny_lm():
  """(CausalLM, params): the model tests' tiny Mistral config (GQA, sliding window), random init."""
  from rlhf_jax import models

  model = models.CausalLM(models.ModelConfig.from_hf(_hf_reference().hf_config("mistral")))
  params = model.init(jax.random.key(0))
  ids, mask = _hf_reference().padded_batch(1, HF_LENS, HF_P, side="left")
  return model, params, jnp.asarray(ids), jnp.asarray(mask)


# One program for both tests below (same static settings; stop ids are traced, 4 slots).
_REAL_LM_SAMPLING = dict(max_new_tokens=HF_N, temperature=0.9, top_k=10, top_p=0.95)


def test_causal_lm_fixed_key_reproduces_and_keys_differ(tiny_lm):
  model, params, ids, mask = tiny_lm
  gen = functools.partial(sampling.generate, model, params, ids, mask, **_REAL_LM_SAMPLING)
  a, b, c = gen(jax.random.key(1)), gen(jax.random.key(1)), gen(jax.random.key(2))
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.logps, b.logps)
  assert np.mean(np.asarray(a.tokens) != np.asarray(c.tokens)) > 0.5  # ~uniform over the top 10


def test_causal_lm_no_recompilation_for_same_shapes(tiny_lm):
  # Only the documented static settings fix the program: prompts, key, parameter values,
  # temperature, the top-p value and the stop ids all change here without a compile.
  model, params, ids, mask = tiny_lm
  sampling.generate(model, params, ids, mask, jax.random.key(0), eos_token_id=[3, 4],
                    **_REAL_LM_SAMPLING)
  # Inputs made before listening: building them runs small eager computations that compile.
  new_ids = jnp.asarray(np.random.default_rng(1).integers(0, 100, ids.shape), jnp.int32)
  new_params = jax.tree.map(lambda x: x * 1.5, params)
  new_key = jax.random.key(1)
  _assert_no_compilation(lambda: sampling.generate(
      model, new_params, new_ids, mask, new_key,
      **{**_REAL_LM_SAMPLING, "temperature": 0.6, "top_p": 0.8}, eos_token_id=5))


def test_learned_positions_bound_prompt_plus_new_tokens():
  # GPT-2's position table: past it nn.Embed would give NaN logits silently, so generate refuses
  # when the finished sequence (what the trainer scores) would not fit; exactly full is fine.
  # Shapes only (eval_shape): the check is on static shapes, so nothing needs compiling.
  from rlhf_jax import models

  table = HF_P + HF_N
  config = models.ModelConfig.from_hf(_hf_reference().hf_config("gpt2", n_positions=table))
  model = models.CausalLM(config)
  params = jax.eval_shape(model.init, jax.random.key(0))
  ids, mask = _hf_reference().padded_batch(2, HF_LENS, HF_P, side="left")

  def shapes(max_new_tokens):
    return jax.eval_shape(lambda p: sampling.generate(model, p, ids, mask, jax.random.key(0),
                                                      max_new_tokens=max_new_tokens), params)

  assert shapes(HF_N).tokens.shape == (len(HF_LENS), HF_N)
  with pytest.raises(ValueError, match=r"6 \+ max_new_tokens 11 = 17 exceeds .*"
                                       r"max_position_embeddings=16"):
    shapes(HF_N + 1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logps_equal_token_logps_of_the_full_forward(hf_pair, temperature):
  # The KV-cache decode (sampler) against one no-cache forward of prompt + completion scored by
  # the trainer's log-prob function: the same distribution, up to float32 rounding.
  _, model, params, ids, mask, token_logps = hf_pair
  out = sampling.generate(model, params, ids, mask, jax.random.key(7), max_new_tokens=HF_N,
                          temperature=temperature, eos_token_id=[5, 6, 7, 8, 9])
  full_ids = jnp.concatenate([jnp.asarray(ids), out.tokens], axis=1)
  full_mask = jnp.concatenate([jnp.asarray(mask), out.mask], axis=1)
  want = token_logps(params, full_ids, full_mask, temperature=temperature)[:, HF_P:]
  np.testing.assert_allclose(out.logps, want, atol=2e-5)
  # And the tokens are a plausible sample: not all greedy (temperature is on).
  greedy = sampling.generate(model, params, ids, mask, jax.random.key(7), max_new_tokens=HF_N,
                             temperature=0.0)
  assert np.any(np.asarray(out.tokens) != np.asarray(greedy.tokens))


# ----------------------------------------------------------------------------------------------
# generate_text


@pytest.fixture(scope="module")
def word_tokenizer():
  """A word-level tokenizer over the toy vocabulary: <unk> <pad> <eos> <bos> w4 ... w47."""
  import tokenizers
  import transformers

  words = ["<unk>", "<pad>", "<eos>", "<bos>"] + [f"w{i}" for i in range(4, TOY.config.vocab_size)]
  backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok = transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>",
      bos_token="<bos>")
  tok.chat_template = ("{% for m in messages %}<bos> {{ m['content'] }} <eos> {% endfor %}"
                       "{% if add_generation_prompt %}w4{% endif %}")
  return tok


@pytest.mark.parametrize("chat", [False, True])
def test_generate_text_left_pads_templates_and_decodes(toy_setup, word_tokenizer, chat):
  params = toy_setup[0]
  prompts = ["w5 w9 w20", "w7", "w30 w31 w32 w33 w34"]
  texts = sampling.generate_text(
      TOY, params, word_tokenizer, prompts, jax.random.key(0), chat=chat, max_new_tokens=6,
      temperature=0.0)
  assert word_tokenizer.padding_side == "right"  # restored
  # Reference: the same prompts left-padded by hand to 16 slots.
  rendered = [f"<bos> {p} <eos> w4" if chat else p for p in prompts]
  ids = np.full((3, 16), 1, np.int32)
  mask = np.zeros_like(ids)
  for b, text in enumerate(rendered):
    row = word_tokenizer.convert_tokens_to_ids(text.split())
    ids[b, 16 - len(row):], mask[b, 16 - len(row):] = row, 1
  out = sampling.generate(TOY, params, ids, mask, jax.random.key(0), max_new_tokens=6,
                          temperature=0.0, eos_token_id=2)
  want = [" ".join(f"w{t}" for t in row[m == 1] if t != 2)
          for row, m in zip(np.asarray(out.tokens), np.asarray(out.mask))]
  assert texts == want and all(texts)


@pytest.mark.parametrize("hf_pair", _FILTER_FAMILIES, indirect=True)
def test_truncated_logps_equal_the_filtered_full_forward(hf_pair):
  # top-k + top-p through the real KV-cache decode, against the NumPy filter applied to one
  # no-cache forward's logits: every token inside the kept set, logps renormalised over it.
  _, model, params, ids, mask, _ = hf_pair
  settings = dict(temperature=0.9, top_k=20, top_p=0.8)
  out = sampling.generate(model, params, ids, mask, jax.random.key(11), max_new_tokens=HF_N,
                          **settings)
  full_ids = jnp.concatenate([jnp.asarray(ids), out.tokens], axis=1)
  full_mask = jnp.concatenate([jnp.asarray(mask), out.mask], axis=1)
  logits = np.asarray(jax.jit(model.apply)(params, full_ids, full_mask).logits)[:, HF_P - 1:-1]
  ref = _np_log_softmax(_np_filter(logits.reshape(-1, logits.shape[-1]), 0.9, 20, 0.8))
  want = ref[np.arange(ref.shape[0]), np.asarray(out.tokens).reshape(-1)].reshape(out.tokens.shape)
  assert np.all(np.isfinite(want)), "emitted a token outside the top-k/top-p set"
  np.testing.assert_allclose(out.logps, want, atol=2e-5)

@pytest.mark.slow
@pytest.mark.parametrize("hf_pair", _FILTER_FAMILIES, indirect=True)
def test_bf16_sampler_logps_match_the_trainers(hf_pair):
  # A known failure elsewhere: sampler-vs-trainer log-prob mismatch in bf16. Both read the same bf16 hidden
  # states through the same f32-accumulated unembedding, so the gap is bf16 attention rounding.
  _, model, params, ids, mask, token_logps = hf_pair
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  out = sampling.generate(model, params, ids, mask, jax.random.key(1), max_new_tokens=HF_N)
  full_ids = jnp.concatenate([jnp.asarray(ids), out.tokens], axis=1)
  full_mask = jnp.concatenate([jnp.asarray(mask), out.mask], axis=1)
  want = token_logps(params, full_ids, full_mask)[:, HF_P:]
  np.testing.assert_allclose(out.logps, want, atol=2e-2)

def test_batch_sharded_over_devices_gives_the_same_samples(toy_setup):
  # Prompts split over the 8 fake CPU devices (a "data" mesh axis), params replicated.
  params, ids, mask = toy_setup
  ids, mask = jnp.tile(ids, (2, 1)), jnp.tile(mask, (2, 1))
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  kw = dict(max_new_tokens=N, temperature=1.0, eos_token_id=[7, 11])
  want = sampling.generate(TOY, params, ids, mask, jax.random.key(4), **kw)
  got = sampling.generate(TOY, params, jax.device_put(ids, batch_sharding),
                          jax.device_put(mask, batch_sharding), jax.random.key(4), **kw)
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_array_equal(got.mask, want.mask)
  np.testing.assert_allclose(got.logps, want.logps, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Top-p alone: the top-k prefilter and its exact fallback.


def _peaked_logits(rows, vocab, seed):
  """Logits whose top-0.9 nucleus is a few dozen tokens (inside the prefilter)."""
  z = np.random.default_rng(seed).normal(size=(rows, vocab)).astype(np.float32)
  z[:, :40] += 9.0
  return z


def _flat_logits(rows, vocab, seed):
  """Logits whose top-0.9 nucleus is most of the vocabulary (past the prefilter)."""
  return np.random.default_rng(seed).normal(size=(rows, vocab)).astype(np.float32) * 0.3


def _tied_logits(rows, vocab):
  """The nucleus ends inside the prefilter on a value shared past it: ties must all be kept."""
  z = np.full((rows, vocab), -5.0, np.float32)
  z[:, :10] = 6.0
  z[:, 10:400] = 3.0  # 390 tokens tied, straddling the 256-candidate boundary
  return z


@pytest.mark.parametrize("case,hits", [("peaked", True), ("flat", False), ("mixed", False),
                                       ("tied", False)])
def test_top_p_prefilter_gives_the_full_sort_threshold(case, hits):
  vocab, top_p = 2000, 0.9
  logits = {"peaked": _peaked_logits(4, vocab, 0), "flat": _flat_logits(4, vocab, 1),
            "mixed": np.concatenate([_peaked_logits(3, vocab, 2), _flat_logits(1, vocab, 3)]),
            "tied": _tied_logits(2, vocab)}[case]
  z = jnp.asarray(logits)
  lse = jax.nn.logsumexp(z, axis=-1, keepdims=True)
  hit = jax.jit(lambda z: sampling._prefilter(z, lse, top_p, sampling.TOP_P_CANDIDATES)[3])(z)
  assert bool(hit) == hits
  filtered = functools.partial(sampling._candidates, temperature=1.0, top_p=top_p, top_k=0,
                               use_top_p=True)
  fast = np.asarray(jax.jit(lambda z: filtered(z)[0])(z))
  exact = np.asarray(jax.jit(lambda z: filtered(z, prefilter=0)[0])(z))
  np.testing.assert_array_equal(fast, exact)
  np.testing.assert_array_equal(np.asarray(sampling.filter_logits(z, top_p=top_p)), exact)
  want = _np_filter(logits, 1.0, 0, top_p)
  if case == "tied":  # the reference cuts inside the tie; the sampler keeps all tied tokens
    assert np.all(np.isfinite(exact[:, :400])) and not np.any(np.isfinite(exact[:, 400:]))
  else:
    np.testing.assert_array_equal(np.isfinite(exact), np.isfinite(want))
  if case == "peaked":
    assert np.all(np.isfinite(exact).sum(-1) < sampling.TOP_P_CANDIDATES)


def test_top_p_alone_sorts_the_vocabulary_only_in_the_fallback_branch():
  # The compiled program (not just the lowering): XLA CPU turns a top_k whose outputs are sliced
  # at an offset back into a full [B, V] sort with an index payload, which cost ~1 s per step
  # at 152k entries. The only [B, V] sort left must sit in the lax.cond fallback branch.
  shape = (2, 5000)
  for fn in (functools.partial(sampling.sample_from_logits, key=jax.random.key(0), top_p=0.5),
             functools.partial(sampling.filter_logits, top_p=0.5)):
    text = jax.jit(fn).lower(jnp.zeros(shape)).compile().as_text()
    sorts = [line for line in text.splitlines() if " sort(" in line and "2,5000]" in line]
    assert sorts, "expected the fallback sort"
    assert all("cond/branch" in line and "s32[2,5000]" not in line for line in sorts), sorts


@pytest.mark.parametrize("case", ["peaked", "flat"])
def test_top_p_prefilter_draw_frequencies_match_the_truncated_softmax(case):
  # One distribution over 600 tokens, 20k draws: the prefilter path (peaked: the nucleus is
  # inside the candidates) and the fallback (flat) both draw from the exact truncated softmax.
  draws, vocab, top_p = 20_000, 600, 0.9
  logits = (_peaked_logits if case == "peaked" else _flat_logits)(1, vocab, 5)
  tokens, logps = jax.jit(functools.partial(sampling.sample_from_logits, top_p=top_p))(
      jnp.broadcast_to(jnp.asarray(logits), (draws, vocab)), jax.random.key(7))
  probs = np.exp(_np_log_softmax(_np_filter(logits, 1.0, 0, top_p)))[0]
  kept = probs > 0
  counts = np.bincount(np.asarray(tokens), minlength=vocab)
  assert counts[~kept].sum() == 0
  if case == "flat":  # ~500 kept tokens: pool them into 20 bins of equal expected mass
    order = np.argsort(-probs[kept])
    bins = np.minimum((np.cumsum(probs[kept][order]) / probs[kept].sum() * 20).astype(int), 19)
    counts_k = np.bincount(bins, weights=counts[kept][order], minlength=20)
    probs_k = np.bincount(bins, weights=probs[kept][order], minlength=20)
  else:
    counts_k, probs_k = counts[kept], probs[kept]
  assert _chi2_pvalue(counts_k, probs_k / probs_k.sum()) > 1e-4
  np.testing.assert_allclose(np.exp(np.asarray(logps)), probs[np.asarray(tokens)], rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# Group sampling: num_samples = G prefills each prompt once and copies its cache to G rows.


def test_num_samples_equals_generate_on_repeated_prompts(toy_setup):
  params, ids, mask = toy_setup
  g = 3
  rep_ids, rep_mask = jnp.repeat(ids, g, axis=0), jnp.repeat(mask, g, axis=0)
  for temperature in (0.0, 1.0):
    grouped = sampling.generate(TOY, params, ids, mask, jax.random.key(4), max_new_tokens=N,
                                temperature=temperature, num_samples=g)
    repeated = sampling.generate(TOY, params, rep_ids, rep_mask, jax.random.key(4),
                                 max_new_tokens=N, temperature=temperature)
    assert grouped.tokens.shape == (len(PROMPT_LENS) * g, N)
    # Same key, same [B·G, V] draws: the grouped rows are exactly the repeated prompts' rows.
    np.testing.assert_array_equal(grouped.tokens, repeated.tokens)
    np.testing.assert_allclose(grouped.logps, repeated.logps, atol=1e-6)
    want, _ = _full_forward_logps(TOY, params, rep_ids, rep_mask, grouped, temperature, 0, 1.0)
    np.testing.assert_allclose(grouped.logps, want, atol=2e-5)
  tokens = np.asarray(grouped.tokens).reshape(len(PROMPT_LENS), g, N)
  for b in range(len(PROMPT_LENS)):  # sampled copies of one prompt differ
    assert not np.all(tokens[b] == tokens[b, :1])


@pytest.mark.parametrize("hf_pair", _CACHE_FAMILIES, indirect=True)
def test_num_samples_on_a_causal_lm(hf_pair):
  _, model, params, ids, mask, token_logps = hf_pair
  g = 2
  rep_ids, rep_mask = np.repeat(ids, g, axis=0), np.repeat(mask, g, axis=0)
  greedy = sampling.generate(model, params, ids, mask, jax.random.key(0), max_new_tokens=HF_N,
                             temperature=0.0, num_samples=g)
  want = sampling.generate(model, params, rep_ids, rep_mask, jax.random.key(0),
                           max_new_tokens=HF_N, temperature=0.0)
  np.testing.assert_array_equal(greedy.tokens, want.tokens)
  np.testing.assert_allclose(greedy.logps, want.logps, atol=2e-5)
  sampled = sampling.generate(model, params, ids, mask, jax.random.key(1), max_new_tokens=HF_N,
                              temperature=1.0, num_samples=g)
  full_ids = jnp.concatenate([jnp.asarray(rep_ids), sampled.tokens], axis=1)
  full_mask = jnp.concatenate([jnp.asarray(rep_mask), sampled.mask], axis=1)
  np.testing.assert_allclose(sampled.logps, token_logps(params, full_ids, full_mask)[:, HF_P:],
                             atol=2e-5)
  tokens = np.asarray(sampled.tokens).reshape(len(HF_LENS), g, HF_N)
  assert np.mean(tokens[:, 0] != tokens[:, 1]) > 0.2


def test_num_samples_is_validated(toy_setup):
  params, ids, mask = toy_setup
  with pytest.raises(ValueError, match="num_samples"):
    sampling.generate(TOY, params, ids, mask, jax.random.key(0), max_new_tokens=2, num_samples=0)


# ----------------------------------------------------------------------------------------------
# The decode step reads each weight once (no per-layer slice copies of stacked arrays).


def _bytes_accessed(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0]
  return float(cost["bytes accessed"])


def test_decode_step_reads_each_weight_once():
  from rlhf_jax import models

  # Weights dominate (2 layers of width 256, MLP 1024; a small vocabulary, whose embedding the
  # cost model counts twice: the token gather reads the table, so does the tied unembedding).
  config = models.ModelConfig(
      model_type="qwen2", vocab_size=512, hidden_size=256, num_layers=2, num_heads=4,
      num_kv_heads=2, head_dim=64, intermediate_size=1024, norm="rmsnorm", positions="rope",
      max_position_embeddings=512, mlp="gated", activation="silu", qkv_bias=True,
      tie_embeddings=True)
  model = models.CausalLM(config)
  params = model.init(jax.random.key(0))
  batch, slots = 2, 48
  step = jax.jit(functools.partial(sampling._decode_step, model), donate_argnums=(1,))
  args = (jnp.zeros((batch,), jnp.int32), jnp.ones((batch, slots), jnp.int32),
          jnp.zeros((batch,), jnp.int32), jnp.int32(20))

  def ratio(decode_params, cache):
    read = sum(x.nbytes for x in jax.tree.leaves(params)) + sum(
        x.nbytes for x in jax.tree.leaves(cache))
    return _bytes_accessed(step.lower(decode_params, cache, *args).compile()) / read

  # What generate's loop runs: the layout from _decode_layout (per-layer weights and cache).
  layout_params, layout_cache = sampling._decode_layout(model, params, batch, slots, jnp.float32)
  assert ratio(layout_params, layout_cache) <= 1.2
  # The same step on the stacked [L, ...] params and cache copies each layer's slices first:
  # the measure can tell.
  assert ratio(params, model.init_cache(batch, slots)) > 1.4
