"""Throughput of one DPO step: packed shared-prompt rows vs the padded two-row layout.

The step is the real one (`rlhf_jax.train.preference` + `steps.make_train_step`, as in
`dpo_step.py`): the policy and the frozen reference each score the batch once, the DPO loss,
the backward pass through the policy, AdamW. The two layouts hold the same pairs
(`rlhf_jax.data.BatchStream` with layout="padded" or "packed"):

  padded  2B rows [prompt | completion | pad], the batch's bucket long (prompt computed twice)
  packed  R rows of L slots, each pair one item [prompt | chosen | rejected] (prompt once)

Two length distributions:
  synthetic  the embedded synthetic pair task, its word tokenizer, max_length 64 (the
             preference trainer's default)
  realistic  prompts longer than responses, as in multi-turn HH / UltraFeedback: prompt
             lengths lognormal (median 300 tokens, sigma 0.6) cut to 3/4 of max_length,
             chosen and rejected lengths lognormal (median 120, sigma 0.6) each, cut to
             max_length - prompt (the tokenizer's truncation rule), max_length 512

Reported per layout: slots per step (rows x length), the fraction of them holding real tokens
(the padded layout counts its repeated prompt as real: it is computed), step time, slot
tokens/s, and useful tokens/s: every pair counted as prompt + chosen + rejected (its prompt
once) in both layouts, so the two columns compare the same work. Real-token fractions are also
averaged over `--fraction-batches` batches of the stream (host only, no model).

    python benchmarks/shared_prompt.py            # 2 layers of Qwen2.5-0.5B width, vocab 32k
    python benchmarks/shared_prompt.py --fractions-only   # slot fractions only, no model:
        # real / slots and useful / slots (each prompt once) over --fraction-batches batches
    python benchmarks/shared_prompt.py --only realistic --compare-head --repeats 3
        # the LM head on the scored slots only (the trainers' `ops.scored_token_logps`) vs on
        # every slot (`ops.chunked_token_logps`, masked afterwards), interleaved per repeat
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from dpo_step import dpo_loss_fn
from forward import qwen25_05b_config
from rlhf_jax.data import BatchStream, TokenizeConfig, prepare, synthetic
from rlhf_jax.data.tokenize import TokenizedPair
from rlhf_jax import ops
from rlhf_jax.models import CausalLM
from rlhf_jax.train import steps
from rlhf_jax.train.state import OptimizerConfig, TrainState, make_optimizer


def synthetic_records(num_rows: int, max_length: int):
  config = TokenizeConfig(max_length=max_length)
  return prepare("pair", "synthetic:pair", synthetic.build_tokenizer(), config,
                 num_rows=num_rows)[0]


def realistic_records(num_rows: int, max_length: int, vocab: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  draw = lambda median, cap: int(np.clip(round(rng.lognormal(np.log(median), 0.6)), 1, cap))
  records = []
  for _ in range(num_rows):
    prompt = draw(300, max_length * 3 // 4)
    budget = max_length - prompt
    ids = lambda n: rng.integers(3, vocab, size=n).astype(np.int32)
    records.append(TokenizedPair(ids(prompt), ids(draw(120, budget)), ids(draw(120, budget))))
  return records


def useful_tokens(records) -> int:
  return sum(len(r.prompt) + len(r.chosen) + len(r.rejected) for r in records)


def real_fraction(batch) -> float:
  return float(np.sum(batch["attention_mask"]) / batch["attention_mask"].size)


def time_step(step, state, batch, ref_params, repeats: int):
  batch = jax.device_put({k: v for k, v in batch.items() if k != "index"})
  state, metrics = step(state, batch, ref_params)  # compiles this shape
  jax.block_until_ready(metrics)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, metrics = step(state, batch, ref_params)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return state, statistics.median(times), float(metrics["loss"])


@contextlib.contextmanager
def head_on_every_slot():
  """While tracing: the head scores every slot and the mask is applied afterwards (what the
  trainers did before `ops.scored_token_logps`)."""
  scored = ops.scored_token_logps
  ops.scored_token_logps = ops._every_slot_token_logps
  try:
    yield
  finally:
    ops.scored_token_logps = scored


def compare_head(args, model, params, ref_params, tx, tasks):
  """Step time with the head on the scored slots vs on every slot, same batch, same layout,
  the two steps alternating (median over --repeats each)."""
  print("| distribution | layout | batch shape | head on every slot | head on scored slots | "
        "speed-up |")
  print("|---|---|---|---|---|---|")
  for name, (records, max_length) in tasks.items():
    if args.only and name != args.only:
      continue
    for layout in ("packed", "padded"):
      batch = BatchStream(records, args.batch, max_length, seed=0, layout=layout).batch(0)
      batch = jax.device_put({k: v for k, v in batch.items() if k != "index"})
      runs = {}
      for variant in ("every", "scored"):
        step = steps.make_train_step(dpo_loss_fn(model, args.chunk))
        state = TrainState.create(jax.tree.map(jnp.copy, params), tx, jax.random.key(1))
        with head_on_every_slot() if variant == "every" else contextlib.nullcontext():
          state, metrics = step(state, batch, ref_params)  # traces and compiles here
        jax.block_until_ready(metrics)
        runs[variant] = {"step": step, "state": state, "times": [],
                         "loss": float(metrics["loss"])}
      for _ in range(args.repeats):
        for run in runs.values():
          start = time.perf_counter()
          run["state"], metrics = run["step"](run["state"], batch, ref_params)
          jax.block_until_ready(metrics)
          run["times"].append(time.perf_counter() - start)
      every, scored = (statistics.median(runs[v]["times"]) for v in ("every", "scored"))
      shape = batch["input_ids"].shape
      print(f"| {name} | {layout} | {shape[0]} x {shape[1]} | {every * 1e3:,.0f} ms | "
            f"{scored * 1e3:,.0f} ms | {every / scored:.2f}x |", flush=True)
      print(f"<!-- first-step DPO loss: every slot {runs['every']['loss']:.6f}, scored slots "
            f"{runs['scored']['loss']:.6f} -->", flush=True)


def _tasks(args):
  return {"synthetic": (synthetic_records(512, args.synthetic_max_length),
                        args.synthetic_max_length),
          "realistic": (realistic_records(512, args.realistic_max_length, args.vocab),
                        args.realistic_max_length)}


def fractions(args):
  """Slots per step and how many of them hold real tokens (the padded layout's repeated prompt
  counted) or useful ones (each pair's prompt once), over the first batches of each stream."""
  print(f"pairs={args.batch}, first {args.fraction_batches} batches of each stream")
  print("| distribution | layout | slots / step | real / slots | useful / slots |")
  print("|---|---|---|---|---|")
  for name, (records, max_length) in _tasks(args).items():
    for layout in ("padded", "packed"):
      stream = BatchStream(records, args.batch, max_length, seed=0, layout=layout)
      batches = [stream.batch(i) for i in range(args.fraction_batches)]
      slots = sum(b["attention_mask"].size for b in batches)
      real = sum(int(b["attention_mask"].sum()) for b in batches)
      useful = sum(useful_tokens([records[i] for i in b["index"]]) for b in batches)
      print(f"| {name} | {layout} | {slots / len(batches):,.0f} | {real / slots:.1%} | "
            f"{useful / slots:.1%} |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--vocab", type=int, default=32768)
  parser.add_argument("--batch", type=int, default=8, help="preference pairs per step")
  parser.add_argument("--realistic-max-length", type=int, default=512)
  parser.add_argument("--synthetic-max-length", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=2, help="timed steps per layout")
  parser.add_argument("--fraction-batches", type=int, default=32)
  parser.add_argument("--remat", default="none")
  parser.add_argument("--chunk", type=int, default=512)
  parser.add_argument("--only", choices=["synthetic", "realistic"], default=None)
  parser.add_argument("--compare-head", action="store_true",
                      help="time the head on scored slots only vs on every slot")
  parser.add_argument("--fractions-only", action="store_true",
                      help="no model: how full the slots are, over --fraction-batches batches")
  args = parser.parse_args()
  if args.fractions_only:
    return fractions(args)

  config = dataclasses.replace(qwen25_05b_config(args.layers), vocab_size=args.vocab,
                               remat_policy=args.remat)
  model = CausalLM(config)
  params = model.init(jax.random.key(0), dtype=jnp.float32)
  ref_params = jax.tree.map(jnp.copy, params)
  tx = make_optimizer(OptimizerConfig(lr=1e-6), 1000)
  step = steps.make_train_step(dpo_loss_fn(model, args.chunk))
  print(f"device={jax.devices()[0].device_kind} jax={jax.__version__} layers={args.layers} "
        f"width={config.hidden_size} vocab={args.vocab} pairs={args.batch} float32 "
        f"remat={args.remat}")
  tasks = _tasks(args)
  if args.compare_head:
    return compare_head(args, model, params, ref_params, tx, tasks)
  print("| distribution | layout | batch shape | real / slots (this batch) | real / slots "
        f"({args.fraction_batches} batches) | step | slot tokens/s | useful tokens/s |")
  print("|---|---|---|---|---|---|---|---|")
  for name, (records, max_length) in tasks.items():
    if args.only and name != args.only:
      continue
    streams = {layout: BatchStream(records, args.batch, max_length, seed=0, layout=layout)
               for layout in ("padded", "packed")}
    batches = {layout: stream.batch(0) for layout, stream in streams.items()}
    useful = useful_tokens([records[i] for i in batches["packed"]["index"]])
    losses = {}
    for layout, batch in batches.items():
      state = TrainState.create(jax.tree.map(jnp.copy, params), tx, jax.random.key(1))
      state, seconds, losses[layout] = time_step(step, state, batch, ref_params, args.repeats)
      masks = [streams[layout].batch(i)["attention_mask"] for i in range(args.fraction_batches)]
      mean_fraction = sum(m.sum() for m in masks) / sum(m.size for m in masks)
      shape = batch["input_ids"].shape
      print(f"| {name} | {layout} | {shape[0]} x {shape[1]} | {real_fraction(batch):.1%} | "
            f"{mean_fraction:.1%} | {seconds * 1e3:,.0f} ms | {np.prod(shape) / seconds:,.0f} | "
            f"{useful / seconds:,.0f} |", flush=True)
    # Same pairs, same loss: the layouts differ only in float32 rounding.
    print(f"<!-- {name}: DPO loss padded {losses['padded']:.6f}, packed {losses['packed']:.6f}; "
          f"{useful} useful tokens in the timed batch -->", flush=True)


if __name__ == "__main__":
  main()
