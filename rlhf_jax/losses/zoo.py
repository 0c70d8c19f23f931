"""The rest of TRL's pairwise zoo: EXO, NCA, BCO, SPPO, AOT, APO and DiscoPOP, each with its paper.

Notation, dtypes and conventions are those of `preference.py` (pc, pr, rc, rr; ρ = log-ratio;
h = ρc - ρr; per-example [B] float32 values, never reduced; keyword-only hyper-parameters).

Batch-coupled losses: `aot` and `aot_pair` sort across the batch, and `bco_pair` with its default
delta takes a batch mean, so each depends on the whole batch it is given (under data parallelism,
the local shard). They take `where=` ([B] bool, the real rows) so padding rows leave the batch
statistics alone, and their registry entries say `batch_coupled=True`.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from rlhf_jax.losses.preference import _check, _check_logps, _float, _smoothed_logistic

__all__ = [
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_pair",
    "apo_zero",
    "apo_down",
    "discopop",
]

def exo_pair(pc, pr, rc, rr, *, beta=0.1, label_smoothing=1e-3) -> chex.Array:
  """EXO, pairwise: KL(p_θ || p_label) between two-point distributions over (chosen, rejected).

  Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment",
  arXiv 2402.00856, eq. 16 with K = 2: p_θ = (σ(βh), σ(-βh)), p_label = (1-ε, ε):
    σ(βh) (log σ(βh) - log(1-ε)) + σ(-βh) (log σ(-βh) - log ε).
  ε in (0, 1), default 1e-3 as TRL. Minimal (0) at βh = log((1-ε)/ε). Token sums. [B] float32.
  """
  _check_logps(pc, pr, rc, rr)
  _check(label_smoothing, lambda e: 0.0 < e < 1.0, "exo_pair: label_smoothing must be in (0, 1)")
  pc, pr, rc, rr = map(_float, (pc, pr, rc, rr))
  z = beta * ((pc - rc) - (pr - rr))
  eps = label_smoothing
  return (jax.nn.sigmoid(z) * (jax.nn.log_sigmoid(z) - jnp.log1p(-eps))
          + jax.nn.sigmoid(-z) * (jax.nn.log_sigmoid(-z) - jnp.log(eps)))


def nca_pair(pc, pr, rc, rr, *, beta=0.1) -> chex.Array:
  """NCA, pairwise: -log σ(β ρc) - ½ log σ(-β ρc) - ½ log σ(-β ρr).

  Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards",
  arXiv 2402.05369 (NCA with K = 2 responses, the preferred one given reward 1). Unlike DPO it
  pushes on each log-ratio, not only on their difference. Token sums. [B] float32.
  """
  _check_logps(pc, pr, rc, rr)
  pc, pr, rc, rr = map(_float, (pc, pr, rc, rr))
  reward_c, reward_r = beta * (pc - rc), beta * (pr - rr)
  return (-jax.nn.log_sigmoid(reward_c) - 0.5 * jax.nn.log_sigmoid(-reward_c)
          - 0.5 * jax.nn.log_sigmoid(-reward_r))


def bco_pair(pc, pr, rc, rr, *, beta=0.1, delta=None, where=None) -> chex.Array:
  """BCO on pairs: -log σ(β ρc - δ) - log σ(-(β ρr - δ)).

  Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment",
  arXiv 2404.04656: a binary classifier (chosen = 1, rejected = 0) on the implicit rewards β ρ,
  shifted by δ. The paper's δ is a running mean of the rewards; with `delta=None` it is the
  detached mean of the batch's 2B implicit rewards (so the loss is batch-coupled), otherwise the
  trainer passes its running mean (a scalar, detached here). `where` ([B] bool) names the real
  rows: padding rows do not enter the batch mean. Token sums. [B] float32.
  """
  _check_logps(pc, pr, rc, rr)
  pc, pr, rc, rr = map(_float, (pc, pr, rc, rr))
  reward_c, reward_r = beta * (pc - rc), beta * (pr - rr)
  if delta is None:
    weight = _row_weight(where, reward_c)
    count = jnp.maximum(jnp.sum(weight), 1.0)
    delta = 0.5 * (jnp.sum(weight * reward_c) + jnp.sum(weight * reward_r)) / count
  delta = jax.lax.stop_gradient(_float(delta))
  return -jax.nn.log_sigmoid(reward_c - delta) - jax.nn.log_sigmoid(-(reward_r - delta))


def sppo_hard(pc, pr, rc, rr, *, beta=0.1) -> chex.Array:
  """SPPO with hard win probabilities: (ρc - 1/(2β))² + (ρr + 1/(2β))².

  Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment",
  arXiv 2405.00675, eq. 4.7 (η = 1/β) with P(y ≻ π) set to 1 for the winner and 0 for the loser.
  Token sums. [B] float32.
  """
  _check_logps(pc, pr, rc, rr)
  _check(beta, lambda b: b > 0, "sppo_hard: beta must be > 0")
  pc, pr, rc, rr = map(_float, (pc, pr, rc, rr))
  return jnp.square(pc - rc - 0.5 / beta) + jnp.square(pr - rr + 0.5 / beta)


def _row_weight(where, like: chex.Array) -> chex.Array:
  if where is None:
    return jnp.ones_like(like)
  chex.assert_equal_shape([where, like])
  return jnp.asarray(where).astype(like.dtype)


def _quantile_logistic(x: chex.Array, y: chex.Array, where, beta, label_smoothing) -> chex.Array:
  """AOT's core: the logistic loss on sort(x) - sort(y), over the rows `where` selects.

  Without `where`, row i of the result is the i-th quantile. With it, the real rows are sorted
  among themselves (padding sorts last on both sides) and each quantile's value is written back
  to the row holding the i-th smallest x, so padding rows get 0 and a row-weighted sum equals the
  sum over the real quantiles.
  """
  if where is None:
    return _smoothed_logistic(beta * (jnp.sort(x) - jnp.sort(y)), label_smoothing)
  valid = jnp.asarray(where).astype(bool)
  chex.assert_equal_shape([valid, x])
  order_x = jnp.argsort(jnp.where(valid, x, jnp.inf))
  order_y = jnp.argsort(jnp.where(valid, y, jnp.inf))
  real_quantile = jnp.arange(x.shape[0]) < jnp.sum(valid)
  delta = jnp.where(real_quantile, x[order_x] - y[order_y], 0.0)
  values = jnp.where(real_quantile, _smoothed_logistic(beta * delta, label_smoothing), 0.0)
  return jnp.zeros_like(values).at[order_x].set(values)


def aot_pair(pc, pr, rc, rr, *, beta=0.1, label_smoothing=0.0, where=None) -> chex.Array:
  """AOT, unpaired form: DPO's logistic loss on sort(ρc) - sort(ρr), sorted across the batch.

  Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport",
  arXiv 2406.05882. First-order stochastic dominance of the chosen log-ratio distribution over
  the rejected one: the i-th smallest ρc is compared with the i-th smallest ρr (a 1-D optimal
  transport solved by sorting), so chosen and rejected need not come from the same prompt.
  Named as in TRL: "aot_pair" is the form for unpaired data.

  Batch-coupled: row i of the result belongs to the i-th quantile, not to example i; with
  `where` ([B] bool, the real rows) padding rows are left out of the sorting and get 0.
  Token sums. [B] float32.
  """
  _check_logps(pc, pr, rc, rr)
  pc, pr, rc, rr = map(_float, (pc, pr, rc, rr))
  return _quantile_logistic(pc - rc, pr - rr, where, beta, label_smoothing)


def aot(pc, pr, rc, rr, *, beta=0.1, label_smoothing=0.0, where=None) -> chex.Array:
  """AOT, paired form: DPO's logistic loss on sort(pc - pr) - sort(rc - rr) across the batch.

  Melnyk et al. 2024, arXiv 2406.05882: the distribution of the policy's pairwise margins
  log π(y_c)/π(y_r) must dominate the reference's; quantiles are matched by sorting each.
  Named as in TRL: "aot" is the form for paired data.

  Batch-coupled: row i of the result belongs to the i-th quantile; `where` as in `aot_pair`.
  Token sums. [B] float32.
  """
  _check_logps(pc, pr, rc, rr)
  pc, pr, rc, rr = map(_float, (pc, pr, rc, rr))
  return _quantile_logistic(pc - pr, rc - rr, where, beta, label_smoothing)


def apo_zero(pc, pr, rc, rr, *, beta=0.1) -> chex.Array:
  """APO-zero: (1 - σ(β ρc)) + σ(β ρr): raise the chosen likelihood, lower the rejected.

  D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions",
  arXiv 2408.06266, eq. 7: for when the chosen outputs are better than the model's own.
  Token sums. [B] float32.
  """
  _check_logps(pc, pr, rc, rr)
  pc, pr, rc, rr = map(_float, (pc, pr, rc, rr))
  return jax.nn.sigmoid(-beta * (pc - rc)) + jax.nn.sigmoid(beta * (pr - rr))


def apo_down(pc, pr, rc, rr, *, beta=0.1) -> chex.Array:
  """APO-down: σ(β ρc) + (1 - σ(β (ρc - ρr))): lower both, the rejected more.

  D'Oosterlinck et al. 2024, arXiv 2408.06266, eq. 8: for when the chosen outputs are worse than
  the model's own. Token sums. [B] float32.
  """
  _check_logps(pc, pr, rc, rr)
  pc, pr, rc, rr = map(_float, (pc, pr, rc, rr))
  rho_c = pc - rc
  return jax.nn.sigmoid(beta * rho_c) + jax.nn.sigmoid(-beta * (rho_c - (pr - rr)))


def discopop(pc, pr, rc, rr, *, beta=0.1, tau=0.05) -> chex.Array:
  """DiscoPOP (log-ratio modulated loss): (1 - m)·(-log σ(z)) + m·e^-z, z = β h, m = σ(z/τ).

  Chris Lu et al. 2024, "Discovering Preference Optimization Algorithms with and for Large
  Language Models", arXiv 2406.08414, eq. 5 (τ = 0.05). Blends the logistic loss (for z < 0)
  with the exponential loss (z > 0). m·e^-z is computed as exp(log σ(z/τ) - z), which stays
  finite when z is very negative (where e^-z alone overflows and 0·inf is NaN). Token sums.
  [B] float32.
  """
  _check_logps(pc, pr, rc, rr)
  _check(tau, lambda t: t > 0, "discopop: tau must be > 0")
  pc, pr, rc, rr = map(_float, (pc, pr, rc, rr))
  z = beta * ((pc - rc) - (pr - rr))
  return (jax.nn.sigmoid(-z / tau) * -jax.nn.log_sigmoid(z)
          + jnp.exp(jax.nn.log_sigmoid(z / tau) - z))
