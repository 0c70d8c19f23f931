"""Compiled peak memory of naive vs chunked token log-probs, forward and forward+backward.

    python benchmarks/logprobs_memory.py [--batch 4 --seq 1024 --vocab 151936 --width 896]

Uses XLA's memory analysis of the compiled program (nothing is executed, so it runs anywhere):
`temp` is the scratch XLA allocates beyond arguments and outputs, which is where a [B, T, V]
float32 log-softmax and its gradient live. Defaults are Qwen2.5-0.5B's width and vocabulary.
"""

import argparse

import jax
import jax.numpy as jnp

from rlhf_jax import ops


def naive_logps(hidden, unembed, labels):
  logits = jnp.einsum("btd,dv->btv", hidden, unembed, preferred_element_type=jnp.float32)
  return ops.token_logps_from_logits(logits, labels)


def compiled_bytes(fn, *args):
  stats = jax.jit(fn).lower(*args).compile().memory_analysis()
  return stats.temp_size_in_bytes, stats.temp_size_in_bytes + stats.argument_size_in_bytes + (
      stats.output_size_in_bytes)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq", type=int, default=1024)
  parser.add_argument("--vocab", type=int, default=151936)
  parser.add_argument("--width", type=int, default=896)
  parser.add_argument("--chunk", type=int, default=512)
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  args = parser.parse_args()
  dtype = jnp.dtype(args.dtype)
  hidden = jax.ShapeDtypeStruct((args.batch, args.seq, args.width), dtype)
  unembed = jax.ShapeDtypeStruct((args.width, args.vocab), dtype)
  labels = jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32)
  chunked = lambda h, w, y: ops.chunked_token_logps(h, w, y, chunk_size=args.chunk)
  print(f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} "
        f"B={args.batch} T={args.seq} V={args.vocab} D={args.width} dtype={args.dtype} "
        f"chunk={args.chunk}")
  print(f"{'':28s}{'temp MiB':>12s}{'total MiB':>12s}")
  results = {}
  for name, fn in (("naive", naive_logps), ("chunked", chunked)):
    forward = lambda h, w, y, fn=fn: fn(h, w, y).sum()
    backward = jax.grad(forward, argnums=(0, 1))
    for pass_name, f in (("forward", forward), ("forward+backward", backward)):
      temp, total = compiled_bytes(f, hidden, unembed, labels)
      results[name, pass_name] = temp
      print(f"{name + ' ' + pass_name:28s}{temp / 2**20:12.1f}{total / 2**20:12.1f}")
  for pass_name in ("forward", "forward+backward"):
    ratio = results["chunked", pass_name] / results["naive", pass_name]
    print(f"chunked/naive temp, {pass_name}: {ratio:.3f}")


if __name__ == "__main__":
  main()
