"""Tests for rlhf_jax/losses/kl.py: the estimators' closed forms, unbiasedness (exactly and by
Monte Carlo), k2's second-order agreement, numerics, KL-penalised rewards, the adaptive
controller, and jit/vmap/pmap/shard_map.

Inputs are built with NumPy and the functions called jitted: compilation is the tests' cost."""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses
from transform_harness import TRANSFORMS, TransformHarness

# `losses.kl` is the estimator function (the package star-imports it over the module's name).
kl_module = importlib.import_module("rlhf_jax.losses.kl")

B, T = 16, 7
ESTIMATORS = kl_module.KL_ESTIMATORS


@jax.jit
def _all_estimators(logps, ref_logps):
  return {e: losses.kl(logps, ref_logps, estimator=e) for e in ESTIMATORS}


@jax.jit
def _all_estimator_grads(logps, ref_logps):
  return {e: jax.grad(lambda lp, ref: losses.kl(lp, ref, estimator=e).sum(), argnums=(0, 1))(
      logps, ref_logps) for e in ESTIMATORS}


penalized_rewards = jax.jit(losses.kl_penalized_rewards, static_argnames="estimator")
update_kl_controller = jax.jit(losses.update_kl_controller)


def _right_padded_mask(rng, batch=B, length=T, min_len=1):
  lengths = rng.integers(min_len, length + 1, size=batch)
  return (np.arange(length)[None, :] < lengths[:, None]).astype(np.float32)


# ---------------------------------------------------------------- float64 NumPy references

def np_kl(logps, ref_logps, estimator):
  d = np.float64(logps) - ref_logps
  return {"k1": d, "k2": d ** 2 / 2, "k3": np.exp(-d) - 1 + d}[estimator]


def np_penalized_rewards(scores, logps, ref_logps, mask, kl_coef, estimator):
  kl = np.where(mask > 0, np_kl(logps, ref_logps, estimator), 0.0)
  rewards = -kl_coef * kl
  for b in range(mask.shape[0]):
    valid = np.flatnonzero(mask[b])
    if valid.size:
      rewards[b, valid[-1]] += scores[b]
  return rewards, kl


def np_update(kl_coef, observed_kl, num_steps, target, horizon):
  error = np.clip(np.float64(observed_kl) / target - 1, -0.2, 0.2)
  return kl_coef * (1 + error * num_steps / horizon)


# ---------------------------------------------------------------- estimators

def test_estimators_closed_forms():
  d = np.float32([np.log(2), -1.0, 0.0, 3.0])
  got = _all_estimators(d, np.zeros(4, np.float32))
  np.testing.assert_allclose(got["k1"], d)
  np.testing.assert_allclose(got["k2"], [np.log(2) ** 2 / 2, 0.5, 0.0, 4.5], rtol=1e-6)
  np.testing.assert_allclose(got["k3"], [0.5 - 1 + np.log(2), np.e - 2, 0.0, np.exp(-3) + 2],
                             rtol=1e-6)


def test_estimators_match_numpy_and_gradients():
  rng = np.random.default_rng(0)
  logps = np.float32(rng.uniform(-15, 0, (B, T)))
  ref = np.float32(rng.uniform(-15, 0, (B, T)))
  got = _all_estimators(logps, ref)
  grads = _all_estimator_grads(logps, ref)
  d = np.float64(logps) - ref
  analytic = {"k1": np.ones_like(d), "k2": d, "k3": 1 - np.exp(-d)}
  for e in ESTIMATORS:
    assert got[e].dtype == jnp.float32 and got[e].shape == (B, T)
    np.testing.assert_allclose(got[e], np_kl(logps, ref, e), rtol=1e-5, atol=1e-6, err_msg=e)
    np.testing.assert_allclose(grads[e][0], analytic[e], rtol=1e-5, atol=1e-6, err_msg=e)
    np.testing.assert_allclose(grads[e][1], -analytic[e], rtol=1e-5, atol=1e-6, err_msg=e)


def test_unknown_estimator():
  with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
    losses.kl(np.zeros(2, np.float32), np.zeros(2, np.float32), estimator="k4")


P_PROBS = np.array([0.4, 0.3, 0.15, 0.1, 0.05])
Q_PROBS = np.full(5, 0.2)
TRUE_KL = float(np.sum(P_PROBS * np.log(P_PROBS / Q_PROBS)))  # KL(p || q) = 0.217


def test_k1_and_k3_are_exactly_unbiased_over_the_categorical():
  # E_p[k] = sum_x p(x) k(x): exact, no sampling.
  got = _all_estimators(np.float32(np.log(P_PROBS)), np.float32(np.log(Q_PROBS)))
  for e in ("k1", "k3"):
    np.testing.assert_allclose(np.sum(P_PROBS * got[e]), TRUE_KL, rtol=1e-5, err_msg=e)


@functools.partial(jax.jit, static_argnames="num_samples")
def _monte_carlo(key, logp_K, logq_K, num_samples):
  tokens = jax.random.categorical(key, logp_K, shape=(num_samples,))
  per_token = _all_estimators(logp_K[tokens], logq_K[tokens])
  return {e: (k.mean(), k.std()) for e, k in per_token.items()}


def test_k1_and_k3_monte_carlo_on_policy_samples():
  num_samples = 200_000
  stats = _monte_carlo(jax.random.key(0), np.float32(np.log(P_PROBS)),
                       np.float32(np.log(Q_PROBS)), num_samples)
  for e in ("k1", "k3"):
    mean, std = (float(x) for x in stats[e])
    assert abs(mean - TRUE_KL) < 4 * std / np.sqrt(num_samples), (e, mean, TRUE_KL)
  # Schulman's point, for this pair: k3 has the lower variance of the two unbiased estimators.
  assert stats["k3"][1] < 0.7 * stats["k1"][1]


def test_k2_agrees_with_kl_to_second_order():
  # q_eps ∝ p·exp(eps·h); with d exactly representable (ref_logps = 0), E_p[k2] - KL = O(eps³)
  # while KL = O(eps²): the relative gap shrinks like eps, and is large for far distributions.
  h = np.array([1.0, -0.5, 2.0, 0.3, -1.5])  # skewed under p, so the eps³ term is not zero
  epsilons = (1.0, 0.1, 0.05, 0.025)
  ds = []
  for eps in epsilons:
    q = P_PROBS * np.exp(eps * h)
    ds.append(np.float32(np.log(P_PROBS) - np.log(q / q.sum())))
  got = _all_estimators(np.stack(ds), np.zeros((len(epsilons), 5), np.float32))
  kl = np.sum(P_PROBS * np.float64(got["k1"]), axis=1)
  rel_gap = np.abs(np.sum(P_PROBS * np.float64(got["k2"]), axis=1) - kl) / kl
  assert rel_gap[0] > 0.2  # eps = 1: k2 is a biased estimate
  assert rel_gap[-1] < 2e-3
  ratios = rel_gap[1:-1] / rel_gap[2:]
  assert np.all((ratios > 1.8) & (ratios < 3.0)), rel_gap


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_nonnegative_and_finite_down_to_minus_1e4(dtype):
  values = np.array([-1e4, -100.0, -20.5, -20.0, -5.0, -1e-3, 0.0, 1e-3, 5.0, 100.0, 1e4])
  logps = jnp.asarray(np.concatenate([values, np.zeros_like(values)]), dtype)
  ref = jnp.asarray(np.concatenate([np.zeros_like(values), values]), dtype)
  got = _all_estimators(logps, ref)
  grads = _all_estimator_grads(logps, ref)
  for e in ESTIMATORS:
    assert got[e].dtype == jnp.float32
    assert np.all(np.isfinite(got[e])) and np.all(np.isfinite(np.float32(grads[e][0]))), e
  assert np.all(got["k3"] >= 0) and np.all(got["k2"] >= 0)
  # Below d = -20 k3 follows its tangent line at -20 (value and slope), keeping the sign.
  d = np.float64(np.asarray(logps, np.float32) - np.asarray(ref, np.float32))
  tangent = np.exp(20.0) - 21.0 + (1 - np.exp(20.0)) * (d + 20)
  exact = np.expm1(-np.maximum(d, -20)) + np.maximum(d, -20)
  np.testing.assert_allclose(got["k3"], np.where(d < -20, tangent, exact), rtol=2e-6)
  np.testing.assert_allclose(np.float32(grads["k3"][0]), 1 - np.exp(-np.maximum(d, -20)),
                             rtol=1e-2 if dtype == jnp.bfloat16 else 1e-6)


# ---------------------------------------------------------------- KL-penalised rewards

def test_penalized_rewards_hand_example():
  scores = np.float32([1.0, 2.0, 3.0])
  d = np.float32([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8], [1.0, 1.0, 1.0, 1.0]])
  # Row 0 right-padded, row 1 after a masked prompt token, row 2 empty.
  mask = np.float32([[1, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]])
  rewards, kl = penalized_rewards(scores, d, np.zeros_like(d), mask, kl_coef=0.5)
  np.testing.assert_allclose(kl, d * mask)
  np.testing.assert_allclose(rewards, [[-0.05, -0.1, 1 - 0.15, 0], [0, -0.3, 2 - 0.35, 0],
                                       [0, 0, 0, 0]], rtol=1e-6)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_penalized_rewards_match_numpy_and_log_the_kl_used(estimator):
  rng = np.random.default_rng(1)
  scores = np.float32(rng.normal(size=B))
  logps, ref = np.float32(rng.normal(-2, 1, (2, B, T)))
  mask = _right_padded_mask(rng)
  rewards, kl = penalized_rewards(scores, logps, ref, mask, kl_coef=0.2, estimator=estimator)
  ref_rewards, ref_kl = np_penalized_rewards(scores, logps, ref, mask, 0.2, estimator)
  np.testing.assert_allclose(rewards, ref_rewards, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(kl, ref_kl, rtol=1e-5, atol=1e-6)
  # The KL returned is the one the rewards were penalised with: they add back to the score.
  np.testing.assert_allclose(np.sum(rewards + 0.2 * kl, axis=1), scores, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(kl, np.where(mask > 0, _all_estimators(logps, ref)[estimator], 0))
  # Whatever sits at padded positions (garbage log-probs) changes nothing. Checked eagerly too:
  # under jit XLA may rewrite x * mask into a select, which would hide an inf * 0 = NaN.
  garbage_logps = np.where(mask > 0, logps, -1e4).astype(np.float32)
  garbage_ref = np.where(mask > 0, ref, np.inf).astype(np.float32)
  for fn in (penalized_rewards, losses.kl_penalized_rewards):
    again = fn(scores, garbage_logps, garbage_ref, mask, kl_coef=0.2, estimator=estimator)
    np.testing.assert_allclose(again[0], rewards, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(again[1], kl, rtol=1e-6, atol=1e-7)


def test_penalized_rewards_are_detached_and_finite_in_bf16():
  rng = np.random.default_rng(2)
  mask = _right_padded_mask(rng)
  scores = jnp.asarray(rng.normal(size=B), jnp.bfloat16)
  logps, ref = (jnp.asarray(x, jnp.bfloat16) for x in rng.uniform(-1e4, 0, (2, B, T)))

  @jax.jit
  def total_and_grads(scores, logps, ref, kl_coef):
    def total(*args):
      rewards, kl = losses.kl_penalized_rewards(*args, mask, kl_coef=kl_coef, estimator="k3")
      return rewards.sum() + kl.sum()
    return total(scores, logps, ref), jax.grad(total, argnums=(0, 1, 2))(scores, logps, ref)

  value, grads = total_and_grads(scores, logps, ref, jnp.float32(0.05))  # a traced kl_coef
  assert np.isfinite(value)
  for grad in grads:
    np.testing.assert_array_equal(np.float32(grad), 0.0)


# ---------------------------------------------------------------- adaptive controller

def test_controller_moves_toward_the_target_clipped_at_20_percent():
  state = losses.init_kl_controller(0.1)
  assert isinstance(state, losses.KLControllerState)
  assert state.kl_coef.dtype == jnp.float32 and state.kl_coef.shape == ()
  n, horizon, target = 256.0, 10_000.0, 6.0
  # KL above the target: beta up; far above: the error clips at +0.2; below: down, at -0.2.
  for observed, error in ((6.6, 0.1), (100.0, 0.2), (5.7, -0.05), (0.0, -0.2), (6.0, 0.0)):
    new = update_kl_controller(state, np.float32(observed), np.float32(n), target=target,
                               horizon=horizon)
    np.testing.assert_allclose(new.kl_coef, 0.1 * (1 + error * n / horizon), rtol=1e-6)
    assert new.kl_coef.dtype == jnp.float32
  # The fixed controller: target=None leaves beta alone, whatever the KL.
  for observed in (0.0, 6.0, 1e3):
    fixed = update_kl_controller(state, np.float32(observed), np.float32(n), target=None)
    assert float(fixed.kl_coef) == float(state.kl_coef)


def test_controller_scan_matches_numpy_recurrence():
  observed = np.float32([10.0, 8.0, 6.5, 5.0, 1.0, 30.0, 6.0, 0.5])

  @functools.partial(jax.jit, static_argnames="target")
  def run(kl_coef, observed, target):
    def step(state, kl):
      new = losses.update_kl_controller(state, kl, 512, target=target, horizon=2000.0)
      return new, new.kl_coef
    return jax.lax.scan(step, losses.init_kl_controller(kl_coef), observed)[1]

  beta, expected = 0.2, []
  for kl in observed:
    beta = np_update(beta, kl, 512, 6.0, 2000.0)
    expected.append(beta)
  np.testing.assert_allclose(run(0.2, observed, 6.0), expected, rtol=1e-5)
  np.testing.assert_allclose(run(0.2, observed, None), np.full(8, 0.2, np.float32))


def test_controller_errors():
  state = losses.init_kl_controller(0.1)
  with pytest.raises(ValueError, match="num_steps < 5 \\* horizon"):
    losses.update_kl_controller(state, 1.0, 50_000, target=6.0, horizon=10_000)
  with pytest.raises(ValueError, match="must be positive"):
    losses.update_kl_controller(state, 1.0, 10, target=0.0)


# ---------------------------------------------------------------- jit / vmap / pmap / shard_map

def _cases():
  rng = np.random.default_rng(3)

  def tokens(num):
    return [np.float32(rng.normal(-2, 1, (B, T))) for _ in range(num)]

  def rewards_args():
    return (np.float32(rng.normal(size=B)), *tokens(2), _right_padded_mask(rng))

  def controller_args():
    return (losses.KLControllerState(np.float32(rng.uniform(0.05, 0.2))),
            np.float32(rng.uniform(0, 12)), np.float32(rng.integers(1, 500)))

  cases = {
      # name: (function under test, NumPy reference, builder of one batch's args, row-local?)
      f"kl_{e}": (functools.partial(losses.kl, estimator=e),
                  functools.partial(np_kl, estimator=e), lambda: tokens(2), True)
      for e in ESTIMATORS
  }
  cases["kl_penalized_rewards_k3"] = (
      functools.partial(losses.kl_penalized_rewards, kl_coef=0.1, estimator="k3"),
      functools.partial(np_penalized_rewards, kl_coef=0.1, estimator="k3"), rewards_args, True)
  cases["update_kl_controller"] = (
      functools.partial(losses.update_kl_controller, target=6.0, horizon=1000.0),
      lambda state, kl, n: losses.KLControllerState(np_update(state.kl_coef, kl, n, 6.0, 1000.0)),
      controller_args, False)
  cases["init_kl_controller"] = (
      losses.init_kl_controller, lambda beta: losses.KLControllerState(np.float64(beta)),
      lambda: (np.float32(rng.uniform(0.05, 0.2)),), False)
  return cases


CASES = _cases()
HARNESS = TransformHarness(CASES, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def mesh():
  return HARNESS.mesh()


@pytest.fixture(scope="module")
def batches_and_expected():
  return HARNESS.batches_and_expected()


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_same_values_under_transforms(transform, batches_and_expected, mesh):
  HARNESS.check_transform(transform, *batches_and_expected, mesh)


def test_row_local_functions_shard_along_the_batch(batches_and_expected, mesh):
  """The estimators and the penalised rewards shard one batch's rows over the devices under
  shard_map and still give the single-device values."""
  HARNESS.check_row_sharding(batches_and_expected[0], mesh)
