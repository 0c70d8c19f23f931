"""The loop: bit-exact resume after a kill, the NaN guard, one compilation per bucket, one run per
directory, resume checks, metrics on stdout."""

import dataclasses
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.parallel import MeshConfig
from rlhf_jax.train import loop, preference, sft
from rlhf_jax.train.state import OptimizerConfig


def _metrics(run_dir, split="train"):
  lines = (run_dir / "metrics.jsonl").read_text().splitlines()
  return [json.loads(line) for line in lines if json.loads(line)["split"] == split]


class Killed(Exception):
  pass


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_resume_refuses_a_different_experiment_in_the_same_directory(model_spec, data_spec, small_run):
  config = sft.SFTConfig(model=model_spec, data=data_spec("sft"), run=small_run(steps=2))
  loop.run_loop(sft.build_task(config), config.run)
  changed = dataclasses.replace(config, optimizer=OptimizerConfig(lr=0.5),
                                run=dataclasses.replace(config.run, steps=4))
  with pytest.raises(ValueError, match="'optimizer' config differs"):
    loop.run_loop(sft.build_task(changed), changed.run)


# A model-free task: the state is a vector that each step adds the batch to. It exercises the
# loop's directory, checkpoint and logging logic in well under a second per run.
def _toy_task(num_steps, scale=1.0):
  def train_step(state, batch):
    w = state["w"] + scale * batch["x"]
    return {"w": w}, {"loss": jnp.sum(w), "scale": jnp.float32(scale)}

  return loop.Task(init_state=lambda: {"w": jnp.zeros(2, jnp.float32)}, train_step=train_step,
                   batch=lambda i: {"x": np.full(2, i + 1, np.float32),
                                    "attention_mask": np.ones((1, 4), np.int32)},
                   put=lambda batch: batch, num_steps=num_steps,
                   config={"model": {"name": "toy"}, "scale": scale})


def _toy_run(tmp_path, **changes):
  # Async checkpointing (the default) on: saves still in flight must be seen by the checks.
  base = loop.RunConfig(steps=4, batch_size=2, log_every=2, checkpoint_every=2, export=False,
                        output_dir=str(tmp_path / "run"), progress=False,
                        mesh=MeshConfig(1, 1, 1))
  return dataclasses.replace(base, **changes)


def _restored_w(run_dir, step):
  from rlhf_jax.train.checkpoint import Checkpointer
  checkpoints = Checkpointer(run_dir / "checkpoints")
  try:
    state, meta = checkpoints.restore({"w": jnp.zeros(2, jnp.float32)}, step)
  finally:
    checkpoints.close()
  return np.asarray(state["w"]), meta


def test_resume_false_refuses_a_directory_that_holds_checkpoints(tmp_path):
  run = _toy_run(tmp_path)
  loop.run_loop(_toy_task(4), run)
  run_dir = tmp_path / "run"
  config_before = (run_dir / "config.json").read_text()
  fresh = dataclasses.replace(run, resume=False)
  with pytest.raises(ValueError,
                     match=r"checkpoints at steps \[2, 4\] and run\.resume=false") as info:
    loop.run_loop(_toy_task(4, scale=10.0), fresh)
  message = str(info.value)
  assert str(run_dir / "checkpoints") in message
  assert "run.resume=true" in message and "run.overwrite=true" in message
  # Nothing of the old run was touched: its config and its state at step 4 (w = 1+2+3+4).
  assert (run_dir / "config.json").read_text() == config_before
  np.testing.assert_array_equal(_restored_w(run_dir, 4)[0], [10.0, 10.0])
  with pytest.raises(ValueError, match="contradicts run.resume=true"):
    loop.run_loop(_toy_task(4), dataclasses.replace(run, overwrite=True))


def test_overwrite_starts_over_and_saves_the_new_run(tmp_path):
  run = _toy_run(tmp_path)
  loop.run_loop(_toy_task(4), run)
  loop.run_loop(_toy_task(4, scale=10.0), dataclasses.replace(run, resume=False, overwrite=True))
  run_dir = tmp_path / "run"
  # Every checkpoint is the new run's (orbax would have skipped saves at steps <= 4).
  for step, want in ((2, 30.0), (4, 100.0)):
    np.testing.assert_array_equal(_restored_w(run_dir, step)[0], [want, want])
  assert json.loads((run_dir / "config.json").read_text())["scale"] == 10.0
  assert [m["scale"] for m in _metrics(run_dir)] == [10.0] * 4  # no line of the old run is left
  # And a later resume continues the new run, not the old one.
  summary = loop.run_loop(_toy_task(4, scale=10.0), run)
  np.testing.assert_array_equal(np.asarray(summary["state"]["w"]), [100.0, 100.0])


@pytest.mark.parametrize("field, new", [("seed", 1), ("batch_size", 4), ("steps", 6)])
def test_resume_refuses_a_different_seed_batch_size_or_step_count(tmp_path, field, new):
  run = _toy_run(tmp_path)
  loop.run_loop(_toy_task(4), run)
  meta = _restored_w(tmp_path / "run", 4)[1]
  assert (meta["seed"], meta["batch_size"], meta["steps"]) == (0, 2, 4)
  old = getattr(run, field)
  changed = dataclasses.replace(run, **{field: new})
  with pytest.raises(ValueError, match=rf"written with run\.{field}={old}, this run has "
                                       rf"run\.{field}={new}"):
    loop.run_loop(_toy_task(changed.steps), changed)


def test_metrics_line_goes_to_stdout_every_log_interval(tmp_path, capsys):
  loop.run_loop(_toy_task(4), _toy_run(tmp_path))
  lines = capsys.readouterr().out.splitlines()
  metric_lines = [line for line in lines if line.startswith("step ")]
  assert [line.split()[1] for line in metric_lines] == ["2/4", "4/4"]
  assert "loss=6 " in metric_lines[0] + " " and "tok/s=" in metric_lines[0]
  assert "loss=20" in metric_lines[1]


def test_only_the_first_process_writes_run_files(tmp_path, monkeypatch, capsys):
  # Another process of a multi-host run: it checkpoints (orbax coordinates that) but writes no
  # config, metrics or stdout lines, which would race with process 0's.
  monkeypatch.setattr(loop.parallel, "is_main_process", lambda: False)
  loop.run_loop(_toy_task(4), _toy_run(tmp_path))
  run_dir = tmp_path / "run"
  assert not (run_dir / "config.json").exists() and not (run_dir / "metrics.jsonl").exists()
  assert not [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
  np.testing.assert_array_equal(_restored_w(run_dir, 4)[0], [10.0, 10.0])


def test_killed_and_resumed_toy_run_with_async_checkpoints(tmp_path):
  straight = loop.run_loop(_toy_task(6), _toy_run(tmp_path / "a", steps=6))
  task = _toy_task(6)
  step = task.train_step

  def dies_at_step_6(state, batch):
    if float(state["w"][0]) == 15.0:  # after 5 steps (1+...+5): the save at step 4 may be in flight
      raise Killed
    return step(state, batch)

  task.train_step = dies_at_step_6
  with pytest.raises(Killed):
    loop.run_loop(task, _toy_run(tmp_path / "b", steps=6))
  resumed = loop.run_loop(_toy_task(6), _toy_run(tmp_path / "b", steps=6))
  assert _metrics(tmp_path / "a" / "run") == _metrics(tmp_path / "b" / "run")
  np.testing.assert_array_equal(np.asarray(resumed["state"]["w"]),
                                np.asarray(straight["state"]["w"]))
  assert [m["step"] for m in _metrics(tmp_path / "b" / "run")] == list(range(1, 7))


def test_a_failing_export_or_evaluation_loses_no_training(tmp_path, caplog):
  """The final checkpoint is on disk before the export and the final evaluation; rerunning the
  same command resumes there, trains nothing, and redoes them."""
  calls = []

  def broken(state, out_dir):
    calls.append(float(state["w"][0]))
    raise RuntimeError("disk full")

  task = _toy_task(4)
  task.export = broken
  run = _toy_run(tmp_path, export=True)
  with pytest.raises(RuntimeError, match="disk full"):
    loop.run_loop(task, run)
  from rlhf_jax.train.checkpoint import Checkpointer
  checkpoints = Checkpointer(tmp_path / "run" / "checkpoints")
  assert checkpoints.latest_step() == 4
  checkpoints.close()
  assert "rerun the same command to resume there and redo them" in caplog.text
  exported = []
  task = _toy_task(4)
  task.export = lambda state, out_dir: exported.append(float(state["w"][0]))
  task.evaluators.append(lambda state: {"w0": float(state["w"][0])})
  train_steps = []
  step = task.train_step
  task.train_step = lambda state, batch: train_steps.append(1) or step(state, batch)
  summary = loop.run_loop(task, run)
  assert not train_steps and exported == calls  # the same final state, exported this time
  assert summary["eval"] == {"w0": calls[0]}
  assert [r["step"] for r in _metrics(tmp_path / "run", "eval")] == [4]


def test_the_starting_point_is_evaluated_before_the_first_step(model_spec, data_spec, small_run):
  """eval_at_start (the default): an eval record at step 0, the initial policy's, so a run on a
  real model has its starting point on record; a resumed run does not redo it."""
  config = preference.PreferenceConfig(
      model=model_spec, data=data_spec("pair", num_rows=128),
      run=small_run(steps=2, eval_at_start=True))
  task = preference.build_task(config)
  expected = loop.evaluate(task, task.init_state())
  loop.run_loop(task, config.run)
  evals = _metrics(pathlib.Path(config.run.output_dir), "eval")
  assert [m["step"] for m in evals] == [0, 2]
  assert evals[0]["loss"] == pytest.approx(expected["loss"], rel=1e-6)
  assert evals[0]["loss"] == pytest.approx(np.log(2), abs=1e-6)  # policy == reference: log 2
