"""Packed online updates (`train/packed_rollouts.py`): the layout of a rollout (each prompt once
per item, every response token in one slot, fixed row budgets), and the update pass of GRPO,
RLOO and PPO on packed rows giving the padded layout's losses, metrics and new params."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec
from transformers import LlamaConfig

from rlhf_jax import losses, models, rollout as rollout_lib
from rlhf_jax.train import grpo, online, packed_rollouts, ppo
from rlhf_jax.train.state import TrainState

PROMPTS, G, P, N = 3, 4, 5, 6  # prompts, samples per prompt, prompt width, response width
PROMPT_LENGTHS = [5, 2, 4]  # real prompt tokens (left padded)
RESPONSE_LENGTHS = [6, 1, 3, 2, 4, 6, 1, 5, 2, 2, 6, 3]  # response tokens per rollout row
# SGD: the new params are the gradients' images (Adam would amplify float32 rounding in
# near-zero gradients into lr-sized steps).
LR = 0.5
SCORES = np.array([1.0, 0.0, 0.2, 0.7, -0.3, 0.5, 0.9, 0.1, 0.0, 1.0, 0.4, 0.6], np.float32)


@pytest.fixture(scope="module")
def model():
  config = LlamaConfig(vocab_size=12, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
  return models.CausalLM(models.ModelConfig.from_hf(config))


@pytest.fixture(scope="module")
def rollout():
  rng = np.random.default_rng(0)
  rows = PROMPTS * G
  prompt_mask = np.zeros((rows, P), np.int32)
  prompt = np.zeros((rows, P), np.int32)
  for i, length in enumerate(PROMPT_LENGTHS):
    tokens = rng.integers(3, 12, length)
    for g in range(G):
      prompt[i * G + g, P - length:] = tokens
      prompt_mask[i * G + g, P - length:] = 1
  response_mask = (np.arange(N)[None] < np.asarray(RESPONSE_LENGTHS)[:, None]).astype(np.float32)
  response = np.where(response_mask > 0, rng.integers(3, 12, (rows, N)), 0).astype(np.int32)
  return rollout_lib.Rollout(
      input_ids=jnp.asarray(np.concatenate([prompt, response], 1)),
      attention_mask=jnp.asarray(np.concatenate([prompt_mask, response_mask.astype(np.int32)],
                                                1)),
      response_mask=jnp.asarray(response_mask),
      sampler_logps=jnp.asarray(-rng.random((rows, N)).astype(np.float32) * response_mask),
      has_stop=jnp.asarray(np.asarray(RESPONSE_LENGTHS) < N),
      prompt_index=jnp.repeat(jnp.arange(PROMPTS, dtype=jnp.int32), G))


@pytest.fixture(scope="module")
def params(model):
  return model.init(jax.random.key(0)), model.init(jax.random.key(1))


def _order(rollout, minibatches, epochs, seed=4):
  return online.shuffled_minibatches(jax.random.key(seed), rollout.input_ids.shape[0],
                                     minibatches, epochs)


@pytest.mark.parametrize("row_length", [None, 24])
def test_the_layout_holds_every_response_token_once_and_each_prompt_once_per_item(
    rollout, row_length):
  order = _order(rollout, minibatches=2, epochs=2)
  layouts = packed_rollouts.layout_rollout(rollout, order, row_length)
  full = jax.device_get(layouts.full)
  ids = np.asarray(rollout.input_ids)
  width = P + N
  length = width if row_length is None else row_length
  assert full.source.shape[1] == length
  # The row count is a budget: a multiple of the step (1/8 of the padded tokens in rows of L).
  step = packed_rollouts.row_step(PROMPTS * G, width, length)
  assert full.source.shape[0] % step == 0
  packed_tokens = int(np.sum(full.segment_ids > 0))
  real = sum(PROMPT_LENGTHS) * G + sum(RESPONSE_LENGTHS)
  assert packed_tokens < real  # prompts shared
  # Every response token in exactly one slot, with its own id; prompts' tokens are real ones.
  seen = np.zeros((PROMPTS * G, N), int)
  for r, l in zip(*np.nonzero(full.sequence_ids >= 0)):
    s, t = full.sequence_ids[r, l], full.response_slots[r, l]
    seen[s, t] += 1
    assert full.source[r, l] == s * width + P + t
  np.testing.assert_array_equal(seen, np.asarray(rollout.response_mask))
  tokens = np.asarray(full.tokens(jnp.asarray(ids)))
  np.testing.assert_array_equal(tokens[full.segment_ids > 0],
                                ids.reshape(-1)[full.source[full.segment_ids > 0]])
  # Each item's prompt is its group's real prompt tokens, once.
  for r in range(full.source.shape[0]):
    for segment in set(full.segment_ids[r][full.segment_ids[r] > 0]):
      in_segment = full.segment_ids[r] == segment
      prompt_slots = full.source[r][in_segment & (full.branch_ids[r] == 0)] % width
      group = set(full.sequence_ids[r][in_segment & (full.sequence_ids[r] >= 0)] // G)
      assert len(group) == 1
      np.testing.assert_array_equal(prompt_slots,
                                    np.arange(P - PROMPT_LENGTHS[group.pop()], P))
  if row_length == 24:  # 3 items for 3 groups would not fit; but far fewer than 12 prompts
    assert np.sum(full.branch_ids == 0) - np.sum(full.segment_ids == 0) < sum(PROMPT_LENGTHS) * G
  # pack / unpack round trip of the per-sequence view.
  x = jnp.asarray(np.random.default_rng(1).random((PROMPTS * G, N)), jnp.float32)
  mask = rollout.response_mask
  back = layouts.full.unpack(layouts.full.pack(x), PROMPTS * G, N)
  np.testing.assert_array_equal(back, x * mask)
  # Minibatch layouts number their sequences within the minibatch, in its order.
  mb = jax.device_get(layouts.minibatches)
  for k, rows in enumerate(np.asarray(order)):
    local_ids = ids[rows]
    valid = mb.sequence_ids[k] >= 0
    np.testing.assert_array_equal(
        local_ids.reshape(-1)[mb.source[k][valid]],
        local_ids[mb.sequence_ids[k][valid], P + mb.response_slots[k][valid]])
    assert np.sum(valid) == np.sum(np.asarray(mask)[rows])


def test_a_sequence_longer_than_the_row_is_an_error(rollout):
  with pytest.raises(ValueError, match="does not fit a packed row of 8 tokens"):
    packed_rollouts.layout_rollout(rollout, _order(rollout, 1, 1), row_length=8)


@pytest.mark.parametrize("mode", ["grpo", "dapo", "dr_grpo"])
def test_aggregate_packed_equals_aggregate_of_the_padded_rows(rollout, mode):
  layout = packed_rollouts.layout_rollout(rollout, _order(rollout, 1, 1), 24).full
  per_token = jnp.asarray(np.random.default_rng(2).normal(size=(PROMPTS * G, N)), jnp.float32)
  mask = rollout.response_mask
  norm = {"normalizer": 10.0} if mode == "dr_grpo" else {}
  want = losses.aggregate(jnp.where(mask > 0, per_token, jnp.inf), mask, mode=mode, **norm)
  packed_RL = jnp.where(layout.loss_mask > 0, layout.pack(per_token), jnp.nan)
  got = losses.aggregate_packed(packed_RL, layout.loss_mask, layout.sequence_ids, PROMPTS * G,
                                mode=mode, **norm)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  if mode == "dr_grpo":
    with pytest.raises(ValueError, match="needs the normalizer"):
      losses.aggregate_packed(packed_RL, layout.loss_mask, layout.sequence_ids, PROMPTS * G,
                              mode=mode)


def _updates(algorithm, state_of, ref, rollout, *, epochs, minibatches, row_length):
  """(padded, packed) results of one online step (`online.make_online_step`) from the same
  state, with a sampler that returns the fixed rollout: the packed step plans its layouts for
  the minibatch order that its update draws."""
  steps = {layout: online.make_online_step(
      algorithm, sample=lambda *_: rollout, score=lambda *_: (jnp.asarray(SCORES), {}),
      epochs=epochs, minibatches=minibatches, layout=layout, row_length=row_length)
      for layout in ("padded", "packed")}
  batch = {"prompt_ids": None, "prompt_mask": None}
  return steps["padded"](state_of(), batch, ref), steps["packed"](state_of(), batch, ref)


def _assert_same(padded, packed):
  (state_a, metrics_a), (state_b, metrics_b) = padded, packed
  assert set(metrics_a) == set(metrics_b)
  for name in metrics_a:
    np.testing.assert_allclose(metrics_b[name], metrics_a[name], rtol=2e-5, atol=2e-6,
                               err_msg=name)
  assert int(state_a.step) == int(state_b.step)
  for a, b in zip(jax.tree.leaves(state_a.params), jax.tree.leaves(state_b.params)):
    np.testing.assert_allclose(b, a, rtol=2e-5, atol=2e-6)
  # The step moved the params (the comparison is not of two untouched states).
  return metrics_a


# One compile pair each (the budget of these tests): GRPO's per-sequence mean with the KL in the
# loss and RLOO's Dr. GRPO sums with the KL in the reward, groups split over rows; DAPO's token
# mean is PPO's below, and every mode of `aggregate_packed` is checked on its own.
@pytest.mark.parametrize("trainer, aggregation, row_length", [
    ("grpo", "grpo", None), ("rloo", "dr_grpo", 24)])
def test_grpo_and_rloo_packed_updates_equal_the_padded_ones(model, rollout, params, trainer,
                                                            aggregation, row_length):
  policy, ref = params
  loss = grpo.GRPOLoss(kl_coef=0.1, aggregation=aggregation, epochs=2, minibatches=2,
                       kl_in="reward" if trainer == "rloo" else "loss", clip_eps_high=0.28)
  algorithm = grpo.make_grpo_algorithm(
      model, loss, advantage="leave_one_out" if trainer == "rloo" else "group", group_size=G,
      temperature=0.7, max_new_tokens=N)
  tx = optax.sgd(LR)  # one transformation: a new one would be a new static arg (a recompile)
  state_of = lambda: TrainState.create(jax.tree.map(jnp.copy, policy), tx, jax.random.key(2))
  padded, packed = _updates(algorithm, state_of, ref, rollout, epochs=2, minibatches=2,
                            row_length=row_length)
  metrics = _assert_same(padded, packed)
  assert metrics["clip_fraction"] > 0  # the second epoch's ratios left the clip range
  moved = max(float(jnp.max(jnp.abs(a - b)))
              for a, b in zip(jax.tree.leaves(padded[0].params), jax.tree.leaves(policy)))
  assert moved > 1e-3


@pytest.mark.parametrize("value_head", ["shared", "separate"])
def test_ppo_packed_update_equals_the_padded_one(model, rollout, params, value_head):
  policy, ref = params
  loss = ppo.PPOLoss(kl_coef=0.05, gamma=0.9, lam=0.8, epochs=2, minibatches=2,
                     entropy_coef=0.01, kl_target=1.0,  # token_mean: DAPO's aggregation
                     value_head=value_head)
  critic, critic_params = None, None
  if value_head == "separate":  # a critic of its own: the same shape, other weights, a score
    critic = models.RewardModel(model.config)
    critic_params = critic.init(jax.random.key(6))
  value_fn = ppo.ValueFunction(value_head, critic)
  algorithm = ppo.make_ppo_algorithm(model, loss, value_fn, temperature=0.7)
  full = ppo.init_params(model, policy, loss, jax.random.key(5), critic_params)
  tx = optax.sgd(LR)
  state_of = lambda: TrainState.create(
      jax.tree.map(jnp.copy, full), tx, jax.random.key(2),
      extra={"kl": losses.init_kl_controller(loss.kl_coef)})
  padded, packed = _updates(algorithm, state_of, ref, rollout, epochs=2, minibatches=2,
                            row_length=None)
  metrics = _assert_same(padded, packed)
  assert abs(metrics["loss/value"]) > 0
  np.testing.assert_allclose(packed[0].extra["kl"].kl_coef, padded[0].extra["kl"].kl_coef,
                             rtol=1e-6)


def test_the_online_configs_default_to_packed_and_parse_the_padded_layout():
  from rlhf_jax import config as config_lib  # noqa: PLC0415

  for cls in (grpo.GRPOConfig, ppo.PPOConfig):
    assert cls().layout == "packed" and cls().packed_row_length is None
    changed = config_lib.apply_overrides(cls(), ["layout=padded", "packed_row_length=64"])
    assert (changed.layout, changed.packed_row_length) == ("padded", 64)
    with pytest.raises(config_lib.ConfigError,
                       match="layout: expected one of 'packed', 'padded', got 'pad'"):
      config_lib.apply_overrides(cls(), ["layout=pad"])
    with pytest.raises(ValueError, match="packed_row_length"):
      config_lib.apply_overrides(cls(), ["packed_row_length=0"]).validate()


def test_layouts_shard_their_rows_over_the_batch_axes_of_the_rollouts_mesh(rollout):
  from rlhf_jax import parallel  # noqa: PLC0415
  from rlhf_jax.parallel import MeshConfig  # noqa: PLC0415

  mesh = parallel.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  sharded = jax.tree.map(lambda x: jax.device_put(x, parallel.batch_sharding(mesh, x.ndim)),
                         rollout)
  layouts = packed_rollouts.layout_rollout(sharded, _order(rollout, 2, 1), 24)
  plain = packed_rollouts.layout_rollout(rollout, _order(rollout, 2, 1), 24)
  for got, single, leading in ((layouts.full, plain.full, 0),
                               (layouts.minibatches, plain.minibatches, 1)):
    assert got.source.shape[leading] % 4 == 0  # rows: a multiple of data x fsdp
    assert got.source.sharding.spec == PartitionSpec(*[None] * leading, parallel.BATCH_AXES,
                                                     None)
    # The same packing, in a different row budget (empty rows after the plan's).
    rows = min(single.source.shape[leading], got.source.shape[leading])
    first = (slice(None),) * leading + (slice(0, rows),)
    np.testing.assert_array_equal(np.asarray(got.sequence_ids)[first],
                                  np.asarray(single.sequence_ids)[first])
