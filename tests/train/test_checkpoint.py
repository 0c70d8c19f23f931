"""Damaged checkpoints: a resume takes the newest intact step (and says which one was damaged
and why), or stops with a CheckpointError naming the directory when none is intact; never an
orbax traceback, never a silent start from step 0."""

import dataclasses
import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.errors import CheckpointError
from rlhf_jax.parallel import MeshConfig
from rlhf_jax.train import loop
from rlhf_jax.train.checkpoint import Checkpointer


# A model-free task (as in test_loop.py): the state is a vector each step adds its batch to, so
# the state after step s is (1 + ... + s) and any resume point shows in it.
def _task(num_steps, calls=None):
  def train_step(state, batch):
    if calls is not None:
      calls.append(int(batch["x"][0]))
    w = state["w"] + batch["x"]
    return {"w": w}, {"loss": jnp.sum(w)}

  return loop.Task(init_state=lambda: {"w": jnp.zeros(2, jnp.float32)}, train_step=train_step,
                   batch=lambda i: {"x": np.full(2, i + 1, np.float32),
                                    "attention_mask": np.ones((1, 4), np.int32)},
                   put=lambda batch: batch, num_steps=num_steps, config={"model": "toy"})


def _run(tmp_path, name, **changes):
  base = loop.RunConfig(steps=6, batch_size=2, log_every=2, checkpoint_every=2, export=False,
                        keep_checkpoints=3, output_dir=str(tmp_path / name), progress=False,
                        mesh=MeshConfig(1, 1, 1))
  return dataclasses.replace(base, **changes)


def _metrics(run_dir):
  return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _truncate_an_array_file(step_dir):
  for path in (step_dir / "state" / "d").iterdir():  # the finalised OCDBT data files
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _empty_the_metadata(step_dir):
  (step_dir / "meta" / "metadata").write_text("")


def _corrupt_the_array_metadata(step_dir):
  (step_dir / "state" / "_METADATA").write_text('{"tree_metadata": ')


def _delete_part_of_the_step(step_dir):  # as a kill between writing the items would leave it
  shutil.rmtree(step_dir / "state")


DAMAGES = [_truncate_an_array_file, _empty_the_metadata, _corrupt_the_array_metadata,
           _delete_part_of_the_step]


class Killed(Exception):
  pass


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__.strip("_"))
def test_a_damaged_latest_checkpoint_resumes_from_the_previous_one(tmp_path, damage, caplog):
  straight = loop.run_loop(_task(6), _run(tmp_path, "straight"))
  run = _run(tmp_path, "damaged")
  task = _task(6)
  step = task.train_step

  def killed_at_step_5(state, batch):  # after the checkpoints at steps 2 and 4
    if int(batch["x"][0]) == 5:
      raise Killed
    return step(state, batch)

  task.train_step = killed_at_step_5
  with pytest.raises(Killed):
    loop.run_loop(task, run)
  checkpoints = tmp_path / "damaged" / "checkpoints"
  damage(checkpoints / "4")
  calls = []
  with caplog.at_level(logging.WARNING):
    resumed = loop.run_loop(_task(6, calls), run)
  assert "the checkpoint at step 4 in" in caplog.text and "is damaged (" in caplog.text
  assert "resuming from step 2, the newest intact checkpoint" in caplog.text
  assert calls == [3, 4, 5, 6]  # from step 2: neither from 0 nor from the damaged step 4
  assert (checkpoints / "4.damaged").is_dir()  # kept for a look, out of orbax's way
  # The run equals one that never broke: every metric line, and the final state.
  assert _metrics(tmp_path / "damaged") == _metrics(tmp_path / "straight")
  np.testing.assert_array_equal(np.asarray(resumed["state"]["w"]),
                                np.asarray(straight["state"]["w"]))
  # Step 4 was written again (orbax skips saves at or below a step it still lists).
  checkpointer = Checkpointer(checkpoints)
  try:
    assert sorted(checkpointer.all_steps()) == [2, 4, 6]
    state, meta = checkpointer.restore({"w": jnp.zeros(2, jnp.float32)}, 4)
  finally:
    checkpointer.close()
  assert meta["step"] == 4
  np.testing.assert_array_equal(np.asarray(state["w"]), [10.0, 10.0])  # 1 + 2 + 3 + 4


def test_no_intact_checkpoint_is_a_clear_error_naming_the_directory(tmp_path):
  run = _run(tmp_path, "run", steps=4)
  loop.run_loop(_task(4), run)  # checkpoints at steps 2 and 4
  checkpoints = tmp_path / "run" / "checkpoints"
  _truncate_an_array_file(checkpoints / "4")
  _empty_the_metadata(checkpoints / "2")
  with pytest.raises(CheckpointError) as info:
    loop.run_loop(_task(4), run)
  message = str(info.value)
  assert message.startswith(f"{checkpoints}: expected an intact checkpoint to resume from, got "
                            "only damaged ones: step 4: ValueError: ")
  assert "; step 2: JSONDecodeError: " in message and "run.overwrite=true" in message
  assert "\n" not in message
  assert sorted(p.name for p in checkpoints.iterdir()) == ["2", "4"]  # nothing moved or deleted


def test_restoring_a_named_damaged_step_is_a_checkpoint_error(tmp_path):
  # What `python -m rlhf_jax export RUN_DIR OUT --step 4` meets on a damaged step.
  loop.run_loop(_task(4), _run(tmp_path, "run", steps=4))
  checkpoints = tmp_path / "run" / "checkpoints"
  _delete_part_of_the_step(checkpoints / "4")
  checkpointer = Checkpointer(checkpoints)
  try:
    with pytest.raises(CheckpointError, match=rf"^{checkpoints / '4'}: expected an intact "
                                              r"checkpoint, got a damaged one \(KeyError: "):
      checkpointer.restore({"w": jnp.zeros(2, jnp.float32)}, 4)
  finally:
    checkpointer.close()


KILL_SCRIPT = pathlib.Path(__file__).with_name("kill_during_save.py")
# moment of the save of step 4 -> what a resume finds: the step it resumes from, and what the
# kill left on disk for step 4 (orbax ignores a temporary directory: no step, no damage).
KILL_MOMENTS = {"tmp_created": (2, "4.orbax-checkpoint-tmp"),
                "items_written": (2, "4.orbax-checkpoint-tmp"),
                "committed": (2, "4.orbax-checkpoint-tmp"),
                "renamed": (4, "4")}


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory):
  """One run per moment, each SIGKILLed at that moment of its async save of step 4 (the
  processes run at once: each is mostly jax's import)."""
  root = tmp_path_factory.mktemp("killed")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      [str(pathlib.Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(
      "--xla_force_host_platform_device_count=8", "")  # one device, as the run's mesh
  children = {moment: subprocess.Popen(
      [sys.executable, str(KILL_SCRIPT), str(root / moment), moment], env=env,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for moment in KILL_MOMENTS}
  for moment, child in children.items():
    out, _ = child.communicate(timeout=300)
    assert child.returncode == -signal.SIGKILL, f"{moment}: {child.returncode}: {out[-3000:]}"
  return root


@pytest.mark.parametrize("moment", list(KILL_MOMENTS))
def test_a_kill_during_an_async_save_resumes_from_the_newest_intact_step(
    killed_runs, tmp_path, moment, caplog):
  """kill -9 at each moment of the save of step 4 (see kill_during_save.py), then the same
  command again: it resumes from step 4 once the save had completed (the rename), else from
  step 2, and the run equals one that never broke, bit for bit."""
  resumes_at, left = KILL_MOMENTS[moment]
  run_dir = tmp_path / "run"
  shutil.copytree(killed_runs / moment / "run", run_dir)
  checkpoints = run_dir / "checkpoints"
  assert sorted(p.name for p in checkpoints.iterdir()) == ["2", left]
  straight = loop.run_loop(_task(6), _run(tmp_path, "straight", async_checkpoint=True))
  calls = []
  with caplog.at_level(logging.INFO, logger="rlhf_jax.train.loop"):
    resumed = loop.run_loop(_task(6, calls), _run(tmp_path, "run", async_checkpoint=True))
  assert f"resumed from {checkpoints} at step {resumes_at}" in caplog.text
  assert "damaged" not in caplog.text  # an unfinished save is not a damaged step
  assert calls == list(range(resumes_at + 1, 7))
  assert _metrics(run_dir) == _metrics(tmp_path / "straight")
  np.testing.assert_array_equal(np.asarray(resumed["state"]["w"]),
                                np.asarray(straight["state"]["w"]))
  # Step 4 is on disk again, whole; orbax removed its stale temporary directory.
  assert sorted(p.name for p in checkpoints.iterdir()) == ["2", "4", "6"]
  checkpointer = Checkpointer(checkpoints)
  try:
    state, meta = checkpointer.restore({"w": jnp.zeros(2, jnp.float32)}, 4)
  finally:
    checkpointer.close()
  assert meta["step"] == 4
  np.testing.assert_array_equal(np.asarray(state["w"]), [10.0, 10.0])  # 1 + 2 + 3 + 4


def test_a_metrics_line_cut_by_a_kill_is_dropped_on_resume(tmp_path):
  run = _run(tmp_path, "run", steps=4)
  loop.run_loop(_task(4), run)
  metrics = tmp_path / "run" / "metrics.jsonl"
  whole = _metrics(tmp_path / "run")
  lines = metrics.read_text().splitlines()
  # The run killed while it wrote step 3's line; its last checkpoint is step 2.
  metrics.write_text("".join(line + "\n" for line in lines[:2]) + lines[2][:9])
  shutil.rmtree(tmp_path / "run" / "checkpoints" / "4")
  loop.run_loop(_task(4), run)
  assert _metrics(tmp_path / "run") == whole
