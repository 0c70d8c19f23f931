"""DPO (or any loss in PREFERENCE_LOSSES) on the embedded synthetic preferences.

    python -m rlhf_jax run experiments/dpo.py                        # ~1 min on 2 CPU cores
    python -m rlhf_jax run experiments/dpo.py --set loss.name=ipo    # any registered loss
    python -m rlhf_jax run experiments/dpo.py --arg rpo              # DPO + NLL (RPO, α = 1)
    python -m rlhf_jax run experiments/dpo.py --arg runlocal         # smoke test

Expected: held-out rewards/accuracy (implicit reward of chosen > rejected) climbs well above 0.5
and rewards/margin grows; logps/chosen may still fall (DPO constrains only the difference).
Start from an SFT run for the classic recipe: --set model.path=runs/sft/hf.

The real recipe (DPO of Qwen2.5-0.5B-Instruct on an HH-format dataset, reference precomputed):
    python -m rlhf_jax run experiments/dpo.py --set model.path=Qwen/Qwen2.5-0.5B-Instruct \
      --set model.dtype=bfloat16 --set model.remat_policy=full --set data.train=Anthropic/hh-rlhf \
      --set data.max_length=1024 --set data.max_prompt_length=512 \
      --set data.buckets='(256,512,1024)' --set loss.beta=0.1 --set loss.reference=precompute \
      --set optimizer.lr=5e-7 --set optimizer.warmup_steps=100 \
      --set run.batch_size=64 --set run.steps=1000
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
      loss=PreferenceLossConfig(name="dpo", beta=0.1),
      optimizer=OptimizerConfig(lr=1e-3, warmup_steps=20),
      run=RunConfig(steps=200, batch_size=32, log_every=25, eval_every=100, output_dir="runs/dpo"))
  if arg == "rpo":  # Pang et al. 2024: DPO plus the NLL of the chosen response
    config = dataclasses.replace(config, loss=dataclasses.replace(config.loss, nll_weight=1.0),
                                 run=dataclasses.replace(config.run, output_dir="runs/rpo"))
  if arg == "runlocal":
    config = dataclasses.replace(config, run=dataclasses.replace(
        config.run, steps=10, output_dir="runs/dpo-local"))
  return config
