"""The loop: bit-exact resume after a kill, the NaN guard, one compilation per bucket."""

import dataclasses
import json
import pathlib
import re

import jax
import numpy as np
import pytest

from rlhf_jax.parallel import MeshConfig
from rlhf_jax.train import loop, preference, sft
from rlhf_jax.train.state import OptimizerConfig

pytestmark = pytest.mark.slow


def _metrics(run_dir, split="train"):
  lines = (run_dir / "metrics.jsonl").read_text().splitlines()
  return [json.loads(line) for line in lines if json.loads(line)["split"] == split]


class Killed(Exception):
  pass


def test_killed_and_resumed_run_is_bit_identical(model_spec, data_spec, small_run, tmp_path):
  def config(name):
    return preference.PreferenceConfig(
        model=model_spec, data=data_spec("pair"),
        optimizer=OptimizerConfig(lr=1e-3, warmup_steps=2),
        # The 8-device mesh: restoring sharded params and optimiser state is part of the test.
        run=small_run(steps=8, checkpoint_every=3, output_dir=str(tmp_path / name),
                      mesh=MeshConfig(data=2, fsdp=4)))

  straight = loop.run_loop(preference.build_task(config("straight")), config("straight").run)

  task = preference.build_task(config("killed"))
  step = task.train_step

  def dies_at_step_5(state, batch):
    if int(state.step) == 4:  # after the checkpoint at step 3, mid-way to the next one
      raise Killed
    return step(state, batch)

  task.train_step = dies_at_step_5
  with pytest.raises(Killed):
    loop.run_loop(task, config("killed").run)
  # A new process would rebuild everything from the config; so do we.
  resumed = loop.run_loop(preference.build_task(config("killed")), config("killed").run)

  a, b = _metrics(tmp_path / "straight"), _metrics(tmp_path / "killed")
  assert [m["step"] for m in b] == list(range(1, 9))  # lines after the checkpoint were replaced
  assert a == b  # every metric of every step, bit for bit
  for x, y in zip(jax.tree.leaves(straight["state"].params), jax.tree.leaves(
      resumed["state"].params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_nan_guard_names_the_step_and_keeps_the_last_good_checkpoint(model_spec, data_spec, small_run):
  config = sft.SFTConfig(model=model_spec, data=data_spec("sft"),
                         optimizer=OptimizerConfig(name="sgd", lr=1e12,
                                                   max_grad_norm=None, schedule="constant"),
                         run=small_run(steps=30, checkpoint_every=1))
  task = sft.build_task(config)
  with pytest.raises(loop.TrainingDivergedError, match=r"step (\d+): non-finite") as info:
    loop.run_loop(task, config.run)
  bad_step = int(re.search(r"step (\d+)", str(info.value)).group(1))
  checkpoints = sorted(int(p.name) for p in (pathlib.Path(config.run.output_dir) /
                                            "checkpoints").iterdir() if p.name.isdigit())
  assert checkpoints[-1] == bad_step - 1  # the diverged state was never written
  assert f"last good checkpoint is step {bad_step - 1}" in str(info.value)


def test_one_compilation_per_bucket(model_spec, data_spec, small_run):
  config = sft.SFTConfig(model=model_spec,
                         data=dataclasses.replace(data_spec("sft"), buckets=(16, 32)),
                         run=small_run(steps=12))
  task = sft.build_task(config)
  state = task.init_state()
  lowered = []  # one event per program lowered for compilation (before any persistent cache)

  def listener(event, duration, **kwargs):
    if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
      lowered.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    lengths = set()
    for i in range(12):
      batch = task.batch(i)
      lengths.add(batch["input_ids"].shape[1])
      state, _ = task.train_step(state, task.put(batch))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert lengths == {16, 32}  # synthetic rows straddle 16 tokens: both buckets occur
  assert len(lowered) == 2  # one program per bucket, none per step


def test_resume_refuses_a_different_experiment_in_the_same_directory(model_spec, data_spec, small_run):
  config = sft.SFTConfig(model=model_spec, data=data_spec("sft"), run=small_run(steps=2))
  loop.run_loop(sft.build_task(config), config.run)
  changed = dataclasses.replace(config, optimizer=OptimizerConfig(lr=0.5),
                                run=dataclasses.replace(config.run, steps=4))
  with pytest.raises(ValueError, match="'optimizer' config differs"):
    loop.run_loop(sft.build_task(changed), changed.run)
