"""The one training loop: batches in, pure jitted steps, metrics, evaluation, checkpoints, resume.

Every trainer (SFT, reward model, the preference family, KTO, PPO, GRPO, RLOO) hands this loop a
`Task`: how to build the initial state, a jitted `train_step(state, batch) -> (state, metrics)`,
the batch for a given step, and optionally an evaluation and an export. All I/O lives here.

Exact resume: a checkpoint holds the state (params, optimiser state, RNG key, extras) and the step;
batch i is a pure function of (seed, i), and per-step randomness is fold_in(key, step). A run
killed and resumed therefore logs the same metrics, bit for bit, as one that ran straight through.

A run directory holds one run: with `run.resume=false` the loop refuses a directory that already
holds checkpoints (orbax would skip every save at or below their latest step, so the new run would
write none and a later resume would restore the old run) unless `run.overwrite=true` deletes them.
Resuming checks that the checkpoint was written with the same `seed` and `batch_size` (the data
order) and `steps` (the learning-rate schedule). It takes the newest intact checkpoint: a damaged
one (truncated files, empty metadata, a step left half-written) is logged with why and moved
aside, and none intact is a CheckpointError naming the directory (train/checkpoint.py).

Order at a step that checkpoints: the checkpoint is written first, then the evaluation; at the
end, the final checkpoint is on disk before the export and the final evaluation, so neither can
lose the run: rerunning the same command resumes at the last step and redoes them (a resume at a
step that evaluates redoes that evaluation too).

Metrics go to output_dir/metrics.jsonl every step, and a compact line goes to stdout every
`log_every` steps (and after every evaluation).

NaN guard: metrics are checked on the host after every step; a non-finite value stops the run with
an error naming the step and the metric, before the bad state can be checkpointed, so the last
checkpoint on disk is the last good one. Divergence alarms (train/alarms.py: grad_norm stuck at 0,
a loss that never moves, a grad_norm blowing up) warn naming the metric and step, and stop the
run the same way with `run.stop_on_alarm=true`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import shutil
import time
from typing import Any, Callable, Iterable

import numpy as np

from rlhf_jax import parallel
from rlhf_jax.config import ConfigError, require
from rlhf_jax.errors import UserError
from rlhf_jax.parallel import MeshConfig
from rlhf_jax.train.alarms import Alarms
from rlhf_jax.train.checkpoint import Checkpointer

__all__ = ["RunConfig", "Task", "TrainingDivergedError", "MetricsWriter", "run_loop"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RunConfig:
  steps: int = 100  # optimiser updates (each one optimizer.grad_accumulation micro-batches)
  batch_size: int = 8  # examples per micro-batch, global across devices
  log_every: int = 10
  eval_every: int = 0  # 0: evaluate at the end only
  eval_at_start: bool = True  # evaluate before the first step too: the starting point on record
  checkpoint_every: int = 0  # 0: checkpoint at the end only
  keep_checkpoints: int = 3
  async_checkpoint: bool = True
  resume: bool = True  # continue from the latest checkpoint in output_dir when there is one
  # With resume=false: delete the checkpoints already in output_dir and start over (without it,
  # a directory holding checkpoints is an error rather than a silent mix of two runs).
  overwrite: bool = False
  seed: int = 0  # one seed for init, data order and sampling
  output_dir: str = "runs/default"
  mesh: MeshConfig = MeshConfig()
  progress: bool = True  # tqdm bar with tokens/s and ETA
  tensorboard: bool = False  # needs the `tensorboard` extra
  wandb_project: str | None = None  # needs the `wandb` extra
  export: bool = True  # write a Hugging Face checkpoint of the final model to output_dir/hf
  # Divergence alarms (train/alarms.py): grad_norm exactly 0, or the loss at its first value,
  # for alarm_steps consecutive steps (0: off); grad_norm over alarm_grad_growth x its first
  # value (0: off). A warning naming the metric and step; with stop_on_alarm, the run stops.
  alarm_steps: int = 10
  alarm_grad_growth: float = 1e3
  # RL alarms (0: off): entropy under alarm_entropy_ratio x its first value; KL to the reference
  # over alarm_kl nats; response length of the last alarm_steps steps off that of the first by
  # more than alarm_length_drift (a fraction); gold reward alarm_gold_drop below its best while
  # the proxy rises (at evaluations with both).
  alarm_entropy_ratio: float = 0.1
  alarm_kl: float = 20.0
  alarm_length_drift: float = 0.5
  alarm_gold_drop: float = 0.1
  stop_on_alarm: bool = False

  def validate(self, *, steps: bool = True):
    """Ranges of the run settings (`steps=False`: trainers whose rounds set run.steps)."""
    if steps:
      require(self.steps >= 1, "run.steps", "an integer >= 1", self.steps)
    require(self.batch_size >= 1, "run.batch_size", "an integer >= 1", self.batch_size)
    require(self.log_every >= 1, "run.log_every", "an integer >= 1", self.log_every)
    for name in ("eval_every", "checkpoint_every", "alarm_steps"):
      value = getattr(self, name)
      require(value >= 0, f"run.{name}", "an integer >= 0 (0: off)", value)
    require(self.keep_checkpoints >= 1, "run.keep_checkpoints", "an integer >= 1",
            self.keep_checkpoints)
    require(self.alarm_grad_growth == 0 or self.alarm_grad_growth > 1, "run.alarm_grad_growth",
            "0 (off) or a factor > 1", self.alarm_grad_growth)
    require(0 <= self.alarm_entropy_ratio < 1, "run.alarm_entropy_ratio",
            "0 (off) or a fraction in (0, 1)", self.alarm_entropy_ratio)
    for name in ("alarm_kl", "alarm_length_drift", "alarm_gold_drop"):
      require(getattr(self, name) >= 0, f"run.{name}", "0 (off) or a number > 0",
              getattr(self, name))


@dataclasses.dataclass
class Task:
  """What a trainer gives the loop."""
  init_state: Callable[[], Any]
  train_step: Callable[[Any, dict], tuple[Any, dict]]
  batch: Callable[[int], dict]  # host batch for micro-step i
  put: Callable[[dict], dict]  # host batch -> device (sharded) batch
  num_steps: int  # micro-steps in the whole run
  eval_step: Callable[[Any, dict], dict] | None = None  # -> weighted sums incl. "weight"
  eval_batches: Callable[[], Iterable[dict]] | None = None
  # Extra evaluations at every evaluation: state -> metrics (e.g. sampling the policy and
  # measuring gold/proxy reward and KL); merged into the eval record.
  evaluators: list = dataclasses.field(default_factory=list)
  export: Callable[[Any, str], None] | None = None
  count_tokens: Callable[[dict], int] = lambda batch: int(np.sum(batch["attention_mask"]))
  config: dict = dataclasses.field(default_factory=dict)  # the experiment config, for the run dir


class TrainingDivergedError(UserError, RuntimeError):
  """A step produced a non-finite metric (or tripped an alarm, with run.stop_on_alarm); the run
  stopped before saving that state. A RuntimeError as it always was, and a UserError so the CLI
  reports it in one line."""


class MetricsWriter:
  """Metrics to a JSONL file, and optionally TensorBoard and Weights & Biases.

  `enabled=False` (every process but the first of a multi-host run) writes nothing.
  """

  def __init__(self, path: pathlib.Path, *, tensorboard_dir=None, wandb_project=None,
               config=None, resume_step: int | None = None, enabled: bool = True):
    self.path, self.enabled = path, enabled
    self.file = self.tensorboard = self.wandb = None
    if not enabled:
      return
    if resume_step is not None and path.exists():  # drop lines the resumed run will rewrite
      # (training past the checkpoint, and its evaluations: the one at the checkpoint's own step
      # runs after the save, so a resume redoes it); a last line without its newline is one a
      # kill cut short while it was written: never whole, so dropped too.
      text = path.read_text()
      lines = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]
      kept = [line for line in lines if line.strip() and _kept(json.loads(line), resume_step)]
      path.write_text("".join(line + "\n" for line in kept))
    self.file = path.open("a")
    if tensorboard_dir is not None:
      try:
        from tensorboardX import SummaryWriter
      except ImportError as err:
        raise ImportError("run.tensorboard=true needs tensorboardX: pip install "
                          "'rlhf-jax[tensorboard]'") from err
      self.tensorboard = SummaryWriter(str(tensorboard_dir))
    if wandb_project is not None:
      try:
        import wandb
      except ImportError as err:
        raise ImportError("run.wandb_project needs wandb: pip install 'rlhf-jax[wandb]'") from err
      self.wandb = wandb.init(project=wandb_project, config=config, resume="allow")

  def write(self, step: int, split: str, metrics: dict):
    if not self.enabled:
      return
    record = {"step": step, "split": split, **{k: _scalar(v) for k, v in metrics.items()}}
    self.file.write(json.dumps(record) + "\n")
    self.file.flush()
    if self.tensorboard is not None:
      for key, value in record.items():
        if key not in ("step", "split"):
          self.tensorboard.add_scalar(f"{split}/{key}", value, step)
    if self.wandb is not None:
      self.wandb.log({f"{split}/{k}": v for k, v in record.items() if k != "split"}, step=step)

  def close(self):
    if not self.enabled:
      return
    self.file.close()
    if self.tensorboard is not None:
      self.tensorboard.close()
    if self.wandb is not None:
      self.wandb.finish()


def _kept(record: dict, resume_step: int) -> bool:
  if record["split"] == "train":
    return record["step"] <= resume_step
  return record["step"] < resume_step


def _scalar(value):
  value = np.asarray(value)  # host: metrics come through parallel.host_get
  return value.item() if value.size == 1 else value.tolist()


def _last_good(checkpoints: Checkpointer) -> str:
  checkpoints.wait()
  last = checkpoints.latest_step()
  return (f"the last good checkpoint is step {last} in {checkpoints.directory}" if last
          is not None else "no checkpoint was written before it")


def _check_finite(step: int, metrics: dict, checkpoints: Checkpointer):
  # host: metrics come through parallel.host_get
  bad = {k: v for k, v in metrics.items() if not np.all(np.isfinite(np.asarray(v, np.float64)))}
  if bad:
    raise TrainingDivergedError(
        f"step {step}: non-finite {', '.join(f'{k}={v}' for k, v in bad.items())}; stopped "
        f"without saving this state ({_last_good(checkpoints)}). Lower the learning rate or "
        "check the data, then rerun to resume from that checkpoint.")


def _check_alarms(step: int, metrics: dict, alarms: Alarms, run: RunConfig,
                  checkpoints: Checkpointer, *, evaluation: bool = False):
  fired = alarms.check_eval(step, metrics) if evaluation else alarms.check(step, metrics)
  for message in fired:
    if run.stop_on_alarm:
      raise TrainingDivergedError(
          f"{message}; stopped by run.stop_on_alarm=true without saving this state "
          f"({_last_good(checkpoints)})")
    log.warning("%s; run.stop_on_alarm=true would stop the run here", message)


def evaluate(task: Task, state) -> dict:
  """Weighted means over every evaluation example (zero-weight filler excluded), merged with
  the task's extra evaluators."""
  metrics: dict[str, float] = {}
  if task.eval_step is not None:
    totals: dict[str, float] = {}
    for batch in task.eval_batches():
      sums = parallel.host_get(task.eval_step(state, task.put(batch)))
      for key, value in sums.items():
        totals[key] = totals.get(key, 0.0) + float(value)
    weight = totals.pop("weight", 0.0)
    metrics = {key: value / max(weight, 1e-12) for key, value in totals.items()}
  for evaluator in task.evaluators:
    metrics.update(evaluator(state))
  return metrics


_RESUME_MUST_MATCH = ("model", "data", "loss", "optimizer")
# RunConfig fields a resumed run must share with its checkpoint: the data order is a function of
# (seed, batch_size) and the checkpoint stores the data position as a step count; the learning-rate
# schedule is a function of steps.
_RUN_MUST_MATCH = {"seed": "the data order and every random draw",
                   "batch_size": "the data order (the data position is stored as a step count)",
                   "steps": "the learning-rate schedule"}


def _check_resumable(meta: dict, current: dict, run: RunConfig, directory):
  saved = meta.get("config")
  for section in _RESUME_MUST_MATCH if saved else ():
    if section in current and saved.get(section) != current.get(section):
      raise ConfigError(
          f"{directory} holds checkpoints of a run whose '{section}' config differs from this "
          f"one ({saved.get(section)} vs {current.get(section)}); use a new run.output_dir, or "
          "run.resume=false with run.overwrite=true to start over there")
  step = meta.get("step")
  for name, why in _RUN_MUST_MATCH.items():
    if name in meta and meta[name] != getattr(run, name):
      raise ConfigError(
          f"cannot resume the checkpoint at step {step} in {directory}: it was written with "
          f"run.{name}={meta[name]}, this run has run.{name}={getattr(run, name)} ({why} depends "
          f"on it). Set run.{name}={meta[name]} to resume, use a new run.output_dir, or "
          "run.resume=false with run.overwrite=true to start over there")


def _open_checkpoints(run: RunConfig, directory: pathlib.Path) -> Checkpointer:
  """The run's Checkpointer; when not resuming, old checkpoints are refused (overwrite: deleted)."""
  if run.overwrite and run.resume:
    raise ConfigError("run.overwrite=true deletes the checkpoints in run.output_dir and starts "
                     "over, which contradicts run.resume=true; set run.resume=false with it")
  checkpoints = Checkpointer(directory, keep=run.keep_checkpoints,
                             async_save=run.async_checkpoint)
  steps = checkpoints.all_steps()
  if run.resume or not steps:
    return checkpoints
  if not run.overwrite:
    checkpoints.close()
    raise ConfigError(
        f"{checkpoints.directory} already holds checkpoints at steps {sorted(steps)} and "
        "run.resume=false: this run would write none at or below step "
        f"{max(steps)} and a later resume would restore the old run. Set run.resume=true to "
        "continue that run, choose another run.output_dir, or set run.overwrite=true to delete "
        "those checkpoints and start over")
  log.warning("run.overwrite=true: deleting checkpoints at steps %s in %s", sorted(steps),
              checkpoints.directory)
  checkpoints.close()
  shutil.rmtree(checkpoints.directory)
  return Checkpointer(directory, keep=run.keep_checkpoints, async_save=run.async_checkpoint)


def run_loop(task: Task, run: RunConfig) -> dict:
  """Runs (or resumes) a task to completion; returns a summary with the final metrics."""
  out = pathlib.Path(run.output_dir)
  out.mkdir(parents=True, exist_ok=True)
  checkpoints = _open_checkpoints(run, out / "checkpoints")
  try:
    state = task.init_state()
    start = 0
    # The newest intact checkpoint: damaged ones are logged and set aside (checkpoint.py).
    restored = checkpoints.restore_intact(
        state, check=lambda meta: _check_resumable(meta, task.config, run, out)) if (
            run.resume) else None
    if restored is not None:
      state, meta = restored
      start = int(meta["step"])
      log.info("resumed from %s at step %d", checkpoints.directory, start)
  except BaseException:
    checkpoints.close()
    raise
  # Written once the run is known to belong here: a refused run leaves the old config in place.
  # Run files come from process 0 only; every process takes part in the (orbax) checkpoints.
  main_process = parallel.is_main_process()
  if main_process:
    (out / "config.json").write_text(json.dumps(task.config, indent=2))
  writer = MetricsWriter(out / "metrics.jsonl",
                         tensorboard_dir=out / "tensorboard" if run.tensorboard else None,
                         wandb_project=run.wandb_project, config=task.config,
                         resume_step=start, enabled=main_process)

  def save(step):
    checkpoints.save(step, state, {"step": step, "data_position": step, "seed": run.seed,
                                   "batch_size": run.batch_size, "steps": run.steps,
                                   "config": task.config})

  from tqdm.auto import tqdm
  bar = tqdm(total=task.num_steps, initial=start, disable=not run.progress, unit="step",
             dynamic_ncols=True)
  last_metrics, eval_metrics = {}, {}
  evaluates = task.eval_step is not None or bool(task.evaluators)
  alarms = Alarms(run.alarm_steps, run.alarm_grad_growth,
                  entropy_ratio=run.alarm_entropy_ratio, kl_max=run.alarm_kl,
                  length_drift=run.alarm_length_drift, gold_drop=run.alarm_gold_drop)
  window_tokens, window_start = 0, time.perf_counter()

  def evaluate_at(step: int) -> dict:
    """Evaluates the current state: recorded, checked for reward hacking, printed."""
    metrics = evaluate(task, state)
    writer.write(step, "eval", metrics)
    _check_alarms(step, metrics, alarms, run, checkpoints, evaluation=True)
    _print(f"eval step {step}/{task.num_steps} {_format(metrics)}")
    return metrics

  try:
    if evaluates and 0 < start < task.num_steps and run.eval_every and start % run.eval_every == 0:
      eval_metrics = evaluate(task, state)  # the evaluation after that checkpoint, redone
      writer.write(start, "eval", eval_metrics)
    if evaluates and start == 0 and run.eval_at_start and task.num_steps > 0:
      eval_metrics = evaluate_at(0)
    for step in range(start, task.num_steps):
      batch = task.batch(step)
      window_tokens += task.count_tokens(batch)
      state, metrics = task.train_step(state, task.put(batch))
      metrics = parallel.host_get(metrics)
      _check_finite(step + 1, metrics, checkpoints)
      _check_alarms(step + 1, metrics, alarms, run, checkpoints)
      last_metrics = {**{k: _scalar(v) for k, v in metrics.items()}, **alarms.fired_metrics()}
      writer.write(step + 1, "train", last_metrics)
      bar.update(1)
      if (step + 1) % run.log_every == 0 or step + 1 == task.num_steps:
        elapsed = time.perf_counter() - window_start
        throughput = window_tokens / max(elapsed, 1e-9)
        shown = {"loss": f"{last_metrics['loss']:.4f}"} if "loss" in last_metrics else {}
        bar.set_postfix(**shown, tok_s=f"{throughput:,.0f}")
        _print(f"step {step + 1}/{task.num_steps} {_format(last_metrics)} "
               f"tok/s={throughput:.0f}")
        window_tokens, window_start = 0, time.perf_counter()
      done = step + 1 == task.num_steps
      # The checkpoint comes first: an evaluation or export that fails loses no training.
      if done or run.checkpoint_every and (step + 1) % run.checkpoint_every == 0:
        save(step + 1)
      if evaluates and not done and run.eval_every and (step + 1) % run.eval_every == 0:
        eval_metrics = evaluate_at(step + 1)
    bar.close()
    checkpoints.close()  # the final checkpoint is on disk before anything else can fail
    try:
      if run.export and task.export is not None:
        task.export(state, str(out / "hf"))
      if evaluates:
        eval_metrics = evaluate_at(task.num_steps)
    except Exception as err:
      log.error("the final export or evaluation failed; the final checkpoint (step %d) is in %s: "
                "rerun the same command to resume there and redo them", task.num_steps,
                checkpoints.directory)
      raise err
  finally:
    bar.close()
    writer.close()
    checkpoints.close()
  return {"state": state, "train": last_metrics, "eval": eval_metrics, "output_dir": str(out),
          "alarms": sorted(alarms.fired)}


def _print(line: str):
  """One metrics line to stdout (through tqdm, so a live bar is not broken), from process 0."""
  if parallel.is_main_process():
    from tqdm.auto import tqdm
    tqdm.write(line)


def _format(metrics: dict) -> str:
  """Scalars as `name=value` (4 significant digits); array-valued metrics stay in the JSONL."""
  return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                  for k, v in sorted(metrics.items()) if isinstance(v, (int, float)))
