"""SimPO (Meng et al. 2024): reference-free, length-normalised, with a target margin γ.

    python -m rlhf_jax run experiments/simpo.py                  # ~1 min on 2 CPU cores
    python -m rlhf_jax run experiments/simpo.py --arg runlocal   # smoke test

No reference model is loaded. Expected: rewards/accuracy (β·mean log-prob, chosen vs rejected)
well above 0.5 on held-out pairs.

The real recipe (SimPO on Qwen2.5-0.5B-Instruct, the paper's β = 2.5, γ/β = 0.55):
    python -m rlhf_jax run experiments/simpo.py --set model.path=Qwen/Qwen2.5-0.5B-Instruct \
      --set model.dtype=bfloat16 --set data.train=princeton-nlp/llama3-ultrafeedback-armorm \
      --set data.max_length=1024 --set loss.beta=2.5 --set loss.hparams='{"gamma": 1.375}' \
      --set data.buckets='(256,512,1024)' \
      --set optimizer.lr=1e-6 --set run.batch_size=128 --set run.steps=500
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
      loss=PreferenceLossConfig(name="simpo", beta=2.0, hparams={"gamma": 0.5}),
      optimizer=OptimizerConfig(lr=1e-3, warmup_steps=20),
      run=RunConfig(steps=200, batch_size=32, log_every=25, eval_every=100,
                    output_dir="runs/simpo"))
  if arg == "runlocal":
    config = dataclasses.replace(config, run=dataclasses.replace(
        config.run, steps=10, output_dir="runs/simpo-local"))
  return config
