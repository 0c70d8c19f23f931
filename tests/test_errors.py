"""One error surface: every error a user can fix is a `UserError` (and still what it was)."""

import pytest

from rlhf_jax import errors
from rlhf_jax.config import ConfigError
from rlhf_jax.data import DataError
from rlhf_jax.models import CheckpointError, UnsupportedModelError
from rlhf_jax.parallel import LaunchError
from rlhf_jax.rewards.loading import RewardError
from rlhf_jax.train.export import ExportError
from rlhf_jax.train.loop import TrainingDivergedError


@pytest.mark.parametrize("cls", [ConfigError, DataError, CheckpointError, UnsupportedModelError,
                                 LaunchError, RewardError, ExportError, TrainingDivergedError])
def test_every_user_error_shares_the_base_and_stays_a_value_error(cls):
  assert issubclass(cls, errors.UserError) and issubclass(cls, ValueError)


def test_training_diverged_is_still_a_runtime_error():
  assert issubclass(TrainingDivergedError, RuntimeError)


def test_where_and_what_make_the_message():
  err = ConfigError("expected a number > 0, got -1", where="optimizer.lr")
  assert str(err) == "optimizer.lr: expected a number > 0, got -1"
  assert (err.where, err.what) == ("optimizer.lr", "expected a number > 0, got -1")
  assert str(ConfigError("unknown config key 'x'")) == "unknown config key 'x'"  # as before


def test_data_errors_say_line_or_row_never_both():
  by_row = DataError("rows.parquet", 4, "chosen", "missing")
  assert str(by_row) == "rows.parquet, row 4, field 'chosen': missing"
  by_line = by_row.at_line(9)
  assert str(by_line) == "rows.parquet, line 9, field 'chosen': missing"
  assert (by_line.row, by_line.line, by_line.field, by_line.what) == (4, 9, "chosen", "missing")


def test_one_line_joins_an_embedded_multi_line_message():
  assert errors.one_line(ValueError("a: b\n  c\n\nd")) == "a: b c d"
