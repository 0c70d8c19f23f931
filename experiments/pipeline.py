"""The classic RLHF pipeline beside its direct alternatives, where the true reward is known.

    python -m rlhf_jax run experiments/pipeline.py              # ~2.5-3 min on 2 CPU cores
    python -m rlhf_jax run experiments/pipeline.py --arg sweep  # several KL coefs / betas, ~6 min
    python -m rlhf_jax run experiments/pipeline.py --arg runlocal   # ~1 min smoke run

SFT -> reward model -> PPO (KL penalty to the SFT policy), and DPO and IPO on the same
preference pairs, and best-of-N against the reward model (its KL also estimated from the reward
model's CDF on M = best_of_n_reference = 256 fresh samples per prompt; the table's note gives the
estimate's bias); then every policy is sampled on the same held-out prompts. Wall times: PPO's and
best-of-N's add the reward model's training ("+ Ns RM"); best-of-N's is sampling and scoring.
Writes runs/pipeline/{table.md, results.json, frontier.png, overoptimization.png}. Expected:
every method raises the gold reward above the SFT policy's; PPO and best-of-N raise it most for
their KL; DPO and IPO learn the labellers' length bias (longer answers); with --arg sweep, the
weakest KL penalty raises the proxy while gold falls.
"""

import dataclasses

from rlhf_jax.pipeline import PipelineConfig, Stage


def get_config(arg=None):
  config = PipelineConfig()
  if arg == "sweep":  # frontiers: several KL coefficients and betas
    config = dataclasses.replace(config, output_dir="runs/pipeline-sweep",
                                 ppo_kl_coefs=(0.01, 0.05, 0.2),
                                 direct_methods=("dpo:0.03", "dpo:0.1", "dpo:0.3", "ipo:0.25",
                                                 "ipo:0.5", "ipo:1.0"),
                                 ppo=Stage(steps=60, lr=3e-4))
  if arg == "runlocal":
    config = dataclasses.replace(
        config, output_dir="runs/pipeline-local", sft=Stage(steps=40, lr=2e-3),
        reward=Stage(steps=40), ppo=Stage(steps=4, batch_size=16, lr=3e-4),
        direct=Stage(steps=10, lr=3e-4), best_of_n=(2, 4), best_of_n_reference=64,
        eval_prompts=32,
        num_demonstrations=1024, num_pairs=1024)
  return config
