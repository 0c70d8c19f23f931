"""Two real JAX processes on 127.0.0.1 (4 fake CPU devices each, gloo collectives), launched
through the CLI with the JAX_* variables, against one process with 8 devices: every trainer's
per-step metrics agree; a run killed in both processes resumes bit-exactly.

One launch of each kind runs every trainer in sequence (start-up is paid once); the kill test
adds two more launches of GRPO, the damaged-checkpoint test one of SFT (resuming a copy of the
fixture's run). See tests/jax_processes.py for the launcher.
"""

import json
import pathlib
import shutil
import signal
import time

import numpy as np
import pytest

from rlhf_jax import embedded
from rlhf_jax.models import hf_io
import jax_processes

pytestmark = pytest.mark.slow

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1)
GRPO_STEPS = 4


def _commands(root: pathlib.Path, policy: str, judge: str) -> dict[str, list[str]]:
  """trainer -> CLI arguments: the experiments' runlocal settings, shrunk further."""
  common = ["--set", f"model.path={policy}", "--set", "run.progress=false",
            "--set", "data.num_rows=64"]
  # Exports and evaluations cost compilations: SFT keeps its export (gathered on every process,
  # written by process 0), PPO its export and sampled evaluation; the others drop them.
  lean = ["--set", "run.export=false", "--set", "data.eval_fraction=0"]
  online = ["--set", "generation.max_new_tokens=6"]
  runs = {
      # Checkpoints at steps 2 and 4: the damaged-checkpoint test resumes a copy of this run.
      "sft": ["experiments/sft.py", "--set", "data.eval_fraction=0", "--set", "run.steps=4",
              "--set", "run.batch_size=8", "--set", "run.checkpoint_every=2"],
      "dpo": ["experiments/dpo.py", *lean, "--set", "run.steps=3", "--set", "run.batch_size=8"],
      "ppo": ["experiments/ppo.py", *online, "--set", "run.steps=2", "--set", "run.batch_size=8"],
      "grpo": ["experiments/grpo.py", *online, *lean, "--set", f"run.steps={GRPO_STEPS}",
               "--set", "run.batch_size=8", "--set", "run.checkpoint_every=1"],
      # The constitutional judge: a causal LM with its own tokenizer (here the arithmetic
      # task's, whose answer tokens are "1" and "2").
      "iterative_dpo": ["experiments/iterative_dpo.py", *online, "--set", "run.export=false",
                        "--set", "labels.kind=judge",
                        "--set", f"labels.judge={judge}", "--set", "labels.answers=1,2",
                        "--set", "rounds.rounds=2", "--set", "rounds.prompts_per_round=8",
                        "--set", "rounds.minibatch_size=8"],
  }
  return {name: ["run", args[0], "--arg", "runlocal", *args[1:], *common,
                 "--set", f"run.output_dir={root / name}"] for name, args in runs.items()}


def _records(run_dir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_same_metrics(ours: list[dict], reference: list[dict], *, exact=False):
  assert [(r["step"], r["split"]) for r in ours] == [(r["step"], r["split"]) for r in reference]
  for mine, theirs in zip(ours, reference):
    assert mine.keys() == theirs.keys()
    for key in mine:
      if exact or isinstance(mine[key], str):
        assert mine[key] == theirs[key], (mine["step"], key)
      else:
        np.testing.assert_allclose(mine[key], theirs[key], rtol=1e-5, atol=1e-5,
                                   err_msg=f"step {mine['step']} {mine['split']} {key}")


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
  """Every trainer run by 2 processes x 4 devices and by 1 process x 8 devices."""
  root = tmp_path_factory.mktemp("multiprocess")
  policy = embedded.ensure_assets(root / "policy", **TINY)
  judge = embedded.ensure_assets(root / "judge", task="arith", seed=1, **TINY)
  two = _commands(root / "two", policy, judge)
  one = _commands(root / "one", policy, judge)
  jax_processes.launch(list(two.values()), num_processes=2, devices_per_process=4,
                      log_dir=root / "logs-two", timeout=900)
  jax_processes.launch(list(one.values()), num_processes=1, devices_per_process=8,
                      log_dir=root / "logs-one", timeout=900)
  return root, two


@pytest.mark.parametrize("trainer", ["sft", "dpo", "ppo", "grpo", "iterative_dpo"])
def test_two_processes_match_one_process_step_by_step(jobs, trainer):
  root, _ = jobs
  two, one = _records(root / "two" / trainer), _records(root / "one" / trainer)
  assert sum(r["split"] == "train" for r in two) >= 2
  _assert_same_metrics(two, one)
  if trainer in ("sft", "ppo"):  # exported tensor by tensor: gathered by all, written by one
    exported = [hf_io.read_safetensors(str(root / run / trainer / "hf")) for run in ("two", "one")]
    assert exported[0].keys() == exported[1].keys()
    for name in exported[0]:
      np.testing.assert_allclose(exported[0][name], exported[1][name], rtol=1e-5, atol=1e-5,
                                 err_msg=name)
  if trainer == "ppo":  # the sampled held-out evaluation ran on both processes
    assert any(r["split"] == "eval" and "gold_reward" in r for r in two)
  lines = (root / "logs-two" / "process-1.log").read_text().splitlines()
  assert not [line for line in lines if line.startswith("step ")]  # process 0 prints metrics


def test_killed_in_both_processes_resumes_bit_exactly(jobs, tmp_path):
  root, two = jobs
  command = [word.replace(str(root / "two" / "grpo"), str(tmp_path / "grpo"))
             for word in two["grpo"]]
  processes = jax_processes.start([command], log_dir=tmp_path / "logs-killed")
  checkpoint = tmp_path / "grpo" / "checkpoints" / "2"
  deadline = time.monotonic() + 600
  while not checkpoint.exists() and time.monotonic() < deadline:
    if any(p.poll() is not None for p in processes):
      jax_processes.wait(processes, tmp_path / "logs-killed")  # raises with the logs
      pytest.fail("the run ended before it could be killed")
    time.sleep(0.1)
  for p in processes:  # kill -9 both, mid-run
    p.send_signal(signal.SIGKILL)
  for p in processes:
    p.wait()
  assert checkpoint.exists() and not (tmp_path / "grpo" / "checkpoints" /
                                       str(GRPO_STEPS)).exists()
  jax_processes.launch([command], log_dir=tmp_path / "logs-resumed", timeout=600)
  assert "resumed from" in (tmp_path / "logs-resumed" / "process-0.log").read_text()
  _assert_same_metrics(_records(tmp_path / "grpo"), _records(root / "two" / "grpo"),
                       exact=True)


def test_both_processes_skip_a_damaged_checkpoint_to_the_same_step(jobs, tmp_path):
  """A damaged latest checkpoint in a 2-process job: both processes resume from the same
  (previous) step, set the damaged one aside, and the run ends as the undamaged one did."""
  root, two = jobs
  out = tmp_path / "sft"
  shutil.copytree(root / "two" / "sft", out)  # the fixture's finished run, checkpoints 2 and 4
  command = [word.replace(str(root / "two" / "sft"), str(out)) for word in two["sft"]]
  unbroken = _records(out)
  for path in (out / "checkpoints" / "4" / "state").rglob("*"):
    if path.is_file() and path.parent.name == "d":  # the OCDBT data files
      path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  jax_processes.launch([command], log_dir=tmp_path / "logs-resumed", timeout=600)
  for rank in (0, 1):
    log = (tmp_path / "logs-resumed" / f"process-{rank}.log").read_text()
    assert "the checkpoint at step 4 in" in log and "resuming from step 2" in log, log[-3000:]
  assert (out / "checkpoints" / "4.damaged").is_dir() and (out / "checkpoints" / "4").is_dir()
  _assert_same_metrics(_records(out), unbroken, exact=True)
