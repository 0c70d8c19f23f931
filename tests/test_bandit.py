"""The bandit reproduces Azar et al. 2023 §5.1: DPO ignores the KL on one-sided data, IPO does not."""

import dataclasses

import numpy as np
import pytest

from rlhf_jax import bandit

CONFIG = bandit.BanditConfig(steps=3000, log_every=100, losses=("dpo", "ipo"), betas=(0.1, 1.0))


@pytest.fixture(scope="module")
def data():
  return bandit.make_data(CONFIG)


def _log_ratio(probs):
  """h on the one-sided prompt (uniform reference): log π(y0) - log π(y1), per logged step."""
  return np.log(probs[:, 0, 0]) - np.log(probs[:, 0, 1])


def test_data_has_a_one_sided_pair(data):
  one_sided = data.prompt == 0
  assert np.all(data.chosen[one_sided] == 0) and np.all(data.rejected[one_sided] == 1)
  assert one_sided.sum() == CONFIG.one_sided_count
  assert set(data.prompt.tolist()) == set(range(CONFIG.num_prompts))


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_ipo_stops_at_its_regularised_solution(data, beta):
  probs = bandit.train_loss("ipo", beta, data, CONFIG)
  h = _log_ratio(probs)
  np.testing.assert_allclose(h[-1], 1 / (2 * beta), rtol=1e-3)  # IPO's minimiser: h = 1/(2β)
  # y2, y3 are never compared on that prompt, so Adam moves θ0 and θ1 symmetrically.
  e = np.exp(1 / (4 * beta))
  np.testing.assert_allclose(probs[-1, 0, 0], e / (e + 1 / e + 2), atol=1e-3)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_dpo_drives_the_preferred_response_to_one_whatever_beta(data, beta):
  probs = bandit.train_loss("dpo", beta, data, CONFIG)
  h = _log_ratio(probs)
  assert probs[-1, 0, 0] > 0.98
  assert h[-1] > 5 * (1 / (2 * beta))  # far past IPO's regularised margin ...
  assert np.all(np.diff(h[len(h) // 2:]) > 0)  # ... and still growing: no finite minimiser


def test_run_writes_table_and_plot(tmp_path):
  config = dataclasses.replace(CONFIG, steps=200, log_every=50, losses=("dpo", "ipo", "orpo"),
                               output_dir=str(tmp_path))
  result = bandit.run(config)
  rows = {(r["loss"], r["beta"]) for r in result["rows"]}
  assert rows == {("dpo", 0.1), ("dpo", 1.0), ("ipo", 0.1), ("ipo", 1.0), ("orpo", None)}
  assert all(np.isfinite(r["kl_to_ref"]) and r["kl_to_ref"] >= 0 for r in result["rows"])
  assert (tmp_path / "trajectories.png").stat().st_size > 10_000
  assert "| dpo | 0.1 |" in (tmp_path / "table.md").read_text()
