"""Tests for rlhf_jax.losses.preference, .zoo and .registry (one file: they share fixtures).

Each loss is checked at hand-picked points against closed forms, on random inputs against an
independent float64 NumPy formula, for its gradients (analytic, or central differences of the
NumPy formula),
its limits, its numerics at extreme log-probs and in bfloat16, and for the same values under jit,
vmap, pmap and shard_map. Tolerances: float32 results are compared with float64 references at
rtol 1e-5 / atol 1e-6 (a few float32 ulps of inputs of magnitude <= 40, through a handful of ops).
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rlhf_jax import losses
from rlhf_jax.losses import preference as pref
from rlhf_jax.losses import registry, zoo

REG = losses.PREFERENCE_LOSSES
RTOL, ATOL = 1e-5, 1e-6
B = 8

# ----------------------------------------------------------------------------- NumPy references


def np_log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def np_sigmoid(x):
  return np.exp(np_log_sigmoid(x))


def np_f_logits(rho_c, rho_r, f_divergence="reverse_kl", alpha=0.5):
  """f'(u_c) - f'(u_r), u = e^ρ, straight from the f-divergences' derivatives."""
  uc, ur = np.exp(rho_c), np.exp(rho_r)
  fprime = {
      "reverse_kl": lambda u: np.log(u) + 1.0,
      "forward_kl": lambda u: -1.0 / u,
      "js_divergence": lambda u: np.log(2 * u / (1 + u)),
      "alpha_divergence": lambda u: (1.0 - u**-alpha) / alpha,
  }[f_divergence]
  return fprime(uc) - fprime(ur)


def np_dpo(pc, pr, rc, rr, beta=0.1, label_smoothing=0.0, f_divergence="reverse_kl", alpha=0.5):
  z = beta * np_f_logits(pc - rc, pr - rr, f_divergence, alpha)
  return -(1 - label_smoothing) * np_log_sigmoid(z) - label_smoothing * np_log_sigmoid(-z)


def np_robust_dpo(pc, pr, rc, rr, beta=0.1, label_smoothing=0.1):
  z, e = beta * ((pc - rc) - (pr - rr)), label_smoothing
  return (-(1 - e) * np_log_sigmoid(z) + e * np_log_sigmoid(-z)) / (1 - 2 * e)


def np_ipo(pc, pr, rc, rr, beta=0.1):
  return ((pc - rc) - (pr - rr) - 1 / (2 * beta))**2


def np_hinge(pc, pr, rc, rr, beta=0.1):
  return np.maximum(0.0, 1 - beta * ((pc - rc) - (pr - rr)))


def np_simpo(pc, pr, rc=None, rr=None, beta=2.0, gamma=0.5):
  return -np_log_sigmoid(beta * (pc - pr) - gamma)


def np_orpo(pc, pr, rc=None, rr=None):
  log_odds = lambda logp: logp - np.log1p(-np.exp(logp))  # noqa: E731
  return -np_log_sigmoid(log_odds(pc) - log_odds(pr))


def np_exo_pair(pc, pr, rc, rr, beta=0.1, label_smoothing=1e-3):
  p = np_sigmoid(beta * ((pc - rc) - (pr - rr)))
  e = label_smoothing
  return p * (np.log(p) - np.log(1 - e)) + (1 - p) * (np.log(1 - p) - np.log(e))


def np_nca_pair(pc, pr, rc, rr, beta=0.1):
  a, b = beta * (pc - rc), beta * (pr - rr)
  return -np_log_sigmoid(a) - 0.5 * np_log_sigmoid(-a) - 0.5 * np_log_sigmoid(-b)


def np_bco_pair(pc, pr, rc, rr, beta=0.1, delta=None):
  a, b = beta * (pc - rc), beta * (pr - rr)
  delta = np.concatenate([a, b]).mean() if delta is None else delta
  return -np_log_sigmoid(a - delta) - np_log_sigmoid(delta - b)


def np_sppo_hard(pc, pr, rc, rr, beta=0.1):
  return (pc - rc - 0.5 / beta)**2 + (pr - rr + 0.5 / beta)**2


def np_aot_pair(pc, pr, rc, rr, beta=0.1, label_smoothing=0.0):
  z = beta * (np.sort(pc - rc) - np.sort(pr - rr))
  return -(1 - label_smoothing) * np_log_sigmoid(z) - label_smoothing * np_log_sigmoid(-z)


def np_aot(pc, pr, rc, rr, beta=0.1, label_smoothing=0.0):
  z = beta * (np.sort(pc - pr) - np.sort(rc - rr))
  return -(1 - label_smoothing) * np_log_sigmoid(z) - label_smoothing * np_log_sigmoid(-z)


def np_apo_zero(pc, pr, rc, rr, beta=0.1):
  return 1 - np_sigmoid(beta * (pc - rc)) + np_sigmoid(beta * (pr - rr))


def np_apo_down(pc, pr, rc, rr, beta=0.1):
  a, b = pc - rc, pr - rr
  return np_sigmoid(beta * a) + 1 - np_sigmoid(beta * (a - b))


def np_discopop(pc, pr, rc, rr, beta=0.1, tau=0.05):
  z = beta * ((pc - rc) - (pr - rr))
  m = np_sigmoid(z / tau)
  return (1 - m) * -np_log_sigmoid(z) + m * np.exp(-z)


def np_kto(policy, ref, desirable, kl_ref, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
  r, z0 = policy - ref, max(kl_ref, 0.0)
  return np.where(desirable, desirable_weight * (1 - np_sigmoid(beta * (r - z0))),
                  undesirable_weight * (1 - np_sigmoid(beta * (z0 - r))))


def np_ranking(rewards, ranks, mask):
  out = np.zeros(rewards.shape[0])
  for b in range(rewards.shape[0]):
    terms = [-np_log_sigmoid(rewards[b, i] - rewards[b, j])
             for i in range(rewards.shape[1]) for j in range(rewards.shape[1])
             if mask[b, i] and mask[b, j] and ranks[b, i] < ranks[b, j]]
    out[b] = np.mean(terms) if terms else 0.0
  return out


NP_REFERENCE = {
    "dpo": np_dpo, "robust_dpo": np_robust_dpo, "ipo": np_ipo, "hinge": np_hinge,
    "simpo": np_simpo, "orpo": np_orpo, "exo_pair": np_exo_pair, "nca_pair": np_nca_pair,
    "bco_pair": np_bco_pair, "sppo_hard": np_sppo_hard, "aot": np_aot, "aot_pair": np_aot_pair,
    "apo_zero": np_apo_zero, "apo_down": np_apo_down, "discopop": np_discopop,
    "ln_dpo": np_dpo, "sigmoid_norm": np_dpo,
    "dpo_forward_kl": lambda *a, **k: np_dpo(*a, f_divergence="forward_kl", **k),
    "dpo_js_divergence": lambda *a, **k: np_dpo(*a, f_divergence="js_divergence", **k),
    "dpo_alpha_divergence": lambda *a, **k: np_dpo(*a, f_divergence="alpha_divergence", **k),
}

# ----------------------------------------------------------------------------- inputs


def random_logps(seed, reduction="sum", n=B):
  """Float32 policy/reference log-probs: sums in [-40, -5] or means in [-3, -0.05]; the reference
  near the policy (log-ratios ~ N(0, 2) or N(0, 0.5)), as after SFT."""
  rng = np.random.default_rng(seed)
  lo, hi, spread = (-40.0, -5.0, 2.0) if reduction == "sum" else (-3.0, -0.05, 0.5)
  pc, pr = rng.uniform(lo, hi, n), rng.uniform(lo, hi, n)
  rc, rr = pc + rng.normal(0, spread, n), pr + rng.normal(0, spread, n)
  if reduction == "mean":  # mean log-probs stay negative
    rc, rr = -np.abs(rc), -np.abs(rr)
  return tuple(np.float32(x) for x in (pc, pr, rc, rr))


def as_jnp(*arrays):
  return tuple(jnp.asarray(a) for a in arrays)


def col(*values):
  """A [B] float32 array repeating `values`. Tests keep to the shapes [B] and [B, K]: eager JAX
  compiles every primitive once per shape, so each new shape costs seconds on a loaded box."""
  return jnp.asarray(np.resize(np.float32(values), B))


# ----------------------------------------------------------------------------- closed forms

LOG2 = math.log(2.0)


def at_zero():
  """Inputs with every log-ratio 0 (so h = 0): policy == reference."""
  pc = jnp.linspace(-30.0, -2.0, B)
  pr = jnp.linspace(-5.0, -25.0, B)
  return pc, pr, pc, pr


@pytest.mark.parametrize("name, expected", [
    ("dpo", LOG2),
    ("robust_dpo", LOG2),  # ((1-ε) - ε) log 2 / (1 - 2ε)
    ("ipo", 1 / (4 * 0.1**2)),
    ("hinge", 1.0),
    ("exo_pair", -LOG2 - 0.5 * math.log(1e-3 * (1 - 1e-3))),
    ("nca_pair", 2 * LOG2),
    ("bco_pair", 2 * LOG2),
    ("sppo_hard", 2 * (0.5 / 0.1)**2),
    ("aot", LOG2),
    ("aot_pair", LOG2),
    ("apo_zero", 1.0),
    ("apo_down", 1.0),
    ("discopop", 0.5 * LOG2 + 0.5),
    ("ln_dpo", LOG2),
    ("dpo_forward_kl", LOG2),
    ("dpo_js_divergence", LOG2),
    ("dpo_alpha_divergence", LOG2),
])
def test_value_when_policy_equals_reference(name, expected):
  np.testing.assert_allclose(REG[name](*at_zero()), expected, rtol=RTOL)


def test_reference_free_closed_forms():
  pc = col(-1.0, -0.3)
  # SimPO at pc = pr: -log σ(-γ) = softplus(γ).
  np.testing.assert_allclose(losses.simpo(pc, pc, gamma=0.7), math.log1p(math.exp(0.7)),
                             rtol=RTOL)
  # ORPO at pc = pr: log 2; at p = log ½ the odds are 1 (log-odds 0).
  np.testing.assert_allclose(losses.orpo(pc, pc), LOG2, rtol=RTOL)
  half, quarter = col(math.log(0.5)), col(math.log(0.25))
  # odds(½) = 1, odds(¼) = 1/3: -log σ(log 3).
  np.testing.assert_allclose(losses.orpo(half, quarter), -math.log(3 / 4), rtol=RTOL)


def test_dpo_closed_forms():
  # h = (−1 − −3) − (−4 − −2) = 4, β = 0.5: -log σ(2).
  args = tuple(col(x) for x in (-1.0, -4.0, -3.0, -2.0))
  np.testing.assert_allclose(losses.dpo(*args, beta=0.5), -math.log(1 / (1 + math.exp(-2))),
                             rtol=RTOL)
  np.testing.assert_allclose(losses.hinge(*args, beta=0.2), 1 - 0.8, rtol=RTOL)
  np.testing.assert_allclose(losses.ipo(*args, beta=0.5), (4 - 1)**2, rtol=RTOL)


def test_f_divergence_closed_forms():
  # ρc = log 2, ρr = 0: u_c = 2, u_r = 1.
  pc, pr, rc, rr = col(math.log(2.0) - 3.0), col(-5.0), col(-3.0), col(-5.0)
  beta = 0.7
  nls = lambda z: math.log1p(math.exp(-z))  # noqa: E731  -log σ(z)
  cases = {
      "forward_kl": beta * (1 - 0.5),  # -1/u_c + 1/u_r
      "js_divergence": beta * math.log(4 / 3),  # log(2·2/3) - log(1)
      "alpha_divergence": beta * 2 * (1 - 2**-0.5),  # α = ½: (1 - u_c^-½)/½
  }
  for divergence, logit in cases.items():
    got = losses.dpo(pc, pr, rc, rr, beta=beta, f_divergence=divergence, alpha=0.5)
    np.testing.assert_allclose(got, nls(logit), rtol=RTOL, err_msg=divergence)


def test_bradley_terry_and_ranking_closed_forms():
  r = col(1.5, 0.0)
  np.testing.assert_allclose(losses.bradley_terry(r, r), LOG2, rtol=RTOL)
  np.testing.assert_allclose(losses.bradley_terry(r, jnp.zeros(B), margin=col(1.5, -2.0)),
                             np.resize([LOG2, math.log1p(math.exp(-2.0))], B), rtol=RTOL)
  # Three ranked responses and an empty slot.
  rewards = jnp.tile(jnp.array([2.0, 1.0, 0.0, 9.0]), (B, 1))
  ranks = jnp.tile(jnp.array([0, 1, 2, 0]), (B, 1))
  mask = jnp.tile(jnp.array([1, 1, 1, 0]), (B, 1))
  sp = lambda x: math.log1p(math.exp(x))  # noqa: E731
  expected = (sp(-1.0) + sp(-2.0) + sp(-1.0)) / 3
  np.testing.assert_allclose(losses.ranking(rewards, ranks, mask), expected, rtol=RTOL)


def test_kto_closed_forms():
  policy, ref = col(-3.0, -3.0, -1.0, -1.0), col(-4.0, -4.0, -1.0, -1.0)
  desirable = jnp.asarray(np.resize([True, False, True, False], B))
  # r = (1, 1, 0, 0), z0 = 1: the first two rows sit on the reference point: w·½.
  got = losses.kto(policy, ref, desirable, 1.0, desirable_weight=2.0, undesirable_weight=3.0)
  sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
  np.testing.assert_allclose(
      got, np.resize([1.0, 1.5, 2.0 * (1 - sig(-0.1)), 3.0 * (1 - sig(0.1))], B), rtol=RTOL)


# ----------------------------------------------------------------------------- NumPy parity

NP_CASES = [(name, {}) for name in REG] + [
    ("dpo", {"beta": 0.3, "label_smoothing": 0.2}),
    ("dpo", {"f_divergence": "alpha_divergence", "alpha": 0.3}),
    ("dpo_alpha_divergence", {"alpha": 0.9, "label_smoothing": 0.05}),
    ("robust_dpo", {"beta": 0.5, "label_smoothing": 0.3}),
    ("ipo", {"beta": 0.5}),
    ("hinge", {"beta": 0.5}),
    ("simpo", {"beta": 2.5, "gamma": 1.4}),
    ("exo_pair", {"beta": 0.2, "label_smoothing": 0.1}),
    ("bco_pair", {"beta": 0.2, "delta": 0.3}),
    ("aot", {"beta": 0.3, "label_smoothing": 0.1}),
    ("aot_pair", {"beta": 0.3, "label_smoothing": 0.1}),
    ("discopop", {"beta": 0.2, "tau": 0.5}),
]


@pytest.mark.parametrize("name, hparams", NP_CASES, ids=lambda x: str(x))
def test_matches_numpy(name, hparams):
  entry = REG[name]
  for seed in range(3):
    args = random_logps(seed, entry.logp_reduction)
    want = NP_REFERENCE[name](*(a.astype(np.float64) for a in args), **hparams)
    got = entry(*as_jnp(*args), **hparams)
    assert got.dtype == jnp.float32 and got.shape == (B,)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=f"{name} {hparams}")


def test_kto_matches_numpy():
  rng = np.random.default_rng(0)
  policy, ref, _, _ = random_logps(1)
  desirable = rng.random(B) < 0.5
  for kl_ref, hp in [(0.7, {}), (-0.4, {"beta": 0.5, "desirable_weight": 1.3,
                                         "undesirable_weight": 0.6})]:
    got = losses.kto(*as_jnp(policy, ref, desirable), jnp.float32(kl_ref), **hp)
    want = np_kto(policy.astype(np.float64), ref.astype(np.float64), desirable, kl_ref, **hp)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_bradley_terry_and_ranking_match_numpy():
  rng = np.random.default_rng(3)
  chosen, rejected, margin = (np.float32(rng.normal(0, 2, B)) for _ in range(3))
  np.testing.assert_allclose(
      losses.bradley_terry(*as_jnp(chosen, rejected), margin=jnp.asarray(margin)),
      -np_log_sigmoid(chosen.astype(np.float64) - rejected - margin), rtol=RTOL, atol=ATOL)
  rewards = np.float32(rng.normal(0, 2, (B, 4)))
  ranks = rng.integers(0, 3, (B, 4))  # many ties
  mask = rng.random((B, 4)) < 0.7
  mask[0] = False  # no valid pair
  np.testing.assert_allclose(losses.ranking(*as_jnp(rewards, ranks, mask)),
                             np_ranking(rewards.astype(np.float64), ranks, mask),
                             rtol=RTOL, atol=ATOL)


def test_implicit_rewards():
  pc, pr, rc, rr = random_logps(4)
  chosen, rejected = losses.implicit_rewards(*as_jnp(pc, pr, rc, rr), beta=0.2)
  np.testing.assert_allclose(chosen, 0.2 * (pc.astype(np.float64) - rc), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(rejected, 0.2 * (pr.astype(np.float64) - rr), rtol=RTOL, atol=ATOL)
  chosen, rejected = losses.implicit_rewards(*as_jnp(pc, pr), beta=0.2)
  np.testing.assert_allclose(chosen, 0.2 * pc, rtol=RTOL)
  np.testing.assert_allclose(rejected, 0.2 * pr, rtol=RTOL)
  grad = jax.grad(lambda x: losses.implicit_rewards(x, x, beta=1.0)[0].sum())(jnp.asarray(pc))
  np.testing.assert_array_equal(grad, 0.0)  # metrics only: detached


# ----------------------------------------------------------------------------- gradients


def grads(fn, args, argnums=(0, 1, 2, 3)):
  return jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=argnums)(*as_jnp(*args))


def np_dpo_dh(h, beta, eps):
  return -beta * ((1 - eps) * np_sigmoid(-beta * h) - eps * np_sigmoid(beta * h))


def np_robust_dh(h, beta, eps):
  return -beta * ((1 - eps) * np_sigmoid(-beta * h) + eps * np_sigmoid(beta * h)) / (1 - 2 * eps)


@pytest.mark.parametrize("name, hparams, dloss_dh", [
    ("dpo", {"beta": 0.3, "label_smoothing": 0.1}, lambda h: np_dpo_dh(h, 0.3, 0.1)),
    ("robust_dpo", {"beta": 0.3, "label_smoothing": 0.2}, lambda h: np_robust_dh(h, 0.3, 0.2)),
    ("ipo", {"beta": 0.4}, lambda h: 2 * (h - 1 / 0.8)),
    ("hinge", {"beta": 0.2}, lambda h: np.where(0.2 * h < 1, -0.2, 0.0)),
])
def test_gradients_of_h_losses(name, hparams, dloss_dh):
  """For losses of h alone: dL/dpc = dL/dh, dL/dpr = dL/drc = -dL/dh, dL/drr = dL/dh."""
  args = random_logps(5, REG[name].logp_reduction)
  pc, pr, rc, rr = (a.astype(np.float64) for a in args)
  d = dloss_dh((pc - rc) - (pr - rr))
  got = grads(lambda *a: REG[name](*a, **hparams), args)
  for g, want in zip(got, (d, -d, -d, d)):
    np.testing.assert_allclose(g, want, rtol=RTOL, atol=ATOL, err_msg=name)


def test_simpo_gradient():
  pc, pr, _, _ = random_logps(6, "mean")
  beta, gamma = 2.5, 0.8
  d = -beta * np_sigmoid(-(beta * (pc.astype(np.float64) - pr) - gamma))
  g_c, g_r = grads(lambda c, r: losses.simpo(c, r, beta=beta, gamma=gamma), (pc, pr), (0, 1))
  np.testing.assert_allclose(g_c, d, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(g_r, -d, rtol=RTOL, atol=ATOL)


def test_orpo_gradient():
  pc, pr, _, _ = random_logps(7, "mean")
  pc[:2] = [-1e-5, -1e4]  # near 0 (against another near 0), and a vanishing probability
  pr[:2] = [-3e-5, -3.0]
  c, r = pc.astype(np.float64), pr.astype(np.float64)
  log_odds = lambda p: p - np.log1p(-np.exp(p))  # noqa: E731
  outer = np_sigmoid(-(log_odds(c) - log_odds(r)))  # -d/dx log σ(x) = σ(-x)
  # d log_odds/dp = 1 / (1 - e^p)
  want_c, want_r = -outer / -np.expm1(c), outer / -np.expm1(r)
  # Near p = 0, log(1 - e^p) in float32 loses ~3 digits to cancellation; the stable form does not.
  np.testing.assert_allclose(losses.orpo(*as_jnp(pc, pr)), np_orpo(c, r), rtol=RTOL, atol=ATOL)
  g_c, g_r = grads(losses.orpo, (pc, pr), (0, 1))
  np.testing.assert_allclose(g_c, want_c, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(g_r, want_r, rtol=RTOL, atol=ATOL)


def test_kto_gradient_and_detached_reference_point():
  policy, ref, _, _ = random_logps(8)
  desirable = np.arange(B) % 3 == 0
  beta, w_d, w_u, kl_ref = 0.3, 1.5, 0.7, 0.9
  def fn(p, k):
    return losses.kto(p, jnp.asarray(ref), jnp.asarray(desirable), k, beta=beta,
                      desirable_weight=w_d, undesirable_weight=w_u)

  g_policy, g_kl = jax.grad(lambda p, k: fn(p, k).sum(), argnums=(0, 1))(
      jnp.asarray(policy), jnp.float32(kl_ref))
  r = policy.astype(np.float64) - ref
  z_d, z_u = beta * (r - kl_ref), beta * (kl_ref - r)
  want = np.where(desirable, -w_d * beta * np_sigmoid(z_d) * np_sigmoid(-z_d),
                  w_u * beta * np_sigmoid(z_u) * np_sigmoid(-z_u))
  np.testing.assert_allclose(g_policy, want, rtol=RTOL, atol=ATOL)
  assert float(g_kl) == 0.0  # z0 is a stop_gradient
  # A negative estimate is clamped to 0.
  np.testing.assert_array_equal(fn(jnp.asarray(policy), -3.0), fn(jnp.asarray(policy), 0.0))


def np_numeric_grads(np_fn, args, step=1e-6):
  """Central differences of sum(np_fn(*args)) for every element of every arg, in float64."""
  args = [np.asarray(a, np.float64) for a in args]
  out = []
  for k, a in enumerate(args):
    g = np.zeros_like(a)
    for idx in np.ndindex(a.shape):
      plus, minus = [x.copy() for x in args], [x.copy() for x in args]
      plus[k][idx] += step
      minus[k][idx] -= step
      g[idx] = (np.sum(np_fn(*plus)) - np.sum(np_fn(*minus))) / (2 * step)
    out.append(g)
  return out


# bco_pair's default delta is a detached batch mean, which finite differences of the reference
# would see move: it is checked at a fixed delta (test_bco_pair_delta_is_detached covers the rest).
FD_CASES = [("exo_pair", {}), ("nca_pair", {}), ("bco_pair", {"delta": 0.2}), ("sppo_hard", {}),
            ("aot", {"label_smoothing": 0.1}), ("aot_pair", {"label_smoothing": 0.1}),
            ("apo_zero", {}), ("apo_down", {}), ("discopop", {}), ("dpo_forward_kl", {}),
            ("dpo_js_divergence", {}), ("dpo_alpha_divergence", {"alpha": 0.3})]


@pytest.mark.parametrize("name, hparams", FD_CASES, ids=lambda x: str(x))
def test_gradients_against_numpy_finite_differences(name, hparams):
  """Autodiff through the float32 loss vs central differences of the float64 NumPy reference.

  (Cheaper and tighter than jax.test_util.check_grads, whose float32 finite differences need
  loose tolerances and whose float64 runs compile every primitive again.)"""
  hparams = {"beta": 0.3, **hparams}
  args = random_logps(9, REG[name].logp_reduction)
  want = np_numeric_grads(lambda *a: NP_REFERENCE[name](*a, **hparams), args)
  got = grads(lambda *a: REG[name](*a, **hparams), args)
  for i, (g, w) in enumerate(zip(got, want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=f"{name} d/d arg {i}")


def test_bco_pair_delta_is_detached():
  """The default delta is the batch mean of the 2B implicit rewards, with no gradient."""
  args = as_jnp(*random_logps(21))
  beta = 0.3
  rewards = losses.implicit_rewards(*args, beta=beta)
  delta = float(jnp.mean(jnp.concatenate(rewards)))
  np.testing.assert_allclose(losses.bco_pair(*args, beta=beta),
                             losses.bco_pair(*args, beta=beta, delta=delta), rtol=1e-6)
  g_default = grads(lambda *a: losses.bco_pair(*a, beta=beta), args)
  g_fixed = grads(lambda *a: losses.bco_pair(*a, beta=beta, delta=delta), args)
  for a, b in zip(g_default, g_fixed):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_ranking_and_bradley_terry_gradients():
  rng = np.random.default_rng(10)
  rewards = np.float32(rng.normal(0, 2, (B, 4)))
  ranks, mask = rng.integers(0, 3, (B, 4)), rng.random((B, 4)) < 0.8
  want = np_numeric_grads(lambda r: np_ranking(r, ranks, mask), (rewards,))[0]
  got = jax.grad(lambda r: losses.ranking(r, ranks, mask).sum())(jnp.asarray(rewards))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  chosen, rejected = rewards[:, 0], rewards[:, 1]
  d = -np_sigmoid(-(chosen.astype(np.float64) - rejected - 0.5))
  g_c, g_r = grads(lambda c, r: losses.bradley_terry(c, r, margin=0.5), (chosen, rejected), (0, 1))
  np.testing.assert_allclose(g_c, d, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(g_r, -d, rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------- limits


def test_zero_smoothing_is_plain_dpo():
  args = as_jnp(*random_logps(11))
  h = (args[0] - args[2]) - (args[1] - args[3])
  plain = -jax.nn.log_sigmoid(0.1 * h)
  np.testing.assert_allclose(losses.dpo(*args, label_smoothing=0.0), plain, rtol=1e-6)
  np.testing.assert_allclose(losses.robust_dpo(*args, label_smoothing=0.0), plain, rtol=1e-6)
  np.testing.assert_allclose(losses.dpo(*args), plain, rtol=1e-6)


def test_robust_dpo_is_unbiased_under_label_flips():
  """E over flips with probability ε of the robust loss = the clean DPO loss (Chowdhury et al.).

  Flipping a label swaps chosen and rejected. Checked in float64, where it holds to rounding."""
  with jax.enable_x64(True):
    pc, pr, rc, rr = (jnp.asarray(a, jnp.float64) for a in random_logps(12))
    for eps in (0.05, 0.2, 0.45):
      noisy = ((1 - eps) * losses.robust_dpo(pc, pr, rc, rr, beta=0.3, label_smoothing=eps)
               + eps * losses.robust_dpo(pr, pc, rr, rc, beta=0.3, label_smoothing=eps))
      np.testing.assert_allclose(noisy, losses.dpo(pc, pr, rc, rr, beta=0.3), rtol=1e-12)


@pytest.mark.parametrize("eps", [0.5, 0.7, -0.1])
@pytest.mark.parametrize("kind", [float, np.float32, np.asarray, jnp.float32, jnp.asarray])
def test_robust_dpo_rejects_bad_flip_rates(eps, kind):
  # Python, NumPy and concrete JAX scalars are all checked (at 0.5 the loss divides by zero).
  args = as_jnp(*random_logps(0))
  with pytest.raises(ValueError, match="label_smoothing"):
    losses.robust_dpo(*args, label_smoothing=kind(eps))
  with pytest.raises(ValueError, match="label_smoothing"):
    losses.PREFERENCE_LOSSES["robust_dpo"](*args, label_smoothing=kind(eps))


def test_ipo_minimum_at_target_margin():
  beta = 0.1
  # h = (-10 - -15) - (-7 - -7) = 5 = 1/(2β), exactly representable.
  pc, pr, rc, rr = (col(x) for x in (-10.0, -7.0, -15.0, -7.0))
  np.testing.assert_array_equal(losses.ipo(pc, pr, rc, rr, beta=beta), 0.0)
  for g in grads(lambda *a: losses.ipo(*a, beta=beta), (pc, pr, rc, rr)):
    np.testing.assert_array_equal(g, 0.0)
  assert np.all(np.asarray(losses.ipo(pc + col(-0.25, 0.25), pr, rc, rr, beta=beta)) > 0.0)


def test_hinge_is_flat_past_its_margin():
  pc, pr, rc, rr = (col(x) for x in (-10.0, -20.0, -15.0, -10.0))  # h = 15, βh = 1.5
  np.testing.assert_array_equal(losses.hinge(pc, pr, rc, rr, beta=0.1), 0.0)
  for g in grads(lambda *a: losses.hinge(*a, beta=0.1), (pc, pr, rc, rr)):
    np.testing.assert_array_equal(g, 0.0)


def test_ranking_with_two_responses_is_bradley_terry():
  rng = np.random.default_rng(13)
  chosen, rejected = (jnp.asarray(np.float32(rng.normal(0, 3, B))) for _ in range(2))
  rewards = jnp.stack([chosen, rejected], axis=1)
  ranks = jnp.broadcast_to(jnp.array([0, 1]), (B, 2))
  np.testing.assert_allclose(losses.ranking(rewards, ranks, jnp.ones((B, 2), bool)),
                             losses.bradley_terry(chosen, rejected), rtol=1e-6)
  # Reversed ranks: the same pair counted the other way round.
  np.testing.assert_allclose(losses.ranking(rewards, 1 - ranks, jnp.ones((B, 2), bool)),
                             losses.bradley_terry(rejected, chosen), rtol=1e-6)


def test_ranking_skips_ties_and_masked_slots():
  rows = lambda *r: jnp.asarray(np.resize(np.array(r), (B, 4)))  # noqa: E731  rows repeated
  rewards = rows([2.0, 0.5, 1.0, np.nan],  # slot 3 masked out, even holding NaN
                 [1.0, 2.0, 3.0, 4.0],     # all tied: no valid pair
                 [1.0, 2.0, 3.0, 4.0]).astype(jnp.float32)  # fully masked: no valid pair
  ranks = rows([0, 1, 1, 0], [2, 2, 2, 2], [0, 1, 2, 3])
  mask = rows([1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0])
  got = losses.ranking(rewards, ranks, mask)
  sp = lambda x: math.log1p(math.exp(x))  # noqa: E731
  # Row 0: pairs (0, 1) and (0, 2); 1 and 2 tie; slot 3 is masked.
  np.testing.assert_allclose(got[0::3], (sp(-1.5) + sp(-1.0)) / 2, rtol=RTOL)
  np.testing.assert_array_equal(got[1::3], 0.0)
  np.testing.assert_array_equal(got[2::3], 0.0)
  g = jax.grad(lambda r: losses.ranking(r, ranks, mask).sum())(rewards)
  assert np.isfinite(np.asarray(g)).all()
  np.testing.assert_array_equal(g[0::3, 3], 0.0)
  np.testing.assert_array_equal(g[1::3], 0.0)
  np.testing.assert_array_equal(g[2::3], 0.0)


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "js_divergence",
                                        "alpha_divergence"])
def test_f_divergences_decrease_in_h_and_give_log2_at_zero(divergence):
  rho = jnp.linspace(-3.0, 3.0, B)
  zeros = jnp.zeros_like(rho)
  def fn(pc, pr):
    return losses.dpo(pc, pr, zeros, zeros, beta=0.5, f_divergence=divergence)

  # h = ρc - ρr = 0 whatever the log-ratios are: log 2.
  np.testing.assert_allclose(fn(rho, rho), LOG2, rtol=RTOL)
  # Raising ρc (or lowering ρr) raises h and lowers the loss, everywhere.
  for fixed in (-2.0, 0.0, 1.5):
    other = jnp.full_like(rho, fixed)
    assert np.all(np.diff(np.asarray(fn(rho, other))) < 0), divergence
    assert np.all(np.diff(np.asarray(fn(other, rho))) > 0), divergence
  g_c, g_r = grads(fn, (rho, rho[::-1]), (0, 1))
  assert np.all(np.asarray(g_c) < 0) and np.all(np.asarray(g_r) > 0)


def test_alpha_divergence_limits():
  """f'_α(e^ρ) = (1 - e^-αρ)/α -> ρ as α -> 0 (reverse KL), = 1 - e^-ρ at α = 1 (forward KL)."""
  args = as_jnp(*random_logps(14))
  beta, delta = 0.3, 1e-5
  reverse = losses.dpo(*args, beta=beta)
  forward = losses.dpo(*args, beta=beta, f_divergence="forward_kl")
  def alpha(a):
    return losses.dpo(*args, beta=beta, f_divergence="alpha_divergence", alpha=a)

  np.testing.assert_array_equal(alpha(1.0), forward)  # α = 1 is forward KL exactly
  # The loss is 1-Lipschitz in its logit, so |Δloss| <= β·|Δ(f'(u_c) - f'(u_r))|, and
  #   at α = δ:      |f'_α(e^ρ) - ρ| <= δ ρ²/2 · e^{δ|ρ|}
  #   at α = 1 - δ:  |f'_α(e^ρ) - f'_1(e^ρ)| <= δ |ρ e^-ρ - 1 + e^-ρ| (first order, δ|ρ| << 1).
  rho = np.stack([np.asarray(args[0] - args[2]), np.asarray(args[1] - args[3])]).astype(np.float64)
  bound_0 = beta * 2 * np.max(delta * rho**2 / 2 * np.exp(delta * np.abs(rho)))
  bound_1 = beta * 2 * 1.01 * np.max(delta * np.abs(rho * np.exp(-rho) - 1 + np.exp(-rho)))
  ulps = 4e-7 * np.maximum(np.abs(np.asarray(forward)), 1)  # float32 rounding of the losses
  assert np.all(np.abs(np.asarray(alpha(delta)) - np.asarray(reverse)) <= bound_0 + ulps)
  assert np.all(np.abs(np.asarray(alpha(1 - delta)) - np.asarray(forward)) <= bound_1 + ulps)
  assert bound_0 < 1e-4 and bound_1 < 1e-3  # the bounds are tight enough to mean something
  assert not np.allclose(alpha(0.5), reverse, rtol=1e-3)  # the limits are not trivially equal
  with pytest.raises(ValueError, match="alpha"):
    alpha(0.0)
  with pytest.raises(ValueError, match="f_divergence"):
    losses.dpo(*args, f_divergence="kl")


def test_capped_exponential_keeps_pushing():
  """Past e^50, forward-KL logits grow linearly: finite, and the gradient still points up."""
  pc, pr, rc, rr = col(-1e4, -3e3, -200.0), col(-5.0), col(-10.0), col(-5.0)  # ρc <= -190
  loss = losses.dpo(pc, pr, rc, rr, f_divergence="forward_kl")
  g_c = grads(lambda *a: losses.dpo(*a, f_divergence="forward_kl"), (pc, pr, rc, rr))[0]
  assert np.isfinite(loss).all() and np.isfinite(g_c).all() and np.all(np.asarray(g_c) < 0)
  order = np.argsort(np.asarray(pc))  # lower ρc, larger loss
  assert np.all(np.diff(np.asarray(loss)[order]) <= 0)


def test_kto_kl_estimate():
  rng = np.random.default_rng(15)
  estimate = jax.jit(losses.kto_kl_estimate)  # one small compile per batch size
  for n in (1, 5, 7, B):  # odd and single-row batches: a plain mean
    policy, ref = np.float32(rng.normal(-20, 3, n)), np.float32(rng.normal(-21, 3, n))
    want = max(np.mean(policy.astype(np.float64) - ref), 0.0)
    np.testing.assert_allclose(estimate(*as_jnp(policy, ref)), want, rtol=RTOL, atol=ATOL)
  policy, ref = col(-10.0, -10.0, -50.0, -50.0), col(-11.0, -13.0, -1.0, -1.0)
  # Padding rows left out with `where`; clamped at 0; no gradient.
  used = jnp.asarray(np.resize([True, True, False, False], B))
  np.testing.assert_allclose(losses.kto_kl_estimate(policy, ref, where=used), 2.0, rtol=RTOL)
  assert float(losses.kto_kl_estimate(policy, ref)) == 0.0
  assert float(losses.kto_kl_estimate(policy, ref, where=jnp.zeros(B, bool))) == 0.0
  g = jax.grad(lambda p: losses.kto_kl_estimate(p, ref, where=used))(policy)
  np.testing.assert_array_equal(g, 0.0)


# ----------------------------------------------------------------------------- numerics

EXTREMES = np.float32([-1e4, -3e3, -50.0, -1.0, -1e-6])


def extreme_grid():
  """Every combination of extreme log-probs for (pc, pr, rc, rr): 625 rows."""
  return tuple(np.array(c, np.float32) for c in zip(*itertools.product(EXTREMES, repeat=4)))


def assert_finite_values_and_grads(fn, args, n_grad_args):
  """Float32 and bfloat16 inputs: float32 values, and values and gradients all finite."""
  for dtype in (jnp.float32, jnp.bfloat16):
    typed = tuple(jnp.asarray(a, dtype) if i < n_grad_args else jnp.asarray(a)
                  for i, a in enumerate(args))
    value, vjp = jax.vjp(lambda *a: fn(*a, *typed[n_grad_args:]), *typed[:n_grad_args])
    g = vjp(jnp.ones_like(value))
    assert value.dtype == jnp.float32, dtype
    assert np.isfinite(np.asarray(value)).all(), dtype
    for gi in g:
      assert gi.dtype == dtype and np.isfinite(np.asarray(gi, np.float32)).all(), dtype


@pytest.mark.parametrize("name", sorted(REG))
def test_no_nan_or_inf_at_extreme_logps_and_in_bf16(name):
  assert_finite_values_and_grads(REG[name], extreme_grid(), 4)


def test_no_nan_or_inf_unpaired_and_reward_losses():
  pc, _, rc, _ = extreme_grid()
  desirable = np.arange(pc.shape[0]) % 2 == 0
  assert_finite_values_and_grads(lambda p, r, d: losses.kto(p, r, d, 3.0), (pc, rc, desirable), 2)
  assert_finite_values_and_grads(lambda p, r: losses.bradley_terry(p, -r), (pc, rc), 2)
  rewards = np.stack(extreme_grid(), axis=1) * np.float32([1, -1, 1, -1])
  ranks, mask = np.tile([0, 1, 1, 2], (rewards.shape[0], 1)), np.ones_like(rewards, bool)
  assert_finite_values_and_grads(losses.ranking, (rewards, ranks, mask), 1)


# ----------------------------------------------------------------------------- transformations


def all_losses(batch):
  """Every loss on one batch (a dict of [B] / [B, K] arrays and a scalar kl_ref)."""
  pc, pr, rc, rr = batch["pc"], batch["pr"], batch["rc"], batch["rr"]
  # ln_dpo and sigmoid_norm are dpo itself (test_registry_metadata checks it).
  out = {name: entry(pc, pr, rc, rr) for name, entry in REG.items()
         if name not in ("ln_dpo", "sigmoid_norm")}
  out["cdpo"] = losses.dpo(pc, pr, rc, rr, label_smoothing=0.1)
  out["bco_pair_delta"] = losses.bco_pair(pc, pr, rc, rr, delta=0.3)
  out["kto"] = losses.kto(pc, rc, batch["desirable"], batch["kl_ref"])
  out["bradley_terry"] = losses.bradley_terry(pc, pr, margin=0.2)
  out["ranking"] = losses.ranking(batch["rewards"], batch["ranks"], batch["mask"])
  return out


def make_batch(seed, n):
  rng = np.random.default_rng(seed)
  pc, pr, rc, rr = random_logps(seed, "mean", n)  # mean-scale values suit every loss
  return {"pc": pc, "pr": pr, "rc": rc, "rr": rr, "desirable": rng.random(n) < 0.5,
          "kl_ref": np.float32(rng.uniform(0, 1)), "rewards": np.float32(rng.normal(0, 2, (n, 3))),
          "ranks": rng.integers(0, 3, (n, 3)), "mask": rng.random((n, 3)) < 0.8}


def stacked_batches(n_batches):
  """[n_batches, B, ...] leaves, and the per-batch dicts they came from."""
  batches = [make_batch(100 + i, B) for i in range(n_batches)]
  return jax.tree.map(lambda *xs: np.stack(xs), *batches), batches


_all_losses_jit = jax.jit(all_losses)  # the per-slice baseline, compiled once for [B] slices


def assert_same(got, want, context):
  for name in want:
    # XLA may fuse a compiled graph differently from op-by-op execution: a few ulps.
    np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7,
                               err_msg=f"{name} under {context}")


def test_jit_matches_eager():
  batch = make_batch(0, B)
  assert_same(_all_losses_jit(batch), all_losses(batch), "jit")


def test_vmap_matches_per_batch_calls():
  stacked, batches = stacked_batches(3)
  out = jax.vmap(all_losses)(stacked)
  for i, batch in enumerate(batches):
    assert_same(jax.tree.map(lambda x: x[i], out), _all_losses_jit(batch), f"vmap[{i}]")


def test_pmap_matches_per_device_calls():
  n = jax.device_count()
  assert n == 8, "tests/conftest.py sets 8 host devices"
  stacked, batches = stacked_batches(n)
  out = jax.pmap(all_losses)(stacked)
  for i, batch in enumerate(batches):
    assert_same(jax.tree.map(lambda x: x[i], out), _all_losses_jit(batch), f"pmap[{i}]")


def test_shard_map_matches_per_shard_calls():
  """Batch sharded over 8 devices; batch-coupled losses (aot, aot_pair, bco_pair) see a shard."""
  mesh = jax.make_mesh((8,), ("data",))
  stacked, batches = stacked_batches(8)
  flat = {k: (v.reshape(8 * B, *v.shape[2:]) if k != "kl_ref" else v[0])
          for k, v in stacked.items()}
  specs = {k: P() if k == "kl_ref" else P("data") for k in flat}
  sharded = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in flat.items()}
  fn = jax.jit(jax.shard_map(all_losses, mesh=mesh, in_specs=(specs,), out_specs=P("data")))
  out = jax.tree.map(np.asarray, fn(sharded))
  for i, batch in enumerate(batches):
    batch = {**batch, "kl_ref": flat["kl_ref"]}
    assert_same(jax.tree.map(lambda x: x[i * B:(i + 1) * B], out), _all_losses_jit(batch),
                f"shard_map[{i}]")


def test_kto_kl_estimate_global_mean_under_shard_map():
  mesh = jax.make_mesh((8,), ("data",))
  rng = np.random.default_rng(16)
  policy, ref = np.float32(rng.normal(-20, 3, 8 * 3)), np.float32(rng.normal(-21, 3, 8 * 3))
  where = rng.random(8 * 3) < 0.6
  fn = jax.jit(jax.shard_map(
      lambda p, r, w: losses.kto_kl_estimate(p, r, where=w, axis_name="data"),
      mesh=mesh, in_specs=(P("data"),) * 3, out_specs=P()))
  args = [jax.device_put(x, NamedSharding(mesh, P("data"))) for x in (policy, ref, where)]
  np.testing.assert_allclose(fn(*args), losses.kto_kl_estimate(*as_jnp(policy, ref), where=where),
                             rtol=1e-6)


# ----------------------------------------------------------------------------- the registry

REQUIRED = ["dpo", "robust_dpo", "ipo", "hinge", "simpo", "orpo", "exo_pair", "nca_pair",
            "bco_pair", "sppo_hard", "aot", "aot_pair", "apo_zero", "apo_down", "discopop",
            "ln_dpo", "sigmoid_norm"]


def test_registry_metadata():
  assert set(REQUIRED) <= set(REG)
  assert {n for n, e in REG.items() if e.reference_free} == {"simpo", "orpo"}
  assert {n for n, e in REG.items() if e.logp_reduction == "mean"} == {
      "ipo", "simpo", "orpo", "ln_dpo", "sigmoid_norm"}
  assert {n for n, e in REG.items() if e.batch_coupled} == {"aot", "aot_pair", "bco_pair"}
  assert REG["dpo"].defaults == {"beta": 0.1, "label_smoothing": 0.0,
                                 "f_divergence": "reverse_kl", "alpha": 0.5}
  assert REG["simpo"].defaults == {"beta": 2.0, "gamma": 0.5}
  assert REG["orpo"].defaults == {}
  assert REG["exo_pair"].defaults == {"beta": 0.1, "label_smoothing": 1e-3}
  assert REG["discopop"].defaults == {"beta": 0.1, "tau": 0.05}
  assert REG["bco_pair"].defaults == {"beta": 0.1, "delta": None}
  # Length-normalised DPO is dpo fed token means: the same function, another logp_reduction.
  for name in ("ln_dpo", "sigmoid_norm"):
    assert REG[name].fn is losses.dpo and REG[name].fixed == () and REG[name].hparams == (
        REG["dpo"].hparams)


def test_registry_uniform_calls():
  args = as_jnp(*random_logps(17, "mean"))
  for name, entry in REG.items():
    value = entry(*args)
    assert value.shape == (B,) and value.dtype == jnp.float32, name
    if entry.reference_free:
      np.testing.assert_array_equal(entry(*args[:2], None, None), value)
      np.testing.assert_array_equal(entry(*args[:2]), value)
    else:
      with pytest.raises(ValueError, match="reference"):
        entry(*args[:2])
    # Every declared hyper-parameter is accepted at its default.
    np.testing.assert_array_equal(entry(*args, **entry.defaults), value)


def test_registry_passes_hparams_through():
  args = as_jnp(*random_logps(18))
  np.testing.assert_array_equal(REG["ipo"](*args, beta=0.3), losses.ipo(*args, beta=0.3))
  np.testing.assert_array_equal(REG["dpo_js_divergence"](*args, beta=0.2),
                                losses.dpo(*args, beta=0.2, f_divergence="js_divergence"))
  np.testing.assert_array_equal(REG["dpo_alpha_divergence"](*args, alpha=0.3),
                                losses.dpo(*args, f_divergence="alpha_divergence", alpha=0.3))
  np.testing.assert_array_equal(REG["ln_dpo"](*args, label_smoothing=0.1),
                                losses.dpo(*args, label_smoothing=0.1))


def test_registry_rejects_unknown_hparams():
  args = as_jnp(*random_logps(19))
  with pytest.raises(ValueError, match="'betta'.*did you mean 'beta'"):
    REG["dpo"](*args, betta=0.2)
  with pytest.raises(ValueError, match="'beta'"):
    REG["orpo"](*args, beta=0.2)
  with pytest.raises(ValueError, match="'f_divergence'"):  # bound by the named variant
    REG["dpo_forward_kl"](*args, f_divergence="js_divergence")
  with pytest.raises(ValueError, match="'alpha'"):  # meaningless for forward KL
    REG["dpo_forward_kl"](*args, alpha=0.3)
  REG["dpo"].check_hparams({"beta": 1.0, "alpha": 0.2})  # valid ones pass


def test_register_user_loss():
  def margin_mse(pc, pr, rc, rr, *, target=1.0):
    return jnp.square((pc - rc) - (pr - rr) - target)

  try:
    entry = losses.register_preference_loss("margin_mse", margin_mse, reference_free=False,
                                            logp_reduction="mean")
    assert REG["margin_mse"] is entry and entry.defaults == {"target": 1.0}
    args = as_jnp(*random_logps(20))
    np.testing.assert_array_equal(entry(*args, target=2.0), margin_mse(*args, target=2.0))
    with pytest.raises(ValueError, match="already registered"):
      losses.register_preference_loss("margin_mse", margin_mse, reference_free=False,
                                      logp_reduction="mean")
  finally:
    REG.pop("margin_mse", None)
  with pytest.raises(ValueError, match="positional"):
    losses.register_preference_loss("bad", margin_mse, reference_free=True, logp_reduction="sum")
  with pytest.raises(ValueError, match="defaults"):
    losses.register_preference_loss("bad", lambda pc, pr, *, k: pc, reference_free=True,
                                    logp_reduction="sum")
  with pytest.raises(ValueError, match="logp_reduction"):
    losses.register_preference_loss("bad", margin_mse, reference_free=False,
                                    logp_reduction="token")
  assert "bad" not in REG


def test_module_exports():
  exported = set(pref.__all__) | set(zoo.__all__) | set(registry.__all__)
  assert exported <= set(dir(losses))
  for name in ["dpo", "robust_dpo", "ipo", "hinge", "simpo", "orpo", "kto", "kto_kl_estimate",
               "bradley_terry", "ranking", "implicit_rewards", "PREFERENCE_LOSSES",
               "register_preference_loss", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
               "aot", "aot_pair", "apo_zero", "apo_down", "discopop"]:
    assert name in exported and hasattr(losses, name), name


def test_shape_checks():
  a, b = jnp.zeros(3) - 1, jnp.zeros(4) - 1
  with pytest.raises(AssertionError):
    losses.dpo(a, b, a, a)
  with pytest.raises(AssertionError):
    losses.dpo(a[:, None], a[:, None], a[:, None], a[:, None])  # [B, 1] is not [B]
  with pytest.raises(AssertionError):
    losses.bradley_terry(a, a, margin=b)


@pytest.mark.parametrize("name", sorted(n for n, e in losses.PREFERENCE_LOSSES.items()
                                        if e.batch_coupled))
def test_batch_coupled_losses_mask_equals_slicing(name):
  """Padding rows (where=False) change neither the real rows' total nor its gradient."""
  entry = losses.PREFERENCE_LOSSES[name]
  args = as_jnp(*random_logps(3, n=7))
  where = jnp.array([True, True, False, True, False, True, True])
  real = [x[where] for x in args]
  weight = where.astype(jnp.float32)
  masked_total = lambda pc: jnp.sum(entry(pc, *args[1:], where=where) * weight)
  sliced_total = lambda pc: jnp.sum(entry(pc, *real[1:]))
  np.testing.assert_allclose(masked_total(args[0]), sliced_total(real[0]), rtol=1e-6)
  grad_masked = jax.grad(masked_total)(args[0])
  np.testing.assert_allclose(grad_masked[where], jax.grad(sliced_total)(real[0]), rtol=1e-5,
                             atol=1e-7)
  assert np.all(grad_masked[~where] == 0)
  # Without padding, where=all-True is the plain batch loss.
  np.testing.assert_allclose(jnp.sum(entry(*real, where=jnp.ones(5, bool))),
                             jnp.sum(entry(*real)), rtol=1e-6)
