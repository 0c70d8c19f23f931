"""Reward-model objectives: margins, centering, heads and rankings, on a stand-in scorer.

`make_losses` only needs `rm.apply(params, ids, mask) -> [N, H]`, so a lookup table of rewards
indexed by each row's first token makes every term checkable against its formula.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses
from rlhf_jax.train import reward


@dataclasses.dataclass(frozen=True)
class TableRM:
  def apply(self, params, input_ids, attention_mask):
    return params["table"][input_ids[:, 0]]  # [N, H]


def _pair_batch(chosen_ids, rejected_ids, *, margin=None, objective=None):
  ids = jnp.asarray(list(chosen_ids) + list(rejected_ids), jnp.int32)[:, None]
  n = len(chosen_ids)
  return {"input_ids": ids, "attention_mask": jnp.ones_like(ids),
          "margin": jnp.asarray(margin if margin is not None else [0.0] * n, jnp.float32),
          "objective": jnp.asarray(objective if objective is not None else [0] * n, jnp.int32)}


TABLE = jnp.asarray([[0.5, -1.0], [-0.25, 2.0], [1.5, 0.0], [-2.0, 0.75]], jnp.float32)


def test_margin_and_centering_terms():
  batch = _pair_batch([0, 2], [1, 3], margin=[0.3, 1.0])
  rc, rr = TABLE[jnp.array([0, 2]), 0], TABLE[jnp.array([1, 3]), 0]
  plain, metrics = reward.make_losses(TableRM(), reward.RewardLoss())({"table": TABLE}, batch)
  np.testing.assert_allclose(plain, losses.bradley_terry(rc, rr), rtol=1e-6)
  np.testing.assert_allclose(metrics["reward_margin"], rc - rr, rtol=1e-6)
  loss = reward.RewardLoss(use_margin=True, center_coef=0.01)
  values, _ = reward.make_losses(TableRM(), loss)({"table": TABLE}, batch)
  expected = (losses.bradley_terry(rc, rr, margin=jnp.array([0.3, 1.0]))
              + 0.01 * (rc + rr) ** 2)
  np.testing.assert_allclose(values, expected, rtol=1e-6)


def test_centering_pulls_the_mean_reward_to_zero():
  # Shifting every reward by a constant leaves Bradley-Terry unchanged; only centering sees it.
  batch = _pair_batch([0, 2], [1, 3])
  fn = reward.make_losses(TableRM(), reward.RewardLoss(center_coef=0.1))
  loss = lambda shift: jnp.mean(fn({"table": TABLE + shift}, batch)[0])
  grad_at = lambda shift: float(jax.grad(loss)(jnp.float32(shift)))
  assert grad_at(1.0) > 0 > grad_at(-1.0)
  plain = reward.make_losses(TableRM(), reward.RewardLoss())
  np.testing.assert_allclose(jnp.mean(plain({"table": TABLE + 3.0}, batch)[0]),
                             jnp.mean(plain({"table": TABLE}, batch)[0]), rtol=1e-6)


def test_each_pair_trains_the_head_of_its_objective():
  batch = _pair_batch([0, 2], [1, 3], objective=[1, 0])
  fn = reward.make_losses(TableRM(), reward.RewardLoss(num_heads=2))
  _, metrics = fn({"table": TABLE}, batch)
  np.testing.assert_allclose(metrics["reward_chosen"], [TABLE[0, 1], TABLE[2, 0]])
  np.testing.assert_allclose(metrics["reward_rejected"], [TABLE[1, 1], TABLE[3, 0]])
  grads = jax.grad(lambda p: jnp.sum(fn(p, batch)[0]))({"table": TABLE})["table"]
  assert grads[0, 0] == 0 and grads[0, 1] != 0  # row 0 is scored by head 1 only
  assert grads[2, 1] == 0 and grads[2, 0] != 0


def test_ranking_centering_is_the_pair_term_for_two_completions():
  ranked = {"input_ids": jnp.asarray([[0], [1], [2], [3]], jnp.int32),
            "attention_mask": jnp.ones((4, 1), jnp.int32),
            "ranks": jnp.asarray([[0, 1], [1, 0]], jnp.int32),
            "rank_mask": jnp.ones((2, 2), jnp.float32)}
  table = TABLE[:, :1]
  ranking_fn = reward.make_losses(TableRM(), reward.RewardLoss(objective="ranking",
                                                               center_coef=0.05))
  values, metrics = ranking_fn({"table": table}, ranked)
  # Row 0 prefers completion 0 (reward 0.5) to 1 (-0.25); row 1 prefers 3 (-2.0) to 2 (1.5).
  rc, rr = jnp.array([0.5, -2.0]), jnp.array([-0.25, 1.5])
  np.testing.assert_allclose(values, losses.bradley_terry(rc, rr) + 0.05 * (rc + rr) ** 2,
                             rtol=1e-6)
  np.testing.assert_allclose(metrics["accuracy"], [1.0, 0.0])


@pytest.mark.parametrize("bad, message", [
    (dict(objective="ranking", num_heads=2), "one head"),
    (dict(objective="ranking", use_margin=True), "use_margin"),
    (dict(objective="listwise"), "loss.objective: expected one of 'bradley_terry', 'ranking'"),
])
def test_bad_reward_configs_are_errors(bad, message):
  with pytest.raises(ValueError, match=message):
    reward.RewardLoss(**bad).validate()
