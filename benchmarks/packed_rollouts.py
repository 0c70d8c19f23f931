"""Tokens/s of one GRPO update pass on packed rows vs the padded [prompt | response] rows.

One update pass is what `online.make_update` runs for a rollout with one epoch of one minibatch:
the old policy's and the reference's scoring passes (prepare), then one minibatch update (the
policy's forward and backward and the optimiser step). The rollouts are built directly (no
sampling): token ids are random, the lengths are what matters:

  embedded   the embedded review task: chat-templated prompts (`synthetic.prompt_messages`) and
             G = 4 completions per prompt drawn from its demonstration distribution
             (`synthetic.sample_response`, the lengths an SFT policy writes), clipped at
             max_new_tokens 24 (the online tests' setting), word-level tokenizer;
  realistic  prompts lognormal with median 200 tokens (sigma 0.3, clipped to [16, 256]),
             completions lognormal with median 150 (sigma 0.8) clipped at max_new_tokens 512,
             G = 8 (the padded width is 256 + 512).

Throughput counts the rollout's real tokens (each sequence's prompt and response tokens, the
same numerator for both layouts) per second of the jitted update, after a compile; packed adds
the host-side layout planning (`packed_rollouts.layout_rollout`), reported on its own too.
"padding removed" is 1 - packed slots / padded slots.

    python benchmarks/packed_rollouts.py                 # both distributions, default model
    python benchmarks/packed_rollouts.py --dist realistic --prompts 4 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import rollout as rollout_lib
from rlhf_jax.models import CausalLM, ModelConfig
from rlhf_jax.train import grpo, online, packed_rollouts
from rlhf_jax.train.state import TrainState


def model_config(args) -> ModelConfig:
  return ModelConfig(
      model_type="llama", vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
      num_heads=args.heads, num_kv_heads=args.heads // 2, head_dim=args.hidden // args.heads,
      intermediate_size=args.hidden * 3, norm="rmsnorm", norm_eps=1e-5, positions="rope",
      max_position_embeddings=4096, rope_theta=10000.0, mlp="gated", activation="silu",
      tie_embeddings=True, pad_token_id=0)


def embedded_lengths(num_prompts: int, group: int, max_new: int, seed: int = 0):
  """(prompt lengths [B], completion lengths [B·G]) of the embedded review task."""
  from rlhf_jax.data import synthetic  # noqa: PLC0415

  tokenizer = synthetic.build_tokenizer()
  task = synthetic.SyntheticTask(seed=seed)
  rng = np.random.default_rng(seed)
  prompts, completions = [], []
  for item in task.prompts(num_prompts):
    text = tokenizer.apply_chat_template(list(synthetic.prompt_messages(item)),
                                         add_generation_prompt=True, tokenize=False)
    prompts.append(len(tokenizer(text)["input_ids"]))
    for _ in range(group):
      # + 1: the stop token
      n = len(tokenizer(synthetic.sample_response(rng, item), add_special_tokens=False)
              ["input_ids"]) + 1
      completions.append(min(n, max_new))
  return np.asarray(prompts), np.asarray(completions)


def realistic_lengths(num_prompts: int, group: int, max_new: int, prompt_width: int,
                      seed: int = 0):
  rng = np.random.default_rng(seed)
  prompts = np.clip(np.round(rng.lognormal(np.log(200), 0.3, num_prompts)), 16, prompt_width)
  completions = np.clip(np.round(rng.lognormal(np.log(150), 0.8, num_prompts * group)), 1,
                        max_new)
  return prompts.astype(int), completions.astype(int)


def make_rollout(prompt_lengths, completion_lengths, group: int, prompt_width: int,
                 max_new: int, vocab: int, seed: int = 0) -> rollout_lib.Rollout:
  rng = np.random.default_rng(seed)
  rows = len(completion_lengths)
  prompt_mask = np.zeros((rows, prompt_width), np.int32)
  prompt = np.zeros((rows, prompt_width), np.int32)
  for i, length in enumerate(prompt_lengths):
    tokens = rng.integers(3, vocab, length)
    prompt[i * group:(i + 1) * group, prompt_width - length:] = tokens
    prompt_mask[i * group:(i + 1) * group, prompt_width - length:] = 1
  response_mask = (np.arange(max_new)[None] < completion_lengths[:, None]).astype(np.float32)
  response = np.where(response_mask > 0, rng.integers(3, vocab, (rows, max_new)), 0)
  return rollout_lib.Rollout(
      input_ids=jnp.asarray(np.concatenate([prompt, response], 1), jnp.int32),
      attention_mask=jnp.asarray(np.concatenate([prompt_mask, response_mask.astype(np.int32)],
                                                1)),
      response_mask=jnp.asarray(response_mask), sampler_logps=jnp.zeros((rows, max_new)),
      has_stop=jnp.asarray(completion_lengths < max_new),
      prompt_index=jnp.repeat(jnp.arange(len(prompt_lengths), dtype=jnp.int32), group))


def bench(name, args, prompt_lengths, completion_lengths, group, prompt_width, max_new):
  model = CausalLM(model_config(args))
  params = model.init(jax.random.key(0))
  ref = model.init(jax.random.key(1))
  rollout = make_rollout(prompt_lengths, completion_lengths, group, prompt_width, max_new,
                         args.vocab)
  scores = jnp.asarray(np.random.default_rng(1).normal(size=len(completion_lengths)),
                       jnp.float32)
  algorithm = grpo.make_grpo_algorithm(
      model, grpo.GRPOLoss(), advantage="group", group_size=group, temperature=1.0,
      max_new_tokens=max_new, chunk_size=args.chunk)
  tx = optax.adamw(1e-5)
  key = jax.random.key(4)
  real = int(np.sum(np.asarray(rollout.attention_mask)))
  padded_slots = int(np.prod(rollout.input_ids.shape))
  order = online.shuffled_minibatches(key, rollout.input_ids.shape[0], 1, 1)
  results = {}
  for layout in ("padded", "packed"):
    update = online.make_update(algorithm, epochs=1, minibatches=1, packed=layout == "packed")
    plan_s = []

    def run_once():
      extra = ()
      if layout == "packed":
        start = time.perf_counter()
        extra = (packed_rollouts.layout_rollout(rollout, order, args.row_length),)
        jax.block_until_ready(extra)
        plan_s.append(time.perf_counter() - start)
      state = TrainState.create(jax.tree.map(jnp.copy, params), tx, jax.random.key(2))
      jax.block_until_ready(state)
      start = time.perf_counter()
      out = update(state, ref, rollout, scores, key, *extra)
      jax.block_until_ready(out)
      return time.perf_counter() - start, extra

    start = time.perf_counter()
    _, extra = run_once()
    compile_s = time.perf_counter() - start
    times = [run_once()[0] for _ in range(args.repeats)]
    update_s = statistics.median(times)
    plan = statistics.median(plan_s) if plan_s else 0.0
    slots = (padded_slots if layout == "padded"
             else int(np.prod(extra[0].full.source.shape)))
    shape = tuple(rollout.input_ids.shape) if layout == "padded" else tuple(
        extra[0].full.source.shape)
    results[layout] = dict(seconds=update_s + plan, update_s=update_s, plan_s=plan,
                           compile_s=compile_s, slots=slots, shape=shape,
                           tokens_per_s=real / (update_s + plan))
  padded, packed = results["padded"], results["packed"]
  removed = 1 - packed["slots"] / padded["slots"]
  print(f"\n{name}: {len(prompt_lengths)} prompts x G={group}, prompt median "
        f"{int(np.median(prompt_lengths))}, completion median "
        f"{int(np.median(completion_lengths))} (max_new_tokens {max_new}); real tokens {real}, "
        f"padding in the padded rows {1 - real / padded_slots:.1%}")
  print("| layout | rows x length | slots | update s | plan s | tokens/s | speed-up |")
  print("|---|---|---|---|---|---|---|")
  for layout, r in results.items():
    print(f"| {layout} | {r['shape'][0]} x {r['shape'][1]} | {r['slots']} | "
          f"{r['update_s']:.3f} | {r['plan_s']:.3f} | {r['tokens_per_s']:.0f} | "
          f"{r['tokens_per_s'] / padded['tokens_per_s']:.2f}x |")
  print(f"padding removed (1 - packed slots / padded slots): {removed:.1%}")
  return results


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dist", choices=("embedded", "realistic", "both"), default="both")
  parser.add_argument("--prompts", type=int, default=4, help="prompts per rollout (realistic)")
  parser.add_argument("--embedded-prompts", type=int, default=32)
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--hidden", type=int, default=128)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--vocab", type=int, default=1024)
  parser.add_argument("--chunk", type=int, default=512)
  parser.add_argument("--row-length", type=int, default=None,
                      help="packed row length (default: the rollout's width)")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args(argv)
  print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind}; model {args.layers} layers "
        f"x {args.hidden}, vocab {args.vocab}")
  if args.dist in ("embedded", "both"):
    prompts, completions = embedded_lengths(args.embedded_prompts, 4, 24)
    width = int(np.max(prompts))
    bench("embedded", args, prompts, completions, 4, width, 24)
  if args.dist in ("realistic", "both"):
    prompts, completions = realistic_lengths(args.prompts, 8, 512, 256)
    bench("realistic", args, prompts, completions, 8, 256, 512)


if __name__ == "__main__":
  main()
