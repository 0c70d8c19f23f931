"""Throughput of one DPO training step on a Qwen2.5-0.5B-shaped model (random weights).

The step is the real one (`rlhf_jax.train.preference` + `steps.make_train_step`): the policy and
the frozen reference each score the 2B rows [chosen; rejected] once (chunked log-probs), the DPO
loss, the backward pass through the policy, AdamW. bf16 params and compute, float32 softmax.

    python benchmarks/dpo_step.py                                # batch 8 pairs x 1024, bf16
    python benchmarks/dpo_step.py --layers 2 --batch 1 --seq 256 --vocab 32768   # on a CPU
    python benchmarks/dpo_step.py ... --torch   # the same step in PyTorch eager (transformers'
                                                # Qwen2 model), a TRL-style reference

Model FLOPs per pair-row token (the MFU convention: remat recomputation is not counted):
policy forward + backward = 3 x forward, reference forward = 1 x forward, so 4 x forward.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from forward import flops_per_token, peak_tflops, qwen25_05b_config
from rlhf_jax.models import CausalLM, lora
from rlhf_jax.train import preference, steps
from rlhf_jax.train.state import OptimizerConfig, TrainState, make_optimizer


def make_batch(rng, pairs: int, seq: int, vocab: int, prompt: int):
  ids = rng.integers(3, vocab, size=(2 * pairs, seq)).astype(np.int32)
  ids[pairs:, :prompt] = ids[:pairs, :prompt]  # chosen and rejected share the prompt
  loss_mask = np.zeros((2 * pairs, seq), np.int32)
  loss_mask[:, prompt:] = 1
  return {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": loss_mask,
          "weight": np.ones(pairs, np.float32)}


def dpo_loss_fn(model, chunk: int):
  """loss_fn(params, batch, ref_params): DPO (beta 0.1) with the frozen reference in the step."""
  per_example = preference.make_pair_losses(
      model, preference.PreferenceLossConfig(name="dpo", beta=0.1), chunk)

  def loss_fn(params, batch, ref):
    ref_logps = jax.lax.stop_gradient(
        preference._sequence_logps(model, ref, batch, "sum", chunk)[0])
    values, _ = per_example(params, batch, ref_logps)
    return jnp.mean(values), {}

  return loss_fn


def dpo_loss_fn_precomputed(model, chunk: int):
  """loss_fn(params, batch, ref_logps [2B]): DPO (beta 0.1) against precomputed reference
  log-probs (what a trainer does when the reference is scored once before training)."""
  per_example = preference.make_pair_losses(
      model, preference.PreferenceLossConfig(name="dpo", beta=0.1), chunk)

  def loss_fn(params, batch, ref_logps):
    values, _ = per_example(params, batch, ref_logps)
    return jnp.mean(values), {}

  return loss_fn


def make_jax_step(args, config, batch, precomputed_reference: bool = False):
  """(run, memory), compiled here: run() does one DPO step and waits for it; memory is XLA's
  compiled footprint of the step. precomputed_reference: the step takes the reference's [2B] sequence log-probs
  instead of running the reference forward."""
  model = CausalLM(config)
  dtype = jnp.dtype(args.dtype)
  params = model.init(jax.random.key(0), dtype=dtype)
  tx = make_optimizer(OptimizerConfig(lr=1e-6), 1000)
  batch = jax.device_put(batch)
  if precomputed_reference:
    ref = jax.jit(lambda p, b: preference._sequence_logps(model, p, b, "sum", args.chunk)[0])(
        params, batch)
    step = steps.make_train_step(dpo_loss_fn_precomputed(model, args.chunk))
  else:
    ref = jax.tree.map(jnp.copy, params)
    step = steps.make_train_step(dpo_loss_fn(model, args.chunk))
  holder = [TrainState.create(params, tx, jax.random.key(1))]
  # Run the AOT-compiled step: lower().compile() does not fill jit's cache, so calling `step`
  # would compile the same program a second time.
  compiled = step.lower(holder[0], batch, ref).compile()
  stats = compiled.memory_analysis()
  memory = (stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes
            - stats.alias_size_in_bytes)  # the donated state is updated in place

  def run():
    detached, bases = lora.detach_bases(holder[0])  # what the jitted step does around `inner`
    new_state, metrics = compiled(detached, bases, batch, ref)
    holder[0] = lora.attach_bases(new_state, bases)
    jax.block_until_ready(metrics)

  return run, memory


def time_jax(args, config, batch, precomputed_reference: bool = False):
  """(median seconds per step, peak bytes: the device's, else the compiled footprint)."""
  run, memory = make_jax_step(args, config, batch, precomputed_reference)
  run()  # warm-up
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  device_stats = jax.devices()[0].memory_stats() or {}  # None on CPU
  return statistics.median(times), device_stats.get("peak_bytes_in_use", memory)


def time_torch(args, config, batch):
  import torch
  import transformers

  torch.manual_seed(0)
  hf_config = transformers.Qwen2Config(
      vocab_size=config.vocab_size, hidden_size=config.hidden_size,
      intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
      num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
      tie_word_embeddings=True, max_position_embeddings=config.max_position_embeddings)
  dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
  device = "cuda" if torch.cuda.is_available() else "cpu"
  policy = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype).to(device)
  reference = transformers.AutoModelForCausalLM.from_config(hf_config,
                                                            dtype=dtype).to(device).eval()
  if args.remat != "none":  # transformers 5 renamed gradient_checkpointing_enable
    (getattr(policy, "activation_checkpointing_enable", None)
     or policy.gradient_checkpointing_enable)()
  optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
  ids = torch.as_tensor(batch["input_ids"], device=device).long()
  mask = torch.as_tensor(batch["loss_mask"][:, 1:], device=device).float()
  pairs = ids.shape[0] // 2

  def sequence_logps(model):
    logits = model(ids).logits[:, :-1].float()  # what TRL does: full float32 log-softmax
    logps = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    return (logps * mask).sum(-1)

  def one_step():
    with torch.no_grad():
      ref = sequence_logps(reference)
    pol = sequence_logps(policy)
    h = (pol[:pairs] - ref[:pairs]) - (pol[pairs:] - ref[pairs:])
    loss = -torch.nn.functional.logsigmoid(0.1 * h).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if device == "cuda":
      torch.cuda.synchronize()

  one_step()
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    one_step()
    times.append(time.perf_counter() - start)
  peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
  return statistics.median(times), peak


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=8, help="preference pairs per step")
  parser.add_argument("--seq", type=int, default=1024)
  parser.add_argument("--prompt", type=int, default=256, help="shared prompt tokens")
  parser.add_argument("--layers", type=int, default=24)
  parser.add_argument("--vocab", type=int, default=151936)
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  parser.add_argument("--chunk", type=int, default=512, help="log-prob chunk size")
  parser.add_argument("--remat", default="full", help="remat policy: none | full | dots")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--peak-tflops", type=float, default=None)
  parser.add_argument("--torch", action="store_true", help="also time the PyTorch reference")
  args = parser.parse_args()
  config = dataclasses.replace(qwen25_05b_config(args.layers), vocab_size=args.vocab,
                               remat_policy=args.remat)
  batch = make_batch(np.random.default_rng(0), args.batch, args.seq, args.vocab, args.prompt)
  tokens = 2 * args.batch * args.seq
  flops = 4 * flops_per_token(config, args.seq) * tokens
  peak = peak_tflops(args.peak_tflops)
  print(f"device={jax.devices()[0].device_kind} layers={args.layers} vocab={args.vocab} "
        f"pairs={args.batch} seq={args.seq} dtype={args.dtype} remat={args.remat}")
  rows = [("rlhf_jax (JAX)", time_jax(args, config, batch))]
  if args.torch:
    rows.append(("PyTorch eager", time_torch(args, config, batch)))
  # Peak memory: the device's peak on an accelerator; on a CPU (no allocator statistics) XLA's
  # compiled footprint of the step (arguments + outputs + scratch), and nothing for torch.
  for name, (seconds, memory) in rows:
    mfu = f" MFU={flops / seconds / (peak * 1e12):.1%}" if peak else ""
    mem = f" peak={memory / 2**20:8.0f} MiB" if memory else ""
    print(f"{name:16s} step={seconds * 1e3:9.1f} ms  tokens/s={tokens / seconds:10.0f}  "
          f"TFLOP/s={flops / seconds / 1e12:7.3f}{mfu}{mem}")


if __name__ == "__main__":
  main()
