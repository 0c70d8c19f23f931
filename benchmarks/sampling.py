"""Generation throughput of `rlhf_jax.sampling.generate` (and optionally transformers' `generate`).

Default: a random model with Qwen2.5-0.5B's shapes (hidden 896, 24 layers, 14 heads, 2 KV heads,
intermediate 4864, vocab 151936, tied embeddings, qkv bias), bf16, batch 32, 128 prompt tokens,
256 new tokens, no stop id (every row makes all N tokens). Flags shrink it for a CPU:

  python benchmarks/sampling.py                                   # accelerator, full size
  python benchmarks/sampling.py --layers 2 --batch 4 --prompt-len 32 --new-tokens 32 \\
      --vocab 8192 --dtype float32 --torch                         # CPU, with the PyTorch baseline

Prints one line per system: first_call_extra_s (first call minus the best warm call: compile
time for JAX, warm-up for PyTorch), seconds per call (best of --repeats),
new tokens per second (batch · new tokens / seconds) and milliseconds per decode step; for
rlhf_jax also prefill_ms (best call making one new token) and decode_ms_per_token
((call - prefill) / (N - 1)). --num-samples G draws G completions per prompt (rows B·G; the
prompt is prefilled once, `generate(num_samples=G)`; --repeat-prompts instead feeds the prompts
repeated G times, the old way). benchmarks/sampling_tunix.py compares against Tunix.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import sampling
from rlhf_jax.models import CausalLM, ModelConfig


def qwen_like_config(args) -> ModelConfig:
  return ModelConfig(
      model_type="qwen2", vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
      num_heads=args.heads, num_kv_heads=args.kv_heads, head_dim=args.hidden // args.heads,
      intermediate_size=args.intermediate, norm="rmsnorm", norm_eps=1e-6, positions="rope",
      max_position_embeddings=32768, rope_theta=1_000_000.0, mlp="gated", activation="silu",
      qkv_bias=True, tie_embeddings=True, pad_token_id=0)


def prompts(args):
  rng = np.random.default_rng(0)
  ids = rng.integers(1, args.vocab, (args.batch, args.prompt_len)).astype(np.int32)
  mask = np.ones_like(ids)
  # Left padding of varied lengths (up to half the prompt), as in a real batch.
  for b, pad in enumerate(rng.integers(0, args.prompt_len // 2 + 1, args.batch)):
    ids[b, :pad], mask[b, :pad] = 0, 0
  return ids, mask


def report(name, first_call_extra_s, seconds, args, extra=None):
  tokens = args.batch * args.num_samples * args.new_tokens
  row = dict(system=name, first_call_extra_s=round(first_call_extra_s, 2), s_per_call=round(seconds, 4),
             tokens_per_s=round(tokens / seconds, 1),
             ms_per_step=round(1000 * seconds / args.new_tokens, 2), **(extra or {}))
  print(json.dumps(row))


def bench_jax(args, config, ids, mask):
  model = CausalLM(config)
  dtype = jnp.dtype(args.dtype)
  params = jax.jit(model.init, static_argnums=1)(jax.random.key(0), dtype)
  kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, eos_token_id=None)
  g = args.num_samples
  if args.repeat_prompts:
    ids, mask, g = np.repeat(ids, g, axis=0), np.repeat(mask, g, axis=0), 1

  def run(seed, new_tokens=args.new_tokens):
    out = sampling.generate(model, params, ids, mask, jax.random.key(seed),
                            max_new_tokens=new_tokens, num_samples=g, **kw)
    return jax.block_until_ready(out)

  start = time.perf_counter()
  out = run(0)
  first = time.perf_counter() - start
  times = []
  for i in range(args.repeats):
    start = time.perf_counter()
    out = run(i + 1)
    times.append(time.perf_counter() - start)
  seconds = min(times)
  assert int(np.asarray(out.mask).sum()) == args.batch * args.num_samples * args.new_tokens
  run(0, 1)
  prefill = []
  for i in range(args.repeats):
    start = time.perf_counter()
    run(i + 1, 1)
    prefill.append(time.perf_counter() - start)
  extra = dict(device=str(jax.devices()[0].device_kind), dtype=args.dtype,
               prefill_ms=round(1000 * min(prefill), 1))
  if args.new_tokens > 1:
    extra["decode_ms_per_token"] = round(1000 * (seconds - min(prefill)) / (args.new_tokens - 1),
                                         2)
  report("rlhf_jax" + ("_repeated_prompts" if args.repeat_prompts else ""), first - seconds,
         seconds, args, extra)


def bench_torch(args, config, ids, mask):
  import torch
  import transformers

  dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
  torch.manual_seed(0)
  hf_config = config.to_hf("ForCausalLM")
  hf_model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype).eval()
  device = "cuda" if torch.cuda.is_available() else "cpu"
  hf_model.to(device)
  ids_t = torch.tensor(np.repeat(ids, args.num_samples, axis=0), dtype=torch.long, device=device)
  mask_t = torch.tensor(np.repeat(mask, args.num_samples, axis=0), dtype=torch.long,
                        device=device)
  sample = args.temperature > 0
  kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=sample,
            pad_token_id=0)
  if sample:
    kw.update(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p)

  def run():
    with torch.no_grad():
      out = hf_model.generate(ids_t, attention_mask=mask_t, **kw)
    if device == "cuda":
      torch.cuda.synchronize()
    return out

  start = time.perf_counter()
  out = run()
  first = time.perf_counter() - start
  times = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    out = run()
    times.append(time.perf_counter() - start)
  assert out.shape[1] == args.prompt_len + args.new_tokens
  seconds = min(times)
  report("transformers", first - seconds, seconds, args,
         dict(device=device, dtype=args.dtype, torch_threads=torch.get_num_threads()))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--layers", type=int, default=24)
  parser.add_argument("--hidden", type=int, default=896)
  parser.add_argument("--heads", type=int, default=14)
  parser.add_argument("--kv-heads", type=int, default=2)
  parser.add_argument("--intermediate", type=int, default=4864)
  parser.add_argument("--vocab", type=int, default=151936)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--prompt-len", type=int, default=128)
  parser.add_argument("--new-tokens", type=int, default=256)
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  parser.add_argument("--temperature", type=float, default=1.0)
  parser.add_argument("--top-k", type=int, default=0)
  parser.add_argument("--top-p", type=float, default=1.0)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--num-samples", type=int, default=1, help="completions per prompt (G)")
  parser.add_argument("--repeat-prompts", action="store_true",
                      help="rlhf_jax: repeat the prompts G times instead of num_samples=G")
  parser.add_argument("--torch", action="store_true", help="also time transformers' generate")
  parser.add_argument("--no-jax", action="store_true", help="skip rlhf_jax (with --torch)")
  args = parser.parse_args()
  config = qwen_like_config(args)
  print(json.dumps({"config": {k: v for k, v in dataclasses.asdict(config).items()
                               if k in ("vocab_size", "hidden_size", "num_layers", "num_heads",
                                        "num_kv_heads", "intermediate_size")},
                    "batch": args.batch, "prompt_len": args.prompt_len,
                    "new_tokens": args.new_tokens, "num_samples": args.num_samples,
                    "dtype": args.dtype,
                    "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}))
  ids, mask = prompts(args)
  if not args.no_jax:
    bench_jax(args, config, ids, mask)
  if args.torch:
    bench_torch(args, config, ids, mask)


if __name__ == "__main__":
  main()
