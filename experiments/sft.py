"""SFT on the embedded synthetic reviews: next-token loss on the response tokens only.

    python -m rlhf_jax run experiments/sft.py                  # ~1 min on 2 CPU cores
    python -m rlhf_jax run experiments/sft.py --arg runlocal   # a few steps, smoke test

Expected: eval NLL per response token falls from ~3.9 (a random 50-word model) to ~1.3 (the
demonstrations' own entropy is close to that). The model lands in runs/sft/hf, a Hugging Face
checkpoint that the other experiments can start from (--set model.path=runs/sft/hf).

The real recipe this stands for (SFT of Qwen2.5-0.5B on chat data, one GPU or a TPU slice):
    python -m rlhf_jax run experiments/sft.py --set model.path=Qwen/Qwen2.5-0.5B \
      --set model.dtype=bfloat16 --set model.remat_policy=full \
      --set data.train=HuggingFaceH4/ultrachat_200k --set data.split=train_sft \
      --set data.max_length=2048 --set data.buckets='(512,1024,2048)' \
      --set optimizer.lr=2e-5 --set optimizer.warmup_steps=100 \
      --set run.batch_size=64 --set run.steps=2000 --set run.output_dir=runs/sft-qwen
"""

import dataclasses

from rlhf_jax.train.common import DataSpec, ModelSpec
from rlhf_jax.train.loop import RunConfig
from rlhf_jax.train.sft import SFTConfig
from rlhf_jax.train.state import OptimizerConfig


def get_config(arg=None):
  config = SFTConfig(
      model=ModelSpec(path="synthetic:tiny"),
      # Synthetic rows are <= 26 tokens: one bucket, so the step compiles once.
      data=DataSpec(train="synthetic:sft", num_rows=4096, max_length=32, buckets=(32,)),
      optimizer=OptimizerConfig(lr=2e-3, warmup_steps=20, schedule="cosine"),
      run=RunConfig(steps=300, batch_size=32, log_every=25, eval_every=100,
                    output_dir="runs/sft"))
  if arg == "runlocal":
    config = dataclasses.replace(config, run=dataclasses.replace(config.run, steps=10,
                                                                 output_dir="runs/sft-local"))
  return config
