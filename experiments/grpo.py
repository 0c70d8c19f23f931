"""GRPO with a verifiable reward (the synthetic task's gold reward as a Python function).

    python -m rlhf_jax run experiments/grpo.py --set model.path=runs/sft/hf
    python -m rlhf_jax run experiments/grpo.py --arg dr_grpo     # Dr. GRPO: no std scaling
    python -m rlhf_jax run experiments/grpo.py --arg dapo        # clip-higher, token-mean
    python -m rlhf_jax run experiments/grpo.py --arg runlocal    # smoke test

G = 4 samples per prompt; advantages normalised within each group; k3 KL to the reference in the
loss (logged as kl, summed over tokens at the rollout; kl_k1 is the k1 diagnostic). Expected: the
eval gold_reward rises steadily from the SFT policy's.

The real recipe (GRPO on GSM8K; the rows' `answer` column is the reference the checker reads):
    python -m rlhf_jax run experiments/grpo.py --set model.path=Qwen/Qwen2.5-0.5B-Instruct \
      --set data.train=openai/gsm8k --set data.subset=main --set data.prompt_column=question \
      --set data.chat=true \
      --set "data.system_prompt=Solve it step by step, then end with: The answer is <number>." \
      --set data.max_length=256 --set data.eval_fraction=0.01 \
      --set data.buckets='(128,256)' \
      --set reward.functions=rlhf_jax.rewards:math_answer --set generation.num_samples=8 \
      --set generation.max_new_tokens=512 --set model.dtype=bfloat16 \
      --set optimizer.lr=1e-6 --set run.batch_size=32 --set run.steps=500
Each reward function gets the prompts, the completions and every other column of the rows as
keyword arguments (`fn(prompts, completions, answer, **columns) -> list[float | None]`; see
rlhf_jax/rewards/__init__.py); one of your own: `--set reward.functions=my_rewards.py:check`.
Several are summed with reward.weights and logged one by one (reward/<name>), e.g. DAPO's soft
length penalty beside the checker:
`reward.functions=rlhf_jax.rewards:math_answer,rlhf_jax.rewards:soft_overlong_penalty(max_length=512,cache=64)`.
The gold (evaluation) reward is the embedded task's only for synthetic:* data, so none here.
"""

import dataclasses

from rlhf_jax.train.common import DataSpec, ModelSpec
from rlhf_jax.train.grpo import GRPOConfig, GRPOLoss
from rlhf_jax.train.loop import RunConfig
from rlhf_jax.rollout import GenerationConfig, RewardSpec
from rlhf_jax.train.state import OptimizerConfig


def get_config(arg=None):
  config = GRPOConfig(
      model=ModelSpec(path="runs/sft/hf"),
      data=DataSpec(train="synthetic:prompt", num_rows=2048, max_length=16, buckets=(16,),
                    eval_fraction=0.05),
      generation=GenerationConfig(max_new_tokens=24, num_samples=4),
      reward=RewardSpec(kind="function"),
      loss=GRPOLoss(advantage="group", kl_in="loss", kl_coef=0.02, aggregation="grpo",
                    epochs=2, minibatches=2),  # 4 clipped updates per batch of samples
      optimizer=OptimizerConfig(lr=2e-4),
      run=RunConfig(steps=60, batch_size=16, log_every=5, eval_every=20,
                    output_dir="runs/grpo"))
  if arg == "dr_grpo":  # Liu et al. 2025: no std scaling, a constant token normaliser
    config = dataclasses.replace(config, loss=dataclasses.replace(
        config.loss, advantage="group_no_std", aggregation="dr_grpo"))
  if arg == "dapo":  # Yu et al. 2025: clip-higher and token-mean aggregation
    config = dataclasses.replace(config, loss=dataclasses.replace(
        config.loss, clip_eps_high=0.28, aggregation="dapo"))
  if arg == "runlocal":
    config = dataclasses.replace(config, model=ModelSpec(path="synthetic:tiny"),
                                 run=dataclasses.replace(config.run, steps=3,
                                                         output_dir="runs/grpo-local"))
  return config
