"""Tests for rlhf_jax/losses/policy.py: closed forms, float64 NumPy references, analytic
gradients, masking invariances, numerics at extreme log-probs, and jit/vmap/pmap/shard_map.

Compilation is what these tests spend their time on, so inputs are built with NumPy and the
functions are called jitted (one compile per function and shape, not one per eager op)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses
from rlhf_jax.losses import policy
from transform_harness import TRANSFORMS, TransformHarness

B, T, G = 16, 7, 4  # B rows (4 prompts x G=4 completions), T tokens
MODES = policy.AGGREGATION_MODES


class J:
  """The functions under test, jitted."""

  ppo_policy = jax.jit(losses.ppo_policy)
  ppo_clip_fraction = jax.jit(losses.ppo_clip_fraction)
  approx_kl = jax.jit(losses.approx_kl)
  ppo_value = jax.jit(losses.ppo_value)
  gae = jax.jit(losses.gae)
  whiten = jax.jit(losses.whiten, static_argnames="shift_mean")
  group_advantages = jax.jit(losses.group_advantages,
                             static_argnames=("group_size", "scale_by_std"))
  leave_one_out_advantages = jax.jit(losses.leave_one_out_advantages,
                                     static_argnames="group_size")


@jax.jit
def _all_aggregations(per_token, mask):
  """Every mode and alias of `aggregate` in one compiled program."""
  out = {m: losses.aggregate(per_token, mask, mode=m)
         for m in (*MODES, *policy.AGGREGATION_ALIASES)}
  out["dr_grpo_norm_3"] = losses.aggregate(per_token, mask, mode="dr_grpo", normalizer=3)
  out["dr_grpo_norm_32"] = losses.aggregate(per_token, mask, mode="dr_grpo", normalizer=32)
  return out


def _right_padded_mask(rng, batch=B, length=T, min_len=1):
  lengths = rng.integers(min_len, length + 1, size=batch)
  return (np.arange(length)[None, :] < lengths[:, None]).astype(np.float32)


def _f32(*arrays):
  return [np.asarray(a, np.float32) for a in arrays]


# ---------------------------------------------------------------- float64 NumPy references

def np_ppo_policy(logps, old_logps, adv, eps=0.2, eps_high=None):
  eps_high = eps if eps_high is None else eps_high
  ratio = np.exp(np.float64(logps) - old_logps)
  return np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - eps, 1 + eps_high))


def np_clip_fraction(logps, old_logps, adv, mask, eps=0.2, eps_high=None):
  # TRL's definition: the clipped loss is strictly larger than the unclipped one.
  eps_high = eps if eps_high is None else eps_high
  ratio = np.exp(np.float64(logps) - old_logps)
  clipped = -adv * np.clip(ratio, 1 - eps, 1 + eps_high) > -adv * ratio
  return clipped[mask > 0].mean()


def np_approx_kl(logps, old_logps, mask):
  ratio = np.exp(np.float64(logps) - old_logps)  # new / old, tokens drawn from old
  return (ratio - 1 - np.log(ratio))[mask > 0].mean()


def np_ppo_value(v, old, ret, eps=0.2):
  v = np.float64(v)
  v_clip = old + np.clip(v - old, -eps, eps)
  return 0.5 * np.maximum((v - ret) ** 2, (v_clip - ret) ** 2)


def np_gae(rewards, values, mask, gamma, lam):
  """The double loop: A_t = sum_l (gamma lam)^l delta_{t+l} over each row's valid prefix."""
  rewards, values = np.float64(rewards), np.float64(values)
  adv = np.zeros(rewards.shape)
  for b in range(rewards.shape[0]):
    n = int(mask[b].sum())
    for t in range(n):
      for l in range(n - t):
        k = t + l
        next_v = values[b, k + 1] if k + 1 < n else 0.0
        delta = rewards[b, k] + gamma * next_v - values[b, k]
        adv[b, t] += (gamma * lam) ** l * delta
  return adv, (adv + values) * mask


def np_whiten(x, mask, shift_mean=True, eps=1e-8):
  valid = np.float64(x[mask > 0])
  out = (np.float64(x) - valid.mean()) / np.sqrt(valid.var() + eps)
  if not shift_mean:
    out += valid.mean()
  return np.where(mask > 0, out, 0.0)


def np_group_advantages(rewards, group_size, scale_by_std=True, eps=1e-6):
  grouped = np.float64(rewards).reshape(-1, group_size)
  centred = grouped - grouped.mean(1, keepdims=True)
  if scale_by_std:
    centred /= grouped.std(1, ddof=1, keepdims=True) + eps
  return centred.reshape(-1)


def np_leave_one_out(rewards, group_size):
  r = np.float64(rewards)
  return np.array([r[i] - np.mean(np.delete(r[i // group_size * group_size:][:group_size],
                                            i % group_size)) for i in range(r.size)])


def np_aggregate(per_token, mask, mode, normalizer=None):
  per_token, mask = np.float64(per_token), mask > 0
  if mode == "token_mean":
    return per_token[mask].sum() / mask.sum()
  rows = []
  for b in range(per_token.shape[0]):
    if mask[b].any():
      if mode == "seq_mean_token_mean":
        rows.append(per_token[b][mask[b]].mean())
      else:
        rows.append(per_token[b][mask[b]].sum() / (normalizer or per_token.shape[1]))
  return np.mean(rows)


# ---------------------------------------------------------------- ppo_policy

def test_ppo_policy_closed_form():
  logps = np.log(np.float32([1.0, 1.5, 0.5, 1.5, 0.5, 1.25, 1.5]))
  adv = np.float32([1.0, 2.0, 2.0, -1.0, -1.0, 1.0, 1.0])
  # ratio 1: -A; ratio 1.5, A=2: max(-3, -2.4); ratio .5, A=2: max(-1, -1.6);
  # ratio 1.5, A=-1: max(1.5, 1.2); ratio .5, A=-1: max(.5, .8); ratio 1.25 and 1.5, A=1: -1.2.
  got = J.ppo_policy(logps, np.zeros(7, np.float32), adv)
  np.testing.assert_allclose(got, [-1.0, -2.4, -1.0, 1.5, 0.8, -1.2, -1.2], rtol=1e-6)
  # Clip-higher: ratio 1.25 is inside [0.8, 1.28]; 1.5 is clipped to 1.28; the low side is kept.
  got = J.ppo_policy(logps, np.zeros(7, np.float32), adv, clip_eps_high=0.28)
  np.testing.assert_allclose(got, [-1.0, -2.56, -1.0, 1.5, 0.8, -1.25, -1.28], rtol=1e-6)


@pytest.mark.parametrize("eps,eps_high", [(0.2, None), (0.1, 0.3)])
def test_ppo_policy_matches_numpy(eps, eps_high):
  rng = np.random.default_rng(0)
  logps, old, adv = _f32(rng.normal(-2, 1, (B, T)), rng.normal(-2, 1, (B, T)),
                         rng.normal(size=(B, T)))
  got = J.ppo_policy(logps, old, adv, clip_eps=eps, clip_eps_high=eps_high)
  assert got.dtype == jnp.float32 and got.shape == (B, T)
  np.testing.assert_allclose(got, np_ppo_policy(logps, old, adv, eps, eps_high),
                             rtol=1e-5, atol=1e-6)


@functools.partial(jax.jit, static_argnames="eps_high")
def _ppo_policy_grads(logps, old, adv, eps_high):
  return jax.grad(lambda *a: losses.ppo_policy(*a, clip_eps_high=eps_high).sum(),
                  argnums=(0, 1, 2))(logps, old, adv)


@pytest.mark.parametrize("eps_high", [None, 0.28])
def test_ppo_policy_gradient_is_minus_adv_ratio_or_zero_where_clip_binds(eps_high):
  high = 1 + (0.2 if eps_high is None else eps_high)
  # Both signs of A at ratios inside, above and below the clip range; 1.25 is inside only
  # with eps_high = 0.28.
  ratios = np.float32([1.1, 1.25, 1.5, 0.5, 1.1, 1.25, 1.5, 0.5])
  adv = np.float32([1.5] * 4 + [-0.7] * 4)
  old = np.full(8, -3.0, np.float32)
  grads = _ppo_policy_grads(np.log(ratios) + old, old, adv, eps_high)
  binds = (adv > 0) & (ratios > high) | (adv < 0) & (ratios < 0.8)
  assert binds.tolist() == [False, eps_high is None, True, False, False, False, False, True]
  np.testing.assert_allclose(grads[0], np.where(binds, 0.0, -adv * ratios), rtol=1e-5)
  np.testing.assert_array_equal(grads[1], 0.0)  # old log-probs and advantages are constants
  np.testing.assert_array_equal(grads[2], 0.0)


def test_ppo_clip_fraction():
  ratios = np.float32([[1.1, 1.5, 0.5, 1.5], [0.5, 1.0, 2.0, 0.1]])
  adv = np.float32([[1.0, 1.0, 1.0, -1.0], [-1.0, 0.0, 0.0, 1.0]])
  mask = np.float32([[1, 1, 1, 1], [1, 1, 1, 0]])
  # Binding: (0,1) A>0 r>1.2 and (1,0) A<0 r<0.8; A = 0 never binds; (1,3) is masked out.
  got = J.ppo_clip_fraction(np.log(ratios), np.zeros((2, 4), np.float32), adv, mask)
  np.testing.assert_allclose(got, 2 / 7, rtol=1e-6)
  rng = np.random.default_rng(1)
  logps, old, adv = _f32(rng.normal(-2, .3, (B, T)), rng.normal(-2, .3, (B, T)),
                         rng.normal(size=(B, T)))
  mask = _right_padded_mask(rng)
  for eps_high in (None, 0.3):
    got = J.ppo_clip_fraction(logps, old, adv, mask, clip_eps=0.1, clip_eps_high=eps_high)
    np.testing.assert_allclose(got, np_clip_fraction(logps, old, adv, mask, 0.1, eps_high),
                               rtol=1e-6)
  assert J.ppo_clip_fraction(logps, old, adv, 0 * mask) == 0.0


def test_approx_kl_matches_numpy_and_is_kl_old_to_new():
  rng = np.random.default_rng(2)
  logps, old = _f32(rng.normal(-2, .5, (B, T)), rng.normal(-2, .5, (B, T)))
  mask = _right_padded_mask(rng)
  np.testing.assert_allclose(J.approx_kl(logps, old, mask), np_approx_kl(logps, old, mask),
                             rtol=1e-5)
  # Direction: tokens are sampled from the OLD policy, and the estimate converges to
  # KL(old || new), which for these two categoricals is many standard errors from KL(new || old).
  old_p = np.array([0.6, 0.3, 0.05, 0.05])
  new_p = np.array([0.25, 0.25, 0.25, 0.25])
  kl_old_new = np.sum(old_p * np.log(old_p / new_p))
  kl_new_old = np.sum(new_p * np.log(new_p / old_p))
  tokens = np.random.default_rng(0).choice(4, size=(100, 1000), p=old_p)
  lp_new, lp_old = _f32(np.log(new_p)[tokens], np.log(old_p)[tokens])
  estimate = float(J.approx_kl(lp_new, lp_old, np.ones_like(lp_new)))
  ratio = np.exp(np.float64(lp_new) - lp_old)
  stderr = (ratio - 1 - np.log(ratio)).std() / np.sqrt(tokens.size)
  assert abs(estimate - kl_old_new) < 4 * stderr
  assert abs(estimate - kl_new_old) > 20 * stderr


# ---------------------------------------------------------------- ppo_value

def test_ppo_value_closed_form_and_gradients():
  # old = 0 and eps = 0.2 throughout.
  v = np.float32([0.1, 0.5, 1.5, -0.5, 0.5])
  ret = np.float32([1.0, 1.0, 1.0, 1.0, -1.0])
  old = np.zeros(5, np.float32)
  # .5*max(.81, .81), .5*max(.25, .64), .5*max(.25, .64), .5*max(2.25, 1.44), .5*max(2.25, 1.44)
  np.testing.assert_allclose(J.ppo_value(v, old, ret), [0.405, 0.32, 0.32, 1.125, 1.125],
                             rtol=1e-6)
  grads = jax.jit(jax.grad(lambda *a: losses.ppo_value(*a).sum(), argnums=(0, 1, 2)))(
      v, old, ret)
  # v - R inside the clip or where the unclipped term is larger; 0 where the clipped one binds.
  np.testing.assert_allclose(grads[0], [-0.9, 0.0, 0.0, -1.5, 1.5], rtol=1e-6)
  np.testing.assert_array_equal(grads[1], 0.0)
  np.testing.assert_array_equal(grads[2], 0.0)


def test_ppo_value_matches_numpy():
  rng = np.random.default_rng(3)
  v, old, ret = _f32(rng.normal(size=(B, T)), rng.normal(size=(B, T)), rng.normal(size=(B, T)))
  for eps in (0.2, 0.5):
    np.testing.assert_allclose(J.ppo_value(v, old, ret, clip_eps=eps),
                               np_ppo_value(v, old, ret, eps), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- gae

def test_gae_matches_double_loop():
  rng = np.random.default_rng(4)
  rewards, values = _f32(rng.normal(size=(B, T)), rng.normal(size=(B, T)))
  mask = _right_padded_mask(rng)
  for gamma, lam in ((0.9, 0.8), (1.0, 0.95), (0.99, 0.0)):
    adv, ret = J.gae(rewards, values, mask, gamma=gamma, lam=lam)
    ref_adv, ref_ret = np_gae(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-5)
    assert adv.dtype == ret.dtype == jnp.float32


def test_gae_gamma_lam_one_is_reward_to_go_minus_value():
  rewards = np.float32([[1.0, 2.0, 3.0, 0.0], [5.0, 0.0, 0.0, 0.0]])
  values = np.float32([[0.5, 1.0, 1.5, 9.0], [2.0, 9.0, 9.0, 9.0]])
  mask = np.float32([[1, 1, 1, 0], [1, 0, 0, 0]])
  adv, ret = J.gae(rewards, values, mask, gamma=1.0, lam=1.0)
  np.testing.assert_allclose(adv, [[6 - .5, 5 - 1, 3 - 1.5, 0], [5 - 2, 0, 0, 0]], rtol=1e-6)
  np.testing.assert_allclose(ret, [[6, 5, 3, 0], [5, 0, 0, 0]], rtol=1e-6)


def test_gae_ignores_padding_and_accepts_leading_zeros():
  rng = np.random.default_rng(5)
  rewards, values = _f32(rng.normal(size=(B, T)), rng.normal(size=(B, T)))
  mask = _right_padded_mask(rng)
  adv, ret = J.gae(rewards, values, mask, gamma=0.9, lam=0.8)
  garbage_r = np.where(mask > 0, rewards, np.inf).astype(np.float32)
  garbage_v = np.where(mask > 0, values, -np.inf).astype(np.float32)
  # Eagerly too: under jit XLA may rewrite x * mask into a select, hiding an inf * 0 = NaN.
  for fn in (J.gae, losses.gae):
    adv2, ret2 = fn(garbage_r, garbage_v, mask, gamma=0.9, lam=0.8)
    np.testing.assert_allclose(adv2, adv, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ret2, ret, rtol=1e-6, atol=1e-6)
  assert np.all(np.asarray(adv)[mask == 0] == 0) and np.all(np.asarray(ret)[mask == 0] == 0)
  # A completion after masked prompt tokens: the same numbers, shifted right.
  pad = lambda x: np.concatenate([np.zeros((B, 3), np.float32), x], axis=1)
  adv3, ret3 = J.gae(pad(rewards), pad(values), pad(mask), gamma=0.9, lam=0.8)
  np.testing.assert_allclose(adv3, pad(np.asarray(adv)), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ret3, pad(np.asarray(ret)), rtol=1e-6, atol=1e-6)


def test_gae_is_detached():
  rng = np.random.default_rng(6)
  rewards, values = _f32(rng.normal(size=(2, 5)), rng.normal(size=(2, 5)))
  mask = np.ones((2, 5), np.float32)
  grads = jax.jit(jax.grad(lambda r, v: sum(x.sum() for x in losses.gae(r, v, mask)),
                           argnums=(0, 1)))(rewards, values)
  np.testing.assert_array_equal(grads[0], 0.0)
  np.testing.assert_array_equal(grads[1], 0.0)


# ---------------------------------------------------------------- whiten

def test_whiten_moments_padding_and_numpy():
  rng = np.random.default_rng(7)
  x = np.float32(rng.normal(3.0, 2.0, (B, T)))
  mask = _right_padded_mask(rng)
  out = np.asarray(J.whiten(x, mask))
  np.testing.assert_allclose(out[mask > 0].mean(), 0.0, atol=1e-6)
  np.testing.assert_allclose(out[mask > 0].var(), 1.0, rtol=1e-5)
  assert np.all(out[mask == 0] == 0)
  np.testing.assert_allclose(out, np_whiten(x, mask), rtol=1e-5, atol=1e-6)
  # shift_mean=False: unit variance, the mean kept.
  kept = np.asarray(J.whiten(x, mask, shift_mean=False))
  np.testing.assert_allclose(kept[mask > 0].mean(), x[mask > 0].mean(), rtol=1e-5)
  np.testing.assert_allclose(kept[mask > 0].var(), 1.0, rtol=1e-5)
  np.testing.assert_allclose(kept, np_whiten(x, mask, shift_mean=False), rtol=1e-5, atol=1e-5)
  # Invariant to whatever sits at padded positions, NaN included; an empty mask gives zeros.
  garbage = np.where(mask > 0, x, np.nan).astype(np.float32)
  for fn in (J.whiten, losses.whiten):  # eagerly too (see the gae padding test)
    np.testing.assert_allclose(fn(garbage, mask), out, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(J.whiten(x, 0 * mask), 0.0)


# ---------------------------------------------------------------- group advantages

def test_group_advantages_matches_numpy_with_sample_std():
  rng = np.random.default_rng(8)
  rewards = np.float32(rng.normal(size=B))
  got = np.asarray(J.group_advantages(rewards, G))
  np.testing.assert_allclose(got, np_group_advantages(rewards, G), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got.reshape(-1, G).sum(1), 0.0, atol=1e-5)
  # The std is the sample (ddof=1) one: a group of the two rewards 0 and 1 gets -+1/sqrt(2)
  # (the population std would give -+1).
  np.testing.assert_allclose(J.group_advantages(np.float32([0, 1]), 2),
                             [-2 ** -0.5, 2 ** -0.5], rtol=1e-5)
  # Dr. GRPO: centred, not scaled.
  np.testing.assert_allclose(J.group_advantages(rewards, G, scale_by_std=False),
                             np_group_advantages(rewards, G, scale_by_std=False),
                             rtol=1e-5, atol=1e-6)
  # A group with equal rewards carries no signal, and no NaN.
  np.testing.assert_array_equal(J.group_advantages(np.full(4, 0.7, np.float32), 2), 0.0)


def test_leave_one_out_advantages():
  rng = np.random.default_rng(9)
  rewards = np.float32(rng.normal(size=B))
  got = np.asarray(J.leave_one_out_advantages(rewards, G))
  np.testing.assert_allclose(got, np_leave_one_out(rewards, G), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got.reshape(-1, G).mean(1), 0.0, atol=1e-6)
  np.testing.assert_allclose(got, G / (G - 1) * np_group_advantages(rewards, G, False),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(J.leave_one_out_advantages(np.float32([1, 3]), 2), [-2.0, 2.0])


@pytest.mark.parametrize("fn", [losses.group_advantages, losses.leave_one_out_advantages])
def test_group_size_errors(fn):
  with pytest.raises(ValueError, match="group_size must be an int >= 2"):
    fn(np.zeros(4, np.float32), 1)
  with pytest.raises(ValueError, match="not a multiple of group_size"):
    fn(np.zeros(6, np.float32), 4)
  with pytest.raises(ValueError, match="group_size must be an int >= 2, got 2.0"):
    fn(np.zeros(4, np.float32), 2.0)
  np.testing.assert_array_equal(fn(np.zeros(4, np.float32), np.int64(2)), 0.0)  # NumPy ints


# ---------------------------------------------------------------- aggregate

def test_aggregate_modes_differ_on_a_hand_example():
  per_token = np.float32([[1, 2, 3, 99], [4, 99, 99, 99], [7, 7, 7, 7]])
  mask = np.float32([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])  # the last row is empty
  got = _all_aggregations(per_token, mask)
  np.testing.assert_allclose(got["token_mean"], (1 + 2 + 3 + 4) / 4)
  np.testing.assert_allclose(got["seq_mean_token_mean"], (2 + 4) / 2)  # empty row not counted
  np.testing.assert_allclose(got["seq_mean_token_sum_norm"], (6 / 4 + 4 / 4) / 2)  # T = 4
  np.testing.assert_allclose(got["dr_grpo_norm_3"], (6 / 3 + 4 / 3) / 2, rtol=1e-6)
  for alias, mode in policy.AGGREGATION_ALIASES.items():
    assert got[alias] == got[mode]


def test_aggregate_matches_numpy_errors_and_empty_mask():
  rng = np.random.default_rng(10)
  per_token = np.float32(rng.normal(size=(B, T)))
  mask = _right_padded_mask(rng)
  got = _all_aggregations(per_token, mask)
  for mode in MODES:
    np.testing.assert_allclose(got[mode], np_aggregate(per_token, mask, mode),
                               rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got["dr_grpo_norm_32"],
                             np_aggregate(per_token, mask, "dr_grpo", normalizer=32), rtol=1e-5)
  # inf at padded positions changes nothing (eagerly too: see the gae padding test).
  garbage = np.where(mask > 0, per_token, np.inf).astype(np.float32)
  again = _all_aggregations(garbage, mask)
  for mode in MODES:
    np.testing.assert_allclose(again[mode], got[mode], rtol=1e-6)
    np.testing.assert_allclose(losses.aggregate(garbage, mask, mode=mode), got[mode], rtol=1e-6)
  with pytest.raises(ValueError, match="unknown aggregation mode"):
    losses.aggregate(per_token, mask, mode="sum")
  with pytest.raises(ValueError, match="normalizer is only used"):
    losses.aggregate(per_token, mask, mode="token_mean", normalizer=8)
  with pytest.raises(ValueError, match="positive"):
    losses.aggregate(per_token, mask, mode="dr_grpo", normalizer=0)
  # No valid token at all: 0, with a zero (not NaN) gradient.
  empty = np.zeros((B, T), np.float32)
  values = _all_aggregations(per_token, empty)
  grads = jax.jit(jax.jacrev(_all_aggregations))(per_token, empty)
  for mode in MODES:
    assert values[mode] == 0.0 and np.all(np.asarray(grads[mode]) == 0.0)


# ---------------------------------------------------------------- numerics

@jax.jit
def _everything(logps, old, adv, values, mask):
  """Every function (and the policy and value gradients) on the same inputs."""
  def policy_total(lp):
    per_token = losses.ppo_policy(lp, old, adv, clip_eps_high=0.28)
    return sum(losses.aggregate(per_token, mask, mode=m) for m in MODES)

  policy_value, policy_grad = jax.value_and_grad(policy_total)(logps)
  value_value, value_grad = jax.value_and_grad(
      lambda v: losses.ppo_value(v, values, logps).sum())(values)
  return {
      "policy_total": policy_value, "policy_grad": policy_grad,
      "value_total": value_value, "value_grad": value_grad,
      "ppo_policy": losses.ppo_policy(logps, old, adv),
      "approx_kl": losses.approx_kl(logps, old, mask),
      "clip_fraction": losses.ppo_clip_fraction(logps, old, adv, mask),
      "gae": losses.gae(logps, values, mask, gamma=0.99),
      "whiten": losses.whiten(logps, mask),
      "group": losses.group_advantages(logps[:, 0], G),
      "rloo": losses.leave_one_out_advantages(logps[:, 0], G),
  }


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_no_nan_or_inf_at_extreme_logps(dtype):
  rng = np.random.default_rng(11)
  # Log-probs anywhere in [-1e4, 0], so that log-ratios reach +-1e4, plus the exact corners.
  logps = rng.uniform(-1e4, 0, (B, T))
  old = rng.uniform(-1e4, 0, (B, T))
  logps[0, :2], old[0, :2] = (0.0, -1e4), (-1e4, 0.0)
  adv, values = rng.normal(size=(B, T)), rng.normal(size=(B, T)) * 100
  mask = _right_padded_mask(rng)
  out = _everything(*(jnp.asarray(x, dtype) for x in (logps, old, adv, values)), mask)
  for path, leaf in jax.tree_util.tree_leaves_with_path(out):
    name = jax.tree_util.keystr(path)
    # Gradients come back in the inputs' dtype; everything else is float32 math.
    assert leaf.dtype == (dtype if name.endswith("_grad']") else jnp.float32), name
    assert np.all(np.isfinite(np.asarray(leaf, np.float32))), name


def test_ratio_is_exact_below_the_linear_continuation():
  # Up to log-ratio 20 the ratio is exp; past it, exp's tangent line (finite, gradient e^20).
  log_ratio = np.float32([-30.0, -1.0, 0.0, 3.0, 19.5, 20.0, 25.0])
  zeros = np.zeros(7, np.float32)
  got, grad = jax.jit(jax.vmap(jax.value_and_grad(policy._ratio)))(log_ratio, zeros)
  expected = np.where(log_ratio <= 20, np.exp(np.float64(log_ratio)),
                      np.exp(20.0) * (1 + np.float64(log_ratio) - 20))
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  np.testing.assert_allclose(grad, np.exp(np.minimum(np.float64(log_ratio), 20.0)), rtol=1e-6)


# ---------------------------------------------------------------- jit / vmap / pmap / shard_map

def _cases():
  rng = np.random.default_rng(12)

  def tokens(num):
    return _f32(*(rng.normal(-1, 0.5, (B, T)) for _ in range(num)))

  def masked(arrays):
    return (*arrays, _right_padded_mask(rng))

  def rewards():
    return _f32(rng.normal(size=B))

  cases = {
      # name: (function under test, NumPy reference, builder of one batch's args, row-local?)
      "ppo_policy": (functools.partial(losses.ppo_policy, clip_eps_high=0.3),
                     functools.partial(np_ppo_policy, eps_high=0.3), lambda: tokens(3), True),
      "ppo_clip_fraction": (losses.ppo_clip_fraction, np_clip_fraction,
                            lambda: masked(tokens(3)), False),
      "approx_kl": (losses.approx_kl, np_approx_kl, lambda: masked(tokens(2)), False),
      "ppo_value": (losses.ppo_value, np_ppo_value, lambda: tokens(3), True),
      "gae": (functools.partial(losses.gae, gamma=0.9, lam=0.8),
              functools.partial(np_gae, gamma=0.9, lam=0.8), lambda: masked(tokens(2)), True),
      "whiten": (losses.whiten, np_whiten, lambda: masked(tokens(1)), False),
      # Groups of 2: each device's rows hold whole groups when the batch is sharded by rows.
      "group_advantages": (functools.partial(losses.group_advantages, group_size=2),
                           functools.partial(np_group_advantages, group_size=2), rewards, True),
      "leave_one_out_advantages": (
          functools.partial(losses.leave_one_out_advantages, group_size=2),
          functools.partial(np_leave_one_out, group_size=2), rewards, True),
  }
  for mode in MODES:
    cases[f"aggregate_{mode}"] = (functools.partial(losses.aggregate, mode=mode),
                                  functools.partial(np_aggregate, mode=mode),
                                  lambda: masked(tokens(1)), False)
  return cases


CASES = _cases()
HARNESS = TransformHarness(CASES, rtol=1e-5, atol=1e-5)


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
  """Row-local functions (and group functions with whole groups per device) shard one batch's
  rows over the devices under shard_map and still give the single-device values."""
  HARNESS.check_row_sharding(batches_and_expected[0], mesh)
