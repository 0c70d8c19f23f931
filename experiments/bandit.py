"""Every pairwise loss on a tabular preference bandit (the first thing to run).

    python -m rlhf_jax run experiments/bandit.py            # ~1 min on 2 CPU cores
    python -m rlhf_jax run experiments/bandit.py --arg runlocal   # a few seconds

Expected: DPO (and the other logistic losses) push π(y0) on the one-sided prompt to ~1 at both
β = 0.1 and β = 1, while IPO stops at h = 1/(2β) (π(y0) clearly below 1, lower for larger β):
Azar et al. 2023 (arXiv 2310.12036), §5.1. The table and trajectories.png land in runs/bandit/.
"""

import dataclasses

from rlhf_jax.bandit import BanditConfig


def get_config(arg=None):
  config = BanditConfig()
  if arg == "runlocal":  # a smoke run: fewer steps, two losses
    config = dataclasses.replace(config, steps=500, losses=("dpo", "ipo"))
  return config
