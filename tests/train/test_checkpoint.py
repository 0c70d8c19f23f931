"""Damaged checkpoints: a resume takes the newest intact step (and says which one was damaged
and why), or stops with a CheckpointError naming the directory when none is intact; never an
orbax traceback, never a silent start from step 0."""

import dataclasses
import json
import logging
import shutil

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
