"""The attention kernels against the XLA reference: TPU splash attention in Pallas interpret mode
on the CPU (slow, so tiny shapes), and the structured-mask plumbing the kernels rely on."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models import CausalLM, ModelConfig
from rlhf_jax.models.layers import _attend, _local_window_size, attention_implementation
from rlhf_jax.models.transformer import attention_mask_B1TS

T = 128


def _config(**overrides):
  base = dict(model_type="mistral", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
              num_kv_heads=2, head_dim=8, intermediate_size=32, attention_impl="xla")
  return ModelConfig(**{**base, **overrides})


def _qkv(batch, heads=4, kv_heads=2, dim=8):
  keys = jax.random.split(jax.random.key(0), 3)
  return (jax.random.normal(keys[0], (batch, T, heads, dim)),
          jax.random.normal(keys[1], (batch, T, kv_heads, dim)),
          jax.random.normal(keys[2], (batch, T, kv_heads, dim)))


def _packed_segments():
  """Two rows: three packed segments then padding; one left-padded example."""
  row0 = np.repeat([1, 2, 3, 0], [40, 50, 30, 8])
  row1 = np.repeat([0, 1], [20, T - 20])
  return jnp.asarray(np.stack([row0, row1]), jnp.int32)


@pytest.mark.slow
@pytest.mark.parametrize("window", [None, 24])
def test_splash_equals_xla_on_real_tokens_with_its_gradient(window):
  q, k, v = _qkv(2)
  segments_BT = _packed_segments()
  mask = attention_mask_B1TS(segments_BT > 0, jnp.arange(T), window, segments_BT)
  real_BT = np.asarray(segments_BT > 0)

  def loss(impl, q, k, v):
    out = _attend(q, k, v, mask, impl, False, auto=False, scale=0.3,
                  segment_ids_BT=segments_BT, window=window)
    return jnp.sum(jnp.where(segments_BT[:, :, None, None] > 0, out, 0.0) ** 2), out

  (value_x, out_x), grads_x = jax.value_and_grad(loss, (1, 2, 3), has_aux=True)("xla", q, k, v)
  (value_s, out_s), grads_s = jax.value_and_grad(loss, (1, 2, 3), has_aux=True)("splash", q, k,
                                                                                v)
  np.testing.assert_allclose(np.asarray(out_s)[real_BT], np.asarray(out_x)[real_BT], atol=2e-6)
  np.testing.assert_allclose(value_s, value_x, rtol=1e-5)
  for g_s, g_x in zip(grads_s, grads_x):
    np.testing.assert_allclose(g_s, g_x, atol=2e-5)


@pytest.mark.slow
def test_splash_model_matches_xla_on_a_mixed_sliding_model_with_packed_rows():
  """Scanned layers with a traced sliding flag (lax.cond between the two kernels), packed rows."""
  config = _config(sliding_window=16, sliding_layers=(True, False))
  segments_BT = _packed_segments()
  ids = jax.random.randint(jax.random.key(1), segments_BT.shape, 1, 64) * (segments_BT > 0)
  xla = CausalLM(config)
  params = xla.init(jax.random.key(2))
  splash = CausalLM(dataclasses.replace(config, attention_impl="splash"))
  want = xla.apply(params, ids, segment_ids=segments_BT).logits
  got = splash.apply(params, ids, segment_ids=segments_BT).logits
  real_BT = np.asarray(segments_BT > 0)
  np.testing.assert_allclose(np.asarray(got)[real_BT], np.asarray(want)[real_BT], atol=1e-5)
  # A wrong window (every layer sliding) changes the real tokens' logits: the test can fail.
  slide_all = CausalLM(dataclasses.replace(config, attention_impl="splash", sliding_layers=None))
  other = slide_all.apply(params, ids, segment_ids=segments_BT).logits
  assert np.abs(np.asarray(other)[real_BT] - np.asarray(want)[real_BT]).max() > 1e-3


def test_kernel_choice_and_fallbacks():
  config = _config(attention_impl=None)
  if jax.default_backend() == "cpu":
    assert attention_implementation(config, jnp.bfloat16, 8, False, T) == "xla"
  q, k, v = _qkv(1)
  mask = attention_mask_B1TS(jnp.ones((1, T)), jnp.arange(T), None)
  want = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
  # splash without segment ids (e.g. branch ids): XLA in auto mode, an error when asked for.
  np.testing.assert_allclose(_attend(q, k, v, mask, "splash", False, auto=True), want, atol=1e-6)
  with pytest.raises(ValueError, match="splash"):
    _attend(q, k, v, mask, "splash", False, auto=False)
  # cuDNN off a GPU (auto): XLA, the window dropped with it.
  np.testing.assert_allclose(
      _attend(q, k, v, mask, "cudnn", False, auto=True,
              segment_ids_BT=jnp.ones((1, T), jnp.int32), window=T), want, atol=1e-6)


@pytest.mark.parametrize("window", [1, 5, 24])
def test_the_window_given_to_the_kernels_is_the_dense_masks_window(window):
  """cuDNN's local_window_size (and splash's LocalMask) from _local_window_size: the causal
  attention it defines equals the dense sliding-window mask's (XLA implements both)."""
  q, k, v = _qkv(1)
  dense = attention_mask_B1TS(jnp.ones((1, T)), jnp.arange(T), window)
  want = jax.nn.dot_product_attention(q, k, v, mask=dense, implementation="xla")
  got = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla",
                                     local_window_size=_local_window_size(window))
  np.testing.assert_allclose(got, want, atol=1e-6)
  off_by_one = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla",
                                            local_window_size=(window, 0))
  assert np.abs(np.asarray(off_by_one) - np.asarray(want)).max() > 1e-3


@pytest.mark.slow
def test_splash_model_matches_xla_on_left_padded_unpacked_rows():
  """Without segment ids the decoder hands the kernels the key mask as segment ids."""
  config = _config(model_type="llama", num_layers=1)
  mask_BT = jnp.asarray(np.stack([np.arange(T) >= 30, np.ones(T, bool)]), jnp.int32)
  ids = jax.random.randint(jax.random.key(3), mask_BT.shape, 1, 64) * mask_BT
  xla = CausalLM(config)
  params = xla.init(jax.random.key(4))
  splash = CausalLM(dataclasses.replace(config, attention_impl="splash"))
  real_BT = np.asarray(mask_BT > 0)
  np.testing.assert_allclose(np.asarray(splash.apply(params, ids, mask_BT).logits)[real_BT],
                             np.asarray(xla.apply(params, ids, mask_BT).logits)[real_BT],
                             atol=1e-5)
