"""Token-level RL for language models: PPO's losses, advantage estimators, token aggregation.

Shape letters: B batch (sequences), T tokens, G group size (completions per prompt),
P prompts (B = P·G).

Token-level arrays are [B, T], right-padded, with a 0/1 (or bool) `mask` marking the completion
tokens that count. The pieces and how they fit:

  advantages   `gae` (PPO, from per-token rewards and a value head), `group_advantages` (GRPO,
               Dr. GRPO) and `leave_one_out_advantages` (RLOO), both from one score per
               completion, broadcast over its tokens by the caller; `whiten` normalises them.
  losses       `ppo_policy` (clipped surrogate, per token), `ppo_value` (clipped value loss).
  reduction    `aggregate` turns a per-token loss into the scalar to differentiate, with the
               aggregation mode named (GRPO, DAPO and Dr. GRPO differ exactly there).
  metrics      `ppo_clip_fraction`, `approx_kl` (KL(old || new) of the PPO epoch).

Losses never reduce; advantages and returns are detached (stop_gradient). Entropy lives in
`rlhf_jax.ops.entropy_from_logits`. Everything is computed in float32.
"""

from __future__ import annotations

import operator

import chex
import jax
import jax.numpy as jnp

from rlhf_jax.losses.kl import LINEAR_BEYOND, kl
from rlhf_jax.ops import masked_mean, masked_sum, packed_sequence_sums

__all__ = [
    "ppo_policy",
    "ppo_clip_fraction",
    "approx_kl",
    "ppo_value",
    "gae",
    "whiten",
    "group_advantages",
    "leave_one_out_advantages",
    "AGGREGATION_MODES",
    "AGGREGATION_ALIASES",
    "aggregate",
    "aggregate_packed",
]

_sg = jax.lax.stop_gradient


def _ratio(logps: chex.Array, old_logps: chex.Array) -> chex.Array:
  """π/π_old = exp(logps - old_logps), float32, continued linearly past a ratio of e^20.

  The linear continuation keeps the value and gradient finite when the log-probs are far apart
  (stale or garbage old log-probs, -1e4 at padding) instead of overflowing to inf and turning
  masked sums into NaN; below e^20 it is exp itself.
  """
  log_ratio = logps.astype(jnp.float32) - _sg(old_logps.astype(jnp.float32))
  capped = jnp.minimum(log_ratio, LINEAR_BEYOND)
  return jnp.exp(capped) * (1.0 + jnp.maximum(log_ratio - LINEAR_BEYOND, 0.0))


def _clip_range(clip_eps, clip_eps_high):
  return 1.0 - clip_eps, 1.0 + (clip_eps if clip_eps_high is None else clip_eps_high)


def ppo_policy(
    logps: chex.Array,
    old_logps: chex.Array,
    advantages: chex.Array,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
) -> chex.Array:
  """PPO's clipped surrogate as a per-token loss (to minimise).

    loss_t = max(-A_t·ρ_t, -A_t·clip(ρ_t, 1 - ε, 1 + ε_high)),   ρ_t = exp(logps_t - old_logps_t)

  Schulman, Wolski, Dhariwal, Radford, Klimov 2017, "Proximal Policy Optimization Algorithms",
  arXiv 1707.06347, eq. 7 (negated). ε_high ≠ ε is DAPO's "clip-higher" (Yu et al. 2025,
  arXiv 2503.14476); it defaults to ε. The gradient w.r.t. logps is -A·ρ except where the clip
  binds (A > 0 and ρ > 1 + ε_high, or A < 0 and ρ < 1 - ε), where it is 0.

  Args:
    logps: log-probs of the sampled tokens under the current policy [B, T] (any shape).
    old_logps: their log-probs under the policy that sampled them, same shape; detached here.
    advantages: per-token advantages, same shape (broadcast sequence advantages over tokens
      first); detached here. They must be finite at padding too (`gae` gives 0 there): a NaN
      there survives a masked reduction's gradient (0·NaN).
    clip_eps: ε, the lower clip (and the upper one unless `clip_eps_high` is given).
    clip_eps_high: ε_high, the upper clip, or None for ε.

  Returns:
    float32 per-token losses, the shape of `logps`, not masked: reduce with `aggregate`.
    ρ is continued linearly above e^20, so values and gradients stay finite.
  """
  chex.assert_equal_shape([logps, old_logps, advantages])
  chex.assert_type([logps, old_logps, advantages], float)
  ratio = _ratio(logps, old_logps)
  adv = _sg(advantages.astype(jnp.float32))
  low, high = _clip_range(clip_eps, clip_eps_high)
  return jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, low, high))


def ppo_clip_fraction(
    logps: chex.Array,
    old_logps: chex.Array,
    advantages: chex.Array,
    mask: chex.Array,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
) -> chex.Array:
  """Fraction of valid tokens where `ppo_policy`'s clip binds (its gradient is cut to zero).

  A token counts when A > 0 and ρ > 1 + ε_high, or A < 0 and ρ < 1 - ε: where the clipped term
  is strictly the larger one (TRL's and OpenAI baselines' `clipfrac`). Args as `ppo_policy`,
  plus the 0/1 `mask` of the same shape. Returns a float32 scalar in [0, 1] (0 for an empty
  mask), detached: a metric.
  """
  chex.assert_equal_shape([logps, old_logps, advantages, mask])
  ratio = _sg(_ratio(logps, old_logps))
  adv = advantages.astype(jnp.float32)
  low, high = _clip_range(clip_eps, clip_eps_high)
  binds = ((adv > 0) & (ratio > high)) | ((adv < 0) & (ratio < low))
  return masked_mean(binds.astype(jnp.float32), (mask > 0).astype(jnp.float32))


def approx_kl(logps: chex.Array, old_logps: chex.Array, mask: chex.Array) -> chex.Array:
  """How far the PPO epoch has moved the policy: a token-mean estimate of KL(π_old || π).

  The tokens were sampled from π_old, so with d = old_logps - logps the k3 estimator
  exp(-d) - 1 + d = (ρ - 1) - log ρ, ρ = π/π_old, is unbiased for KL(π_old || π) (Schulman 2020,
  http://joschu.net/blog/kl-approx.html; `kl.kl(old_logps, logps, estimator="k3")`). It is ≥ 0
  on every token. Shapes: all [B, T] (any equal shapes); returns a detached float32 scalar, the
  mean over valid tokens (0 for an empty mask).
  """
  chex.assert_equal_shape([logps, old_logps, mask])
  valid = mask > 0
  per_token = jnp.where(valid, kl(_sg(old_logps), _sg(logps), estimator="k3"), 0.0)
  return masked_mean(per_token, valid.astype(jnp.float32))


def ppo_value(
    values: chex.Array,
    old_values: chex.Array,
    returns: chex.Array,
    *,
    clip_eps: float = 0.2,
) -> chex.Array:
  """PPO's clipped value loss, per token.

    loss_t = ½·max((v_t - R_t)², (v_clip_t - R_t)²),   v_clip = v_old + clip(v - v_old, -ε, ε)

  As in OpenAI baselines' PPO2 and TRL (the value clipping is not in Schulman et al. 2017's
  paper, arXiv 1707.06347, but in its reference code). The gradient w.r.t. `values` is v - R,
  except where the clipped term binds (|v - v_old| > ε and it is strictly the larger): there 0.

  Args:
    values: the value head's predictions now [B, T] (any shape).
    old_values: its predictions at rollout time, same shape; detached here.
    returns: the regression targets R (e.g. `gae`'s returns), same shape; detached here.
    clip_eps: ε, in the units of the values.

  Returns:
    float32 per-token losses, not masked.
  """
  chex.assert_equal_shape([values, old_values, returns])
  chex.assert_type([values, old_values, returns], float)
  v = values.astype(jnp.float32)
  old = _sg(old_values.astype(jnp.float32))
  target = _sg(returns.astype(jnp.float32))
  v_clipped = old + jnp.clip(v - old, -clip_eps, clip_eps)
  return 0.5 * jnp.maximum(jnp.square(v - target), jnp.square(v_clipped - target))


def gae(
    rewards: chex.Array,
    values: chex.Array,
    mask: chex.Array,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[chex.Array, chex.Array]:
  """Generalised advantage estimation over right-padded token sequences.

    δ_t = r_t + γ·V_{t+1} - V_t   (V = 0 past the last valid token: the episode ends there)
    A_t = δ_t + γλ·A_{t+1},   returns_t = A_t + V_t

  Schulman, Moritz, Levine, Jordan, Abbeel 2015, "High-Dimensional Continuous Control Using
  Generalized Advantage Estimation", arXiv 1506.02438, eq. 16; a reverse `lax.scan` over T.

  Args:
    rewards: per-token rewards [B, T] (e.g. `kl.kl_penalized_rewards`).
    values: the value head's V(s_t) at each token [B, T].
    mask: 0/1 (or bool) [B, T]; 1 on the completion tokens. A 0 ends the episode (so trailing
      padding and leading prompt zeros are both fine); values and rewards at 0s are ignored,
      even if they are inf.
    gamma: discount γ (1.0 in most RLHF setups).
    lam: GAE's λ.

  Returns:
    (advantages [B, T], returns [B, T]): float32, zero where mask is 0, detached.
  """
  chex.assert_rank([rewards, values, mask], 2)
  chex.assert_equal_shape([rewards, values, mask])
  valid_BT = mask > 0
  rewards_BT = jnp.where(valid_BT, _sg(rewards).astype(jnp.float32), 0.0)
  values_BT = jnp.where(valid_BT, _sg(values).astype(jnp.float32), 0.0)
  # Values are zero at invalid tokens, so this is also V = 0 past each row's last valid token.
  next_values_BT = jnp.pad(values_BT[:, 1:], ((0, 0), (0, 1)))
  deltas_BT = rewards_BT + gamma * next_values_BT - values_BT

  def backward_step(next_adv_B, xs):
    delta_B, valid_B = xs
    adv_B = jnp.where(valid_B, delta_B + gamma * lam * next_adv_B, 0.0)
    return adv_B, adv_B

  init_B = jnp.zeros_like(deltas_BT[:, 0])  # zeros_like keeps shard_map's varying-axis type
  _, advantages_TB = jax.lax.scan(
      backward_step, init_B, (deltas_BT.T, valid_BT.T), reverse=True)
  advantages_BT = advantages_TB.T
  returns_BT = jnp.where(valid_BT, advantages_BT + values_BT, 0.0)
  return _sg(advantages_BT), _sg(returns_BT)


def whiten(
    values: chex.Array,
    mask: chex.Array,
    *,
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> chex.Array:
  """Masked whitening over the whole batch: (x - μ)/sqrt(σ² + eps), μ, σ² over valid entries.

  With `shift_mean=False` the mean is added back, (x - μ)/σ + μ: only the scale changes, as TRL
  does for rewards. σ² is the population variance (divides by the token count N, not N - 1, as
  TRL does): the valid outputs then have mean 0 and variance exactly 1; over thousands of
  tokens the difference is negligible. A common step in PPO for advantages (Andrychowicz et al.
  2020, arXiv 2006.05990) and in InstructGPT-style reward normalisation.

  Args:
    values: any shape, e.g. advantages [B, T].
    mask: 0/1 (or bool), same shape; entries at 0s are ignored (even inf or NaN).
    shift_mean: subtract the mean (True) or keep it (False).
    eps: added to the variance.

  Returns:
    float32, the shape of `values`, zero where the mask is 0 (all zero for an empty mask).
  """
  chex.assert_equal_shape([values, mask])
  valid = mask > 0
  mask_f = valid.astype(jnp.float32)
  x = jnp.where(valid, values.astype(jnp.float32), 0.0)
  mean = masked_mean(x, mask_f)
  centred = jnp.where(valid, x - mean, 0.0)
  var = masked_mean(jnp.square(centred), mask_f)
  out = centred * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return jnp.where(valid, out, 0.0)


def _check_groups(batch_size: int, group_size: int, *, minimum: int) -> int:
  """group_size as a Python int, after checking it against the batch (static shapes)."""
  try:
    size = operator.index(group_size)  # ints and NumPy ints, not floats or tracers
  except TypeError:
    size = None
  if size is None or size < minimum:
    raise ValueError(f"group_size must be an int >= {minimum}, got {group_size!r}")
  group_size = size
  if batch_size % group_size:
    raise ValueError(
        f"batch size {batch_size} is not a multiple of group_size {group_size}: rows must be "
        "laid out prompt-major, group_size completions per prompt")
  return group_size


def group_advantages(
    rewards: chex.Array,
    group_size: int,
    *,
    scale_by_std: bool = True,
    eps: float = 1e-6,
) -> chex.Array:
  """GRPO's group-relative advantages: A_i = (r_i - mean_group(r)) / (std_group(r) + eps).

  Shao et al. 2024, "DeepSeekMath", arXiv 2402.03300, sec. 4.1.2 (outcome supervision).
  `scale_by_std=False` gives Dr. GRPO's A_i = r_i - mean_group(r) (Liu et al. 2025,
  "Understanding R1-Zero-Like Training", arXiv 2503.20783), which removes the difficulty bias
  of dividing by the group's spread.

  std is the SAMPLE standard deviation (divides by G - 1, Bessel-corrected), like torch.std in
  TRL, verl and OpenRLHF, so advantages match theirs; the paper does not say. Hence G ≥ 2. A group
  whose rewards are all equal gets advantages 0.

  Args:
    rewards: one scalar reward per completion [B], B = P·G laid out prompt-major: rows
      [i·G, (i+1)·G) are the G completions of prompt i.
    group_size: G (a Python int).
    scale_by_std: divide by the group's std (GRPO) or not (Dr. GRPO).
    eps: added to the std.

  Returns:
    float32 advantages [B], detached; broadcast over each completion's tokens for `ppo_policy`.
  """
  chex.assert_rank(rewards, 1)
  group_size = _check_groups(rewards.shape[0], group_size, minimum=2)
  rewards_PG = _sg(rewards).astype(jnp.float32).reshape(-1, group_size)
  centred_PG = rewards_PG - jnp.mean(rewards_PG, axis=1, keepdims=True)
  if scale_by_std:
    std_P1 = jnp.sqrt(jnp.sum(jnp.square(centred_PG), axis=1, keepdims=True) / (group_size - 1))
    centred_PG = centred_PG / (std_P1 + eps)
  return _sg(centred_PG.reshape(-1))


def leave_one_out_advantages(rewards: chex.Array, group_size: int) -> chex.Array:
  """RLOO's advantages: A_i = r_i - mean_{j≠i} r_j, within each group of G completions.

  Kool, van Hoof, Welling 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!" (ICLR
  workshop); Ahmadian et al. 2024, "Back to Basics", arXiv 2402.14740. Equivalently
  A_i = G/(G - 1)·(r_i - mean_group(r)), so they sum to zero per group.

  Args:
    rewards: one reward per completion [B], prompt-major as in `group_advantages`.
    group_size: G ≥ 2 (leave-one-out needs another sample).

  Returns:
    float32 advantages [B], detached.
  """
  chex.assert_rank(rewards, 1)
  group_size = _check_groups(rewards.shape[0], group_size, minimum=2)
  rewards_PG = _sg(rewards).astype(jnp.float32).reshape(-1, group_size)
  others_mean_PG = (jnp.sum(rewards_PG, axis=1, keepdims=True) - rewards_PG) / (group_size - 1)
  return _sg((rewards_PG - others_mean_PG).reshape(-1))


AGGREGATION_MODES = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")
AGGREGATION_ALIASES = {
    "grpo": "seq_mean_token_mean",
    "dapo": "token_mean",
    "dr_grpo": "seq_mean_token_sum_norm",
}


def _aggregation_mode(mode: str, normalizer) -> str:
  """The canonical name of an aggregation mode (aliases resolved), checked with its normalizer."""
  mode = AGGREGATION_ALIASES.get(mode, mode)
  if mode not in AGGREGATION_MODES:
    raise ValueError(
        f"unknown aggregation mode {mode!r}; expected one of {AGGREGATION_MODES} or an alias "
        f"in {tuple(AGGREGATION_ALIASES)}")
  if normalizer is not None and mode != "seq_mean_token_sum_norm":
    raise ValueError(f"normalizer is only used by 'seq_mean_token_sum_norm', not {mode!r}")
  return mode


def aggregate(
    per_token: chex.Array,
    mask: chex.Array,
    *,
    mode: str,
    normalizer: float | None = None,
) -> chex.Array:
  """Reduces a per-token loss [B, T] to the scalar to minimise, with the aggregation named.

  Modes (aliases in brackets); "rows" below are the sequences with at least one valid token:
    "seq_mean_token_mean" ("grpo"): mean over rows of each row's mean over its valid tokens.
        GRPO's objective as written (Shao et al. 2024, arXiv 2402.03300): every sequence
        weighs the same, so a token of a long answer weighs less.
    "token_mean" ("dapo"): Σ valid tokens / number of valid tokens in the batch. DAPO's
        token-level loss (Yu et al. 2025, arXiv 2503.14476); every token weighs the same.
        Also the usual PPO (TRL) choice.
    "seq_mean_token_sum_norm" ("dr_grpo"): mean over rows of (Σ valid tokens) / normalizer, a
        constant. Dr. GRPO (Liu et al. 2025, arXiv 2503.20783): no length bias. `normalizer`
        defaults to T, the padded length; pass the generation budget (max_new_tokens) when
        batches are trimmed to varying lengths, or the loss scale changes from batch to batch.

  Args:
    per_token: per-token losses [B, T] (e.g. `ppo_policy`'s).
    mask: 0/1 (or bool) [B, T]; entries at 0s are ignored (even inf or NaN).
    mode: one of the above (no default: the choice changes the gradient).
    normalizer: the constant of "seq_mean_token_sum_norm"; an error for the other modes.

  Returns:
    a float32 scalar; 0 when no token is valid (never a division by zero).
  """
  chex.assert_rank([per_token, mask], 2)
  chex.assert_equal_shape([per_token, mask])
  mode = _aggregation_mode(mode, normalizer)
  if isinstance(normalizer, (int, float)) and normalizer <= 0:
    raise ValueError(f"normalizer must be positive, got {normalizer}")
  valid_BT = mask > 0
  mask_BT = valid_BT.astype(jnp.float32)
  values_BT = jnp.where(valid_BT, per_token.astype(jnp.float32), 0.0)
  if mode == "token_mean":
    return masked_mean(values_BT, mask_BT)
  if mode == "seq_mean_token_mean":
    per_row_B = masked_mean(values_BT, mask_BT, axis=-1)
  else:
    norm = per_token.shape[-1] if normalizer is None else normalizer
    per_row_B = masked_sum(values_BT, mask_BT, axis=-1) / norm
  return masked_mean(per_row_B, jnp.any(valid_BT, axis=-1).astype(jnp.float32))


def aggregate_packed(
    per_token_RL: chex.Array,
    mask_RL: chex.Array,
    sequence_ids_RL: chex.Array,
    num_sequences: int,
    *,
    mode: str,
    normalizer: float | None = None,
) -> chex.Array:
  """`aggregate` of packed rows (`rlhf_jax.data.packing`): the same modes and values, with the
  sequences given by sequence_ids_RL (0..num_sequences - 1, -1 for none) instead of rows.

  "token_mean" is the mean over valid tokens; the per-sequence modes reduce each sequence with
  `ops.packed_sequence_sums`, then average over the sequences with at least one valid token.
  "seq_mean_token_sum_norm" needs `normalizer` (a packed row's length is no sequence's padded
  length). Shapes [R, L]; returns a float32 scalar, 0 when no token is valid.
  """
  chex.assert_rank([per_token_RL, mask_RL, sequence_ids_RL], 2)
  chex.assert_equal_shape([per_token_RL, mask_RL, sequence_ids_RL])
  mode = _aggregation_mode(mode, normalizer)
  if mode == "seq_mean_token_sum_norm" and normalizer is None:
    raise ValueError("'seq_mean_token_sum_norm' of packed rows needs the normalizer (e.g. the "
                     "generation budget max_new_tokens)")
  if isinstance(normalizer, (int, float)) and normalizer <= 0:
    raise ValueError(f"normalizer must be positive, got {normalizer}")
  valid_RL = (mask_RL > 0) & (sequence_ids_RL >= 0)
  mask_f_RL = valid_RL.astype(jnp.float32)
  values_RL = jnp.where(valid_RL, per_token_RL.astype(jnp.float32), 0.0)
  if mode == "token_mean":
    return masked_mean(values_RL, mask_f_RL)
  counts_N = packed_sequence_sums(mask_f_RL, mask_f_RL, sequence_ids_RL, num_sequences)
  if mode == "seq_mean_token_mean":
    per_sequence_N = packed_sequence_sums(values_RL, mask_f_RL, sequence_ids_RL, num_sequences,
                                          reduction="mean")
  else:
    per_sequence_N = packed_sequence_sums(values_RL, mask_f_RL, sequence_ids_RL,
                                          num_sequences) / normalizer
  return masked_mean(per_sequence_N, (counts_N > 0).astype(jnp.float32))
