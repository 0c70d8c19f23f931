"""`python -m rlhf_jax export RUN_DIR OUT_DIR [--step N]`: a training checkpoint as a Hugging Face
directory (weights, config, tokenizer) for evaluation elsewhere.

The run's own config.json rebuilds its task (the same loading and wiring as the run, so the
export is exactly what the run's final export would have written at that step), the checkpoint
restores into its state, and the task's export hook writes it: streamed tensor by tensor, every
process joining the gathers, process 0 writing. Any step the run kept can be exported, not only
the last.
"""

from __future__ import annotations

import importlib
import json
import pathlib

from rlhf_jax import config as config_lib
from rlhf_jax.errors import UserError

__all__ = ["EXPORTABLE", "ExportError", "export_run"]

# trainer -> "module:ConfigClass:build_task function" of the single-stage trainers.
EXPORTABLE = {
    "sft": "rlhf_jax.train.sft:SFTConfig:build_task",
    "reward": "rlhf_jax.train.reward:RewardConfig:build_task",
    "preference": "rlhf_jax.train.preference:PreferenceConfig:build_task",
    "kto": "rlhf_jax.train.preference:KTOConfig:build_kto_task",
    "ppo": "rlhf_jax.train.ppo:PPOConfig:build_task",
    "grpo": "rlhf_jax.train.grpo:GRPOConfig:build_task",
    "rloo": "rlhf_jax.train.grpo:GRPOConfig:build_task",
    "rejection_sampling": "rlhf_jax.train.best_of_n:RejectionSamplingConfig:build_task",
    "iterative_dpo": "rlhf_jax.train.iterative:IterativeDPOConfig:build_task",
}


class ExportError(UserError):
  """A run directory that cannot be exported (no config, no checkpoint, an unknown step)."""


def _load_config(run_dir: pathlib.Path):
  path = run_dir / "config.json"
  if not path.is_file():
    stages = sorted(p.parent.name for p in run_dir.glob("*/config.json"))
    hint = f"; its stages with their own run directories: {stages}" if stages else ""
    raise ExportError(f"{path}: no config.json, so {str(run_dir)!r} is not a run directory{hint}")
  data = json.loads(path.read_text())
  trainer = data.get("trainer")
  if trainer not in EXPORTABLE:
    raise ExportError(f"{path}: trainer {trainer!r} has no single policy to export; exportable "
                      f"trainers: {sorted(EXPORTABLE)} (a multi-stage job exports its stages' "
                      f"run directories)")
  module_name, class_name, build_name = EXPORTABLE[trainer].split(":")
  module = importlib.import_module(module_name)
  try:
    config = config_lib.from_dict(getattr(module, class_name), data)
  except (config_lib.ConfigError, TypeError) as error:
    raise ExportError(f"{path}: does not rebuild a {class_name}: {error}") from None
  return config, getattr(module, build_name)


def export_run(run_dir: str | pathlib.Path, out_dir: str | pathlib.Path, *,
               step: int | None = None, adapters: bool = False) -> int:
  """Writes the run's checkpoint at `step` (None: the latest) to `out_dir`; returns the step.

  A LoRA run is written merged; adapters=True writes its PEFT adapters instead."""
  from rlhf_jax.train.checkpoint import Checkpointer  # deferred: jax and orbax

  run_dir = pathlib.Path(run_dir)
  config, build_task = _load_config(run_dir)
  if not (run_dir / "checkpoints").is_dir():
    raise ExportError(f"{run_dir / 'checkpoints'}: no checkpoint directory to export from")
  checkpoints = Checkpointer(run_dir / "checkpoints", async_save=False)
  try:
    steps = checkpoints.all_steps()
    if not steps:
      raise ExportError(f"{run_dir / 'checkpoints'}: no checkpoint to export")
    step = max(steps) if step is None else step
    if step not in steps:
      raise ExportError(f"--step {step}: {run_dir / 'checkpoints'} holds steps {sorted(steps)}")
    task = build_task(config)
    if task.export is None:
      raise ExportError(f"{run_dir}: trainer {config.trainer!r} defines no export")
    if adapters and getattr(task.export, "lora", None) is None:
      raise ExportError(f"--adapters: {run_dir} trained no LoRA adapters on a causal LM "
                        f"(model.lora.rank=0, or a reward model, which exports merged)")
    state, _ = checkpoints.restore(task.init_state(), step)
  finally:
    checkpoints.close()
  if adapters:
    task.export(state, str(out_dir), adapters=True)
  else:
    task.export(state, str(out_dir))
  return step
