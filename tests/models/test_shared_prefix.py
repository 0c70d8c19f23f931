"""Shared-prefix packed rows: a prefix computed once for all its continuations scores each
continuation exactly as the row [prefix | continuation] alone, gradients included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.data.packing import Prefixed, collate_prefixed, plan_rows
from rlhf_jax.models import from_pretrained
from rlhf_jax.models.transformer import positions_from_segments, predictor_slots


@pytest.fixture(scope="module")
def loaded(hf_lm_dirs):
  return {family: from_pretrained(str(directory)) for family, (_, directory) in hf_lm_dirs.items()}


def test_layout_positions_and_predictors():
  #          prefix  c1  c2     | prefix c1   | pad
  segments = [[1, 1, 1, 1, 1, 1, 2, 2, 2, 0]]
  branches = [[0, 0, 1, 2, 2, 2, 0, 1, 1, 0]]
  segments, branches = jnp.array(segments), jnp.array(branches)
  np.testing.assert_array_equal(positions_from_segments(segments, branches)[0],
                                [0, 1, 2, 2, 3, 4, 0, 1, 2, 0])
  # c2's first token (slot 3) is predicted by the prefix's last token (slot 1), not by c1
  np.testing.assert_array_equal(predictor_slots(segments, branches)[0],
                                [-1, 0, 1, 1, 3, 4, -1, 6, 7, -1])
  np.testing.assert_array_equal(predictor_slots(segments)[0], [-1, 0, 1, 2, 3, 4, -1, 6, 7, -1])


def test_plan_rows_first_fit_decreasing():
  assert plan_rows([5, 3, 4, 4], 8) == [[0, 1], [2, 3]]
  assert plan_rows([2, 2, 2], 8) == [[0, 1, 2]]
  with pytest.raises(ValueError, match="an item of 9 tokens does not fit a row of 8"):
    plan_rows([3, 9], 8)


def test_collate_prefixed_marks_continuations():
  items = [Prefixed(np.array([5, 6]), (np.array([7]), np.array([8, 9]))),
           Prefixed(np.array([], np.int32), (np.array([3, 4]),))]
  batch = collate_prefixed(items, row_length=10, num_rows=2, pad_id=1)
  np.testing.assert_array_equal(batch["input_ids"][0], [5, 6, 7, 8, 9, 3, 4, 1, 1, 1])
  np.testing.assert_array_equal(batch["sequence_ids"][0], [-1, -1, 0, 1, 1, 2, 2, -1, -1, -1])
  # the prefix-less item's first token has no predictor, so no loss
  np.testing.assert_array_equal(batch["loss_mask"][0], [0, 0, 1, 1, 1, 0, 1, 0, 0, 0])
  assert not batch["attention_mask"][1].any()
  with pytest.raises(ValueError, match="need 2 rows of 5 tokens, more than the 1 available"):
    collate_prefixed(items, row_length=5, num_rows=1)


def _items(vocab, seed):
  rng = np.random.default_rng(seed)
  draw = lambda n: rng.integers(3, vocab - 1, size=n).astype(np.int32)
  return [Prefixed(draw(6), (draw(5), draw(3))), Prefixed(draw(3), (draw(2), draw(7))),
          Prefixed(draw(4), (draw(4),))]


def _alone(model, params, items):
  """Per-continuation token log-probs of each [prefix | continuation] row alone."""
  out = []
  for item in items:
    for continuation in item.continuations:
      row = np.concatenate([item.prefix, continuation])[None]
      logps = model.token_logps(params, row, np.ones_like(row))[0]
      out.append(logps[len(item.prefix):])
  return out


def _packed_logps(model, params, batch):
  return model.token_logps(params, batch["input_ids"], batch["attention_mask"],
                           segment_ids=batch["segment_ids"], branch_ids=batch["branch_ids"])


# gpt2: learned positions; mistral and gemma2: sliding windows (4) shorter than the rows, which
# must count positions, not slots; gemma2 also soft-caps.
@pytest.mark.parametrize("family", ["llama", "gpt2", "mistral", "gemma2"])
def test_shared_prefix_logps_equal_separate_rows(loaded, family):
  model, params = loaded[family]
  items = _items(model.config.vocab_size, seed=1)
  batch = collate_prefixed(items, row_length=24, num_rows=2)
  assert batch["segment_ids"].max() >= 2  # two items share a row
  # one compiled program for all separate rows, one for the packed batch
  want = jax.jit(lambda p: _alone(model, p, items))(params)
  logps = np.asarray(jax.jit(lambda p: _packed_logps(model, p, batch))(params))
  for n, w in enumerate(want):
    np.testing.assert_allclose(logps[batch["sequence_ids"] == n], np.asarray(w), atol=2e-5)


def test_shared_prefix_gradients_equal_separate_rows(loaded):
  """The gradient of Σ weights · sequence log-probs, through the shared prefix, is the sum of
  the separate rows' gradients."""
  model, params = loaded["llama"]
  items = _items(model.config.vocab_size, seed=2)
  weights = jnp.array([1.0, -0.5, 0.7, 2.0, -1.3])
  batch = collate_prefixed(items, row_length=24, num_rows=2)

  def packed_loss(p):
    logps = _packed_logps(model, p, batch)
    ids = jnp.where(batch["loss_mask"] > 0, batch["sequence_ids"], len(weights))
    sums = jax.ops.segment_sum(logps.ravel(), ids.ravel(), len(weights) + 1)[:-1]
    return jnp.sum(weights * sums)

  def separate_loss(p):
    return sum(w * jnp.sum(logps) for w, logps in zip(weights, _alone(model, p, items)))

  (packed, got), (separate, want) = (jax.jit(jax.value_and_grad(f))(params)
                                      for f in (packed_loss, separate_loss))
  np.testing.assert_allclose(packed, separate, rtol=1e-6)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=2e-6, rtol=1e-4), got, want)


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2: the head's soft-cap
@pytest.mark.parametrize("packed", [True, False])
def test_a_score_mask_skips_the_prompts_and_changes_nothing_it_scores(loaded, family, packed):
  """score_mask=loss_mask (what the trainers pass: the head scores completions only) gives the
  unmasked call's log-probs and entropies on the completions and 0 elsewhere; the gradient of
  a weighted sum over the completions is the same. Packed shared-prefix rows, and plain rows."""
  model, params = loaded[family]
  batch = collate_prefixed(_items(model.config.vocab_size, seed=3), row_length=24, num_rows=2)
  if not packed:  # plain rows: score the tokens after each row's first 5
    batch = {"input_ids": batch["input_ids"], "attention_mask": np.ones_like(batch["input_ids"]),
             "loss_mask": (np.arange(24) >= 5)[None].repeat(2, 0).astype(np.int32)}
  mask = jnp.asarray(batch["loss_mask"], jnp.float32)
  weights = jnp.asarray(np.random.default_rng(0).normal(size=mask.shape), jnp.float32)

  def scores(p, score_mask):
    out = model.score_tokens(p, batch["input_ids"], batch["attention_mask"], entropy=True,
                             segment_ids=batch.get("segment_ids"),
                             branch_ids=batch.get("branch_ids"), score_mask=score_mask)
    return out.logps, out.entropy

  def loss(p, score_mask):
    logps, entropy = scores(p, score_mask)
    return jnp.sum(weights * mask * (logps + 0.1 * entropy))

  full, skipped = (jax.jit(lambda p, m=m: scores(p, m))(params) for m in (None, batch["loss_mask"]))
  for want, got in zip(full, skipped):
    np.testing.assert_allclose(got, want * mask, atol=2e-5)
  assert np.abs(np.asarray(skipped[0]) * (1 - mask)).max() == 0 < np.abs(full[0]).max()
  (want_value, want), (got_value, got) = (
      jax.jit(jax.value_and_grad(lambda p, m=m: loss(p, m)))(params)
      for m in (None, batch["loss_mask"]))
  np.testing.assert_allclose(got_value, want_value, rtol=1e-6)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=2e-6, rtol=1e-4), got, want)
