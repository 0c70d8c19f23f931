"""A Bradley-Terry reward model on the embedded synthetic preferences.

    python -m rlhf_jax run experiments/reward.py                  # ~1 min on 2 CPU cores
    python -m rlhf_jax run experiments/reward.py --arg ranking    # K-wise rankings (K = 4)
    python -m rlhf_jax run experiments/reward.py --arg runlocal   # smoke test

Expected: held-out preference accuracy well above chance (labels are Bradley-Terry draws on the
gold reward, so even the gold reward itself agrees with ~85% of them). The model is exported to
runs/reward/hf as a `LlamaForSequenceClassification` checkpoint (transformers and TRL load it).

The real recipe (an RM for Qwen2.5-0.5B-Instruct on Anthropic HH, which loads as HH text):
    python -m rlhf_jax run experiments/reward.py --set model.path=Qwen/Qwen2.5-0.5B-Instruct \
      --set model.dtype=bfloat16 --set data.train=Anthropic/hh-rlhf --set data.max_length=1024 \
      --set data.buckets='(256,512,1024)' --set optimizer.lr=1e-5 \
      --set loss.center_coef=0.01 --set run.batch_size=64 --set run.steps=2000
"""

import dataclasses

from rlhf_jax.train.common import DataSpec, ModelSpec
from rlhf_jax.train.loop import RunConfig
from rlhf_jax.train.reward import RewardConfig, RewardLoss
from rlhf_jax.train.state import OptimizerConfig


def get_config(arg=None):
  config = RewardConfig(
      model=ModelSpec(path="synthetic:tiny"),
      data=DataSpec(train="synthetic:pair", num_rows=4096, max_length=32, buckets=(32,)),
      loss=RewardLoss(objective="bradley_terry", center_coef=0.01),
      optimizer=OptimizerConfig(lr=1e-3, warmup_steps=20),
      run=RunConfig(steps=300, batch_size=32, log_every=25, eval_every=100,
                    output_dir="runs/reward"))
  if arg == "ranking":  # InstructGPT's K-wise loss on 4-way rankings
    config = dataclasses.replace(
        config, loss=RewardLoss(objective="ranking"),
        data=dataclasses.replace(config.data, train="synthetic:ranked", num_rows=2048),
        run=dataclasses.replace(config.run, batch_size=8, output_dir="runs/reward-ranking"))
  if arg == "runlocal":
    config = dataclasses.replace(config, run=dataclasses.replace(
        config.run, steps=10, output_dir="runs/reward-local"))
  return config
