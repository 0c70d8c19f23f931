"""The pure online step on a model made in memory (no files): GRPO's and PPO's prepare and loss
against hand computations in NumPy (advantages, ratio, clipped surrogate, KL term, GAE, value
loss), the update's bookkeeping, and the donated update holding one copy of the state."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from transformers import LlamaConfig

from rlhf_jax import losses, models, rollout as rollout_lib
from rlhf_jax.train import grpo, online, ppo
from rlhf_jax.train.state import TrainState

P, N, G = 3, 4, 2  # prompt tokens, response tokens, samples per prompt
RESPONSE_MASK = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]], np.float32)
SCORES = np.array([1.0, 0.0, 0.2, 0.7], np.float32)


@pytest.fixture(scope="module")
def model():
  config = LlamaConfig(vocab_size=12, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
  return models.CausalLM(models.ModelConfig.from_hf(config))


@pytest.fixture(scope="module")
def rollout():
  rng = np.random.default_rng(0)
  rows = G * 2
  prompt = rng.integers(3, 12, (rows, P)).astype(np.int32)
  prompt_mask = np.ones((rows, P), np.int32)
  prompt_mask[1, 0] = 0  # left padding
  response = np.where(RESPONSE_MASK > 0, rng.integers(3, 12, (rows, N)), 0).astype(np.int32)
  return rollout_lib.Rollout(
      input_ids=jnp.asarray(np.concatenate([prompt, response], 1)),
      attention_mask=jnp.asarray(np.concatenate([prompt_mask, RESPONSE_MASK.astype(np.int32)],
                                                1)),
      response_mask=jnp.asarray(RESPONSE_MASK), sampler_logps=jnp.zeros((rows, N)),
      has_stop=jnp.ones(rows, bool), prompt_index=jnp.repeat(jnp.arange(2), G))


@functools.lru_cache
def _apply(model):
  return jax.jit(model.apply)


@pytest.fixture(scope="module")
def policy_and_reference(model):
  return model.init(jax.random.key(0)), model.init(jax.random.key(1))


@pytest.fixture(scope="module")
def grpo_algorithm(model):
  """GRPO with β = 0.1, ε = 0.2, and its prepare and loss jitted (shared by the tests)."""
  algorithm = grpo.make_grpo_algorithm(
      model, grpo.GRPOLoss(kl_coef=0.1, clip_eps=0.2), advantage="group", group_size=G,
      temperature=1.0, max_new_tokens=N)
  return algorithm, jax.jit(algorithm.prepare), jax.jit(algorithm.loss)


def _numpy_logps(model, params, rollout) -> np.ndarray:
  """log π(y_t | y_<t) of the response tokens, from the logits by hand."""
  logits = np.asarray(_apply(model)(params, rollout.input_ids, rollout.attention_mask).logits,
                      np.float64)
  logp = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1,
                                keepdims=True)) - logits.max(-1, keepdims=True)
  ids = np.asarray(rollout.input_ids)
  return np.stack([logp[np.arange(len(ids)), P + t - 1, ids[:, P + t]] for t in range(N)], 1)


def _perturbed(params, scale, seed):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape, x.dtype)
                                   for x, k in zip(leaves, keys)])


def _masked_row_mean(x, mask):
  return np.mean(np.sum(x * mask, 1) / np.sum(mask, 1))


def test_grpo_prepare_and_loss_match_the_hand_computation(model, rollout, grpo_algorithm,
                                                         policy_and_reference):
  params, ref = policy_and_reference
  beta, eps = 0.1, 0.2
  _, prepare, loss = grpo_algorithm
  state = TrainState.create(params, optax.sgd(0.1), jax.random.key(2))
  (old, ref_logps, advantages), metrics = prepare(state, ref, rollout, jnp.asarray(SCORES))
  mask = RESPONSE_MASK
  np.testing.assert_allclose(np.asarray(old) * mask, _numpy_logps(model, params, rollout) * mask,
                             atol=1e-5)
  # Group-normalised advantages, sample std (G - 1): groups (1, 0) and (0.2, 0.7).
  expected_adv = np.array([1, -1, -1, 1]) * np.sqrt(0.5)
  np.testing.assert_allclose(advantages, expected_adv, rtol=1e-5)
  np.testing.assert_allclose(metrics["reward"], SCORES.mean(), rtol=1e-6)

  # The loss at other params: ratio ≠ 1, some tokens clipped.
  new_params = _perturbed(params, 0.3, 3)
  value, _ = loss(new_params, rollout, (old, ref_logps, advantages))
  new, old_np, ref_np = (_numpy_logps(model, new_params, rollout), np.asarray(old, np.float64),
                         _numpy_logps(model, ref, rollout))
  ratio = np.exp(new - old_np)
  a = expected_adv[:, None]
  surrogate = np.maximum(-a * ratio, -a * np.clip(ratio, 1 - eps, 1 + eps))
  assert np.any((np.abs(ratio - 1) > eps) & (mask > 0)), "the clip is exercised"
  k3 = np.exp(ref_np - new) - (ref_np - new) - 1
  np.testing.assert_allclose(value, _masked_row_mean(surrogate + beta * k3, mask), rtol=1e-4)


def test_grpo_update_takes_one_sgd_step_on_that_loss(model, rollout, grpo_algorithm,
                                                     policy_and_reference):
  params, ref = policy_and_reference
  algorithm, prepare, loss = grpo_algorithm
  lr = 0.05
  # A copy: the update donates the state's buffers, and the fixture's params are shared.
  state = TrainState.create(jax.tree.map(jnp.copy, params), optax.sgd(lr), jax.random.key(2))
  prepared, _ = prepare(state, ref, rollout, jnp.asarray(SCORES))
  grads = jax.jit(jax.grad(lambda p: loss(p, rollout, prepared)[0]))(params)
  expected = jax.tree.map(lambda p, g: p - lr * g, params, grads)
  # At the rollout's own params the ratio is 1: loss = mean_rows(mean_tokens(-A + β·k3)).
  new, ref_np = _numpy_logps(model, params, rollout), _numpy_logps(model, ref, rollout)
  k3 = np.exp(ref_np - new) - (ref_np - new) - 1
  expected_loss = _masked_row_mean(-np.asarray(prepared[2])[:, None] + 0.1 * k3, RESPONSE_MASK)
  update = online.make_update(algorithm, epochs=1, minibatches=1)
  new_state, metrics = update(state, ref, rollout, jnp.asarray(SCORES), jax.random.key(4))
  assert int(new_state.step) == 1
  np.testing.assert_allclose(metrics["loss"], expected_loss, rtol=1e-4)
  for got, want in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, atol=1e-6)


def _numpy_gae(rewards, values, mask, gamma, lam):
  advantages = np.zeros_like(rewards)
  for b in range(rewards.shape[0]):
    length, running = int(mask[b].sum()), 0.0
    for t in reversed(range(length)):
      next_value = values[b, t + 1] if t + 1 < length else 0.0
      delta = rewards[b, t] + gamma * next_value - values[b, t]
      running = delta + gamma * lam * running
      advantages[b, t] = running
  return advantages, (advantages + values) * mask


def test_ppo_prepare_and_loss_match_the_hand_computation(model, rollout, policy_and_reference):
  policy, ref = policy_and_reference
  loss = ppo.PPOLoss(kl_coef=0.05, gamma=0.9, lam=0.8, vf_coef=0.1, clip_eps=0.2,
                     value_clip_eps=0.2)
  value_fn = ppo.ValueFunction("shared")
  params = ppo.init_params(model, policy, loss, jax.random.key(5))
  algorithm = ppo.make_ppo_algorithm(model, loss, value_fn, temperature=1.0)
  state = TrainState.create(params, optax.sgd(0.1), jax.random.key(2),
                            extra={"kl": losses.init_kl_controller(loss.kl_coef)})
  prepared, _ = jax.jit(algorithm.prepare)(state, ref, rollout, jnp.asarray(SCORES))
  old, values, advantages, returns = (np.asarray(x, np.float64) for x in prepared)
  mask = RESPONSE_MASK
  logps, ref_np = _numpy_logps(model, policy, rollout), _numpy_logps(model, ref, rollout)
  hidden = _apply(model)(policy, rollout.input_ids, rollout.attention_mask).hidden
  v = np.asarray(models.apply_value_head(params["value_head"], hidden))[:, P - 1:P + N - 1]
  np.testing.assert_allclose(values, v * mask, atol=1e-5)
  # r_t = -β (log π - log π_ref) at every token, + the score at the last one; GAE; whitening.
  rewards = -loss.kl_coef * (logps - ref_np) * mask
  last = mask.sum(1).astype(int) - 1
  rewards[np.arange(4), last] += SCORES
  adv, ret = _numpy_gae(rewards, v * mask, mask, loss.gamma, loss.lam)
  mean = (adv * mask).sum() / mask.sum()
  var = (((adv - mean) * mask) ** 2).sum() / mask.sum()
  np.testing.assert_allclose(returns, ret, atol=1e-5)
  np.testing.assert_allclose(advantages, (adv - mean) / np.sqrt(var + 1e-8) * mask, atol=1e-4)

  new_params = _perturbed(params, 0.3, 6)
  value, metrics = jax.jit(algorithm.loss)(new_params, rollout, prepared)
  new = _numpy_logps(model, new_params["policy"], rollout)
  ratio = np.exp(new - old)
  policy_loss = np.maximum(-advantages * ratio, -advantages * np.clip(ratio, 0.8, 1.2))
  hidden = _apply(model)(new_params["policy"], rollout.input_ids, rollout.attention_mask).hidden
  v_new = np.asarray(models.apply_value_head(new_params["value_head"], hidden),
                     np.float64)[:, P - 1:P + N - 1]
  v_clip = values + np.clip(v_new - values, -0.2, 0.2)
  value_loss = 0.5 * np.maximum((v_new - returns) ** 2, (v_clip - returns) ** 2)
  token_mean = lambda x: (x * mask).sum() / mask.sum()
  np.testing.assert_allclose(metrics["loss/policy"], token_mean(policy_loss), rtol=1e-4)
  np.testing.assert_allclose(metrics["loss/value"], token_mean(value_loss), rtol=1e-4)
  np.testing.assert_allclose(value, token_mean(policy_loss) + 0.1 * token_mean(value_loss),
                             rtol=1e-4)


def test_the_donated_update_holds_one_copy_of_the_state(model, rollout, grpo_algorithm,
                                                       policy_and_reference):
  params, ref = policy_and_reference
  algorithm = grpo_algorithm[0]
  state = TrainState.create(jax.tree.map(jnp.copy, params), optax.adamw(1e-3),
                            jax.random.key(2))
  args = (state, ref, rollout, jnp.asarray(SCORES), jax.random.key(3))
  state_bytes = sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state)))
  donated = online.make_update(algorithm, epochs=2, minibatches=2).lower(*args).compile()
  analysis = donated.memory_analysis()
  # The new state is written into the old one's buffers: params and both Adam moments.
  assert analysis.alias_size_in_bytes >= state_bytes
  kept = jax.jit(online.make_update(algorithm, epochs=2, minibatches=2).__wrapped__)
  assert kept.lower(*args).compile().memory_analysis().alias_size_in_bytes == 0
