"""A toy run that SIGKILLs itself at a chosen moment of the asynchronous orbax save of one step.

`python tests/train/kill_during_save.py OUTPUT_DIR MOMENT [STEP]` runs test_checkpoint.py's toy
task (6 steps, a checkpoint every 2) with async checkpoints, and kills its own process, as
`kill -9` would, while the save of STEP (default 4) is at MOMENT:

  tmp_created     the step's temporary directory exists; no item is written yet
  items_written   every item (state arrays, metadata) is in the temporary directory; no commit
  committed       the commit-success file is written; the directory is not renamed yet
  renamed         the temporary directory is renamed to the step's; the save is complete

The hooks wrap orbax's own functions (its atomic-rename temporary path), so the moment does not
depend on timing. Not a test module: tests/train/test_checkpoint.py runs it.
"""

import os
import pathlib
import signal
import sys

MOMENTS = ("tmp_created", "items_written", "committed", "renamed")


def _kill():
  sys.stdout.flush()
  os.kill(os.getpid(), signal.SIGKILL)


def install(moment: str, step: int):
  """Wraps orbax's temporary-path steps so the process dies at `moment` of saving `step`."""
  from orbax.checkpoint._src.path import async_path, atomicity  # noqa: PLC0415

  final_name = str(step)
  if moment == "tmp_created":
    create = atomicity._create_tmp_directory

    async def create_then_kill(makedir, tmp_dir, **kwargs):
      path = await create(makedir, tmp_dir, **kwargs)
      if atomicity._get_final_directory(pathlib.Path(tmp_dir)).name == final_name:
        _kill()
      return path

    atomicity._create_tmp_directory = create_then_kill
  elif moment == "items_written":
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def kill_then_finalize(self):
      if self.get_final().name == final_name:
        _kill()
      return await finalize(self)

    atomicity.AtomicRenameTemporaryPath.finalize = kill_then_finalize
  elif moment in ("committed", "renamed"):
    rename = async_path.rename

    async def rename_around_kill(source, target):
      ours = pathlib.Path(target).name == final_name
      if ours and moment == "committed":
        _kill()
      result = await rename(source, target)
      if ours:
        _kill()
      return result

    async_path.rename = rename_around_kill
  else:
    raise SystemExit(f"unknown moment {moment!r}; expected one of {MOMENTS}")


def main():
  output_dir, moment = sys.argv[1], sys.argv[2]
  step = int(sys.argv[3]) if len(sys.argv) > 3 else 4
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
  import test_checkpoint  # noqa: PLC0415 — the same toy task and run settings as the test

  from rlhf_jax.train import loop  # noqa: PLC0415
  install(moment, step)
  run = test_checkpoint._run(pathlib.Path(output_dir), "run", async_checkpoint=True)
  loop.run_loop(test_checkpoint._task(6), run)
  print("the run ended without being killed", file=sys.stderr)
  sys.exit(3)


if __name__ == "__main__":
  main()
