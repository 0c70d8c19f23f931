"""Iterative (online) DPO: sample pairs from the current policy, label, train, repeat.

    python -m rlhf_jax run experiments/iterative_dpo.py --set model.path=runs/sft/hf
    python -m rlhf_jax run experiments/iterative_dpo.py --arg judge     # AI-judge labels
    python -m rlhf_jax run experiments/iterative_dpo.py --arg runlocal  # smoke test

Each of 4 rounds samples 2 responses for 256 prompts, labels them (the reward function, a reward
model with reward.kind=model, or a judge with labels.kind=judge: the rule judge here, or any
causal LM via labels.judge=<path> with the constitutional judge, which loads its own tokenizer and
reads labels.answers after labels.constitution's principles; with K > 2 samples a judge compares
every pair and keeps best vs worst), and runs 4 epochs of DPO on the pairs (fewer leave the margins
near 0 and gold unchanged). loss.name picks any PREFERENCE_LOSSES entry (batch-coupled ones, e.g.
aot, train on the labelled pairs only); reset_reference=true moves the reference to the policy at
the start of each round. Expected: the gold reward rises round over round.
"""

import dataclasses

from rlhf_jax.train.common import DataSpec, ModelSpec
from rlhf_jax.train.iterative import IterativeDPOConfig, LabelConfig
from rlhf_jax.train.loop import RunConfig
from rlhf_jax.train.preference import PreferenceLossConfig
from rlhf_jax.rollout import GenerationConfig, RewardSpec
from rlhf_jax.train.rounds import RoundConfig
from rlhf_jax.train.state import OptimizerConfig


def get_config(arg=None):
  config = IterativeDPOConfig(
      model=ModelSpec(path="runs/sft/hf"),
      data=DataSpec(train="synthetic:prompt", num_rows=2048, max_length=16, buckets=(16,),
                    eval_fraction=0.0),
      generation=GenerationConfig(max_new_tokens=24, num_samples=2),
      reward=RewardSpec(kind="function"),
      loss=PreferenceLossConfig(name="dpo", beta=0.1),
      rounds=RoundConfig(rounds=4, prompts_per_round=256, minibatch_size=32, epochs_per_round=4),
      optimizer=OptimizerConfig(lr=2e-4),
      run=RunConfig(steps=0, log_every=8, output_dir="runs/iterative_dpo"))
  if arg == "judge":
    config = dataclasses.replace(config, labels=LabelConfig(kind="judge", judge="rule"))
  if arg == "runlocal":
    config = dataclasses.replace(config, model=ModelSpec(path="synthetic:tiny"),
                                 rounds=dataclasses.replace(config.rounds, rounds=1,
                                                            epochs_per_round=1),
                                 run=dataclasses.replace(config.run,
                                                         output_dir="runs/iterative-local"))
  return config
