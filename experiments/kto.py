"""KTO (Ethayarajh et al. 2024) on unpaired desirable / undesirable responses.

    python -m rlhf_jax run experiments/kto.py                  # ~1 min on 2 CPU cores
    python -m rlhf_jax run experiments/kto.py --arg runlocal   # smoke test

The synthetic rows are labelled desirable when a (noisy) labeller prefers them to a fresh base
sample, so about half are desirable. The KL reference point z0 is estimated in every batch from
mismatched (prompt i, response i+1) pairs. Expected: rewards/desirable rises above
rewards/undesirable on the training batches, and the held-out loss falls.

The real recipe (KTO of Qwen2.5-0.5B-Instruct on unpaired feedback):
    python -m rlhf_jax run experiments/kto.py --set model.path=Qwen/Qwen2.5-0.5B-Instruct \
      --set model.dtype=bfloat16 --set data.train=trl-lib/kto-mix-14k --set data.max_length=1024 \
      --set data.buckets='(256,512,1024)' \
      --set optimizer.lr=5e-7 --set run.batch_size=32 --set run.steps=1000
"""

import dataclasses

from rlhf_jax.train.common import DataSpec, ModelSpec
from rlhf_jax.train.loop import RunConfig
from rlhf_jax.train.preference import KTOConfig, KTOLossConfig
from rlhf_jax.train.state import OptimizerConfig


def get_config(arg=None):
  config = KTOConfig(
      model=ModelSpec(path="synthetic:tiny"),
      data=DataSpec(train="synthetic:unpaired", num_rows=4096, max_length=32, buckets=(32,)),
      loss=KTOLossConfig(beta=0.1),
      optimizer=OptimizerConfig(lr=1e-3, warmup_steps=20),
      run=RunConfig(steps=200, batch_size=32, log_every=25, eval_every=100, output_dir="runs/kto"))
  if arg == "runlocal":
    config = dataclasses.replace(config, run=dataclasses.replace(
        config.run, steps=10, output_dir="runs/kto-local"))
  return config
