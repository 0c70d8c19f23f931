"""Forward and forward+backward throughput of a Qwen2.5-0.5B-shaped model (random weights).

What is timed is what trainers run: `CausalLM.token_logps` (decoder + chunked log-softmax over
the 151,936-token vocabulary), and its gradient with respect to all params.

    python benchmarks/forward.py                                   # 16 x 1024 tokens, bf16
    python benchmarks/forward.py --layers 2 --batch 1 --seq 256    # shrunk, runs on a CPU
    python benchmarks/forward.py --layers 2 --batch 1 --seq 256 --dtype float32 --torch
                                                       # + transformers (PyTorch), same shapes

The torch baseline runs on the same device as JAX (CUDA when torch sees a GPU, else the CPU),
synchronised before each clock read.
(On a CPU, time torch in float32: its CPU bf16 path took over 10 minutes where float32 took
seconds at the shrunk size.)

FLOPs per token (PaLM appendix B convention, Chowdhery et al., 2022, arXiv:2204.02311):
forward = 2·N + 4·L·T·(heads·head_dim), N = matmul params (all but the embedding gather, plus
the unembedding D·V once), T the sequence length (full, not causal-halved, attention);
forward+backward = 3x forward. MFU = achieved FLOP/s over the device's dense bf16 peak
(table below, or --peak-tflops).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models import CausalLM, ModelConfig

__all__ = ["qwen25_05b_config", "flops_per_token", "main"]

# Dense bf16 peak TFLOP/s per device, matched on jax's device_kind (first match wins).
PEAK_TFLOPS = (
    ("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0),
    ("A10", 125.0), ("TPU v6", 918.0), ("TPU v5p", 459.0), ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0), ("TPU v4", 275.0),
)


def qwen25_05b_config(num_layers: int = 24, **overrides) -> ModelConfig:
  """Qwen2.5-0.5B's shapes: width 896, 14 heads / 2 KV heads of 64, MLP 4864, vocab 151936."""
  return ModelConfig(
      model_type="qwen2", vocab_size=151936, hidden_size=896, num_layers=num_layers,
      num_heads=14, num_kv_heads=2, head_dim=64, intermediate_size=4864, norm="rmsnorm",
      norm_eps=1e-6, rope_theta=1_000_000.0, max_position_embeddings=32768, mlp="gated",
      activation="silu", qkv_bias=True, tie_embeddings=True, **overrides)


def matmul_params(config: ModelConfig) -> int:
  d, h = config.hidden_size, config.head_dim
  attn = d * h * (config.num_heads + 2 * config.num_kv_heads) + config.num_heads * h * d
  mlp = (3 if config.mlp == "gated" else 2) * d * config.intermediate_size
  return config.num_layers * (attn + mlp) + d * config.vocab_size


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
  """Forward FLOPs per token: 2·N_matmul + 4·L·T·heads·head_dim."""
  attention = 4 * config.num_layers * seq_len * config.num_heads * config.head_dim
  return 2 * matmul_params(config) + attention


def peak_tflops(override: float | None) -> float | None:
  if override:
    return override
  kind = jax.devices()[0].device_kind
  return next((peak for name, peak in PEAK_TFLOPS if name.lower() in kind.lower()), None)


def _time(fn, args, steps: int, warmup: int) -> float:
  """Median seconds per call after `warmup` calls (the first one compiles)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _report(name: str, seconds: float, tokens: int, flops: float, peak: float | None) -> None:
  line = f"{name:<26} {tokens / seconds:>12,.0f} tokens/s  {1e3 * seconds:>9.1f} ms/step"
  line += f"  {flops / seconds / 1e12:>8.2f} TFLOP/s"
  if peak:
    line += f"  MFU {100 * flops / seconds / 1e12 / peak:5.1f}%"
  print(line, flush=True)


def _torch_benchmark(config: ModelConfig, args, tokens: int, flops_fwd: float, peak) -> None:
  import torch
  import transformers

  torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
  hf_config = config.to_hf()
  # The same device as the JAX side (as benchmarks/sampling.py): comparing our GPU forward with
  # transformers on CPU would measure the device, not the implementation.
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = transformers.AutoModelForCausalLM.from_config(
      hf_config, attn_implementation="sdpa", dtype=torch_dtype).to(device)
  ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)

  def forward():
    logits = model(input_ids=ids).logits[:, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).sum()

  def sync():  # CUDA kernels run asynchronously: time only finished work
    if device == "cuda":
      torch.cuda.synchronize()

  def timed(fn):
    for _ in range(args.warmup):
      fn()
    sync()
    times = []
    for _ in range(args.steps):
      start = time.perf_counter()
      fn()
      sync()
      times.append(time.perf_counter() - start)
    return statistics.median(times)

  print(f"torch device: {device}", flush=True)

  with torch.no_grad():
    _report("torch forward", timed(forward), tokens, flops_fwd, peak)
  _report("torch forward+backward", timed(lambda: forward().backward()), tokens, 3 * flops_fwd,
          peak)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--seq", type=int, default=1024)
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  parser.add_argument("--layers", type=int, default=24)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--remat", default="none", help="remat_policy: none | full | dots | ...")
  parser.add_argument("--attention", default=None, choices=[None, "xla", "cudnn"])
  parser.add_argument("--chunk-size", type=int, default=1024, help="token_logps chunk")
  parser.add_argument("--peak-tflops", type=float, default=None,
                      help="device peak for MFU (default: table by device kind)")
  parser.add_argument("--torch", action="store_true", help="also time transformers (PyTorch)")
  args = parser.parse_args(argv)

  config = qwen25_05b_config(args.layers, remat_policy=args.remat,
                             attention_impl=args.attention)
  model = CausalLM(config)
  dtype = jnp.dtype(args.dtype)
  params = model.init(jax.random.key(0), dtype)
  num_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(0, config.vocab_size, (args.batch, args.seq)), jnp.int32)
  mask = jnp.ones_like(ids)
  tokens = args.batch * args.seq
  flops_fwd = flops_per_token(config, args.seq) * tokens
  peak = peak_tflops(args.peak_tflops)
  device = jax.devices()[0]
  print(f"device: {device.platform} / {device.device_kind} x{jax.device_count()}  "
        f"peak: {peak or 'n/a'} TFLOP/s")
  print(f"model: Qwen2.5-0.5B shapes, {args.layers} layers, {num_params / 1e6:.1f}M params "
        f"({matmul_params(config) / 1e6:.1f}M in matmuls), {args.dtype}, remat={args.remat}; "
        f"batch {args.batch} x seq {args.seq} = {tokens} tokens")

  logps = jax.jit(lambda p, i, m: model.token_logps(p, i, m, chunk_size=args.chunk_size))
  loss = lambda p, i, m: jnp.sum(model.token_logps(p, i, m, chunk_size=args.chunk_size))
  grads = jax.jit(jax.grad(loss))
  _report("forward (token_logps)", _time(logps, (params, ids, mask), args.steps, args.warmup),
          tokens, flops_fwd, peak)
  _report("forward+backward", _time(grads, (params, ids, mask), args.steps, args.warmup),
          tokens, 3 * flops_fwd, peak)
  if args.torch:
    _torch_benchmark(dataclasses.replace(config, remat_policy="none"), args, tokens, flops_fwd,
                     peak)


if __name__ == "__main__":
  main()
