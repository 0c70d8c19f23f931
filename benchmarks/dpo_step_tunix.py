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

--lengths realistic: instead of one fixed-shape pair, `--pairs` pairs drawn from the realistic
length distribution of `shared_prompt.py` (prompts lognormal, median 300, cut to 3/4 of
`--max-length`; chosen and rejected lognormal, median 120 each, cut to the rest), the
`--batch-index`-th batch of the stream. Each side gets the layout it trains on: ours the
trainers' default (`data.layout="packed"`: each pair one item [prompt | chosen | rejected], the
prompt computed once, rows packed into a budget), or `--layout padded`; Tunix's the tensors its
`TrainingInput` takes, prompts left-padded to the batch's longest prompt and chosen and rejected
right-padded to the batch's longest response (the least padding its layout allows). The step
is timed on that one batch, so neither side recompiles. Useful tokens/s counts each pair as
prompt + chosen + rejected on both sides.

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


def realistic_batches(args):
  """(our batch, Tunix's TrainingInput arrays, useful tokens) for --lengths realistic."""
  from rlhf_jax.data import BatchStream
  from shared_prompt import realistic_records, useful_tokens

  records = realistic_records(512, args.max_length, args.vocab)
  stream = BatchStream(records, args.pairs, args.max_length, seed=0, layout=args.layout)
  ours = stream.batch(args.batch_index)
  pairs = [records[i] for i in ours.pop("index")]
  prompt_len = max(len(p.prompt) for p in pairs)
  response_len = max(max(len(p.chosen), len(p.rejected)) for p in pairs)

  def padded(rows, length, left):
    ids, mask = np.zeros((len(rows), length), np.int32), np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
      where = slice(length - len(row), length) if left else slice(0, len(row))
      ids[i, where], mask[i, where] = row, 1
    return ids, mask

  theirs = dict(zip(("prompt_ids", "prompt_mask"), padded([p.prompt for p in pairs], prompt_len,
                                                           left=True)))
  for name in ("chosen", "rejected"):
    rows = [getattr(p, name) for p in pairs]
    theirs[f"{name}_ids"], theirs[f"{name}_mask"] = padded(rows, response_len, left=False)
  return ours, theirs, useful_tokens(pairs)


def fixed_tunix_inputs(args, batch):
  """Tunix's TrainingInput arrays for dpo_step.make_batch's pairs (shared prompt, no padding)."""
  ids = batch["input_ids"]
  pairs, prompt = ids.shape[0] // 2, args.prompt
  ones = lambda x: np.ones_like(x, np.int32)
  prompt_ids, chosen, rejected = ids[:pairs, :prompt], ids[:pairs, prompt:], ids[pairs:, prompt:]
  assert (ids[pairs:, :prompt] == prompt_ids).all()
  return dict(prompt_ids=prompt_ids, prompt_mask=ones(prompt_ids), chosen_ids=chosen,
              chosen_mask=ones(chosen), rejected_ids=rejected, rejected_mask=ones(rejected))


def make_tunix_step(args, arrays):
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
  inputs = dpo_trainer.TrainingInput(**{k: jnp.asarray(v) for k, v in arrays.items()})

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
  parser.add_argument("--lengths", default="fixed", choices=["fixed", "realistic"],
                      help="fixed: --pairs x --seq, --prompt shared; realistic: see above")
  parser.add_argument("--max-length", type=int, default=512, help="realistic: per pair")
  parser.add_argument("--batch-index", type=int, default=0, help="realistic: which batch")
  parser.add_argument("--layout", default="packed", choices=["packed", "padded"],
                      help="realistic: ours")
  args = parser.parse_args()
  import tunix  # noqa: F401  (fail early when it is not installed)
  from importlib.metadata import version

  config = dataclasses.replace(qwen25_05b_config(args.layers), vocab_size=args.vocab,
                               remat_policy=args.remat)
  if args.lengths == "realistic":
    batch, arrays, useful = realistic_batches(args)
  else:
    batch = dpo_step.make_batch(np.random.default_rng(0), args.pairs, args.seq, args.vocab,
                                args.prompt)
    arrays, useful = fixed_tunix_inputs(args, batch), 2 * args.pairs * args.seq
  start = time.perf_counter()
  ours, _ = dpo_step.make_jax_step(
      types.SimpleNamespace(dtype=args.dtype, chunk=512), config, batch)
  print(f"rlhf_jax build + compile {time.perf_counter() - start:.1f} s", flush=True)
  theirs = make_tunix_step(args, arrays)
  shape = (f"seq={args.seq} prompt={args.prompt}" if args.lengths == "fixed" else
           f"realistic max_length={args.max_length} batch {args.batch_index}: ours "
           f"{args.layout} {batch['input_ids'].shape}, Tunix prompt "
           f"{arrays['prompt_ids'].shape} + response {arrays['chosen_ids'].shape[1]} x 2")
  print(f"device={jax.devices()[0].device_kind} jax={jax.__version__} "
        f"google-tunix={version('google-tunix')} flax={version('flax')} layers={args.layers} "
        f"vocab={args.vocab} pairs={args.pairs} {shape} dtype={args.dtype} "
        f"remat={args.remat}", flush=True)
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
  tokens = useful  # fixed: every slot; realistic: each pair's prompt once + both responses
  medians = {k: statistics.median(v) for k, v in times.items()}
  for name, seconds in medians.items():
    print(f"{name:10s} median step={seconds * 1e3:8.1f} ms  tokens/s={tokens / seconds:8.0f}  "
          f"(n={len(times[name])}, min {min(times[name]) * 1e3:.0f} ms, "
          f"max {max(times[name]) * 1e3:.0f} ms)")
  print(f"tunix / rlhf_jax median step time: {medians['tunix'] / medians['rlhf_jax']:.2f}")


if __name__ == "__main__":
  main()
