"""Diagnostics: win rate, length bias, best-of-N KL, the over-optimisation fits."""

import numpy as np
import pytest

from rlhf_jax.eval import diagnostics, plots


def test_win_rate_counts_ties_as_half():
  assert diagnostics.win_rate([1, 2, 3, 0], [0, 2, 4, 0]) == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
  with pytest.raises(ValueError, match="paired"):
    diagnostics.win_rate([1, 2], [1])


def test_length_bias_is_the_correlation_with_length():
  lengths = np.arange(10.0)
  assert diagnostics.length_bias(2 * lengths + 1, lengths) == pytest.approx(1.0)
  assert diagnostics.length_bias(-lengths, lengths) == pytest.approx(-1.0)
  assert diagnostics.length_bias(np.ones(10), lengths) == 0.0


def test_best_of_n_kl_analytic_and_exact_estimate():
  assert diagnostics.best_of_n_kl_analytic(1) == 0.0
  assert diagnostics.best_of_n_kl_analytic(4) == pytest.approx(np.log(4) - 0.75)
  # With an exact CDF (a huge reference sample of uniforms), the estimate converges.
  rng = np.random.default_rng(0)
  n, prompts = 4, 64
  winners = rng.random((prompts, 500, n)).max(axis=2)
  reference = rng.random((prompts, 4000))
  estimate, error = diagnostics.best_of_n_kl_estimate(winners, reference, n)
  assert abs(estimate - diagnostics.best_of_n_kl_analytic(n)) < 4 * error + (n - 1) / 4000


@pytest.mark.parametrize("form,alpha,beta", [("best_of_n", 1.3, 0.4), ("rl", 0.8, 0.5)])
def test_gao_fit_recovers_the_scaling_law_coefficients(form, alpha, beta):
  d = np.linspace(0.0, 3.0, 13)  # d = 0 is dropped (no information)
  shape = d * d if form == "best_of_n" else np.where(d > 0, d * np.log(np.maximum(d, 1e-30)), 0)
  gain = alpha * d - beta * shape
  assert plots.gao_fit(d, gain, form) == pytest.approx((alpha, beta), rel=1e-9)
  # Gold peaks and turns down: for best-of-N the argmax of d (alpha - beta d) is alpha / (2 beta).
  if form == "best_of_n":
    assert d[np.argmax(gain)] == pytest.approx(alpha / (2 * beta), abs=0.25)
  with pytest.raises(ValueError, match="at least 2 points"):
    plots.gao_fit([0.0, 1.0], [0.0, 1.0], form)
  with pytest.raises(ValueError, match="expected"):
    plots.gao_fit(d, gain, "linear")


def test_best_of_n_kl_estimate_bias_is_exact_for_a_continuous_reward():
  rng = np.random.default_rng(1)
  n, m, prompts = 16, 16, 20000  # N = M: the estimate is far below log N - (N-1)/N
  winners = rng.random((prompts, 1)) ** (1 / n)  # F(winner) ~ Beta(N, 1)
  estimate, error = diagnostics.best_of_n_kl_estimate(winners, rng.random((prompts, m)), n)
  bias = diagnostics.best_of_n_kl_estimate_bias(n, m)
  assert bias < -0.4  # the audit's 1.39 for 1.84
  assert abs(estimate - diagnostics.best_of_n_kl_analytic(n) - bias) < 4 * error
  # Once M >> N the bias is about -(N-1)/(2M).
  assert diagnostics.best_of_n_kl_estimate_bias(4, 512) == pytest.approx(-3 / 1024, rel=0.1)


def test_comparison_table_shows_the_reward_model_s_time_and_best_of_n_cost():
  row = {"method": "PPO kl=0.05", "gold_reward": 0.5, "proxy_reward": 1.0, "kl": 2.0,
         "length": 10.0, "win_rate": 0.6, "length_bias": 0.1, "seconds": 40.0, "rm_seconds": 21.0}
  point = {"n": 4, "kl": 0.64, "kl_estimate": 0.62, "kl_estimate_bias": -0.01,
           "gold_reward": 0.4, "proxy_reward": 0.9, "length": 12.5, "seconds": 3.0,
           "rm_seconds": 21.0}
  table = plots.comparison_table([row], [point], reference_samples=128)
  assert "| 40s + 21s RM |" in table
  assert "| best-of-4 | 0.400 | 0.900 | 0.64 (est. 0.62) | 12.5 | - | - | 3.0s + 21s RM |" in table
  assert "M = 128" in table


def test_comparison_table_names_the_alarms_that_fired():
  rows = [{"method": "PPO kl=0.01", "gold_reward": -0.9, "alarms": ["hacking", "kl"]},
          {"method": "DPO β=0.1", "gold_reward": 0.1, "alarms": []}]
  table = plots.comparison_table(rows)
  assert "Training alarms that fired (train/alarms.py): PPO kl=0.01: hacking, kl." in table
  assert "DPO" not in table.split("Training alarms")[1]
  assert "Training alarms" not in plots.comparison_table(rows[1:])
