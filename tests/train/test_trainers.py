"""Each trainer lowers its loss on the embedded data and moves the policy the right way."""

import json

import jax
import numpy as np
import pytest

from rlhf_jax import models
from rlhf_jax.train import loop, preference, reward, sft
from rlhf_jax.train.state import OptimizerConfig

pytestmark = pytest.mark.slow

ADAM = OptimizerConfig(lr=3e-3, warmup_steps=0, schedule="constant")


def _train(task, run):
  before = loop.evaluate(task, task.init_state())
  out = loop.run_loop(task, run)
  return before, out


def test_sft_lowers_held_out_nll_and_exports(model_spec, data_spec, small_run, tmp_path):
  config = sft.SFTConfig(model=model_spec, data=data_spec("sft"), optimizer=ADAM,
                         run=small_run(steps=40))
  before, out = _train(sft.build_task(config), config.run)
  assert out["eval"]["nll"] < before["nll"] - 1.0, (before, out["eval"])
  # The export is a Hugging Face checkpoint with the trained weights.
  model, params = models.from_pretrained(str(tmp_path / "run" / "hf"))
  trained = jax.device_get(out["state"].params)
  np.testing.assert_array_equal(params["embed"]["embedding"], trained["embed"]["embedding"])
  # transformers' generate stops where our sampler does: at EOS (the template's end of turn).
  generation = json.loads((tmp_path / "run" / "hf" / "generation_config.json").read_text())
  assert generation["eos_token_id"] == [3] and generation["pad_token_id"] is not None


def test_reward_model_beats_chance_on_held_out_pairs(model_spec, data_spec, small_run):
  config = reward.RewardConfig(model=model_spec, data=data_spec("pair", num_rows=1024),
                               optimizer=ADAM, run=small_run(steps=60))
  before, out = _train(reward.build_task(config), config.run)
  assert out["eval"]["accuracy"] > 0.65, out["eval"]
  assert out["eval"]["loss"] < before["loss"]


def test_ranking_reward_model(model_spec, data_spec, small_run):
  config = reward.RewardConfig(model=model_spec,
                               data=data_spec("ranked", num_rows=256, layout="padded"),
                               loss=reward.RewardLoss(objective="ranking"), optimizer=ADAM,
                               run=small_run(steps=40, batch_size=8))
  before, out = _train(reward.build_task(config), config.run)
  assert out["eval"]["loss"] < before["loss"]
  assert out["eval"]["accuracy"] > 0.6, out["eval"]


@pytest.mark.parametrize("name, hparams, weight, nll_weight", [
    ("dpo", {}, 1.0, 0.0),
    ("ipo", {}, 1.0, 0.0),
    ("simpo", {"gamma": 0.5}, 1.0, 0.0),
    ("orpo", {}, 0.1, 1.0),
])
def test_preference_losses_raise_held_out_margin_and_accuracy(model_spec, data_spec, small_run, name,
                                                              hparams, weight, nll_weight):
  beta = {"simpo": 2.0, "orpo": 0.1}.get(name, 0.1)
  loss = preference.PreferenceLossConfig(name=name, beta=beta, hparams=hparams, weight=weight,
                                         nll_weight=nll_weight)
  # DPO learns on the default packed rows; the other losses on padded rows, one compiled shape
  # instead of one per packing budget (tests/train/test_packed_preference.py pins the two
  # layouts' losses, metrics and gradients equal).
  layout = "packed" if name == "dpo" else "padded"
  config = preference.PreferenceConfig(model=model_spec,
                                       data=data_spec("pair", num_rows=1024, layout=layout),
                                       loss=loss, optimizer=ADAM, run=small_run(steps=40))
  before, out = _train(preference.build_task(config), config.run)
  after = out["eval"]
  assert after["loss"] < before["loss"], (before, after)
  # The policy's own log-prob margin (sums for DPO, token means for IPO/SimPO/ORPO) grows;
  # implicit rewards scale it by β, which is 0.1 for ORPO, so compare in log-prob units.
  margin = lambda m: m["logps/chosen"] - m["logps/rejected"]
  assert margin(after) > margin(before) + 0.05, (before, after)
  assert after["rewards/margin"] > before["rewards/margin"]
  assert after["rewards/accuracy"] > 0.6, after


def test_kto_separates_desirable_from_undesirable(model_spec, data_spec, small_run):
  config = preference.KTOConfig(model=model_spec, data=data_spec("unpaired", num_rows=1024),
                                optimizer=ADAM, run=small_run(steps=40))
  task = preference.build_kto_task(config)
  before, out = _train(task, config.run)
  assert out["eval"]["loss"] < before["loss"]
  train = out["train"]
  assert train["rewards/desirable"] > train["rewards/undesirable"], train
  assert train["kl_ref"] >= 0


def test_precomputed_reference_matches_the_frozen_model_and_holds_no_reference(
    model_spec, data_spec, small_run, tmp_path):
  results = {}
  for mode in ("model", "precompute"):
    config = preference.PreferenceConfig(
        model=model_spec, data=data_spec("pair", layout="padded"), optimizer=ADAM,
        loss=preference.PreferenceLossConfig(reference=mode),
        run=small_run(steps=5, output_dir=str(tmp_path / mode)))
    task = preference.build_task(config)
    assert task.holds_reference == (mode == "model")
    results[mode] = loop.run_loop(task, config.run)["eval"]
  for key, value in results["model"].items():
    np.testing.assert_allclose(results["precompute"][key], value, rtol=1e-5, atol=1e-6)


def test_reference_free_losses_load_no_reference(model_spec, data_spec, small_run):
  config = preference.PreferenceConfig(
      model=model_spec, data=data_spec("pair"),
      loss=preference.PreferenceLossConfig(name="simpo", beta=2.0), run=small_run(steps=1))
  assert preference.build_task(config).holds_reference is False


def test_packed_sft_loss_equals_the_unpacked_loss(model_spec, data_spec):
  from rlhf_jax.data import BatchStream
  from rlhf_jax.data.batching import collate_packed, pack_sft
  from rlhf_jax.train import common

  tokenizer = common.load_tokenizer(model_spec)
  model, params = common.load_policy(model_spec)
  records, _, _ = common.load_data("sft", data_spec("sft", num_rows=24), tokenizer, 0)
  packed = pack_sft(records, 64)
  members = sum((int(row.segment_ids.max()) for row in packed), 0)
  assert members == len(records) and len(packed) < len(records)
  loss_fn = sft.make_loss_fn(model, sft.SFTLoss())
  packed_batch = {**collate_packed(packed, 64), "weight": np.ones(len(packed), np.float32)}
  unpacked = BatchStream(records, len(records), 32, shuffle=False).batch(0)
  packed_loss, packed_aux = loss_fn(params, packed_batch)
  plain_loss, plain_aux = loss_fn(params, unpacked)
  assert packed_aux["completion_tokens"] == plain_aux["completion_tokens"]
  np.testing.assert_allclose(packed_loss, plain_loss, rtol=1e-5)
