"""Intervals for results over several seeds: a two-level (hierarchical) bootstrap.

A method's evaluation is a set of per-prompt values (gold reward, win indicator, ...) per seed.
Two noises sit in the mean: which seed trained the policy, and which prompts it was evaluated
on. The bootstrap resamples both: seeds with replacement, then prompts with replacement within
each drawn seed, and takes the mean of the pooled draw; the interval is the percentile interval
of those means (Efron & Tibshirani, 1993, ch. 13; the nested resampling of Davison & Hinkley,
1997, sec. 3.8). With one seed it is the ordinary bootstrap over prompts.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["bootstrap_mean_ci", "win_indicators", "format_interval"]


def bootstrap_mean_ci(groups: Sequence[np.ndarray], *, level: float = 0.95,
                      num_resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
  """(mean, low, high): the pooled mean over `groups` (one array per seed; NaNs, rows a metric
  does not apply to, are dropped) and its two-level bootstrap percentile interval."""
  groups = [np.asarray(g, np.float64)[~np.isnan(np.asarray(g, np.float64))] for g in groups]
  groups = [g for g in groups if g.size]
  if not groups:
    raise ValueError("bootstrap_mean_ci: no values")
  if not 0 < level < 1:
    raise ValueError(f"bootstrap_mean_ci: level must be in (0, 1), got {level}")
  rng = np.random.default_rng(seed)
  means = np.empty(num_resamples)
  for b in range(num_resamples):
    drawn = rng.integers(0, len(groups), len(groups))
    pooled = np.concatenate([groups[i][rng.integers(0, groups[i].size, groups[i].size)]
                             for i in drawn])
    means[b] = pooled.mean()
  tail = (1 - level) / 2
  low, high = np.quantile(means, [tail, 1 - tail])
  return float(np.concatenate(groups).mean()), float(low), float(high)


def win_indicators(values: np.ndarray, baseline: np.ndarray) -> np.ndarray:
  """Per-prompt win (1), tie (0.5) or loss (0) of `values` over `baseline` (NaN where either is
  NaN): their mean is the win rate, and its interval comes from `bootstrap_mean_ci`."""
  values, baseline = np.asarray(values, np.float64), np.asarray(baseline, np.float64)
  out = np.where(values > baseline, 1.0, np.where(values == baseline, 0.5, 0.0))
  return np.where(np.isnan(values) | np.isnan(baseline), np.nan, out)


def format_interval(mean: float, low: float, high: float, spec: str = ".3f") -> str:
  """"0.568 [0.512, 0.621]"."""
  return f"{mean:{spec}} [{low:{spec}}, {high:{spec}}]"
