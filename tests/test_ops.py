"""rlhf_jax.ops: masked reductions and token log-probs (naive and chunked) against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import ops


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_masked_mean_matches_slicing():
  rng = np.random.default_rng(0)
  values = rng.normal(size=(3, 5)).astype(np.float32)
  mask = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], np.float32)
  per_row = ops.masked_mean(jnp.asarray(values), jnp.asarray(mask), axis=-1)
  np.testing.assert_allclose(per_row[0], values[0, :2].mean(), rtol=1e-6)
  np.testing.assert_allclose(per_row[1], values[1].mean(), rtol=1e-6)
  assert per_row[2] == 0.0  # empty row: 0, not NaN
  total = ops.masked_mean(jnp.asarray(values), jnp.asarray(mask))
  np.testing.assert_allclose(total, values[mask == 1].mean(), rtol=1e-6)
  np.testing.assert_allclose(
      ops.masked_sum(jnp.asarray(values), jnp.asarray(mask)), values[mask == 1].sum(), rtol=1e-6)


def test_masked_mean_empty_row_has_finite_gradient():
  values = jnp.ones((2, 3))
  mask = jnp.array([[1, 0, 0], [0, 0, 0]])
  grad = jax.grad(lambda v: ops.masked_mean(v, mask, axis=-1).sum())(values)
  assert np.all(np.isfinite(grad))
  np.testing.assert_array_equal(grad, [[1, 0, 0], [0, 0, 0]])


def test_masked_mean_ignores_values_under_the_mask():
  mask = jnp.array([[1, 1, 0]])
  a = ops.masked_mean(jnp.array([[1.0, 2.0, 3.0]]), mask)
  b = ops.masked_mean(jnp.array([[1.0, 2.0, 1e30]]), mask)
  assert a == b == 1.5


def test_packed_sequence_sums_agree_with_sequence_logps():
  logps = jnp.array([[-1.0, -2.0, -3.0, -4.0], [-5.0, -6.0, -7.0, -8.0]])
  mask = jnp.array([[0, 1, 1, 1], [1, 1, 0, 0]])
  one_per_row = jnp.array([[0, 0, 0, 0], [1, 1, 1, 1]])
  for reduction in ("sum", "mean"):
    np.testing.assert_allclose(
        ops.packed_sequence_sums(logps, mask, one_per_row, 2, reduction=reduction),
        ops.sequence_logps(logps, mask, reduction=reduction))
  # three sequences in the first row, none counted in the second; an empty sequence's mean is 0
  ids = jnp.array([[0, 1, 1, 2], [-1, -1, 3, 3]])
  np.testing.assert_allclose(ops.packed_sequence_sums(logps, mask, ids, 4), [0, -5, -4, 0])
  np.testing.assert_allclose(ops.packed_sequence_sums(logps, mask, ids, 4, reduction="mean"),
                             [0, -2.5, -4, 0])


def test_sequence_logps_sum_and_mean():
  logps = jnp.array([[-1.0, -2.0, -3.0], [-4.0, 0.0, 0.0]])
  mask = jnp.array([[1, 1, 1], [1, 0, 0]])
  np.testing.assert_allclose(ops.sequence_logps(logps, mask, reduction="sum"), [-6.0, -4.0])
  np.testing.assert_allclose(ops.sequence_logps(logps, mask, reduction="mean"), [-2.0, -4.0])
  with pytest.raises(ValueError, match="reduction"):
    ops.sequence_logps(logps, mask, reduction="max")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logps_from_logits_matches_numpy(temperature):
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 4, 11)).astype(np.float32) * 3
  labels = rng.integers(0, 11, size=(2, 4))
  got = ops.token_logps_from_logits(jnp.asarray(logits), jnp.asarray(labels), temperature=temperature)
  want = np.take_along_axis(_np_log_softmax(logits.astype(np.float64) / temperature),
                            labels[..., None], -1)[..., 0]
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert got.dtype == jnp.float32


def test_token_logps_from_bf16_logits_is_float32_and_finite():
  logits = (jnp.arange(2 * 3 * 7, dtype=jnp.float32).reshape(2, 3, 7) * 50).astype(jnp.bfloat16)
  labels = jnp.zeros((2, 3), jnp.int32)
  got = ops.token_logps_from_logits(logits, labels)
  assert got.dtype == jnp.float32 and np.all(np.isfinite(got))


def test_entropy_from_logits_closed_forms():
  uniform = jnp.zeros((2, 8))
  np.testing.assert_allclose(ops.entropy_from_logits(uniform), np.log(8.0) * np.ones(2), rtol=1e-6)
  one_hot = jnp.array([[0.0, -1e4, -1e4]])
  np.testing.assert_allclose(ops.entropy_from_logits(one_hot), [0.0], atol=1e-6)
  # A filtered vocabulary (-inf logits) is a distribution over the rest, not a NaN.
  filtered = jnp.array([[0.0, -jnp.inf, 0.0, -jnp.inf]])
  np.testing.assert_allclose(ops.entropy_from_logits(filtered), [np.log(2.0)], rtol=1e-6)
  grad = jax.grad(lambda x: ops.entropy_from_logits(x).sum())(filtered + jnp.array([[0.3, 0, 0, 0]]))
  assert np.all(np.isfinite(grad)) and grad[0, 1] == 0 and grad[0, 3] == 0
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(5, 9))
  p = np.exp(_np_log_softmax(logits / 0.5))
  np.testing.assert_allclose(ops.entropy_from_logits(jnp.asarray(logits), temperature=0.5),
                             -(p * np.log(p)).sum(-1), rtol=1e-5)


def _naive(hidden, unembed, labels, temperature):
  logits = jnp.einsum("...d,dv->...v", hidden, unembed)
  return ops.token_logps_from_logits(logits, labels, temperature=temperature)


# chunk sizes: one that divides the token count, one that leaves a ragged last chunk (padding),
# and one larger than the whole input.
@pytest.mark.parametrize("chunk_size", [4, 5, 64])
@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_chunked_token_logps_equal_naive_values_and_gradients(chunk_size, temperature):
  rng = np.random.default_rng(3)
  hidden = jnp.asarray(rng.normal(size=(2, 6, 16)), jnp.float32)
  unembed = jnp.asarray(rng.normal(size=(16, 37)) * 0.5, jnp.float32)
  labels = jnp.asarray(rng.integers(0, 37, size=(2, 6)))
  weights = jnp.asarray(rng.normal(size=(2, 6)), jnp.float32)  # an arbitrary downstream loss

  def loss(fn, h, w):
    return jnp.sum(weights * fn(h, w))

  chunked = lambda h, w: ops.chunked_token_logps(
      h, w, labels, temperature=temperature, chunk_size=chunk_size)
  naive = lambda h, w: _naive(h, w, labels, temperature)
  np.testing.assert_allclose(chunked(hidden, unembed), naive(hidden, unembed), atol=1e-5)
  grads_chunked = jax.grad(lambda h, w: loss(chunked, h, w), argnums=(0, 1))(hidden, unembed)
  grads_naive = jax.grad(lambda h, w: loss(naive, h, w), argnums=(0, 1))(hidden, unembed)
  for got, want in zip(grads_chunked, grads_naive):
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_chunked_entropy_equals_entropy_from_logits():
  rng = np.random.default_rng(4)
  hidden = jnp.asarray(rng.normal(size=(3, 5, 8)), jnp.float32)
  unembed = jnp.asarray(rng.normal(size=(8, 19)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 19, size=(3, 5)))
  logps, entropy = ops.chunked_token_logps(
      hidden, unembed, labels, chunk_size=4, temperature=0.9, return_entropy=True)
  logits = jnp.einsum("btd,dv->btv", hidden, unembed)
  np.testing.assert_allclose(entropy, ops.entropy_from_logits(logits, temperature=0.9), atol=1e-5)
  np.testing.assert_allclose(logps, _naive(hidden, unembed, labels, 0.9), atol=1e-5)
  # Entropy gradients flow too (an entropy bonus is differentiable), and match the naive ones.
  g_chunked = jax.grad(lambda h: ops.chunked_token_logps(
      h, unembed, labels, chunk_size=4, return_entropy=True)[1].sum())(hidden)
  g_naive = jax.grad(lambda h: ops.entropy_from_logits(
      jnp.einsum("btd,dv->btv", h, unembed)).sum())(hidden)
  np.testing.assert_allclose(g_chunked, g_naive, atol=1e-5)


def test_chunked_token_logps_bf16_inputs():
  rng = np.random.default_rng(5)
  hidden = jnp.asarray(rng.normal(size=(2, 8, 16)), jnp.bfloat16)
  unembed = jnp.asarray(rng.normal(size=(16, 50)) * 0.3, jnp.bfloat16)
  labels = jnp.asarray(rng.integers(0, 50, size=(2, 8)))
  got = ops.chunked_token_logps(hidden, unembed, labels, chunk_size=3)
  want = _naive(hidden.astype(jnp.float32), unembed.astype(jnp.float32), labels, 1.0)
  assert got.dtype == jnp.float32
  # bf16 products accumulated in float32: error is the bf16 rounding of the inputs only.
  np.testing.assert_allclose(got, want, atol=2e-2)


def test_chunked_token_logps_never_materialises_full_logits():
  """The compiled forward+backward holds about one [chunk, V] block, not [N, V]."""
  num_tokens, width, vocab, chunk = 2048, 32, 4096, 128
  hidden = jax.ShapeDtypeStruct((1, num_tokens, width), jnp.float32)
  unembed = jax.ShapeDtypeStruct((width, vocab), jnp.float32)
  labels = jax.ShapeDtypeStruct((1, num_tokens), jnp.int32)

  def temp_bytes(fn):
    grad_fn = jax.grad(lambda h, w, y: fn(h, w, y).sum(), argnums=(0, 1))
    compiled = jax.jit(grad_fn).lower(hidden, unembed, labels).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  chunked = temp_bytes(lambda h, w, y: ops.chunked_token_logps(h, w, y, chunk_size=chunk))
  naive = temp_bytes(lambda h, w, y: _naive(h, w, y, 1.0))
  full_logits = num_tokens * vocab * 4
  assert naive >= full_logits  # the naive path does hold the [N, V] float32 logits
  assert chunked < full_logits / 4, (chunked, naive)


@pytest.mark.parametrize("chunk_size", [2, 7, 512])  # several column chunks, ragged, one chunk
@pytest.mark.parametrize("entropy, temperature, cap", [(False, 1.0, None), (True, 0.8, 3.0)])
def test_scored_token_logps_equal_the_chunked_ones_where_scored(chunk_size, entropy,
                                                                temperature, cap):
  """Values and gradients (hidden and unembedding, through log-probs and entropies) equal
  `chunked_token_logps` at the scored positions; 0 elsewhere; a row with nothing scored and
  rows whose scored positions are scattered anywhere in the row."""
  rng = np.random.default_rng(6)
  hidden = jnp.asarray(rng.normal(size=(3, 11, 16)), jnp.float32)
  unembed = jnp.asarray(rng.normal(size=(16, 41)) * 0.5, jnp.float32)
  labels = jnp.asarray(rng.integers(0, 41, size=(3, 11)))
  where = rng.random((3, 11)) < 0.5
  where[1] = False
  where[2, -3:] = True
  g_logps, g_entropy = (jnp.asarray(rng.normal(size=(3, 11)), jnp.float32) for _ in range(2))

  def loss(fn, h, w):
    logps, ent = fn(h, w)
    return jnp.sum(g_logps * logps) + jnp.sum(g_entropy * ent)

  options = dict(temperature=temperature, logit_softcap=cap, return_entropy=entropy)

  def chunked(h, w):
    out = ops.chunked_token_logps(h, w, labels, chunk_size=4, **options)
    logps, ent = out if entropy else (out, jnp.zeros_like(out))
    return jnp.where(where, logps, 0.0), jnp.where(where, ent, 0.0)

  def scored(h, w):
    out = ops.scored_token_logps(h, w, labels, where, chunk_size=chunk_size, **options)
    return out if entropy else (out, jnp.zeros_like(out))

  for got, want in zip(jax.jit(scored)(hidden, unembed), chunked(hidden, unembed)):
    np.testing.assert_allclose(got, want, atol=1e-5)
  grads = [jax.jit(jax.grad(lambda h, w, fn=fn: loss(fn, h, w), argnums=(0, 1)))(hidden, unembed)
           for fn in (scored, chunked)]
  for got, want in zip(*grads):
    np.testing.assert_allclose(got, want, atol=1e-5)
  assert np.abs(grads[0][0][1]).max() == 0  # nothing scored in row 1: no gradient reaches it


def test_scored_token_logps_loop_stops_after_the_longest_row_s_scored_positions():
  """The chunk loop's trip count is data: with the scored positions of every row in its first
  3 columns, the loop body runs once (chunk of 4 columns), not once per 4 columns of the row.
  Counted through a debug callback in the gradient's forward pass."""
  calls = []
  hidden = jnp.ones((2, 32, 8), jnp.float32)
  unembed = jnp.ones((8, 5), jnp.float32) * 0.1
  labels = jnp.zeros((2, 32), jnp.int32)
  where = jnp.zeros((2, 32), bool).at[:, 20:23].set(True)
  original = jax.nn.logsumexp

  def counting_logsumexp(*args, **kwargs):
    jax.debug.callback(lambda: calls.append(1))
    return original(*args, **kwargs)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(jax.nn, "logsumexp", counting_logsumexp)
    ops._scored_head.cache_clear()
    out = ops.scored_token_logps(hidden, unembed, labels, where, chunk_size=8)
    jax.block_until_ready(out)
  ops._scored_head.cache_clear()
  assert len(calls) == 1, calls
  np.testing.assert_allclose(np.asarray(out)[:, 20:23], np.log(1 / 5), rtol=1e-6)


def test_scored_token_logps_in_bfloat16_match_the_chunked_ones():
  """bfloat16 hidden states and unembedding (what a bf16 trainer passes): the same log-probs,
  gradients in bfloat16 within one bfloat16 rounding of the chunked op's."""
  rng = np.random.default_rng(0)
  hidden = jnp.asarray(rng.normal(size=(3, 40, 32)), jnp.bfloat16)
  unembed = jnp.asarray(rng.normal(size=(32, 97)) * 0.3, jnp.bfloat16)
  labels = jnp.asarray(rng.integers(0, 97, (3, 40)))
  where = jnp.asarray(rng.random((3, 40)) < 0.4)
  scored = lambda h, w: jnp.sum(ops.scored_token_logps(h, w, labels, where, chunk_size=16))
  chunked = lambda h, w: jnp.sum(jnp.where(where, ops.chunked_token_logps(h, w, labels,
                                                                          chunk_size=16), 0.0))
  np.testing.assert_allclose(scored(hidden, unembed), chunked(hidden, unembed), rtol=1e-6)
  for got, want in zip(jax.grad(scored, (0, 1))(hidden, unembed),
                       jax.grad(chunked, (0, 1))(hidden, unembed)):
    assert got.dtype == jnp.bfloat16
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_allclose(got, want, rtol=2 ** -7, atol=2 ** -7 * np.abs(want).max())
