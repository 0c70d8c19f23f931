"""The one base class of the errors a user can fix: a config, a file, a row, a launch, a run.

Every layer raises a subclass of `UserError` (ConfigError, DataError, RewardError, ExportError,
UnsupportedModelError, CheckpointError, LaunchError, TrainingDivergedError, ...), so the CLI can
catch them all and print one line, `error: <where>: <what was expected>, got <what was found>`,
and exit 2 without a traceback (`--debug` shows it). Any other exception is a bug and keeps its
traceback. This module imports nothing, so the lowest layers can use it.
"""

from __future__ import annotations

__all__ = ["UserError", "CheckpointError", "one_line"]


class UserError(ValueError):
  """An error the user can fix. `where` names the place (a file and line, a row and field, a
  config key, a directory); `what` says what was expected and what was found there.

  `str(error)` is `"<where>: <what>"` (just `what` when there is no `where`). A ValueError, so
  code that caught the ValueErrors these errors used to be keeps working.
  """

  def __init__(self, what: str, *, where: str | None = None):
    self.what, self.where = str(what), where
    super().__init__(f"{where}: {self.what}" if where else self.what)


class CheckpointError(UserError):
  """A checkpoint that cannot be loaded: a Hugging Face directory that does not match its config
  (missing, unexpected or mis-shaped tensors), or a run directory whose training checkpoints are
  all damaged."""


def one_line(error: BaseException) -> str:
  """The error's message on one line (an embedded multi-line message is joined with spaces)."""
  return " ".join(part.strip() for part in str(error).splitlines() if part.strip())
