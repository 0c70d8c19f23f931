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
    ("optimizer.mode=max", "not one of"),
    ("optimizer.lr", "not of the form"),
    ("optimizer.steps=-1", "must be >= 0"),  # the config's own validate()
])
def test_bad_overrides_are_errors(override, message):
  with pytest.raises(ConfigError, match=message):
    config_lib.apply_overrides(Outer(), [override])


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
