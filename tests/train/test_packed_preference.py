"""The packed shared-prompt layout (data.layout=packed, the default) gives the padded layout's
per-example losses, metrics and gradients, to float32 rounding: DPO (sums), IPO with an NLL
term (means), KTO, the reward model on pairs and on rankings, the precomputed reference, and a
short DPO run (packed on the 8-device data mesh)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models
from rlhf_jax.data import BatchStream
from rlhf_jax.parallel import MeshConfig
from rlhf_jax.train import common, preference, reward
from rlhf_jax.train.state import OptimizerConfig

BATCH = 8


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
  spec = common.ModelSpec(path=tiny_model_dir)
  tokenizer = common.load_tokenizer(spec)
  model, params = common.load_policy(spec)
  # A reference that differs from the policy, so the implicit rewards are not all zero.
  ref = jax.tree.map(lambda x: x * 0.9, params)
  return tokenizer, model, params, ref


def _records(tokenizer, kind, num_rows=24):
  data = common.DataSpec(train=f"synthetic:{kind}", num_rows=num_rows, max_length=32,
                         buckets=(16, 32), eval_fraction=0.0)
  return common.load_data(kind, data, tokenizer, 0)[0]


def _batches(records, pad_id, step=0, **packed_options):
  """The same records as a padded and as a packed batch (with a zero-weight last example)."""
  out = []
  for layout in ("padded", "packed"):
    stream = BatchStream(records, BATCH, 32, pad_id, seed=1, buckets=(16, 32), layout=layout,
                         **packed_options)
    batch = stream.batch(step)
    batch["weight"][-1] = 0.0
    out.append(batch)
  padded, packed = out
  np.testing.assert_array_equal(padded["index"], packed["index"])
  assert "sequence_ids" in packed and "sequence_ids" not in padded
  return padded, packed


def _loss_of(per_example, *args, jit=True):
  def loss(params, batch):
    values, metrics = per_example(params, batch, *args)
    w = batch["weight"]
    return jnp.sum(values * w) / jnp.sum(w), (values, metrics)
  step = jax.value_and_grad(loss, has_aux=True)
  return jax.jit(step) if jit else step


def _assert_same(got, want, grad_atol=2e-6):
  (loss, (values, metrics)), grads = got
  (want_loss, (want_values, want_metrics)), want_grads = want
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(values, want_values, rtol=1e-5, atol=1e-6)
  assert metrics.keys() == want_metrics.keys()
  for key in want_metrics:
    np.testing.assert_allclose(metrics[key], want_metrics[key], rtol=1e-5, atol=1e-5,
                               err_msg=key)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=grad_atol),
               grads, want_grads)
  assert any(np.abs(g).max() > 1e-3 for g in jax.tree.leaves(want_grads))  # a real gradient


@pytest.mark.slow
def test_pair_losses_metrics_and_gradients_equal_the_padded_layout(setup):
  """DPO (sequence sums) and IPO with an NLL term (token means), in one program per layout."""
  tokenizer, model, params, ref = setup
  padded, packed = _batches(_records(tokenizer, "pair"), tokenizer.pad_token_id)
  assert packed["input_ids"].size < padded["input_ids"].size
  steps = []
  for loss in (preference.PreferenceLossConfig(name="dpo"),
               preference.PreferenceLossConfig(name="ipo", nll_weight=0.5)):
    assert loss.reduction() == ("sum" if loss.name == "dpo" else "mean")
    per_example = preference.make_pair_losses(model, loss, chunk_size=64)
    steps.append(_loss_of(lambda p, b, per_example=per_example, how=loss.reduction(): (
        per_example(p, b, preference._sequence_logps(model, ref, b, how, 64)[0])), jit=False))
  both = jax.jit(lambda p, b: [step(p, b) for step in steps])
  for got, want in zip(both(params, packed), both(params, padded)):
    _assert_same(got, want)


def test_precomputed_reference_is_the_same_cache_in_both_layouts(setup):
  tokenizer, model, params, ref = setup
  records = _records(tokenizer, "pair", num_rows=12)  # 12 = one full and one filled batch
  caches = [preference.precompute_reference(
      model, ref, BatchStream(records, BATCH, 32, tokenizer.pad_token_id, shuffle=False,
                              buckets=(32,), layout=layout), "sum", 64, lambda b: b)
            for layout in ("padded", "packed")]
  np.testing.assert_allclose(caches[1], caches[0], rtol=1e-5, atol=1e-5)
  assert np.all(caches[0] < 0)


def test_kto_losses_metrics_and_gradients_equal_the_padded_layout(setup):
  tokenizer, model, params, ref = setup
  padded, packed = _batches(_records(tokenizer, "unpaired"), tokenizer.pad_token_id)
  assert "kl_input_ids" in padded and "kl_input_ids" not in packed
  per_example = preference.make_kto_losses(model, preference.KTOLossConfig(), chunk_size=64)
  step = _loss_of(per_example, ref)
  _assert_same(step(params, packed), step(params, padded))


def test_reward_model_scores_and_gradients_equal_the_padded_layout(setup):
  tokenizer, model, params, _ = setup
  rm, rm_params = models.RewardModel.from_causal_lm(model, params, jax.random.key(3),
                                                     num_labels=2)
  records = _records(tokenizer, "pair")
  padded, packed = _batches(records, tokenizer.pad_token_id)
  packed["objective"] = padded["objective"] = np.arange(BATCH, dtype=np.int32) % 2
  per_example = reward.make_losses(rm, reward.RewardLoss(num_heads=2, use_margin=True,
                                                         center_coef=0.01))
  step = _loss_of(per_example)
  # The metrics hold each pair's chosen and rejected scores, read from alternating heads.
  _assert_same(step(rm_params, packed), step(rm_params, padded))


@pytest.mark.slow
def test_packed_dpo_on_eight_devices_has_the_padded_loss_curve(model_spec, data_spec, small_run,
                                                              tmp_path):
  """A short DPO run: padded rows on one device, and packed rows split over the 8-device data
  mesh (row counts in multiples of 8), give the same loss curve."""
  curves = {}
  for layout, mesh in (("padded", MeshConfig(1, 1, 1)), ("packed", MeshConfig(8, 1, 1))):
    config = preference.PreferenceConfig(
        model=model_spec, data=dataclasses.replace(data_spec("pair", num_rows=64),
                                                   eval_fraction=0.0, layout=layout),
        optimizer=OptimizerConfig(lr=1e-3, warmup_steps=0),
        run=small_run(steps=3, batch_size=8, mesh=mesh, output_dir=str(tmp_path / layout)))
    task = preference.build_task(config)
    state, curve = task.init_state(), []
    for i in range(3):
      batch = task.put(task.batch(i))
      state, metrics = task.train_step(state, batch)
      curve.append(jax.device_get(metrics))
    curves[layout] = curve
  rows, length = batch["input_ids"].shape
  assert "sequence_ids" in batch and rows % 8 == 0
  assert batch["input_ids"].sharding.shard_shape((rows, length)) == (rows // 8, length)
  assert batch["weight"].sharding.shard_shape((8,)) == (1,)
  for got, want in zip(curves["packed"], curves["padded"]):
    for key in ("loss", "rewards/margin", "logps/chosen", "nll", "grad_norm"):
      np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-5, err_msg=key)
  assert curves["padded"][-1]["loss"] < curves["padded"][0]["loss"]


def test_packed_is_the_default_layout_and_the_keys_parse():
  from rlhf_jax.config import ConfigError, apply_overrides
  assert common.DataSpec().layout == "packed"
  for config in (preference.PreferenceConfig(), preference.KTOConfig(), reward.RewardConfig()):
    assert config.data.layout == "packed"
  config = apply_overrides(preference.PreferenceConfig(), ["data.layout=padded",
                                                            "data.row_length=256"])
  assert (config.data.layout, config.data.row_length) == ("padded", 256)
  with pytest.raises(ConfigError,
                     match="data.layout: expected one of 'packed', 'padded', got 'pad'"):
    apply_overrides(preference.PreferenceConfig(), ["data.layout=pad"])
  with pytest.raises(ConfigError, match="data.row_length"):
    apply_overrides(preference.PreferenceConfig(), ["data.row_length=0"])


def test_ranked_reward_losses_and_gradients_equal_the_padded_layout(setup):
  tokenizer, model, params, _ = setup
  rm, rm_params = models.RewardModel.from_causal_lm(model, params, jax.random.key(4))
  # Every other row with 2 of its 4 completions: masked slots, empty in the packed items.
  records = [dataclasses.replace(r, completions=r.completions[:2], ranks=r.ranks[:2])
             if i % 2 else r for i, r in enumerate(_records(tokenizer, "ranked"))]
  padded, packed = _batches(records, tokenizer.pad_token_id)
  np.testing.assert_array_equal(packed["ranks"], padded["ranks"])
  np.testing.assert_array_equal(packed["rank_mask"], padded["rank_mask"])
  step = _loss_of(reward.make_losses(rm, reward.RewardLoss(objective="ranking",
                                                           center_coef=0.01)))
  _assert_same(step(rm_params, packed), step(rm_params, padded))
