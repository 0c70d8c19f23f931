"""The two-level bootstrap of results over seeds (eval/stats.py)."""

import numpy as np
import pytest

from rlhf_jax.eval import stats


def test_one_seed_is_the_ordinary_bootstrap_and_matches_the_normal_interval():
  values = np.random.default_rng(0).normal(0.3, 1.0, 2000)
  mean, low, high = stats.bootstrap_mean_ci([values], num_resamples=2000)
  half = 1.96 * values.std() / np.sqrt(values.size)
  assert mean == pytest.approx(values.mean())
  assert low == pytest.approx(mean - half, abs=0.2 * half)
  assert high == pytest.approx(mean + half, abs=0.2 * half)


def test_seed_to_seed_noise_widens_the_interval_and_it_covers_the_true_mean():
  """Seeds shift every prompt's value (sd 0.5): intervals that ignored it would cover the true
  mean far less than 95% of the time; the two-level bootstrap covers it about as often as it
  says (percentile intervals run a little short with 10 seeds)."""
  rng = np.random.default_rng(1)
  covered, widths = 0, []
  for _ in range(100):
    groups = [rng.normal(rng.normal(0.0, 0.5), 1.0, 30) for _ in range(10)]
    _, low, high = stats.bootstrap_mean_ci(groups, num_resamples=400, seed=int(rng.integers(99)))
    covered += low <= 0.0 <= high
    widths.append(high - low)
  assert 0.85 <= covered / 100 <= 1.0, covered
  pooled_only = 2 * 1.96 * np.sqrt(1.25 / 300)  # the naive interval over 300 pooled prompts
  assert np.mean(widths) > 2 * pooled_only


def test_win_indicators_count_ties_as_half_and_skip_missing_rows():
  wins = stats.win_indicators(np.array([1.0, 0.0, 2.0, np.nan]), np.array([0.0, 0.0, 3.0, 1.0]))
  np.testing.assert_array_equal(wins[:3], [1.0, 0.5, 0.0])
  assert np.isnan(wins[3])
  assert stats.bootstrap_mean_ci([wins])[0] == pytest.approx(0.5)
  assert stats.format_interval(0.5, 0.25, 0.75) == "0.500 [0.250, 0.750]"
  with pytest.raises(ValueError, match="no values"):
    stats.bootstrap_mean_ci([np.array([np.nan])])
