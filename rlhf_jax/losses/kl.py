"""Per-token KL estimators, KL-penalised rewards and the adaptive KL controller.

Shape letters: B batch (sequences), T tokens (right-padded, with a 0/1 mask).

Tokens are sampled from the policy π being trained; π_ref is the frozen reference. For a sampled
token x let d = log π(x) - log π_ref(x) and r = π_ref(x)/π(x) = exp(-d). Schulman's estimators of
KL(π || π_ref) = E_π[d] (http://joschu.net/blog/kl-approx.html, 2020):

  k1 = d                  unbiased; high variance, negative on some tokens.
  k2 = d²/2               biased: its mean is an f-divergence that agrees with KL to second
                          order in log r (close policies), low variance, ≥ 0.
  k3 = exp(-d) - 1 + d    = (r - 1) - log r; unbiased (E_π[r] = 1), ≥ 0, low variance.

`kl_penalized_rewards` turns one of them into the per-token reward of Ziegler et al. 2019
(arXiv 1909.08593): r_t = -β·k_t, plus the sequence's score at its last token. β comes from the
adaptive controller below (or stays fixed).

Numerics: everything is float32. exp(-d) overflows float32 below d ≈ -88 (a token the policy
finds e^88 times less likely than the reference, or garbage log-probs); `k3` is therefore
continued by its tangent line below d = -LINEAR_BEYOND (a ratio of 4.9e8), so its values and
gradients stay finite and keep their sign. Above that point it is the exact formula, evaluated
by its Taylor series for |d| < 0.5, where expm1(-d) + d would cancel: relative error < 1e-6.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

__all__ = [
    "KL_ESTIMATORS",
    "kl",
    "kl_penalized_rewards",
    "KLControllerState",
    "init_kl_controller",
    "update_kl_controller",
]

KL_ESTIMATORS = ("k1", "k2", "k3")

# |log-ratio| past which exponentials are continued linearly (shared with policy.py's PPO ratio).
LINEAR_BEYOND = 20.0


def _expm1_linear_above(x: chex.Array, limit: float = LINEAR_BEYOND) -> chex.Array:
  """expm1(x) for x ≤ limit, continued by its tangent at `limit` above: finite values and grads.

  The gradient is exp(min(x, limit)) everywhere: it never vanishes and never overflows.
  """
  capped = jnp.minimum(x, limit)
  return jnp.expm1(capped) + jnp.exp(capped) * jnp.maximum(x - limit, 0.0)


def kl(logps: chex.Array, ref_logps: chex.Array, *, estimator: str = "k1") -> chex.Array:
  """Per-token estimate of KL(π || π_ref) from tokens sampled from π (the policy).

  With d = logps - ref_logps:  "k1" = d,  "k2" = d²/2,  "k3" = exp(-d) - 1 + d
  (Schulman 2020, http://joschu.net/blog/kl-approx.html; see the module docstring). The mean of
  k1 or k3 over tokens sampled from π is an unbiased estimate of KL(π || π_ref); the direction
  matters: with tokens sampled from π_ref instead, swap the arguments.

  Args:
    logps: log π(x_t) of the sampled tokens, any shape (typically [B, T]), any float dtype.
    ref_logps: log π_ref(x_t) of the same tokens, same shape.
    estimator: "k1", "k2" or "k3".

  Returns:
    float32 per-token estimates, the shape of `logps`; not masked (multiply by the mask or use
    `ops.masked_mean`). Differentiable w.r.t. both arguments (stop_gradient is the caller's).
  """
  chex.assert_equal_shape([logps, ref_logps])
  chex.assert_type([logps, ref_logps], float)
  if estimator not in KL_ESTIMATORS:
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")
  d = logps.astype(jnp.float32) - ref_logps.astype(jnp.float32)
  if estimator == "k1":
    return d
  if estimator == "k2":
    return 0.5 * jnp.square(d)
  return _k3(d)


def _k3(d: chex.Array) -> chex.Array:
  """exp(-d) - 1 + d in float32, accurate to rounding for all d and finite (see module doc)."""
  # Near 0, expm1(-d) + d cancels down to ~d²/2 and loses digits: there, use the Taylor series
  # Σ_{k≥2} (-d)^k / k! up to k = 8 (relative truncation error < 5e-8 for |d| < 0.5).
  horner = jnp.full_like(d, 1 / math.factorial(8))
  for k in range(7, 1, -1):
    horner = 1 / math.factorial(k) - d * horner
  series = jnp.square(d) * horner
  return jnp.where(jnp.abs(d) < 0.5, series, _expm1_linear_above(-d) + d)


def kl_penalized_rewards(
    scores: chex.Array,
    logps: chex.Array,
    ref_logps: chex.Array,
    mask: chex.Array,
    *,
    kl_coef: chex.Numeric,
    estimator: str = "k1",
) -> tuple[chex.Array, chex.Array]:
  """Per-token rewards r_t = -β·KL_t + score·[t is the last valid token] (Ziegler et al. 2019).

  Ziegler, Stiennon, Wu, Brown, Radford, Amodei, Christiano, Irving 2019, "Fine-Tuning Language
  Models from Human Preferences", arXiv 1909.08593: R = r - β·log(π/π_ref), spread over tokens
  as in their code and InstructGPT: the reward model's score arrives at the last token, the KL
  penalty at every token.

  Args:
    scores: sequence scores from the reward model [B].
    logps: policy log-probs of the sampled completion tokens [B, T].
    ref_logps: reference log-probs of the same tokens [B, T].
    mask: 0/1 (or bool) completion mask [B, T]; the score goes to each row's last 1 (rows are
      right-padded; leading zeros for prompt tokens are fine too). A row without a 1 gets no
      reward at all.
    kl_coef: β, a scalar (Python float or a traced 0-d array, e.g. `KLControllerState.kl_coef`).
    estimator: "k1" (Ziegler's choice), "k2" or "k3"; see `kl`.

  Returns:
    (rewards [B, T], kl [B, T]), float32, zero outside the mask, detached (stop_gradient): these
    are rewards for the policy gradient. `kl` is exactly the per-token KL the rewards were
    penalised with, so log that one.
  """
  chex.assert_rank(scores, 1)
  chex.assert_rank([logps, ref_logps, mask], 2)
  chex.assert_equal_shape([logps, ref_logps, mask])
  chex.assert_equal_shape_prefix([scores, logps], 1)
  kl_coef = jnp.asarray(kl_coef, jnp.float32)
  chex.assert_rank(kl_coef, 0)
  valid_BT = mask > 0
  kl_BT = kl(jax.lax.stop_gradient(logps), jax.lax.stop_gradient(ref_logps), estimator=estimator)
  # `where`, not a product: garbage (inf) log-probs at padding must not become NaN.
  kl_BT = jnp.where(valid_BT, kl_BT, 0.0)
  num_tokens = mask.shape[-1]
  last_B = num_tokens - 1 - jnp.argmax(valid_BT[:, ::-1], axis=-1)
  is_last_BT = (jnp.arange(num_tokens)[None, :] == last_B[:, None]) & valid_BT
  score_BT = jnp.where(is_last_BT, jax.lax.stop_gradient(scores).astype(jnp.float32)[:, None], 0.0)
  rewards_BT = score_BT - kl_coef * kl_BT
  return jax.lax.stop_gradient(rewards_BT), jax.lax.stop_gradient(kl_BT)


class KLControllerState(NamedTuple):
  """The KL coefficient β as a pytree (a float32 0-d array), carried in the RL train state."""

  kl_coef: jax.Array


def init_kl_controller(kl_coef: chex.Numeric) -> KLControllerState:
  """A controller state holding β = `kl_coef` (Ziegler et al. 2019 start from β = 0.1-0.2)."""
  return KLControllerState(kl_coef=jnp.asarray(kl_coef, jnp.float32))


def update_kl_controller(
    state: KLControllerState,
    observed_kl: chex.Numeric,
    num_steps: chex.Numeric,
    *,
    target: float | None,
    horizon: float = 10_000.0,
) -> KLControllerState:
  """Ziegler et al. 2019's adaptive β (arXiv 1909.08593, sec. 2.2); pure and jittable.

    e = clip(KL / target - 1, -0.2, 0.2),    β ← β·(1 + e·n / horizon)

  so β grows when the observed KL is above the target and shrinks below it, by at most a factor
  1 ± 0.2·n/horizon per update. `target=None` is the fixed controller: the state is returned
  unchanged (the branch is taken at trace time, so jit it with `target` closed over or static).

  Args:
    state: the current `KLControllerState`.
    observed_kl: the mean per-sequence KL of the last batch (a scalar, e.g. the sum over tokens
      of `kl_penalized_rewards`' kl, averaged over sequences); treated as a constant.
    num_steps: n, the number of samples (sequences) since the last update, as in the paper and
      TRL (batch size × number of processes).
    target: the KL target (Ziegler et al. use 6 nats for stylistic tasks), or None for fixed β.
    horizon: H; with n ≪ H the multiplier stays near 1. n/H must stay below 5, or β could reach
      0 or go negative (checked when both are Python numbers).

  Returns:
    the new state (β float32).
  """
  if target is None:
    return state
  if isinstance(num_steps, (int, float)) and isinstance(horizon, (int, float)):
    if horizon <= 0 or num_steps < 0 or 0.2 * num_steps / horizon >= 1:
      raise ValueError(
          f"need horizon > 0 and 0 <= num_steps < 5 * horizon, got num_steps={num_steps}, "
          f"horizon={horizon}")
  if isinstance(target, (int, float)) and target <= 0:
    raise ValueError(f"the KL target must be positive (or None for a fixed β), got {target}")
  observed_kl = jax.lax.stop_gradient(jnp.asarray(observed_kl, jnp.float32))
  chex.assert_rank(observed_kl, 0)
  error = jnp.clip(observed_kl / target - 1.0, -0.2, 0.2)
  multiplier = 1.0 + error * jnp.asarray(num_steps, jnp.float32) / horizon
  return KLControllerState(kl_coef=(state.kl_coef * multiplier).astype(jnp.float32))
