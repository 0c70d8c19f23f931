"""Rejection-sampling fine-tuning: rounds of best-of-N against a reward, then SFT on the winners.

    python -m rlhf_jax run experiments/rejection_sampling.py --set model.path=runs/sft/hf
    python -m rlhf_jax run experiments/rejection_sampling.py --arg runlocal   # smoke test

Each of 4 rounds draws N = 8 responses for 64 prompts, keeps the best under the reward, and runs
2 epochs of SFT on the winners (Llama 2's rejection sampling; RAFT). Expected: round/best_score
above round/mean_score, both rising round over round.
"""

import dataclasses

from rlhf_jax.train.best_of_n import RejectionSamplingConfig
from rlhf_jax.train.common import DataSpec, ModelSpec
from rlhf_jax.train.loop import RunConfig
from rlhf_jax.rollout import GenerationConfig, RewardSpec
from rlhf_jax.train.rounds import RoundConfig
from rlhf_jax.train.state import OptimizerConfig


def get_config(arg=None):
  config = RejectionSamplingConfig(
      model=ModelSpec(path="runs/sft/hf"),
      data=DataSpec(train="synthetic:prompt", num_rows=2048, max_length=16, buckets=(16,),
                    eval_fraction=0.0),
      generation=GenerationConfig(max_new_tokens=24, num_samples=8),
      reward=RewardSpec(kind="function"),
      rounds=RoundConfig(rounds=4, prompts_per_round=64, minibatch_size=32, epochs_per_round=2),
      optimizer=OptimizerConfig(lr=1e-3),
      run=RunConfig(steps=0, log_every=4, output_dir="runs/rejection_sampling"))
  if arg == "runlocal":
    config = dataclasses.replace(config, model=ModelSpec(path="synthetic:tiny"),
                                 rounds=dataclasses.replace(config.rounds, rounds=1,
                                                            epochs_per_round=1),
                                 run=dataclasses.replace(config.run,
                                                         output_dir="runs/rs-local"))
  return config
