"""Memory of one DPO training step at Qwen2.5-0.5B's shape: full fine-tuning vs LoRA vs QLoRA.

Nothing is allocated: the params are abstract (`jax.eval_shape`), the step (the real one:
`steps.make_train_step` over the DPO loss with the frozen reference inside) is lowered and
compiled, and XLA's memory analysis gives its temporaries. Training-state bytes are what a run
holds between steps: params (the frozen base once: the reference shares it under LoRA, a copy
under full fine-tuning), the trained part's AdamW moments, the step counter and key.

    python benchmarks/lora_memory.py                      # 24 layers, bf16, 1 pair x 512 tokens
    python benchmarks/lora_memory.py --layers 2 --seq 128 # a quick look

The peak is state + the compiled step's temporaries + its batch (the donated state is updated
in place; under LoRA the frozen base goes in undonated and is counted once).
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dpo_step import dpo_loss_fn
from forward import qwen25_05b_config
from rlhf_jax.models import CausalLM, lora
from rlhf_jax.train import steps
from rlhf_jax.train.state import OptimizerConfig, TrainState, make_optimizer


def _itemsize(dtype) -> int:
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return 8  # a threefry key: two uint32
  return np.dtype(dtype).itemsize


def _bytes(tree) -> int:
  return int(sum(_itemsize(x.dtype) * int(np.prod(x.shape)) for x in jax.tree.leaves(tree)))


def _packed_bytes(tree) -> int:
  """Bytes with 4-bit values at half a byte (how an accelerator stores int4 / NF4)."""
  total = 0
  for x in jax.tree.leaves(tree):
    bits = 4 if str(x.dtype) in ("int4", "uint4") else 8 * _itemsize(x.dtype)
    total += bits * int(np.prod(x.shape)) // 8
  return total


def measure(args, mode: str) -> dict:
  config = qwen25_05b_config(args.layers)
  model = CausalLM(config)
  dtype = jnp.dtype(args.dtype)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), dtype=dtype))
  if mode == "full":
    reference = params  # a copy in the run
  else:
    quantize = {"lora": "none", "qlora_int8": "int8", "qlora_nf4": "nf4"}[mode]
    spec = lora.LoraConfig(rank=args.rank, alpha=2.0 * args.rank, quantize=quantize,
                           dtype=args.dtype)
    params = jax.eval_shape(lambda p: lora.adapt(model, p, spec, jax.random.key(1))[1], params)
    model = dataclasses.replace(model, lora=spec)
    reference = lora.Adapted(params.base, None)  # shares the base's buffers in the run
  tx = make_optimizer(OptimizerConfig(lr=1e-6), 1000)
  state = jax.eval_shape(lambda p: TrainState.create(p, tx, jax.random.key(1)), params)
  rows, seq = 2 * args.pairs, args.seq
  batch = {"input_ids": jax.ShapeDtypeStruct((rows, seq), jnp.int32),
           "attention_mask": jax.ShapeDtypeStruct((rows, seq), jnp.int32),
           "loss_mask": jax.ShapeDtypeStruct((rows, seq), jnp.int32),
           "weight": jax.ShapeDtypeStruct((args.pairs,), jnp.float32)}
  step = steps.make_train_step(dpo_loss_fn(model, args.chunk))
  stats = step.lower(state, batch, reference).compile().memory_analysis()
  base_bytes = _bytes(lora.parts(params)[0])
  state_bytes = _bytes(state) + (base_bytes if mode == "full" else 0)  # + the reference copy
  packed = _packed_bytes(state) + (base_bytes if mode == "full" else 0)
  return {"mode": mode, "state": state_bytes, "state_packed": packed,
          "trained": _bytes(lora.trainable(params)), "temp": stats.temp_size_in_bytes,
          "batch": _bytes(batch), "peak": packed + stats.temp_size_in_bytes + _bytes(batch)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, default=24)
  parser.add_argument("--pairs", type=int, default=1)
  parser.add_argument("--seq", type=int, default=512)
  parser.add_argument("--rank", type=int, default=16)
  parser.add_argument("--chunk", type=int, default=512)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--modes", default="full,lora,qlora_int8,qlora_nf4")
  args = parser.parse_args()
  print(f"Qwen2.5-0.5B shape, {args.layers} layers, {args.dtype}, {args.pairs} pair x {args.seq} "
        f"tokens, LoRA rank {args.rank} on every projection; jax {jax.__version__}, "
        f"{jax.devices()[0].device_kind}")
  gib = lambda b: f"{b / 2**30:.3f}"
  results = [measure(args, mode) for mode in args.modes.split(",")]
  full = next((r for r in results if r["mode"] == "full"), None)
  print("| mode | trained params (GiB) | training state (GiB) | vs full | step temporaries (GiB) "
        "| peak (GiB) |")
  print("|---|---|---|---|---|---|")
  for r in results:
    ratio = f"{r['state_packed'] / full['state_packed']:.1%}" if full else "-"
    print(f"| {r['mode']} | {gib(r['trained'])} | {gib(r['state_packed'])} | {ratio} | "
          f"{gib(r['temp'])} | {gib(r['peak'])} |")


if __name__ == "__main__":
  main()
