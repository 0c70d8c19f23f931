"""Command line: `python -m rlhf_jax run experiments/<name>.py --set key=value ...`.

The experiment's config names its trainer; the CLI applies overrides, prints the final config,
and calls the trainer. Trainers are looked up by import path so `--help` stays instant.
`python -m rlhf_jax export RUN_DIR OUT_DIR [--step N] [--adapters]` writes a run's checkpoint as
a Hugging Face directory (a LoRA run merged, or as PEFT adapters).

A user error (a bad config key or value, experiment file, data row, checkpoint, launch; any
`rlhf_jax.errors.UserError`) prints one line, `error: <where>: <what>`, to stderr and exits 2;
`--debug` shows its traceback instead. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import pathlib
import sys

from rlhf_jax import config as config_lib
from rlhf_jax.errors import UserError, one_line

__all__ = ["TRAINERS", "CONFIGS", "check_trainer", "main", "run_config"]

# trainer name -> "module:function"; the function takes the config and returns a summary dict.
TRAINERS = {
    "bandit": "rlhf_jax.bandit:run",
    "sft": "rlhf_jax.train.sft:run",
    "reward": "rlhf_jax.train.reward:run",
    "preference": "rlhf_jax.train.preference:run",
    "kto": "rlhf_jax.train.preference:run_kto",
    "ppo": "rlhf_jax.train.ppo:run",
    "grpo": "rlhf_jax.train.grpo:run",
    "rloo": "rlhf_jax.train.grpo:run",
    "rejection_sampling": "rlhf_jax.train.best_of_n:run",
    "iterative_dpo": "rlhf_jax.train.iterative:run",
    "pipeline": "rlhf_jax.pipeline:run",
    "verifiable": "rlhf_jax.verifiable:run",
}


# trainer name -> "module:Class" of the config it takes (named, not imported: config errors stay
# instant). A trainer reads its own config's sections; given another's it would fail far from
# the cause, or train with settings nobody set.
CONFIGS = {
    "bandit": "rlhf_jax.bandit:BanditConfig",
    "sft": "rlhf_jax.train.sft:SFTConfig",
    "reward": "rlhf_jax.train.reward:RewardConfig",
    "preference": "rlhf_jax.train.preference:PreferenceConfig",
    "kto": "rlhf_jax.train.preference:KTOConfig",
    "ppo": "rlhf_jax.train.ppo:PPOConfig",
    "grpo": "rlhf_jax.train.grpo:GRPOConfig",
    "rloo": "rlhf_jax.train.grpo:GRPOConfig",
    "rejection_sampling": "rlhf_jax.train.best_of_n:RejectionSamplingConfig",
    "iterative_dpo": "rlhf_jax.train.iterative:IterativeDPOConfig",
    "pipeline": "rlhf_jax.pipeline:PipelineConfig",
    "verifiable": "rlhf_jax.verifiable:VerifiableConfig",
}


def check_trainer(config):
  """`config.trainer` must be a known trainer that takes the config's class (or a subclass of
  it): `--set trainer=sft` on a DPO experiment is a ConfigError naming the class and the
  trainers it serves."""
  if config.trainer not in TRAINERS:
    raise config_lib.ConfigError(f"expected one of the trainers {sorted(TRAINERS)}, got "
                                 f"{config.trainer!r}", where="trainer")
  names = {f"{cls.__module__}:{cls.__qualname__}" for cls in type(config).__mro__}
  if CONFIGS[config.trainer] in names:
    return
  name = type(config).__name__
  served = sorted(trainer for trainer, target in CONFIGS.items() if target in names)
  takes = CONFIGS[config.trainer].rpartition(":")[2]
  raise config_lib.ConfigError(
      f"expected a trainer that {name} serves ({', '.join(served) or 'none'}), got "
      f"{config.trainer!r}, whose config class is {takes} (start from an experiment of that "
      f"trainer)",
      where="trainer")


def run_config(config):
  """Runs the trainer that `config.trainer` names and returns its summary."""
  check_trainer(config)
  target = TRAINERS[config.trainer]
  module_name, function_name = target.split(":")
  return getattr(importlib.import_module(module_name), function_name)(config)


def _parser():
  parser = argparse.ArgumentParser(prog="python -m rlhf_jax", description=__doc__.splitlines()[0])
  commands = parser.add_subparsers(dest="command", required=True)
  run = commands.add_parser("run", help="run an experiment file")
  run.add_argument("experiment", help="path to an experiment file defining get_config()")
  run.add_argument("--arg", default=None, help="argument passed to get_config (e.g. 'runlocal')")
  run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optimizer.lr=1e-5 (repeatable)")
  run.add_argument("--print-config", action="store_true", help="print the config and exit")
  export = commands.add_parser(
      "export", help="write a run's checkpoint as a Hugging Face directory (with its tokenizer)")
  export.add_argument("run_dir", help="the run's output directory (holds config.json and "
                                      "checkpoints/)")
  export.add_argument("out_dir", help="where to write config.json, safetensors and tokenizer")
  export.add_argument("--step", type=int, default=None,
                      help="the checkpoint step to export (default: the latest)")
  export.add_argument("--adapters", action="store_true",
                      help="a LoRA run: write PEFT adapters (adapter_config.json + "
                           "adapter_model.safetensors) instead of the merged model")
  for command in (run, export):
    _launch_arguments(command)
    command.add_argument("--debug", action="store_true",
                         help="show the traceback of a user error (a bad config, file, row or "
                              "checkpoint) instead of its one-line message")
  return parser


def _launch_arguments(command):
  launch = command.add_argument_group(
      "multi-process launch (one process per host or GPU; default: the JAX_COORDINATOR_ADDRESS, "
      "JAX_NUM_PROCESSES and JAX_PROCESS_ID variables, else SLURM / Open MPI / TPU detection)")
  launch.add_argument("--coordinator", metavar="HOST:PORT",
                      help="address of process 0's coordinator service")
  launch.add_argument("--num-processes", type=int, metavar="N", help="number of processes")
  launch.add_argument("--process-id", type=int, metavar="I", help="this process's id, 0..N-1")
  launch.add_argument("--distributed", action="store_true",
                      help="initialise jax.distributed even when no launcher is detected "
                           "(a Cloud TPU VM slice, where jax asks the metadata server)")


def main(argv=None) -> int:
  """Runs a command; a UserError becomes one line on stderr and exit status 2 (with --debug, it
  is raised with its traceback). Any other exception is a bug and keeps its traceback."""
  args = _parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                      datefmt="%H:%M:%S")
  for noisy in ("absl", "jax._src", "orbax", "httpx", "datasets"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  try:
    return _export(args) if args.command == "export" else _run(args)
  except UserError as err:
    if args.debug:
      raise
    print(f"error: {one_line(err)}", file=sys.stderr)
    return 2


def _run(args) -> int:
  config = config_lib.load_experiment(args.experiment, args.arg)
  # The trainer first: another trainer's config would fail its validate() less clearly.
  config = config_lib.apply_overrides(config, args.overrides, check=check_trainer)
  if args.print_config:
    print(json.dumps(config_lib.to_dict(config), indent=2))
    return 0
  _launch(args)
  from rlhf_jax import parallel  # noqa: PLC0415 — keeps --help and config errors instant
  from rlhf_jax.train import common  # noqa: PLC0415
  if (warning := toy_settings_warning(config, args.overrides)) is not None:
    # Once the model has loaded: a run that fails a check before then prints its error alone.
    common.warn_once_loaded(warning)
  if parallel.is_main_process():  # one copy of the config in a multi-process job's logs
    print(json.dumps(config_lib.to_dict(config), indent=2))
  try:
    run_config(config)
  except BaseException:
    common.discard_warnings()  # never loaded: the error is the one line to read
    raise
  common.flush_warnings()  # a trainer that loaded no model through common
  return 0


# Settings an experiment tunes for the embedded tiny model and synthetic task.
TOY_TUNED = ("optimizer.lr", "run.steps", "run.batch_size", "data.train", "data.max_length",
             "data.buckets", "generation.max_new_tokens")


def toy_settings_warning(config, overrides) -> str | None:
  """A warning when --set model.path points the experiment at a real checkpoint while the
  settings it tuned for the embedded model (TOY_TUNED) are left as they are; None otherwise."""
  keys = {o.partition("=")[0].strip() for o in overrides}
  model = getattr(config, "model", None)
  path = getattr(model, "path", None)
  if "model.path" not in keys or not isinstance(path, str) or path.startswith("synthetic:"):
    return None
  local = pathlib.Path(path)
  if (local / "synthetic_assets.json").is_file():  # a tiny model embedded.py built
    return None
  hub_id = not local.is_absolute() and not path.startswith(".") and path.count("/") == 1
  if not local.is_dir() and not hub_id:  # nothing there: loading it is the error to report
    return None
  kept = []
  for key in TOY_TUNED:
    value, found = config, True
    for part in key.split("."):
      if not hasattr(value, part):
        found = False
        break
      value = getattr(value, part)
    if found and key not in keys:
      kept.append(f"{key}={value!r}")
  if not kept:
    return None
  return (f"model.path={path!r} is a real checkpoint, but these settings keep the experiment's "
          f"values for the embedded tiny model: {', '.join(kept)}; the experiment's docstring "
          f"gives the real recipe's (set them with --set)")


def _export(args) -> int:
  from rlhf_jax.train import export  # noqa: PLC0415 — keeps --help instant
  _launch(args)
  step = export.export_run(args.run_dir, args.out_dir, step=args.step, adapters=args.adapters)
  print(f"exported step {step} of {args.run_dir} to {args.out_dir}")
  return 0


def _launch(args):
  """Starts jax.distributed when the flags, variables or a launcher ask (LaunchError when the
  launch settings are inconsistent)."""
  import jax  # noqa: PLC0415

  from rlhf_jax import parallel  # noqa: PLC0415
  launched = parallel.initialize_distributed(args.coordinator, args.num_processes,
                                             args.process_id, force=args.distributed)
  if launched:
    logging.getLogger(__name__).info("process %d of %d (%d local devices of %d)",
                                     jax.process_index(), jax.process_count(),
                                     jax.local_device_count(), jax.device_count())
