"""RLOO (Ahmadian et al. 2024): REINFORCE with a leave-one-out baseline, KL in the reward.

    python -m rlhf_jax run experiments/rloo.py --set model.path=runs/sft/hf \
        --set reward.kind=model --set reward.path=runs/reward/hf   # against the reward model
    python -m rlhf_jax run experiments/rloo.py --arg runlocal      # smoke test

A_i = r_i - mean of the other G - 1 samples of the same prompt (trainer="rloo" implies it; any
other loss.advantage is an error), where r = score - β·Σ_t k1_t (logged as kl);
one on-policy update per batch (the ratio is 1: plain REINFORCE). Expected: the eval gold_reward
rises from the SFT policy's.
"""

import dataclasses

from rlhf_jax.train.common import DataSpec, ModelSpec
from rlhf_jax.train.grpo import GRPOConfig, GRPOLoss
from rlhf_jax.train.loop import RunConfig
from rlhf_jax.rollout import GenerationConfig, RewardSpec
from rlhf_jax.train.state import OptimizerConfig


def get_config(arg=None):
  config = GRPOConfig(
      trainer="rloo",
      model=ModelSpec(path="runs/sft/hf"),
      data=DataSpec(train="synthetic:prompt", num_rows=2048, max_length=16, buckets=(16,),
                    eval_fraction=0.05),
      generation=GenerationConfig(max_new_tokens=24, num_samples=4),
      reward=RewardSpec(kind="function"),
      loss=GRPOLoss(kl_in="reward", kl_coef=0.02,
                    aggregation="dr_grpo", epochs=2, minibatches=2),
      optimizer=OptimizerConfig(lr=2e-4),
      run=RunConfig(steps=60, batch_size=16, log_every=5, eval_every=20,
                    output_dir="runs/rloo"))
  if arg == "runlocal":
    config = dataclasses.replace(config, model=ModelSpec(path="synthetic:tiny"),
                                 run=dataclasses.replace(config.run, steps=3,
                                                         output_dir="runs/rloo-local"))
  return config
