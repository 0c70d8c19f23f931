"""Typed configs: overrides parsed by field type; unknown keys suggest the nearest valid one."""

import dataclasses
from typing import Literal

import pytest

from rlhf_jax import config as config_lib
from rlhf_jax.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Inner:
  lr: float = 1e-3
  steps: int = 10
  name: str = "adamw"
  clip: float | None = 1.0
  flag: bool = False
  buckets: tuple[int, ...] = ()
  mode: Literal["sum", "mean"] = "sum"
  extra: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Outer:
  trainer: str = "sft"
  optimizer: Inner = Inner()

  def validate(self):
    if self.optimizer.steps < 0:
      raise ValueError("optimizer.steps must be >= 0")


def test_overrides_are_parsed_by_type():
  config = config_lib.apply_overrides(Outer(), [
      "optimizer.lr=5e-5", "optimizer.steps=7", "optimizer.name=sgd", "optimizer.clip=none",
      "optimizer.flag=true", "optimizer.buckets=(16,32)", "optimizer.mode=mean",
      'optimizer.extra={"gamma": 0.5}'])
  assert config.optimizer == Inner(lr=5e-5, steps=7, name="sgd", clip=None, flag=True,
                                   buckets=(16, 32), mode="mean", extra={"gamma": 0.5})
  assert config_lib.apply_overrides(Outer(), ["optimizer.buckets=8,16"]).optimizer.buckets == (8,
                                                                                               16)


@pytest.mark.parametrize("override, message", [
    ("optimizer.lrr=1", "unknown config key 'optimizer.lrr'; did you mean 'optimizer.lr'"),
    ("optimzer.lr=1", "did you mean 'optimizer.lr'"),
    ("optimizer.learning_rate=1", "did you mean 'optimizer.lr'"),  # an abbreviation, by initials
    ("optimizer.step=1", "did you mean 'optimizer.steps'"),
    ("optimizer=1", "is a section"),
    ("optimizer.steps=1.5", "expected an integer"),
    ("optimizer.flag=maybe", "expected a boolean"),
    ("optimizer.mode=max", "optimizer.mode: expected one of 'sum', 'mean', got 'max'"),
    ("optimizer.lr", "not of the form"),
    ("optimizer.steps=-1", "must be >= 0"),  # the config's own validate()
])
def test_bad_overrides_are_errors(override, message):
  with pytest.raises(ConfigError, match=message):
    config_lib.apply_overrides(Outer(), [override])


@dataclasses.dataclass(frozen=True)
class Choices:
  remat: Literal["none", "full"] | None = None
  head: Literal["shared", "separate"] = "shared"


@dataclasses.dataclass(frozen=True)
class WithChoices:
  trainer: str = "sft"
  model: Choices = Choices()


def test_an_optional_choice_takes_its_value_none_and_None():
  assert config_lib.apply_overrides(WithChoices(), ["model.remat=none"]).model.remat == "none"
  assert config_lib.apply_overrides(WithChoices(), ["model.remat=null"]).model.remat is None
  with pytest.raises(ConfigError) as error:
    config_lib.apply_overrides(WithChoices(), ["model.remat=fulll"])
  assert str(error.value) == "model.remat: expected one of 'none', 'full', None, got 'fulll'"


def test_a_choice_built_in_an_experiment_file_is_checked_with_the_whole_key():
  """A config built in Python holds any string; apply_overrides (which the CLI always calls)
  names the first choice field holding no allowed value, with its dotted key."""
  config = WithChoices(model=Choices(head="separated"))
  with pytest.raises(ConfigError) as error:
    config_lib.apply_overrides(config, [])
  assert str(error.value) == "model.head: expected one of 'shared', 'separate', got 'separated'"
  with pytest.raises(ConfigError) as error:
    config_lib.check_choices(Choices(remat="dots"), "model.")
  assert str(error.value) == "model.remat: expected one of 'none', 'full', None, got 'dots'"
  config_lib.check_choices(WithChoices())  # the defaults are allowed


@pytest.mark.parametrize("make, key, allowed", [
    ("rlhf_jax.train.ppo:PPOConfig", "loss.kl_estimator", "'k1', 'k2', 'k3'"),
    ("rlhf_jax.train.ppo:PPOConfig", "loss.value_head", "'shared', 'separate'"),
    ("rlhf_jax.train.grpo:GRPOConfig", "loss.advantage",
     "'group', 'group_no_std', 'leave_one_out', None"),
    ("rlhf_jax.train.grpo:GRPOConfig", "loss.kl_in", "'loss', 'reward'"),
    ("rlhf_jax.train.preference:PreferenceConfig", "loss.reference", "'model', 'precompute'"),
    ("rlhf_jax.train.preference:PreferenceConfig", "loss.logp_reduction", "'sum', 'mean', None"),
    ("rlhf_jax.train.preference:PreferenceConfig", "model.remat_policy",
     "'none', 'full', 'dots', 'dots_no_batch', None"),
    ("rlhf_jax.train.preference:PreferenceConfig", "model.attention_impl",
     "'xla', 'cudnn', None"),
    ("rlhf_jax.train.preference:PreferenceConfig", "model.dtype", "'float32', 'bfloat16'"),
    ("rlhf_jax.train.preference:PreferenceConfig", "model.lora.quantize",
     "'none', 'int8', 'int4', 'nf4'"),
    ("rlhf_jax.train.preference:PreferenceConfig", "data.on_overflow",
     "'truncate', 'skip', 'error'"),
    ("rlhf_jax.train.preference:PreferenceConfig", "data.duplicates", "'keep', 'drop'"),
    ("rlhf_jax.train.sft:SFTConfig", "optimizer.schedule", "'constant', 'cosine', 'linear'"),
    ("rlhf_jax.train.reward:RewardConfig", "loss.objective", "'bradley_terry', 'ranking'"),
    ("rlhf_jax.train.iterative:IterativeDPOConfig", "labels.kind", "'reward', 'judge'"),
])
def test_the_trainers_choice_fields_name_the_key_and_the_choices(make, key, allowed):
  import importlib
  module, _, name = make.partition(":")
  cls = getattr(importlib.import_module(module), name)
  with pytest.raises(ConfigError) as error:
    config_lib.apply_overrides(cls(), [f"{key}=bogus"])
  assert str(error.value) == f"{key}: expected one of {allowed}, got 'bogus'"
  # The same config built in Python: its own validate() names the key too.
  section, _, leaf = key.rpartition(".")
  parts = section.split(".")

  def replaced(node, path):
    if not path:
      return dataclasses.replace(node, **{leaf: "bogus"})
    return dataclasses.replace(node, **{path[0]: replaced(getattr(node, path[0]), path[1:])})

  with pytest.raises(ConfigError) as error:
    replaced(cls(), parts).validate()
  assert str(error.value) == f"{key}: expected one of {allowed}, got 'bogus'"


def test_round_trip_through_a_dict():
  config = config_lib.apply_overrides(Outer(), ["optimizer.buckets=(8,)", "optimizer.lr=0.1"])
  assert config_lib.from_dict(Outer, config_lib.to_dict(config)) == config
  assert "optimizer.buckets" in config_lib.config_keys(config)


def test_load_experiment_errors(tmp_path):
  with pytest.raises(ConfigError, match="does not exist"):
    config_lib.load_experiment(tmp_path / "nope.py")
  bad = tmp_path / "bad.py"
  bad.write_text("X = 1\n")
  with pytest.raises(ConfigError, match="must define get_config"):
    config_lib.load_experiment(bad)
