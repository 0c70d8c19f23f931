"""The whole RLHF pipeline on the synthetic task, where the true (gold) reward is known.

  SFT on demonstrations  ->  a reward model on labelled pairs (the proxy)  ->
    PPO against the proxy with a KL penalty to the SFT policy
    DPO and other direct losses on the same pairs
    best-of-N against the proxy (no training)
  -> every policy sampled on the same held-out prompts: gold and proxy reward, KL to the SFT
     policy, length, gold win rate against the SFT policy.

The labellers are Bradley-Terry on the gold reward with noise and a length bias (they like longer
answers a little; gold does not), so the proxy can be exploited: the over-optimisation plot shows
proxy and gold against sqrt(KL) (Gao et al. 2022), the frontier plot gold against KL for each
method (the DPO paper's Figure 2, at toy scale). `sweep` runs several KL coefficients and betas.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time

import jax
import numpy as np

from rlhf_jax import parallel, rewards, rollout
from rlhf_jax.data import BatchStream, TokenizeConfig, prepare, synthetic
from rlhf_jax.eval import diagnostics, plots, policy_eval, stats
from rlhf_jax.parallel import MeshConfig
from rlhf_jax.train import common, loop, ppo, preference, reward, sft
from rlhf_jax.train.state import OptimizerConfig

__all__ = ["Stage", "PipelineConfig", "run", "best_of_n_points"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Stage:
  steps: int
  batch_size: int = 32
  lr: float = 1e-3


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  trainer: str = "pipeline"
  output_dir: str = "runs/pipeline"
  seed: int = 0
  mesh: MeshConfig = MeshConfig()  # every stage's device mesh (default: all devices, data)
  model: str = "synthetic:tiny"  # the pretrained starting point
  label_temperature: float = 0.25  # labeller noise (Bradley-Terry temperature on gold)
  length_bias: float = 0.5  # labellers' preference per extra sentence; gold has none
  num_demonstrations: int = 4096
  num_pairs: int = 4096
  eval_prompts: int = 128
  max_new_tokens: int = 24
  eval_points: int = 3  # evaluations during each training run (trajectories in the plots)
  sft: Stage = Stage(steps=150, lr=2e-3)
  reward: Stage = Stage(steps=150, lr=1e-3)
  ppo: Stage = Stage(steps=40, lr=3e-4)
  ppo_kl_coefs: tuple[float, ...] = (0.05,)
  direct: Stage = Stage(steps=100, lr=1e-4)
  # "loss:beta" for each direct run; IPO's β acts on token-mean log-probs (target margin 1/(2β)
  # nats per token), so it wants a larger β than DPO's on sums.
  direct_methods: tuple[str, ...] = ("dpo:0.1", "ipo:0.5")
  best_of_n: tuple[int, ...] = (2, 4, 8, 16)
  # Fresh samples per prompt for the best-of-N KL estimate's reward CDF: its bias for a continuous
  # reward is about -(N-1)/(2M) (-0.03 at N = 16; 16 gave -0.45), see best_of_n_kl_estimate_bias.
  # Sampling and scoring them takes ~30 s of the pipeline on 2 CPU cores.
  best_of_n_reference: int = 256
  # Several seeds (e.g. --set seeds=0,1,2): the whole pipeline once per seed, in
  # output_dir/seed-<s>, then one table of means with two-level bootstrap 95% intervals (over
  # seeds and held-out prompts, eval/stats.py). Empty: one run with `seed`.
  seeds: tuple[int, ...] = ()

  def direct_runs(self) -> list[tuple[str, float]]:
    from rlhf_jax import losses
    runs = []
    for method in self.direct_methods:
      name, _, beta = method.partition(":")
      if name not in losses.PREFERENCE_LOSSES or not beta:
        raise ValueError(f"direct_methods entry {method!r} must be 'loss:beta' with a loss in "
                         f"PREFERENCE_LOSSES")
      runs.append((name, float(beta)))
    return runs

  def validate(self):
    self.direct_runs()
    if self.best_of_n_reference < 1 or min(self.best_of_n, default=1) < 1:
      raise ValueError("best_of_n sizes and best_of_n_reference must be >= 1")


def _run_config(config: PipelineConfig, stage: Stage, name: str, **changes) -> loop.RunConfig:
  return loop.RunConfig(steps=stage.steps, batch_size=stage.batch_size, log_every=max(
      stage.steps // 4, 1), output_dir=str(pathlib.Path(config.output_dir) / name),
      # Every stage starts over: a rerun into the same output_dir replaces the last one's stages.
      seed=config.seed, progress=False, resume=False, overwrite=True, mesh=config.mesh,
      **changes)


def _timed(fn, *args):
  start = time.perf_counter()
  out = fn(*args)
  return out, time.perf_counter() - start


class _Lab:
  """What every stage shares: the data files, the tokenizer, the evaluation."""

  def __init__(self, config: PipelineConfig):
    self.config = config
    self.out = pathlib.Path(config.output_dir)
    (self.out / "data").mkdir(parents=True, exist_ok=True)
    task = synthetic.SyntheticTask(seed=config.seed, label_temperature=config.label_temperature,
                                   length_bias=config.length_bias)
    self.files = {}
    for name, rows in (("sft", task.sft_rows(config.num_demonstrations)),
                       ("pairs", task.preference_rows(config.num_pairs)),
                       ("prompts", task.prompt_rows(2048)),
                       ("eval_prompts", task.prompt_rows(config.eval_prompts, stream=9))):
      path = self.out / "data" / f"{name}.jsonl"
      path.write_text("".join(json.dumps(row) + "\n" for row in rows))
      self.files[name] = str(path)
    self.base = common.ModelSpec(path=config.model)
    self.tokenizer = common.load_tokenizer(self.base)

  def data(self, name, max_length, buckets, eval_fraction=0.05):
    return common.DataSpec(train=self.files[name], max_length=max_length, buckets=buckets,
                           eval_fraction=eval_fraction)

  def make_evaluator(self, sft_dir, rm_dir):
    """One PolicyEvaluator (the same prompts, key, proxy, gold and reference for every method)."""
    spec = common.ModelSpec(path=sft_dir)
    model, sft_params = common.load_policy(spec)
    rm, rm_params = common.load_reward_model(rm_dir, spec)
    self.proxy = rollout.ModelScorer(rm, rm_params)
    records, _ = prepare("prompt", self.files["eval_prompts"], self.tokenizer,
                         TokenizeConfig(max_length=16))
    self.model, self.sft_params = model, sft_params
    self.evaluator = policy_eval.PolicyEvaluator(
        model, sft_params, self.tokenizer, records, batch_size=64,
        max_new_tokens=self.config.max_new_tokens,
        eos_ids=rollout.stop_ids(self.tokenizer, model), proxy=self.proxy,
        gold_fn=rewards.RewardFunction(synthetic.gold_reward_fn, "gold"), seed=self.config.seed)
    self.records = records
    self.sft_samples = self.evaluator.samples(sft_params)
    return self.evaluator


def _per_prompt(samples, baseline) -> dict:
  """Per-prompt values of a policy's evaluation, for intervals over seeds and prompts."""
  # host: PolicySamples hold NumPy arrays
  as_list = lambda x: None if x is None else np.asarray(x, np.float64).tolist()
  return {"gold_reward": as_list(samples.gold), "proxy_reward": as_list(samples.proxy),
          "kl": as_list(samples.kl), "length": as_list(samples.length),
          "win_rate": as_list(stats.win_indicators(samples.gold, baseline.gold))
          if samples.gold is not None and baseline.gold is not None else None}


def _final(lab: _Lab, params, name: str, seconds: float, trajectory) -> dict:
  samples = lab.evaluator.samples(params)
  row = {"method": name, **policy_eval.summarize(samples, lab.sft_samples), "seconds": seconds,
         "trajectory": trajectory, "per_prompt": _per_prompt(samples, lab.sft_samples)}
  log.info("%s: %s", name, {k: v for k, v in row.items() if k not in ("trajectory", "per_prompt")})
  return row


def _trajectory(run_dir: pathlib.Path) -> list[dict]:
  lines = (run_dir / "metrics.jsonl").read_text().splitlines()
  return [json.loads(line) for line in lines if json.loads(line)["split"] == "eval"
          and "gold_reward" in json.loads(line)]


def run(config: PipelineConfig) -> dict:
  config.validate()
  if config.seeds:
    return run_seeds(config)
  start = time.perf_counter()
  lab = _Lab(config)
  out, rows = lab.out, []
  eval_every = lambda stage: max(stage.steps // config.eval_points, 1)

  # 1. SFT on demonstrations.
  sft_config = sft.SFTConfig(
      model=lab.base, data=lab.data("sft", 32, (32,)),
      optimizer=OptimizerConfig(lr=config.sft.lr, warmup_steps=10),
      run=_run_config(config, config.sft, "sft"))
  _, sft_seconds = _timed(sft.run, sft_config)
  sft_dir = str(out / "sft" / "hf")

  # 2. The proxy reward model on the labelled pairs, from the SFT model.
  rm_config = reward.RewardConfig(
      model=common.ModelSpec(path=sft_dir), data=lab.data("pairs", 32, (32,)),
      loss=reward.RewardLoss(center_coef=0.01),
      optimizer=OptimizerConfig(lr=config.reward.lr, warmup_steps=10),
      run=_run_config(config, config.reward, "reward"))
  rm_summary, rm_seconds = _timed(reward.run, rm_config)
  rm_dir = str(out / "reward" / "hf")
  evaluator = lab.make_evaluator(sft_dir, rm_dir)
  rows.append({"method": "SFT", **policy_eval.summarize(lab.sft_samples, lab.sft_samples),
               "seconds": sft_seconds, "trajectory": [],
               "per_prompt": _per_prompt(lab.sft_samples, lab.sft_samples)})
  log.info("reward model: held-out accuracy %.3f", rm_summary["eval"].get("accuracy", np.nan))

  # 3. PPO against the proxy, from the SFT policy, one run per KL coefficient.
  for kl_coef in config.ppo_kl_coefs:
    name = f"PPO kl={kl_coef:g}"
    ppo_config = ppo.PPOConfig(
        model=common.ModelSpec(path=sft_dir),
        data=dataclasses.replace(lab.data("prompts", 16, (16,), eval_fraction=0.0)),
        generation=rollout.GenerationConfig(max_new_tokens=config.max_new_tokens),
        reward=rollout.RewardSpec(kind="model", path=rm_dir),
        loss=ppo.PPOLoss(kl_coef=kl_coef),
        optimizer=OptimizerConfig(lr=config.ppo.lr),
        run=_run_config(config, config.ppo, f"ppo-{kl_coef:g}",
                        eval_every=eval_every(config.ppo), export=False))
    task = ppo.build_task(ppo_config)
    task.evaluators.append(_as_evaluator(evaluator, lambda s: s.params["policy"]))
    summary, seconds = _timed(loop.run_loop, task, ppo_config.run)
    rows.append({**_final(lab, summary["state"].params["policy"], name, seconds,
                          _trajectory(pathlib.Path(ppo_config.run.output_dir))),
                 "rm_seconds": rm_seconds,  # PPO needs the reward model: its time is extra
                 "alarms": summary["alarms"]})

  # 4. Direct methods on the same pairs, from the SFT policy.
  for loss_name, beta in config.direct_runs():
    name = f"{loss_name.upper()} β={beta:g}"
    direct_config = preference.PreferenceConfig(
        model=common.ModelSpec(path=sft_dir), data=lab.data("pairs", 32, (32,)),
        loss=preference.PreferenceLossConfig(name=loss_name, beta=beta),
        optimizer=OptimizerConfig(lr=config.direct.lr, warmup_steps=5),
        run=_run_config(config, config.direct, f"{loss_name}-{beta:g}",
                        eval_every=eval_every(config.direct), export=False))
    task = preference.build_task(direct_config)
    task.evaluators.append(_as_evaluator(evaluator, lambda s: s.params))
    summary, seconds = _timed(loop.run_loop, task, direct_config.run)
    rows.append({**_final(lab, summary["state"].params, name, seconds,
                          _trajectory(pathlib.Path(direct_config.run.output_dir))),
                 "alarms": summary["alarms"]})

  # 5. Best-of-N against the proxy: no training; KL is log N - (N-1)/N.
  bon = [{**point, "rm_seconds": rm_seconds} for point in best_of_n_points(lab, config)]
  result = {"rows": rows, "best_of_n": bon, "reward_model": rm_summary["eval"],
            "seconds": time.perf_counter() - start, "rm_seconds": rm_seconds}
  table = plots.comparison_table(rows, bon, reference_samples=config.best_of_n_reference)
  print(table)
  (out / "table.md").write_text(table + "\n")
  (out / "results.json").write_text(json.dumps(result, indent=2, default=float))
  plots.frontier(rows, bon, out / "frontier.png")
  plots.overoptimization(rows, out / "overoptimization.png", bon)
  log.info("pipeline done in %.0fs: %s", result["seconds"], out)
  return result


SEED_METRICS = (("gold_reward", ".3f"), ("proxy_reward", ".3f"), ("kl", ".2f"),
                ("length", ".1f"), ("win_rate", ".3f"))


def run_seeds(config: PipelineConfig) -> dict:
  """The pipeline once per seed, then a table of means with 95% intervals per method."""
  out = pathlib.Path(config.output_dir)
  results = [run(dataclasses.replace(config, seed=seed, seeds=(),
                                     output_dir=str(out / f"seed-{seed}")))
             for seed in config.seeds]
  table = seeds_table(results, config.seeds)
  print(table)
  out.mkdir(parents=True, exist_ok=True)
  (out / "table.md").write_text(table + "\n")
  summary = {"seeds": list(config.seeds), "table": table,
             "seconds": sum(r["seconds"] for r in results)}
  (out / "results.json").write_text(json.dumps(summary, indent=2))
  return {**summary, "runs": results}


def seeds_table(results: list[dict], seeds) -> str:
  """Markdown: each method's metrics as mean [95% interval] over seeds and held-out prompts;
  best-of-N points (one mean per seed) over seeds alone."""
  lines = [f"| method | {' | '.join(name.replace('_', ' ') for name, _ in SEED_METRICS)} |",
           "|---" * (len(SEED_METRICS) + 1) + "|"]
  methods = list(dict.fromkeys(row["method"] for r in results for row in r["rows"]))
  for method in methods:
    rows = [row for r in results for row in r["rows"] if row["method"] == method]
    cells = []
    for name, spec in SEED_METRICS:
      # host: lists read back from the runs' results
      groups = [np.asarray(row["per_prompt"][name], np.float64) for row in rows
                if row.get("per_prompt", {}).get(name) is not None]
      trivial = method == "SFT" and name in ("kl", "win_rate")  # 0 and 0.5 by definition
      cells.append(stats.format_interval(*stats.bootstrap_mean_ci(groups), spec)
                   if groups and not trivial else "-")
    lines.append(f"| {method} | {' | '.join(cells)} |")
  for n in sorted({p["n"] for r in results for p in r["best_of_n"]}):
    points = [p for r in results for p in r["best_of_n"] if p["n"] == n]
    cells = []
    for name, spec in SEED_METRICS:
      values = [p[name] for p in points if p.get(name) is not None]
      cells.append(stats.format_interval(*stats.bootstrap_mean_ci(
          [np.asarray([v]) for v in values]), spec) if values else "-")
    lines.append(f"| best-of-{n} | {' | '.join(cells)} |")
  return "\n".join(lines + ["", f"Seeds {', '.join(map(str, seeds))}: mean [95% interval], a "
                             "two-level bootstrap over seeds and held-out prompts (best-of-N: "
                             "over seeds); the SFT policy's own KL and win rate are trivial."])


def _as_evaluator(evaluator, params_of):
  def evaluate(state):
    return policy_eval.summarize(evaluator.samples(params_of(state)))
  return evaluate


def best_of_n_points(lab: _Lab, config: PipelineConfig) -> list[dict]:
  """Gold and proxy of best-of-N for each N, with the analytic and the estimated KL.

  N_max + M samples per prompt: the first N_max are the candidates (best-of-n uses the first n),
  the other M = best_of_n_reference estimate the proxy's CDF for the KL estimate, independently
  of the winners. Each point reports M, the estimate's exact bias for a continuous reward, the
  winners' mean length (tokens), and its wall time: its share n / (N_max + M) of sampling and
  scoring every draw (one batched call per prompt batch, so per-sample cost is uniform).
  """
  n_max, m = max(config.best_of_n), config.best_of_n_reference
  draws = n_max + m
  sample = rollout.make_sampler(lab.model, rollout.GenerationConfig(
      max_new_tokens=config.max_new_tokens, num_samples=draws),
      rollout.stop_ids(lab.tokenizer, lab.model), lab.tokenizer.pad_token_id)
  stream = BatchStream(lab.records, 16, 16, lab.tokenizer.pad_token_id, shuffle=False)
  proxy, gold, length, seconds = [], [], [], 0.0
  key = jax.random.key(config.seed + 1)
  for i, batch in enumerate(stream.epoch()):
    records = [lab.records[j] for j in batch["index"]]
    start = time.perf_counter()
    samples = sample(lab.sft_params, batch["prompt_ids"], batch["prompt_mask"],
                     jax.random.fold_in(key, i))
    scores = parallel.host_get(lab.proxy(samples, records)[0])
    seconds += time.perf_counter() - start
    real = np.repeat(batch["weight"] > 0, draws)
    proxy.append(scores[real].reshape(-1, draws))
    length.append(parallel.host_get(samples.response_mask.sum(1))[real].reshape(-1, draws))
    # Gold (evaluation only, untimed) for the candidates; the reference draws serve the CDF.
    keep = np.flatnonzero(real & (np.arange(real.size) % draws < n_max))
    candidates = rollout.take_rows(samples, keep)
    prompts = [records[j].text for j in parallel.host_get(candidates.prompt_index)]
    responses = rollout.decode_responses(candidates, lab.tokenizer)
    gold.append(np.reshape(synthetic.gold_reward_fn(prompts, responses), (-1, n_max)))
  proxy, gold, length = np.concatenate(proxy), np.concatenate(gold), np.concatenate(length)
  points = []
  for n in config.best_of_n:
    # The winner among each prompt's first n draws (flat rows of the [prompts, n] candidates).
    winners = parallel.host_get(rollout.group_rows(proxy[:, :n].reshape(-1), n))
    won = lambda values: values[:, :n].reshape(-1)[winners]
    kl_estimate, kl_error = diagnostics.best_of_n_kl_estimate(
        won(proxy)[:, None], proxy[:, n_max:], n)
    points.append({"n": n, "kl": diagnostics.best_of_n_kl_analytic(n),
                   "kl_estimate": kl_estimate, "kl_estimate_error": kl_error,
                   "kl_estimate_bias": diagnostics.best_of_n_kl_estimate_bias(n, m),
                   "reference_samples": m,
                   "proxy_reward": float(won(proxy).mean()),
                   "gold_reward": float(won(gold).mean()),
                   "length": float(won(length).mean()),
                   "seconds": seconds * n / draws})
  return points
