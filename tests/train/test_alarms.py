"""Divergence alarms: a gradient norm stuck at exactly 0, a loss that never leaves its first
value, a gradient norm blowing up; each warns naming the metric and step, or stops the run."""

import dataclasses
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import embedded
from rlhf_jax.parallel import MeshConfig
from rlhf_jax.train import loop
from rlhf_jax.train.alarms import Alarms

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[2] / "experiments"


def _feed(alarms, values):
  """Steps 1, 2, ... with these (grad_norm, loss); returns {step: messages} where any fired."""
  fired = {}
  for step, (grad_norm, loss) in enumerate(values, 1):
    messages = alarms.check(step, {"grad_norm": np.float32(grad_norm), "loss": np.float32(loss)})
    if messages:
      fired[step] = messages
  return fired


def test_a_gradient_norm_of_zero_for_n_steps_fires_once_naming_metric_and_step():
  values = [(1.0, 3.0), (0.0, 2.0), (0.0, 2.5), (1.0, 2.4)] + [(0.0, 2.0 + i) for i in range(4)]
  fired = _feed(Alarms(steps=3, growth=0), values + [(0.0, 9.0)] * 3)
  # Steps 2-3 are only two zeros (step 4 resets); steps 5-7 are three: it fires at step 7, once.
  assert list(fired) == [7]
  assert fired[7] == ["step 7: grad_norm has been exactly 0 for 3 consecutive steps (since step "
                      "5): the model no longer learns (a learning rate too high can saturate it)"]


def test_a_loss_that_never_leaves_its_first_value_fires():
  fired = _feed(Alarms(steps=3, growth=0), [(1.0, 2.5), (1.0, 2.5), (2.0, 2.5), (0.5, 2.5)])
  assert fired == {4: ["step 4: loss has stayed at its first value 2.5 for 3 steps (since step "
                       "2): the model no longer learns"]}
  assert _feed(Alarms(steps=3, growth=0), [(1.0, 2.5), (1.0, 2.5), (1.0, 2.4), (1.0, 2.5)]) == {}


def test_an_exploding_gradient_norm_fires():
  fired = _feed(Alarms(steps=0, growth=100), [(0.0, 1.0), (2.0, 1.0), (150.0, 1.0), (201.0, 1.0),
                                               (5000.0, 1.0)])
  # The first nonzero norm (2.0, step 2) is the reference; 201 > 100 x 2 at step 4.
  assert fired == {4: ["step 4: grad_norm=201 is over 100x its first value 2 (the run is blowing "
                       "up; lower the learning rate)"]}


def test_rl_alarms_entropy_collapse_kl_runaway_and_length_drift():
  alarms = Alarms(steps=2, growth=0, entropy_ratio=0.1, kl_max=5.0, length_drift=0.5)
  fired = {}
  rows = [(3.0, 0.1, 10), (2.0, 1.0, 11), (1.0, 3.0, 12), (0.5, 4.0, 14), (0.2, 6.0, 15),
          (0.29, 7.0, 16)]
  for step, (entropy, kl, length) in enumerate(rows, 1):
    if messages := alarms.check(step, {"entropy": entropy, "kl": kl, "response_length": length}):
      fired[step] = messages
  assert fired[5] == [
      "step 5: entropy=0.2 is under 0.1x its first value 3 (entropy collapse: the policy has "
      "turned near-deterministic)",
      "step 5: kl=6 nats is over run.alarm_kl=5 (the policy is running away from the reference; "
      "raise the KL coefficient or lower the learning rate)"]
  # Lengths: the first two steps average 10.5, the last two 15.5 (+48%) at step 6: not yet;
  assert list(fired) == [5]
  messages = alarms.check(7, {"response_length": 17.0})  # then 16.5 (+57%) at step 7
  assert messages == ["step 7: the mean response length of the last 2 steps, 16.5, is +57% off "
                      "that of the first 2, 10.5 (length drift: the reward may pay for length)"]
  assert alarms.fired_metrics() == {"alarm/entropy": 1.0, "alarm/kl": 1.0, "alarm/length": 1.0}


def test_reward_hacking_fires_when_gold_falls_from_its_best_while_the_proxy_rises():
  alarms = Alarms(steps=0, growth=0, gold_drop=0.1)
  evals = [(0, 0.0, 0.1), (10, 0.5, 1.0), (20, 0.45, 1.5), (30, 0.3, 0.9), (40, 0.3, 2.2)]
  fired = {step: m for step, gold, proxy in evals
           if (m := alarms.check_eval(step, {"gold_reward": gold, "proxy_reward": proxy}))}
  # Step 20: gold only 0.05 below its best; step 30: 0.2 below, but the proxy fell below 1.0 too.
  assert fired == {40: ["step 40: gold_reward=0.3 has fallen below its best 0.5 while "
                        "proxy_reward=2.2 rose past 1 (reward hacking: the policy over-optimises "
                        "the reward model)"]}
  assert alarms.check_eval(50, {"proxy_reward": 9.0}) == []  # no gold reward: nothing to judge


def test_off_switches_and_non_finite_values_are_left_to_the_nan_guard():
  zeros = [(0.0, 1.0)] * 20
  assert _feed(Alarms(steps=0, growth=0), zeros) == {}
  alarms = Alarms(steps=2, growth=10)
  assert alarms.check(1, {"grad_norm": np.float32(np.nan), "loss": np.float32(np.inf)}) == []
  assert alarms.check(2, {"other": np.zeros(3)}) == []  # no grad_norm or loss: nothing to check


def _toy_task(num_steps):
  # Its "model" never learns: grad_norm is 0 and the loss is 1 at every step.
  def train_step(state, batch):
    return {"w": state["w"] + 1}, {"loss": jnp.float32(1.0), "grad_norm": jnp.float32(0.0)}

  return loop.Task(init_state=lambda: {"w": jnp.zeros(2, jnp.float32)}, train_step=train_step,
                   batch=lambda i: {"attention_mask": np.ones((1, 4), np.int32)},
                   put=lambda batch: batch, num_steps=num_steps, config={"model": "toy"})


def _toy_run(tmp_path, **changes):
  base = loop.RunConfig(steps=8, batch_size=2, log_every=4, checkpoint_every=2, export=False,
                        alarm_steps=3, output_dir=str(tmp_path / "run"), progress=False,
                        mesh=MeshConfig(1, 1, 1))
  return dataclasses.replace(base, **changes)


def test_the_loop_warns_and_with_stop_on_alarm_stops_before_saving(tmp_path, caplog):
  loop.run_loop(_toy_task(8), _toy_run(tmp_path / "warn"))
  assert "step 3: grad_norm has been exactly 0 for 3 consecutive steps" in caplog.text
  assert "step 4: loss has stayed at its first value 1 for 3 steps" in caplog.text
  assert "run.stop_on_alarm=true would stop the run here" in caplog.text
  with pytest.raises(loop.TrainingDivergedError) as info:
    loop.run_loop(_toy_task(8), _toy_run(tmp_path / "stop", stop_on_alarm=True))
  assert str(info.value).startswith("step 3: grad_norm has been exactly 0 for 3 consecutive "
                                    "steps (since step 1)")
  assert "stopped by run.stop_on_alarm=true without saving this state (the last good " \
         f"checkpoint is step 2 in {tmp_path / 'stop' / 'run' / 'checkpoints'})" in str(info.value)


@pytest.mark.slow
def test_a_learning_rate_that_kills_the_model_warns_and_can_stop_the_run(tmp_path):
  """The issue's run: Adam at lr 1000 without clipping saturates the model within a few steps,
  after which grad_norm is exactly 0.0 at every step, and the run used to exit 0 in silence."""
  model_dir = embedded.ensure_assets(tmp_path / "model", hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=1)
  command = [sys.executable, "-m", "rlhf_jax", "run", str(EXPERIMENTS / "sft.py"),
             "--set", f"model.path={model_dir}", "--set", "data.num_rows=256",
             "--set", "optimizer.lr=1000", "--set", "optimizer.max_grad_norm=None",
             "--set", "optimizer.schedule=constant", "--set", "optimizer.warmup_steps=0",
             "--set", "run.steps=15", "--set", "run.batch_size=8", "--set", "run.eval_every=0",
             "--set", "run.export=false", "--set", "run.progress=false",
             "--set", "run.alarm_steps=5"]

  def cli(*changes):
    return subprocess.run(command + [f"--set={change}" for change in changes],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"})

  warned = cli(f"run.output_dir={tmp_path / 'warn'}")
  assert warned.returncode == 0, warned.stderr[-3000:]
  assert "grad_norm has been exactly 0 for 5 consecutive steps" in warned.stderr
  assert "is over 1000x its first value" in warned.stderr  # it blew up on the way
  stopped = cli(f"run.output_dir={tmp_path / 'stop'}", "run.stop_on_alarm=true",
                "run.alarm_grad_growth=0")
  assert stopped.returncode == 2 and "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
  last = stopped.stderr.strip().splitlines()[-1]
  assert last.startswith("error: step ") and ": grad_norm has been exactly 0 for 5 consecutive " \
      "steps" in last and "stopped by run.stop_on_alarm=true" in last
  assert [line for line in stopped.stderr.splitlines() if line.startswith("error:")] == [last]
