"""Sequence-level preference losses: reward modelling, the DPO family and KTO.

The rest of TRL's pairwise zoo is in `zoo.py`, and the name -> loss registry in `registry.py`;
both share this module's notation and helpers.

Shape letters: B batch (one prompt per row), K responses per prompt (rankings).

Notation shared by every docstring below:
  pc, pr    policy log-probs of the chosen / rejected completion, [B]
  rc, rr    the frozen reference's log-probs of the same completions, [B]
  ρc = pc - rc, ρr = pr - rr     log-ratios; β·ρ is the implicit reward of DPO
  h = ρc - ρr = (pc - pr) - (rc - rr)
  σ the logistic sigmoid; -log σ(x) = softplus(-x) is computed with `jax.nn.log_sigmoid`.

Whether pc, pr, ... are token sums or token means is the caller's choice
(`ops.sequence_logps(..., reduction=)`); each docstring, and each registry entry's
`logp_reduction`, gives the paper's choice. The reference is frozen: the trainer never
differentiates its log-probs, so the losses do not stop_gradient them.

Every loss returns per-example values [B] and never reduces. The math runs in float32 at least
(bfloat16 inputs give float32 results; float64 inputs, used by the gradient tests, stay float64).
Hyper-parameters are keyword-only; those given as Python numbers are range-checked, traced ones
(a vmapped sweep over beta) are not.

`PREFERENCE_LOSSES[name](pc, pr, rc, rr, **hparams) -> [B]` (registry.py) swaps pairwise
losses by name.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp

__all__ = [
    "dpo",
    "robust_dpo",
    "ipo",
    "hinge",
    "simpo",
    "orpo",
    "kto",
    "kto_kl_estimate",
    "bradley_terry",
    "ranking",
    "implicit_rewards",
    "F_DIVERGENCES",
]

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")

# exp(x) is used as is up to this exponent and continued linearly (with slope e^50) beyond it, so
# the forward-KL / alpha-divergence logits stay finite in float32 for log-ratios down to -1e4 and
# still push the right way. Past it the policy is e^50 times less likely than the reference.
_MAX_EXPONENT = 50.0
# ORPO's log-odds diverge as a mean log-prob p -> 0^-; p is clamped at this value (exact below it).
_ORPO_MAX_LOGP = -1e-7


# ----------------------------------------------------------------------------- helpers


def _float(x: chex.Array) -> chex.Array:
  """x in float32 at least (bf16 -> f32, f32 -> f32, f64 -> f64)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_logps(*arrays: chex.Array) -> None:
  chex.assert_rank(arrays, 1)
  chex.assert_equal_shape(arrays)
  chex.assert_type(arrays, float)


def _check(value: Any, ok: Callable[[float], bool], message: str) -> None:
  """Raises ValueError(message) when a concrete `value` fails `ok`.

  Python and NumPy numbers and concrete (non-traced) scalar arrays are checked; a traced value
  (a hyper-parameter swept under jit/vmap) cannot be inspected and is left to the caller.
  """
  if isinstance(value, jax.core.Tracer):
    return
  if not isinstance(value, numbers.Real):
    if not (hasattr(value, "shape") and hasattr(value, "dtype") and value.shape == ()):
      return
    value = value.item()
  if not ok(float(value)):
    raise ValueError(f"{message}, got {value!r}")


def _smoothed_logistic(logits: chex.Array, label_smoothing) -> chex.Array:
  """-(1-ε) log σ(z) - ε log σ(-z): cross-entropy against the soft label (1-ε, ε)."""
  return (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits)
          - label_smoothing * jax.nn.log_sigmoid(-logits))


def _capped_expm1(x: chex.Array) -> chex.Array:
  """expm1(x) for x <= _MAX_EXPONENT, continued linearly (C¹) above it."""
  return (jnp.expm1(jnp.minimum(x, _MAX_EXPONENT))
          + math.exp(_MAX_EXPONENT) * jnp.maximum(x - _MAX_EXPONENT, 0.0))


def _log1mexp(x: chex.Array) -> chex.Array:
  """log(1 - e^x) for x < 0, accurate on both sides of -log 2 (Mächler 2012).

  Each branch of the `where` is fed a harmless input, so the unused one has no NaN gradient.
  """
  near_zero = x > -math.log(2.0)
  return jnp.where(near_zero,
                   jnp.log(-jnp.expm1(jnp.where(near_zero, x, -1.0))),
                   jnp.log1p(-jnp.exp(jnp.where(near_zero, -1.0, x))))


# ----------------------------------------------------------------------------- the DPO family


def _f_divergence_logits(rho_c, rho_r, f_divergence: str, alpha) -> chex.Array:
  """f'(u_c) - f'(u_r) for u = π/π_ref = e^ρ (additive constants in f' cancel)."""
  if f_divergence == "reverse_kl":  # f(u) = u log u: f'(u) = 1 + log u
    return rho_c - rho_r
  if f_divergence == "forward_kl":  # f(u) = -log u: f'(u) = -1/u = -(expm1(-ρ) + 1)
    return _capped_expm1(-rho_r) - _capped_expm1(-rho_c)
  if f_divergence == "js_divergence":  # f'(u) = log(2u / (1 + u)) = log 2 + log σ(ρ)
    return jax.nn.log_sigmoid(rho_c) - jax.nn.log_sigmoid(rho_r)
  if f_divergence == "alpha_divergence":  # f'(u) = (1 - u^-α) / α = -expm1(-αρ) / α
    return (_capped_expm1(-alpha * rho_r) - _capped_expm1(-alpha * rho_c)) / alpha
  raise ValueError(f"f_divergence must be one of {F_DIVERGENCES}, got {f_divergence!r}")


def dpo(pc, pr, rc, rr, *, beta=0.1, label_smoothing=0.0, f_divergence: str = "reverse_kl",
        alpha=0.5) -> chex.Array:
  """Direct Preference Optimisation: -(1-ε) log σ(β h) - ε log σ(-β h).

  Rafailov et al. 2023, "Direct Preference Optimization", arXiv 2305.18290. With ε =
  `label_smoothing` > 0 it is conservative DPO (cDPO: labels flipped with probability ε).

  `f_divergence` generalises the reverse-KL regulariser (Wang et al. 2023, "Beyond Reverse KL",
  arXiv 2309.16240): h is replaced by f'(u_c) - f'(u_r), u = π/π_ref = e^ρ:
    "reverse_kl"        f'(u) = log u + 1            ->  ρc - ρr = h  (plain DPO, the default)
    "forward_kl"        f'(u) = -1/u                 ->  e^-ρr - e^-ρc
    "js_divergence"     f'(u) = log(2u/(1+u))        ->  log σ(ρc) - log σ(ρr)
    "alpha_divergence"  f'(u) = (1 - u^-α)/α, α∈(0,1] ->  (e^-αρr - e^-αρc)/α
  The α-divergence tends to reverse KL as α -> 0 and equals forward KL at α = 1. Exponentials are
  continued linearly past e^50 (a log-ratio below -50/α) so nothing overflows in float32.

  Args:
    pc, pr: policy log-probs of the chosen / rejected completions, [B]; token SUMS in the paper.
    rc, rr: frozen reference log-probs of the same completions, [B].
    beta: inverse temperature β (strength of the implicit KL constraint).
    label_smoothing: ε in [0, 0.5].
    f_divergence: one of `F_DIVERGENCES`.
    alpha: α of the alpha-divergence (ignored otherwise).
  Returns:
    [B] float32 per-example losses.
  """
  _check_logps(pc, pr, rc, rr)
  _check(label_smoothing, lambda e: 0.0 <= e <= 0.5, "dpo: label_smoothing must be in [0, 0.5]")
  if f_divergence == "alpha_divergence":
    _check(alpha, lambda a: 0.0 < a <= 1.0, "dpo: alpha must be in (0, 1]")
  pc, pr, rc, rr = map(_float, (pc, pr, rc, rr))
  logits = _f_divergence_logits(pc - rc, pr - rr, f_divergence, alpha)
  return _smoothed_logistic(beta * logits, label_smoothing)


def robust_dpo(pc, pr, rc, rr, *, beta=0.1, label_smoothing=0.1) -> chex.Array:
  """Robust DPO: [-(1-ε) log σ(β h) + ε log σ(-β h)] / (1 - 2ε).

  Chowdhury et al. 2024, "Provably Robust DPO", arXiv 2403.00409. ε is the rate at which
  preference labels are flipped. The loss is an unbiased estimate of the clean DPO loss: when the
  observed label is flipped with probability ε, (1-ε)·L(h) + ε·L(-h) = -log σ(β h). It may be
  negative.

  Args:
    pc, pr, rc, rr: as in `dpo`, [B]; token sums.
    beta: β.
    label_smoothing: the flip rate ε in [0, 0.5) (ValueError otherwise).
  Returns:
    [B] float32.
  """
  _check_logps(pc, pr, rc, rr)
  _check(label_smoothing, lambda e: 0.0 <= e < 0.5,
         "robust_dpo: label_smoothing (the label-flip rate) must be in [0, 0.5)")
  pc, pr, rc, rr = map(_float, (pc, pr, rc, rr))
  z = beta * ((pc - rc) - (pr - rr))
  eps = label_smoothing
  return (-(1.0 - eps) * jax.nn.log_sigmoid(z) + eps * jax.nn.log_sigmoid(-z)) / (1.0 - 2.0 * eps)


def ipo(pc, pr, rc, rr, *, beta=0.1) -> chex.Array:
  """Identity Preference Optimisation: (h - 1/(2β))².

  Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
  Preferences", arXiv 2310.12036, eq. 17 (β is their τ). The caller passes token-MEAN log-probs,
  as the paper does (`logp_reduction="mean"`): the target margin 1/(2β) is on a per-token scale.

  Returns [B] float32; minimal (0) at h = 1/(2β).
  """
  _check_logps(pc, pr, rc, rr)
  _check(beta, lambda b: b > 0, "ipo: beta must be > 0")
  pc, pr, rc, rr = map(_float, (pc, pr, rc, rr))
  h = (pc - rc) - (pr - rr)
  return jnp.square(h - 0.5 / beta)


def hinge(pc, pr, rc, rr, *, beta=0.1) -> chex.Array:
  """SLiC hinge loss on the DPO margin: max(0, 1 - β h).

  Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback",
  arXiv 2305.10425 (here with the reference-normalised margin, as TRL's "hinge"). Token sums.
  Exactly zero, with zero gradient, once β h > 1. Returns [B] float32.
  """
  _check_logps(pc, pr, rc, rr)
  pc, pr, rc, rr = map(_float, (pc, pr, rc, rr))
  return jax.nn.relu(1.0 - beta * ((pc - rc) - (pr - rr)))


def simpo(pc, pr, *, beta=2.0, gamma=0.5) -> chex.Array:
  """SimPO: -log σ(β (pc - pr) - γ), reference-free.

  Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
  arXiv 2405.14734. pc/pr are length-normalised (token-MEAN) policy log-probs; γ is the absolute
  target reward margin (the paper's tables quote γ/β). Returns [B] float32.
  """
  _check_logps(pc, pr)
  pc, pr = map(_float, (pc, pr))
  return -jax.nn.log_sigmoid(beta * (pc - pr) - gamma)


def _log_odds(logp: chex.Array) -> chex.Array:
  """log(p / (1 - p)) from log p, stably: log p - log(1 - e^{log p})."""
  logp = jnp.minimum(logp, _ORPO_MAX_LOGP)
  return logp - _log1mexp(logp)


def orpo(pc, pr) -> chex.Array:
  """ORPO's odds-ratio term: -log σ(log odds(pc) - log odds(pr)), odds(p) = e^p / (1 - e^p).

  Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
  arXiv 2403.07691. pc/pr are token-MEAN policy log-probs (< 0). The trainer's objective is
  NLL(chosen) + λ·orpo. log(1 - e^p) is computed as log(-expm1(p)) near 0 and log1p(-e^p) far
  from it, in float32; p is clamped at -1e-7 (where the gradient of the log-odds is 1e7), so a
  mean log-prob that rounds to 0 gives no NaN or inf. Returns [B] float32.
  """
  _check_logps(pc, pr)
  pc, pr = map(_float, (pc, pr))
  return -jax.nn.log_sigmoid(_log_odds(pc) - _log_odds(pr))


# ----------------------------------------------------------------------------- KTO


def kto(policy_logps, ref_logps, desirable, kl_ref, *, beta=0.1, desirable_weight=1.0,
        undesirable_weight=1.0) -> chex.Array:
  """Kahneman-Tversky Optimisation on unpaired examples.

  Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization",
  arXiv 2402.01306. With r = policy_logps - ref_logps and the reference point
  z0 = stop_gradient(max(kl_ref, 0)):
    desirable rows:    w_d · (1 - σ(β (r - z0)))
    undesirable rows:  w_u · (1 - σ(β (z0 - r)))

  Args:
    policy_logps, ref_logps: token-SUM log-probs of each completion, [B].
    desirable: [B] bool (or 0/1): whether each completion is labelled desirable.
    kl_ref: the reference point, a scalar (or broadcastable to [B]); see `kto_kl_estimate`.
      It gets no gradient here.
    beta, desirable_weight, undesirable_weight: β, w_d, w_u (the paper balances w_d·n_d against
      w_u·n_u to lie in [1, 4/3]).
  Returns:
    [B] float32.
  """
  _check_logps(policy_logps, ref_logps)
  chex.assert_equal_shape([policy_logps, desirable])
  policy_logps, ref_logps, kl_ref = map(_float, (policy_logps, ref_logps, kl_ref))
  z0 = jax.lax.stop_gradient(jnp.maximum(kl_ref, 0.0))
  r = policy_logps - ref_logps
  # 1 - σ(x) = σ(-x).
  desirable_loss = desirable_weight * jax.nn.sigmoid(-beta * (r - z0))
  undesirable_loss = undesirable_weight * jax.nn.sigmoid(-beta * (z0 - r))
  return jnp.where(jnp.asarray(desirable).astype(bool), desirable_loss, undesirable_loss)


def kto_kl_estimate(policy_kl_logps, ref_kl_logps, *, where=None,
                    axis_name: str | None = None) -> chex.Array:
  """KTO's reference point z0: max(0, mean(policy_kl_logps - ref_kl_logps)), detached.

  Ethayarajh et al. 2024 (arXiv 2402.01306) estimate z0 = KL(π(y'|x) || π_ref(y'|x)) with
  MISMATCHED pairs: each prompt x_i of the batch is scored with a completion y'_j taken from
  another row j ≠ i (the trainer builds them, e.g. by rotating completions one place within the
  batch, which needs B ≥ 2; for B = 1 it must take the completion from another batch). This
  function only averages the log-ratios of those pairs.

  It is a plain mean, so it is correct for any B, odd ones included; rows that are padding (a
  batch filled up to a bucket size) are left out with `where`. Under data parallelism pass the
  mapped `axis_name` to average over the global batch (psum of sums and counts). Under gradient
  accumulation estimate it once over the whole accumulated batch (or weight micro-batch means by
  their row counts); a mean of per-micro-batch clamped estimates is biased upwards.

  Args:
    policy_kl_logps, ref_kl_logps: [B] token-sum log-probs of the mismatched pairs.
    where: optional [B] bool, the rows to use. An empty selection gives 0.
    axis_name: optional mapped axis (pmap / shard_map) to average across.
  Returns:
    A float32 scalar, clamped at 0, with no gradient.
  """
  _check_logps(policy_kl_logps, ref_kl_logps)
  log_ratio = _float(policy_kl_logps) - _float(ref_kl_logps)
  weight = jnp.ones_like(log_ratio) if where is None else jnp.asarray(where).astype(log_ratio.dtype)
  chex.assert_equal_shape([log_ratio, weight])
  total, count = jnp.sum(log_ratio * weight), jnp.sum(weight)
  if axis_name is not None:
    total, count = jax.lax.psum((total, count), axis_name)
  mean = jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)
  return jax.lax.stop_gradient(jnp.maximum(mean, 0.0))


# ----------------------------------------------------------------------------- reward models


def bradley_terry(chosen_rewards, rejected_rewards, *, margin=0.0) -> chex.Array:
  """Bradley-Terry pairwise loss for a reward model: -log σ(r_c - r_r - margin).

  Ouyang et al. 2022 (InstructGPT), arXiv 2203.02155; the margin as in Llama 2 (Touvron et al.
  2023, arXiv 2307.09288). chosen/rejected rewards [B]; margin a scalar or [B]. Returns [B] f32.
  """
  _check_logps(chosen_rewards, rejected_rewards)
  chosen_rewards, rejected_rewards, margin = map(_float, (chosen_rewards, rejected_rewards, margin))
  if margin.ndim:
    chex.assert_equal_shape([chosen_rewards, margin])
  return -jax.nn.log_sigmoid(chosen_rewards - rejected_rewards - margin)


def ranking(rewards, ranks, mask) -> chex.Array:
  """K-wise ranking loss: per example, the mean over valid ordered pairs of -log σ(r_i - r_j).

  Ouyang et al. 2022 (InstructGPT), arXiv 2203.02155, eq. 1: every pair (i, j) of the K ranked
  responses with rank_i < rank_j (rank 0 is best) contributes -log σ(r_i - r_j). Ties (equal rank)
  and masked slots are skipped; an example with no valid pair gives exactly 0 (no NaN, and no
  gradient at all). With K = 2 and ranks (0, 1) it is `bradley_terry`.

  Args:
    rewards: [B, K] float scalar rewards of each response.
    ranks: [B, K] int, 0 = best.
    mask: [B, K] bool or 0/1: which slots hold a response.
  Returns:
    [B] float32.
  """
  chex.assert_rank([rewards, ranks, mask], 2)
  chex.assert_equal_shape([rewards, ranks, mask])
  chex.assert_type(rewards, float)
  mask = jnp.asarray(mask).astype(bool)
  # Padded slots may hold garbage (even NaN): zero them so no gradient path touches them.
  rewards_BK = jnp.where(mask, _float(rewards), 0.0)
  valid_BKK = ((ranks[:, :, None] < ranks[:, None, :]) & mask[:, :, None] & mask[:, None, :])
  pair_loss_BKK = -jax.nn.log_sigmoid(rewards_BK[:, :, None] - rewards_BK[:, None, :])
  total = jnp.sum(jnp.where(valid_BKK, pair_loss_BKK, 0.0), axis=(1, 2))
  count = jnp.sum(valid_BKK, axis=(1, 2)).astype(total.dtype)
  return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)


def implicit_rewards(pc, pr, rc=None, rr=None, *, beta) -> tuple[chex.Array, chex.Array]:
  """DPO's implicit rewards (β ρc, β ρr), detached, for metrics; (β pc, β pr) if rc = rr = None.

  Log them with their margin and accuracy: both rewards falling during DPO training is common
  and harmless as long as the margin grows (users often report it as a bug). Args [B]; returns
  two [B] float32 arrays.
  """
  if (rc is None) != (rr is None):
    raise ValueError("implicit_rewards: pass both rc and rr, or neither (reference-free)")
  arrays = (pc, pr) if rc is None else (pc, pr, rc, rr)
  _check_logps(*arrays)
  pc, pr = _float(pc), _float(pr)
  if rc is not None:
    pc, pr = pc - _float(rc), pr - _float(rr)
  return jax.lax.stop_gradient(beta * pc), jax.lax.stop_gradient(beta * pr)
