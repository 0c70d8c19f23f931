"""RL with a verifiable reward on the embedded arithmetic task: SFT, then GRPO and RLOO.

  SFT on demonstrations that are right most of the time (a share carries a slip: a carry, ±10,
  or a last digit off by one, ±1: `data/arithmetic.py`)  ->
    GRPO and RLOO from the SFT policy, on prompts whose rows carry the `answer` column, rewarded
    by `rlhf_jax.rewards.math_answer` (1 if the completion's number equals the answer, else 0)
  -> every policy sampled at temperature 1 on evaluation prompts that no RL step saw: accuracy
     (the checker's mean), KL to the SFT policy, response length.

What it shows, in the default single-digit setting (a + b with a, b in 0..9): the SFT policy
knows the sums (its greedy answer is almost always right) but samples the demonstrations' slips
about as often as they occur; RL with the checker removes most of them at a small KL — the
sharpening that RL with verifiable rewards is known for. The evaluation prompts are fresh rows
over the same 100 sums (`task.held_out_fraction=0`). `--set task.held_out_fraction=0.1` with
larger operands (`task.min_operand=10 task.max_operand=99`) evaluates on operand pairs never
trained on, but the embedded model needs far more SFT than this lab's budget to add those.
It is the GSM8K recipe of experiments/grpo.py in miniature: the same trainers, the same reward
function reading the same column.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time

from rlhf_jax import rewards, rollout
from rlhf_jax.data import TokenizeConfig, arithmetic, prepare
from rlhf_jax.eval import policy_eval
from rlhf_jax.parallel import MeshConfig
from rlhf_jax.pipeline import Stage
from rlhf_jax.train import common, grpo, loop, sft
from rlhf_jax.train.state import OptimizerConfig

__all__ = ["VerifiableConfig", "run"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class VerifiableConfig:
  trainer: str = "verifiable"
  output_dir: str = "runs/verifiable"
  seed: int = 0
  mesh: MeshConfig = MeshConfig()
  model: str = "synthetic:arith"  # the embedded model with the task's tokenizer
  task: arithmetic.ArithmeticTask = arithmetic.ArithmeticTask()  # its seed is `seed`
  num_demonstrations: int = 8192
  eval_prompts: int = 256
  max_new_tokens: int = 4  # up to 3 digits, then <eos>
  sft: Stage = Stage(steps=300, batch_size=64, lr=1e-3)
  rl: Stage = Stage(steps=40, batch_size=32, lr=5e-4)
  num_samples: int = 8  # G, per prompt
  kl_coef: float = 0.02
  methods: tuple[str, ...] = ("grpo", "rloo")

  def validate(self):
    unknown = set(self.methods) - {"grpo", "rloo"}
    if unknown:
      raise ValueError(f"methods: {sorted(unknown)} are not 'grpo' or 'rloo'")
    if self.task.seed not in (0, self.seed):
      raise ValueError(f"task.seed={self.task.seed}: set seed instead (it seeds the task's rows "
                       "as well as training)")
    if not 0 <= self.task.demo_error_rate < 1:
      raise ValueError(f"task.demo_error_rate must be in [0, 1), got "
                       f"{self.task.demo_error_rate}")
    if not 0 <= self.task.held_out_fraction < 1:
      raise ValueError(f"task.held_out_fraction must be in [0, 1), got "
                       f"{self.task.held_out_fraction}")


def _run_config(config: VerifiableConfig, stage: Stage, name: str) -> loop.RunConfig:
  return loop.RunConfig(steps=stage.steps, batch_size=stage.batch_size,
                        log_every=max(stage.steps // 4, 1),
                        output_dir=str(pathlib.Path(config.output_dir) / name), seed=config.seed,
                        progress=False, resume=False, overwrite=True, mesh=config.mesh,
                        export=True)


def _data(config: VerifiableConfig, out: pathlib.Path) -> dict[str, str]:
  task = dataclasses.replace(config.task, seed=config.seed)
  files = {}
  for name, rows in (("sft", task.sft_rows(config.num_demonstrations)),
                     ("prompts", task.prompt_rows(4096)),
                     ("eval_prompts", task.eval_rows(config.eval_prompts))):
    path = out / "data" / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    files[name] = str(path)
  return files


def _rl_config(config: VerifiableConfig, method: str, sft_dir: str, prompts: str):
  return grpo.GRPOConfig(
      trainer=method, model=common.ModelSpec(path=sft_dir),
      data=common.DataSpec(train=prompts, max_length=12, buckets=(12,), eval_fraction=0.0),
      generation=rollout.GenerationConfig(max_new_tokens=config.max_new_tokens,
                                          num_samples=config.num_samples),
      reward=rollout.RewardSpec(kind="function", functions=("rlhf_jax.rewards:math_answer",),
                                gold_function=None),
      loss=grpo.GRPOLoss(kl_coef=config.kl_coef,
                         kl_in="loss" if method == "grpo" else "reward", epochs=2, minibatches=2),
      optimizer=OptimizerConfig(lr=config.rl.lr),
      run=_run_config(config, config.rl, method))


def _table(rows: list[dict], num_prompts: int, task: arithmetic.ArithmeticTask) -> str:
  lines = ["| method | accuracy | KL to SFT | length | wall time |", "|---|---|---|---|---|"]
  lines += [f"| {r['method']} | {r['accuracy']:.3f} | {r['kl']:.2f} | {r['length']:.2f} | "
            f"{r['seconds']:.0f}s |" for r in rows]
  prompts = ("operand pairs never trained on" if task.held_out_fraction > 0 else
             "fresh rows that no RL step saw, over the sums the demonstrations cover")
  return "\n".join(lines + ["", f"Accuracy: the checker (rlhf_jax.rewards.math_answer) on "
                                 f"{num_prompts} evaluation prompts ({prompts}), one sample "
                                 "each at temperature 1. Length in tokens incl. <eos>. RL's "
                                 "wall time excludes the SFT it starts from."])


def run(config: VerifiableConfig) -> dict:
  config.validate()
  start = time.perf_counter()
  out = pathlib.Path(config.output_dir)
  files = _data(config, out)

  sft_config = sft.SFTConfig(
      model=common.ModelSpec(path=config.model),
      data=common.DataSpec(train=files["sft"], max_length=12, buckets=(12,), eval_fraction=0.0),
      optimizer=OptimizerConfig(lr=config.sft.lr, warmup_steps=20),
      run=_run_config(config, config.sft, "sft"))
  sft_start = time.perf_counter()
  sft.run(sft_config)
  timings = {"SFT": time.perf_counter() - sft_start}
  sft_dir = str(out / "sft" / "hf")

  spec = common.ModelSpec(path=sft_dir)
  tokenizer = common.load_tokenizer(spec)
  model, sft_params = common.load_policy(spec)
  records, _ = prepare("prompt", files["eval_prompts"], tokenizer, TokenizeConfig(max_length=12))
  evaluator = policy_eval.PolicyEvaluator(
      model, sft_params, tokenizer, records, batch_size=64, max_new_tokens=config.max_new_tokens,
      eos_ids=rollout.stop_ids(tokenizer, model), seed=config.seed,
      gold_fn=rewards.RewardFunction.load("rlhf_jax.rewards:math_answer", "accuracy"))
  rows = [{"method": "SFT", **policy_eval.summarize(evaluator.samples(sft_params))}]
  for method in config.methods:
    method_start = time.perf_counter()
    summary = grpo.run(_rl_config(config, method, sft_dir, files["prompts"]))
    timings[method.upper()] = time.perf_counter() - method_start
    rows.append({"method": method.upper(),
                 **policy_eval.summarize(evaluator.samples(summary["state"].params))})
  for row in rows:
    row["accuracy"] = row.pop("gold_reward")
    row["seconds"] = timings[row["method"]]
    log.info("%s", row)
  table = _table(rows, len(records), config.task)
  print(table)
  result = {"rows": rows, "seconds": time.perf_counter() - start}
  (out / "table.md").write_text(table + "\n")
  (out / "results.json").write_text(json.dumps(result, indent=2, default=float))
  log.info("verifiable-reward lab done in %.0fs: %s", result["seconds"], out)
  return result
