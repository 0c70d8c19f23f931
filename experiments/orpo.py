"""ORPO (Hong et al. 2024): SFT's NLL plus λ times the odds-ratio term, no reference model.

    python -m rlhf_jax run experiments/orpo.py                  # ~1 min on 2 CPU cores
    python -m rlhf_jax run experiments/orpo.py --arg runlocal   # smoke test

Loss = NLL(chosen) + λ·(-log σ(log odds(chosen) - log odds(rejected))) on mean token log-probs;
λ is loss.weight. Expected: nll falls (it is also an SFT run) while rewards/accuracy rises.

The real recipe (ORPO of a base Qwen2.5-0.5B on UltraFeedback pairs, the paper's λ = 0.1):
    python -m rlhf_jax run experiments/orpo.py --set model.path=Qwen/Qwen2.5-0.5B \
      --set model.dtype=bfloat16 --set data.train=trl-lib/ultrafeedback_binarized \
      --set data.max_length=1024 --set data.buckets='(256,512,1024)' \
      --set optimizer.lr=8e-6 --set run.steps=1000
"""

import dataclasses

from rlhf_jax.train.common import DataSpec, ModelSpec
from rlhf_jax.train.loop import RunConfig
from rlhf_jax.train.preference import PreferenceConfig, PreferenceLossConfig
from rlhf_jax.train.state import OptimizerConfig


def get_config(arg=None):
  config = PreferenceConfig(
      model=ModelSpec(path="synthetic:tiny"),
      data=DataSpec(train="synthetic:pair", num_rows=4096, max_length=32, buckets=(32,)),
      loss=PreferenceLossConfig(name="orpo", weight=0.1, nll_weight=1.0),
      optimizer=OptimizerConfig(lr=2e-3, warmup_steps=20),
      run=RunConfig(steps=200, batch_size=32, log_every=25, eval_every=100,
                    output_dir="runs/orpo"))
  if arg == "runlocal":
    config = dataclasses.replace(config, run=dataclasses.replace(
        config.run, steps=10, output_dir="runs/orpo-local"))
  return config
