"""PPO against a reward model, with a KL penalty to the SFT policy.

    python -m rlhf_jax run experiments/ppo.py --set model.path=runs/sft/hf \
        --set reward.path=runs/reward/hf                          # after sft.py and reward.py
    python -m rlhf_jax run experiments/ppo.py --arg gold          # the gold reward as a function
    python -m rlhf_jax run experiments/ppo.py --arg runlocal      # smoke test

Each step samples a response per prompt, scores it, computes per-token rewards
(-kl_coef·KL_t, plus the score at the last token), GAE advantages (whitened), and runs 4 epochs of
2 minibatches of the clipped policy and value losses. Expected: reward (proxy) and the eval
gold_reward rise while kl stays a few nats; sampler_logp_gap stays ~0 (one log-prob function).
Set loss.kl_target for the adaptive controller, loss.value_head=separate for an RM-initialised
critic, reward.missing_eos_penalty to punish rambling.

The real recipe (PPO of an SFT'd Qwen2.5-0.5B against its RM):
    python -m rlhf_jax run experiments/ppo.py --set model.path=runs/sft-qwen/hf \
      --set reward.path=runs/rm-qwen/hf \
      --set data.train=trl-lib/tldr --set data.max_length=512 --set generation.max_new_tokens=53 \
      --set data.buckets='(128,256,512)' \
      --set model.dtype=bfloat16 --set optimizer.lr=3e-6 --set run.batch_size=64 \
      --set reward.missing_eos_penalty=1.0 --set run.steps=1000
"""

import dataclasses

from rlhf_jax.train.common import DataSpec, ModelSpec
from rlhf_jax.train.loop import RunConfig
from rlhf_jax.train.ppo import PPOConfig, PPOLoss
from rlhf_jax.rollout import GenerationConfig, RewardSpec
from rlhf_jax.train.state import OptimizerConfig


def get_config(arg=None):
  config = PPOConfig(
      model=ModelSpec(path="runs/sft/hf"),
      data=DataSpec(train="synthetic:prompt", num_rows=2048, max_length=16, buckets=(16,),
                    eval_fraction=0.05),
      generation=GenerationConfig(max_new_tokens=24, temperature=1.0),
      reward=RewardSpec(kind="model", path="runs/reward/hf"),
      loss=PPOLoss(kl_coef=0.05, epochs=4, minibatches=2),
      optimizer=OptimizerConfig(lr=2e-4, max_grad_norm=1.0),
      run=RunConfig(steps=60, batch_size=32, log_every=5, eval_every=20, output_dir="runs/ppo"))
  if arg in ("gold", "runlocal"):  # no reward model needed: the verifiable gold reward
    config = dataclasses.replace(config, reward=RewardSpec(kind="function"))
  if arg == "runlocal":
    config = dataclasses.replace(config, model=ModelSpec(path="synthetic:tiny"),
                                 run=dataclasses.replace(config.run, steps=3,
                                                         output_dir="runs/ppo-local"))
  return config
