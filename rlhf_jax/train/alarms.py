"""Divergence alarms: runs that have stopped learning, or are blowing up, without a NaN yet.

The loop's NaN guard stops a run at the first non-finite metric. These catch what it cannot, on
the host after each step, from the step's `grad_norm` and `loss` metrics (when it has them):

  dead:      grad_norm exactly 0 for `steps` consecutive steps (an update so large that the
             network saturated: nothing flows back any more)
  flat:      loss equal to its first value (to 1e-6 relative) for `steps` consecutive steps
  explosion: grad_norm over `growth` times its first (nonzero) value

Each alarm fires once per run, naming the metric and the step; the loop logs it as a warning,
or, with `run.stop_on_alarm`, stops with a TrainingDivergedError. After a resume the first
values are the resumed run's.
"""

from __future__ import annotations

import math

__all__ = ["Alarms"]


class Alarms:
  """Host-side state of the alarms; `check(step, metrics)` returns the messages that fire."""

  def __init__(self, steps: int, growth: float):
    self.steps, self.growth = steps, growth
    self.first_loss = self.first_grad_norm = None
    self.zero_run = self.flat_run = 0
    self.fired: set[str] = set()

  def check(self, step: int, metrics: dict) -> list[str]:
    messages = []
    grad_norm = _float(metrics.get("grad_norm"))
    loss = _float(metrics.get("loss"))
    if grad_norm is not None and self.steps:
      self.zero_run = self.zero_run + 1 if grad_norm == 0.0 else 0
      if self.zero_run >= self.steps:
        messages += self._fire("dead", f"step {step}: grad_norm has been exactly 0 for "
                               f"{self.zero_run} consecutive steps (since step "
                               f"{step - self.zero_run + 1}): the model no longer learns (a "
                               "learning rate too high can saturate it)")
    if grad_norm is not None and self.growth:
      if self.first_grad_norm is None and grad_norm > 0:
        self.first_grad_norm = grad_norm
      elif self.first_grad_norm is not None and grad_norm > self.growth * self.first_grad_norm:
        messages += self._fire("explosion", f"step {step}: grad_norm={grad_norm:.4g} is over "
                               f"{self.growth:g}x its first value {self.first_grad_norm:.4g} "
                               "(the run is blowing up; lower the learning rate)")
    if loss is not None and self.steps:
      if self.first_loss is None:
        self.first_loss = loss
      else:
        still = abs(loss - self.first_loss) <= 1e-6 * abs(self.first_loss)
        self.flat_run = self.flat_run + 1 if still else 0
        if self.flat_run >= self.steps:
          messages += self._fire("flat", f"step {step}: loss has stayed at its first value "
                                 f"{self.first_loss:.6g} for {self.flat_run} steps (since step "
                                 f"{step - self.flat_run + 1}): the model no longer learns")
    return messages

  def _fire(self, name: str, message: str) -> list[str]:
    if name in self.fired:
      return []
    self.fired.add(name)
    return [message]


def _float(value) -> float | None:
  """A finite scalar metric as a float; None when absent, not a scalar, or not finite (the NaN
  guard's business)."""
  try:
    value = float(value)
  except (TypeError, ValueError):
    return None
  return value if math.isfinite(value) else None
