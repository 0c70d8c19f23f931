"""Divergence alarms: runs that have stopped learning, or are blowing up, without a NaN yet.

The loop's NaN guard stops a run at the first non-finite metric. These catch what it cannot, on
the host after each step, from the step's `grad_norm` and `loss` metrics (when it has them):

  dead:      grad_norm exactly 0 for `steps` consecutive steps (an update so large that the
             network saturated: nothing flows back any more)
  flat:      loss equal to its first value (to 1e-6 relative) for `steps` consecutive steps
  explosion: grad_norm over `growth` times its first (nonzero) value

and, for the RL trainers (their `entropy`, `kl` and `response_length` metrics, and the evaluation's
`gold_reward` / `proxy_reward`):

  entropy collapse: the policy's entropy under `entropy_ratio` times its first value
  KL runaway:       KL to the reference over `kl_max` nats per response
  length drift:     the mean response length of the last `steps` steps off by more than
                    `length_drift` (a fraction) from that of the first `steps` (the length-bias
                    signature of a reward that pays for length)
  reward hacking:   at an evaluation, the gold reward more than `gold_drop` below its best so far
                    while the proxy reward is above its value at that best (over-optimisation of
                    the reward model; needs a gold reward, i.e. the synthetic task or a function)

Each alarm fires once per run, naming the metric and the step; the loop logs it as a warning,
or, with `run.stop_on_alarm`, stops with a TrainingDivergedError. After a resume the first
values are the resumed run's.
"""

from __future__ import annotations

import math

__all__ = ["Alarms"]


class Alarms:
  """Host-side state of the alarms; `check(step, metrics)` returns the messages that fire."""

  def __init__(self, steps: int, growth: float, *, entropy_ratio: float = 0.0,
               kl_max: float = 0.0, length_drift: float = 0.0, gold_drop: float = 0.0):
    self.steps, self.growth = steps, growth
    self.entropy_ratio, self.kl_max = entropy_ratio, kl_max
    self.length_drift, self.gold_drop = length_drift, gold_drop
    self.first_loss = self.first_grad_norm = self.first_entropy = None
    self.zero_run = self.flat_run = 0
    self.lengths: list[float] = []
    self.best_gold = self.proxy_at_best = None
    self.fired: set[str] = set()

  def check_rl(self, step: int, metrics: dict) -> list[str]:
    """The RL trainers' alarms on a train step's metrics."""
    messages = []
    entropy = _float(metrics.get("entropy"))
    if entropy is not None and self.entropy_ratio:
      if self.first_entropy is None:
        self.first_entropy = entropy
      elif entropy < self.entropy_ratio * self.first_entropy:
        messages += self._fire("entropy", f"step {step}: entropy={entropy:.4g} is under "
                               f"{self.entropy_ratio:g}x its first value {self.first_entropy:.4g}"
                               " (entropy collapse: the policy has turned near-deterministic)")
    kl = _float(metrics.get("kl"))
    if kl is not None and self.kl_max and kl > self.kl_max:
      messages += self._fire("kl", f"step {step}: kl={kl:.4g} nats is over run.alarm_kl="
                             f"{self.kl_max:g} (the policy is running away from the reference; "
                             "raise the KL coefficient or lower the learning rate)")
    length = _float(metrics.get("response_length"))
    if length is not None and self.length_drift and self.steps:
      self.lengths.append(length)
      n = self.steps
      if len(self.lengths) >= 2 * n:
        first = sum(self.lengths[:n]) / n
        last = sum(self.lengths[-n:]) / n
        if first > 0 and abs(last - first) > self.length_drift * first:
          messages += self._fire("length", f"step {step}: the mean response length of the last "
                                 f"{n} steps, {last:.4g}, is {last / first - 1:+.0%} off that of "
                                 f"the first {n}, {first:.4g} (length drift: the reward may pay "
                                 "for length)")
    return messages

  def check_eval(self, step: int, metrics: dict) -> list[str]:
    """Reward hacking, at an evaluation that measured both gold and proxy reward."""
    gold, proxy = _float(metrics.get("gold_reward")), _float(metrics.get("proxy_reward"))
    if gold is None or proxy is None or not self.gold_drop:
      return []
    if self.best_gold is None or gold > self.best_gold:
      self.best_gold, self.proxy_at_best = gold, proxy
      return []
    if gold < self.best_gold - self.gold_drop and proxy > self.proxy_at_best:
      return self._fire("hacking", f"step {step}: gold_reward={gold:.4g} has fallen below its "
                        f"best {self.best_gold:.4g} while proxy_reward={proxy:.4g} rose past "
                        f"{self.proxy_at_best:.4g} (reward hacking: the policy over-optimises "
                        "the reward model)")
    return []

  def check(self, step: int, metrics: dict) -> list[str]:
    messages = self.check_rl(step, metrics)
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

  def fired_metrics(self) -> dict:
    """{"alarm/<name>": 1.0} for every alarm fired so far (logged with the metrics)."""
    return {f"alarm/{name}": 1.0 for name in sorted(self.fired)}

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
