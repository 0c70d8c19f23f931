"""Settings are range-checked when the config is built (before any file is read), each error
naming its key: `<key>: expected <what>, got <value>`."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import pytest

from rlhf_jax import config as config_lib
from rlhf_jax import parallel
from rlhf_jax.config import ConfigError
from rlhf_jax.train import common

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[2] / "experiments"


def _error(experiment, *overrides) -> str:
  config = config_lib.load_experiment(EXPERIMENTS / experiment)
  with pytest.raises(ConfigError) as info:
    config_lib.apply_overrides(config, overrides)
  return str(info.value)


@pytest.mark.parametrize("experiment, override, message", [
    ("sft.py", "run.steps=0", "run.steps: expected an integer >= 1, got 0"),
    ("dpo.py", "run.batch_size=0", "run.batch_size: expected an integer >= 1, got 0"),
    ("dpo.py", "run.checkpoint_every=-1",
     "run.checkpoint_every: expected an integer >= 0 (0: off), got -1"),
    ("dpo.py", "run.alarm_grad_growth=0.5",
     "run.alarm_grad_growth: expected 0 (off) or a factor > 1, got 0.5"),
    ("sft.py", "optimizer.lr=0", "optimizer.lr: expected a learning rate > 0, got 0.0"),
    ("reward.py", "optimizer.lr=-1e-5", "optimizer.lr: expected a learning rate > 0, got -1e-05"),
    ("dpo.py", "optimizer.b2=1", "optimizer.b2: expected a decay rate in [0, 1), got 1.0"),
    ("dpo.py", "loss.beta=0", "loss.beta: expected a value > 0, got 0.0"),
    ("kto.py", "loss.beta=-0.1", "loss.beta: expected a value > 0, got -0.1"),
    ("dpo.py", "data.eval_fraction=1",
     "data.eval_fraction: expected a fraction in [0, 1) (0: no held-out evaluation), got 1.0"),
    ("ppo.py", "loss.clip_eps=0", "loss.clip_eps: expected a clip range > 0, got 0.0"),
    ("ppo.py", "loss.gamma=1.5", "loss.gamma: expected a value in [0, 1], got 1.5"),
    ("grpo.py", "loss.clip_eps=-0.2", "loss.clip_eps: expected a clip range > 0, got -0.2"),
    ("rloo.py", "loss.clip_eps_high=0",
     "loss.clip_eps_high: expected a clip range > 0 (or None: loss.clip_eps), got 0.0"),
    ("iterative_dpo.py", "optimizer.lr=0", "optimizer.lr: expected a learning rate > 0, got 0.0"),
])
def test_each_range_error_names_its_key(experiment, override, message):
  assert _error(experiment, override) == message


def test_rounds_trainers_take_their_steps_from_the_rounds():
  # run.steps=0 is the rejection-sampling and iterative-DPO default: not an error there.
  for experiment in ("rejection_sampling.py", "iterative_dpo.py"):
    config = config_lib.apply_overrides(config_lib.load_experiment(EXPERIMENTS / experiment), [])
    assert config.run.steps == 0


@pytest.mark.parametrize("buckets", ["(16,64)", "(32,16)", "(16,)"])
def test_buckets_must_end_at_max_length(buckets):
  message = _error("sft.py", f"data.buckets={buckets}")
  assert message.startswith("data.buckets: expected increasing lengths ending at "
                            "data.max_length=32 (")
  assert message.endswith(f"got {tuple(int(b) for b in buckets.strip('()').split(',') if b)}")
  assert config_lib.apply_overrides(config_lib.load_experiment(EXPERIMENTS / "sft.py"), [
      "data.buckets=(16,32)"]).data.buckets == (16, 32)


def test_data_settings_are_checked_before_anything_is_read(tmp_path):
  spec = common.DataSpec(train=str(tmp_path / "absent.jsonl"), max_length=64, buckets=(32,))
  with pytest.raises(ConfigError, match=r"^data\.buckets: expected increasing lengths ending at "
                                        r"data\.max_length=64"):
    common.load_data("sft", spec, tokenizer=None, seed=0)  # not a missing-file error


def test_the_cli_refuses_buckets_past_max_length_in_one_line():
  result = subprocess.run(
      [sys.executable, "-m", "rlhf_jax", "run", str(EXPERIMENTS / "sft.py"),
       "--set", "data.max_length=128", "--print-config"], capture_output=True, text=True,
      timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines() == [
      "error: data.buckets: expected increasing lengths ending at data.max_length=128 (rows are "
      "cut to max_length, and each batch is padded to the first bucket that holds its longest "
      "row), got (32,)"]


@pytest.mark.parametrize("experiment", ["grpo.py", "rloo.py"])
def test_group_advantages_need_a_group_of_two(experiment):
  trainer = experiment.removesuffix(".py")
  assert _error(experiment, "generation.num_samples=1") == (
      f"generation.num_samples: expected an integer >= 2 (the group size: {trainer}'s advantage "
      "compares each sample with the others drawn for its prompt), got 1")


@pytest.mark.parametrize("mesh, shards", [(parallel.MeshConfig(), "8 x 1 = 8"),
                                          (parallel.MeshConfig(-1, 2, 2), "2 x 2 = 4")])
def test_the_batch_must_split_over_the_mesh_batch_axes(mesh, shards):
  from rlhf_jax.train import loop
  run = loop.RunConfig(batch_size=6, mesh=mesh)
  with pytest.raises(ConfigError) as info:
    common.check_run(run, num_devices=8)
  assert str(info.value) == (
      f"run.batch_size: expected a multiple of the mesh's data x fsdp = {shards} (the batch is "
      f"split over them; run.mesh: data={mesh.data}, fsdp={mesh.fsdp}, tensor={mesh.tensor} on "
      "8 devices), got 6")
  common.check_run(dataclasses.replace(run, batch_size=16), num_devices=8)
  with pytest.raises(ConfigError, match=r"^rounds\.prompts_per_round: expected a multiple of "
                                        r"the mesh's data x fsdp = .* got 6$"):
    common.check_run(run, num_devices=8, batch_size=6, key="rounds.prompts_per_round")
  with pytest.raises(ConfigError, match=r"^run\.mesh: mesh data=16 x fsdp=1 x tensor=1 = 16 "):
    common.check_run(dataclasses.replace(run, mesh=parallel.MeshConfig(16, 1, 1)), num_devices=8)


def test_a_trainer_checks_the_batch_against_the_mesh_before_loading(tmp_path):
  from rlhf_jax.train import sft
  config = config_lib.apply_overrides(config_lib.load_experiment(EXPERIMENTS / "sft.py"), [
      "run.batch_size=12", f"model.path={tmp_path / 'absent'}", "run.mesh.data=-1"])
  with pytest.raises(ConfigError, match=r"^run\.batch_size: expected a multiple of the mesh's "
                                        r"data x fsdp = \d+ x 1"):
    sft.build_task(config)  # not a missing-model error: nothing was read


def _model_dir(path, vocab_size):
  from rlhf_jax.data import synthetic
  synthetic.build_tokenizer().save_pretrained(path)  # a tokenizer and a config, no weights
  (path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": vocab_size}))
  return str(path)


def test_a_tokenizer_larger_than_the_embedding_fails_before_the_weights_load(tmp_path):
  from rlhf_jax.data import synthetic
  from rlhf_jax.errors import CheckpointError
  size = len(synthetic.build_tokenizer())
  small = _model_dir(tmp_path / "small", size - 1)
  with pytest.raises(CheckpointError) as info:
    common.load_tokenizer(common.ModelSpec(path=small))
  assert str(info.value) == (
      f"{small}/config.json: expected a vocab_size above every token id of the tokenizer at "
      f"{small} (its largest is {size - 1}: {size} tokens), got vocab_size={size - 1} (set "
      "model.tokenizer to the model's own tokenizer, or resize the model's embedding)")
  # The tokenizer of another model, against a reference model's embedding, is checked the same.
  fits = _model_dir(tmp_path / "fits", size)
  with pytest.raises(CheckpointError, match="got vocab_size="):
    common.load_tokenizer(common.ModelSpec(path=fits, reference_path=small))
  padded = _model_dir(tmp_path / "padded", 128)  # a larger embedding is fine
  assert len(common.load_tokenizer(common.ModelSpec(path=fits, tokenizer=padded))) == size


@pytest.mark.parametrize("experiment, trainer, overrides", [
    ("sft.py", "sft", ()), ("dpo.py", "preference", ()), ("reward.py", "reward", ()),
    ("grpo.py", "grpo", ("reward.functions=rlhf_jax.rewards:math_answer",))])
def test_a_bad_data_file_fails_before_the_weights_load(tmp_path, experiment, trainer, overrides):
  import importlib

  from rlhf_jax.data import DataError, synthetic
  weightless = _model_dir(tmp_path / "model", len(synthetic.build_tokenizer()))
  (tmp_path / "data.jsonl").write_text("")
  config = config_lib.apply_overrides(config_lib.load_experiment(EXPERIMENTS / experiment), [
      f"model.path={weightless}", f"data.train={tmp_path / 'data.jsonl'}", *overrides])
  module = importlib.import_module(f"rlhf_jax.train.{trainer}")
  with pytest.raises(DataError, match=r"the data file is empty \(0 bytes\)$"):
    module.build_task(config)  # the model directory holds no weights: they were never read


@pytest.mark.parametrize("experiment, trainer", [
    ("ppo.py", "ppo"), ("grpo.py", "grpo"), ("rloo.py", "grpo"),
    ("rejection_sampling.py", "best_of_n"), ("iterative_dpo.py", "iterative")])
def test_a_reward_model_that_cannot_embed_the_policys_tokens_fails_before_the_weights_load(
    tmp_path, experiment, trainer):
  import importlib

  from rlhf_jax.data import synthetic
  from rlhf_jax.errors import CheckpointError
  size = len(synthetic.build_tokenizer())
  policy = _model_dir(tmp_path / "policy", size)  # no weights: loading them would fail
  small = _model_dir(tmp_path / "small_rm", size - 1)
  padded = _model_dir(tmp_path / "padded_rm", 128)
  module = importlib.import_module(f"rlhf_jax.train.{trainer}")

  def build(reward_path):
    config = config_lib.apply_overrides(config_lib.load_experiment(EXPERIMENTS / experiment), [
        f"model.path={policy}", "reward.kind=model", f"reward.path={reward_path}"])
    return module.build_task(config)

  with pytest.raises(CheckpointError) as info:
    build(small)
  assert str(info.value) == (
      f"{small}/config.json (reward.path): expected a vocab_size above every token id of the "
      f"policy's tokenizer at {policy} (its largest is {size - 1}: {size} tokens), got "
      f"vocab_size={size - 1} (the reward model scores the policy's token ids: set reward.path "
      "to a reward model trained with the policy's tokenizer)")
  # A larger embedding passes the check: the next error is the policy's missing weights.
  with pytest.raises(CheckpointError, match=r"^no model\.safetensors or model\.safetensors"
                                            r"\.index\.json in '.*policy'"):
    build(padded)


def test_a_hub_models_vocabulary_is_checked_from_its_config_alone(tmp_path, monkeypatch):
  import huggingface_hub

  from rlhf_jax.data import synthetic
  from rlhf_jax.errors import CheckpointError
  config_file = pathlib.Path(_model_dir(tmp_path / "cached", 8)) / "config.json"
  fetched = []
  monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                      lambda repo, name: fetched.append((repo, name)) or str(config_file))
  with pytest.raises(CheckpointError, match=r"^org/model/config\.json: .* got vocab_size=8 "):
    common.check_vocabulary(synthetic.build_tokenizer(), "org/tokenizer", "org/model")
  assert fetched == [("org/model", "config.json")]  # the config only, never the weights

  def offline(repo, name):
    raise OSError("offline")
  monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
  common.check_vocabulary(synthetic.build_tokenizer(), "org/tokenizer", "org/model")  # no check
