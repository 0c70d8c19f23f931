"""One DPO step: rlhf_jax (benchmarks/dpo_step.py) against Tunix's DPOTrainer step, interleaved.

Tunix (google-tunix, the JAX post-training library) is not a project dependency:

    pip install google-tunix
    python benchmarks/dpo_step_tunix.py --layers 2 --pairs 1 --seq 256 --prompt 64 \\
      --vocab 32768 --dtype float32 --rounds 5

Both sides build a Qwen2.5-0.5B-width model from a config (random weights, tied embeddings,
qkv bias): rlhf_jax's `CausalLM` and Tunix's `tunix.models.qwen2.model.Qwen2` (Flax NNX).
Tunix's step is what `PeftTrainer.train` runs per step for `DPOTrainer`: `_prepare_inputs`
(concatenates [prompt | chosen] and [prompt | rejected], builds the mask and positions, scores
both rows with the reference model: a separate jitted call) then the jitted train step
(`nnx.value_and_grad` of `dpo_loss_fn`, AdamW update). Ours is one jitted program with the
reference forward inside. Same token ids on both sides: one pair, `prompt` shared prompt
tokens, `seq - prompt` response tokens per row, no padding.

Rounds are interleaved (ours `steps` steps, then Tunix's `steps` steps, repeated), after one
warm-up step each (compilation); the ratio is Tunix's median step time over ours.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax

import dpo_step
from forward import qwen25_05b_config


def make_tunix_step(args, batch):
  """run() = one Tunix DPOTrainer step (its _prepare_inputs, then its jitted train step)."""
  from flax import nnx
  from tunix.models.qwen2 import model as qwen2
  from tunix.sft.dpo import dpo_trainer

  dtype = jnp.dtype(args.dtype)
  remat = qwen2.RematConfig.DECODER if args.remat != "none" else qwen2.RematConfig.NONE
  config = qwen2.ModelConfig(
      num_layers=args.layers, vocab_size=args.vocab, embed_dim=896, hidden_dim=4864,
      num_heads=14, head_dim=64, num_kv_heads=2, rope_theta=1_000_000, norm_eps=1e-6,
      use_tied_embedding=True, remat_config=remat, dtype=dtype, param_dtype=dtype)
  policy = qwen2.Qwen2(config, rngs=nnx.Rngs(0))
  reference = qwen2.Qwen2(config, rngs=nnx.Rngs(0))
  trainer = dpo_trainer.DPOTrainer(  # it wraps the optax transformation in nnx.Optimizer
      policy, reference, optax.adamw(1e-6),
      dpo_trainer.DPOTrainingConfig(eval_every_n_steps=10**6, max_steps=10**6, beta=0.1))
  train_step, _ = trainer.jit_train_and_eval_step()
  ids = batch["input_ids"]
  pairs, prompt = ids.shape[0] // 2, args.prompt
  ones = lambda x: np.ones_like(x, np.int32)
  prompt_ids, chosen, rejected = ids[:pairs, :prompt], ids[:pairs, prompt:], ids[pairs:, prompt:]
  assert (ids[pairs:, :prompt] == prompt_ids).all()
  inputs = dpo_trainer.TrainingInput(
      prompt_ids=jnp.asarray(prompt_ids), prompt_mask=jnp.asarray(ones(prompt_ids)),
      chosen_ids=jnp.asarray(chosen), chosen_mask=jnp.asarray(ones(chosen)),
      rejected_ids=jnp.asarray(rejected), rejected_mask=jnp.asarray(ones(rejected)))

  def run():
    example = trainer._prepare_inputs(inputs)
    loss, _, _ = train_step(example)
    jax.block_until_ready(loss)

  return run


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--pairs", type=int, default=1)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--prompt", type=int, default=64)
  parser.add_argument("--vocab", type=int, default=32768)
  parser.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"])
  parser.add_argument("--remat", default="none", help="none, or full (Tunix: DECODER)")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=2, help="steps per side per round")
  args = parser.parse_args()
  import tunix  # noqa: F401  (fail early when it is not installed)
  from importlib.metadata import version

  config = dataclasses.replace(qwen25_05b_config(args.layers), vocab_size=args.vocab,
                               remat_policy=args.remat)
  batch = dpo_step.make_batch(np.random.default_rng(0), args.pairs, args.seq, args.vocab,
                              args.prompt)
  start = time.perf_counter()
  ours, _ = dpo_step.make_jax_step(
      types.SimpleNamespace(dtype=args.dtype, chunk=512), config, batch)
  print(f"rlhf_jax build + compile {time.perf_counter() - start:.1f} s", flush=True)
  theirs = make_tunix_step(args, batch)
  print(f"device={jax.devices()[0].device_kind} jax={jax.__version__} "
        f"google-tunix={version('google-tunix')} flax={version('flax')} layers={args.layers} "
        f"vocab={args.vocab} pairs={args.pairs} seq={args.seq} prompt={args.prompt} "
        f"dtype={args.dtype} remat={args.remat}", flush=True)
  times = {"rlhf_jax": [], "tunix": []}
  for name, run in (("rlhf_jax", ours), ("tunix", theirs)):
    start = time.perf_counter()
    run()
    print(f"{name} first step {time.perf_counter() - start:.1f} s (Tunix: incl. its compile)",
          flush=True)
  for r in range(args.rounds):
    for name, run in (("rlhf_jax", ours), ("tunix", theirs)):
      for _ in range(args.steps):
        start = time.perf_counter()
        run()
        times[name].append(time.perf_counter() - start)
    print(f"round {r}: " + "  ".join(f"{k} {v[-1] * 1e3:.0f} ms" for k, v in times.items()),
          flush=True)
  tokens = 2 * args.pairs * args.seq
  medians = {k: statistics.median(v) for k, v in times.items()}
  for name, seconds in medians.items():
    print(f"{name:10s} median step={seconds * 1e3:8.1f} ms  tokens/s={tokens / seconds:8.0f}  "
          f"(n={len(times[name])}, min {min(times[name]) * 1e3:.0f} ms, "
          f"max {max(times[name]) * 1e3:.0f} ms)")
  print(f"tunix / rlhf_jax median step time: {medians['tunix'] / medians['rlhf_jax']:.2f}")


if __name__ == "__main__":
  main()
