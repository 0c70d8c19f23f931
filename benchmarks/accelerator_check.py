"""One-shot accelerator check: tests on the device, DPO step MFU, sampling roofline, attention.

Run through `benchmarks/accelerator_check.sh` (which installs the package and carried wheels
first), or directly:

    python benchmarks/accelerator_check.py              # full sizes, on a GPU (about 6 minutes)
    python benchmarks/accelerator_check.py --dry-run    # tiny shapes on a CPU (under 2 minutes)

Sections (each one writes its rows even when a later one fails; the table is rewritten after
every section, so a run cut short by a timeout still leaves what it measured):

1. tests: pytest of tests/models/test_transformer.py and tests/test_sampling.py on the default
   JAX backend with JAX_DEFAULT_MATMUL_PRECISION=highest (float32 parity tests would otherwise
   see TF32 matmuls on a GPU). The dry run only collects them (`--collect-only`).
2. dpo: one DPO step (benchmarks/dpo_step.py's step) at Qwen2.5-0.5B's shape (24 layers, width
   896, 14 heads, 2 KV heads, MLP 4864, vocab 151936), bf16, 8 pairs x 1024 tokens, full remat.
   FLOP convention (model FLOPs, remat recomputation not counted): N = matmul parameters (every
   projection of every layer plus the D x V unembedding once; the embedding gather is free),
   T = pairs x sequence length (pair-tokens; each pair is a chosen and a rejected row, so 2T
   row-tokens). One forward of one row-token costs 2N + 4·L·S·heads·head_dim (S the sequence
   length: non-causal-halved attention, PaLM's appendix B). Policy forward+backward = 3
   forwards, the reference forward = 1, both over 2 rows per pair-token:
     reference in the step:      FLOPs = 2 · 4 · (2N + attn) · T  = 16·N·T + 8·attn·T
     precomputed reference:      FLOPs = 2 · 3 · (2N + attn) · T  = 12·N·T + 6·attn·T
   MFU = FLOPs / step time / dense bf16 peak (forward.PEAK_TFLOPS by device name).
3. sampling: `sampling.generate`, batch 32, 128 prompt + 256 new tokens, bf16, against the
   decode bandwidth roofline: bytes per decode step = all parameter bytes (tied embedding read
   once, as the unembedding) + the KV cache the step reads (L x B x S x K x H x 2 (k and v) x
   itemsize, S = the preallocated cache length: the dense decode attends over every slot).
   Roofline step time = bytes / peak HBM bandwidth (table below by device name) and, beside it,
   / the measured device copy bandwidth (2 x bytes of a jitted x + 1 over the time). The
   measured step time is the whole call over the new tokens, so it includes the prefill.
4. attention: jax.nn.dot_product_attention forward+backward at Qwen's head shape (14 heads,
   2 KV heads, head dim 64, bf16), causal, a few sequence lengths: 'xla' with the model's dense
   mask, 'cudnn' with the same mask (what layers._attend does), 'cudnn' with is_causal only
   (no mask: the kernel's best case). Without a GPU only 'xla' runs; cuDNN rows say so.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
import types

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dpo_step  # noqa: E402
from forward import flops_per_token, matmul_params, peak_tflops, qwen25_05b_config  # noqa: E402
from rlhf_jax import sampling  # noqa: E402
from rlhf_jax.models import CausalLM  # noqa: E402
from rlhf_jax.models.transformer import attention_mask_B1TS  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_TIMEOUT_S = 200  # of the 8 minutes the whole check may take on one H100/H200
TEST_FILES = ("tests/models/test_transformer.py", "tests/test_sampling.py")

# Peak HBM bandwidth in TB/s (vendor figures), matched on jax's device_kind, first match wins.
PEAK_HBM_TBPS = (("H200", 4.8), ("H100 PCIe", 2.0), ("H100", 3.35))

FULL = dict(budget_s=420, layers=24, vocab=151936, pairs=8, seq=1024, prompt=256, dpo_steps=3,
            batch=32, prompt_len=128, new_tokens=256, sample_repeats=2, copy_mib=2048,
            attn_batch=4, attn_seqs=(1024, 4096, 8192), attn_steps=5, dtype="bfloat16")
# The dry run shrinks the width too (compile time dominates on a CPU) and, where the device has
# no table entry, uses nominal peaks (labelled) so the MFU and roofline arithmetic still runs.
DRY = dict(budget_s=600, width=dict(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                      intermediate_size=128), nominal_peak_tflops=1.0, nominal_peak_tbps=0.1,
           layers=1, vocab=256, pairs=1, seq=64, prompt=16, dpo_steps=1,
           batch=4, prompt_len=8, new_tokens=8, sample_repeats=1, copy_mib=16,
           attn_batch=1, attn_seqs=(64, 128), attn_steps=2, dtype="float32")


class Table:
  """Rows (section, item, value, unit, detail), written as Markdown after every section."""

  def __init__(self, path: str, header: list[str]):
    self.path, self.header, self.rows = path, header, []

  def add(self, section, item, value, unit="", detail=""):
    self.rows.append((section, item, value, unit, detail))
    print(f"[{section}] {item}: {_fmt(value)} {unit}  {detail}", flush=True)

  def write(self):
    lines = list(self.header) + ["", "| section | item | value | unit | detail |",
                                 "|---|---|---|---|---|"]
    for section, item, value, unit, detail in self.rows:
      lines.append(f"| {section} | {item} | {_fmt(value)} | {unit} | {detail} |")
    with open(self.path, "w") as f:
      f.write("\n".join(lines) + "\n")


def _fmt(value):
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)


def peak_bandwidth_tbps(kind: str) -> float | None:
  return next((bw for name, bw in PEAK_HBM_TBPS if name.lower() in kind.lower()), None)


def check_tests(table: Table, dry_run: bool):
  # Several pytest workers share the device: none may preallocate most of its memory.
  env = dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest",
             XLA_PYTHON_CLIENT_PREALLOCATE="false")
  cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TEST_FILES]
  if dry_run:
    cmd.append("--collect-only")
  elif importlib.util.find_spec("xdist") is not None:
    cmd += ["-n", "4"]
  start = time.perf_counter()
  try:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=TEST_TIMEOUT_S)
  except subprocess.TimeoutExpired:
    table.add("tests", "passed", float("nan"), "tests", f"pytest passed {TEST_TIMEOUT_S} s: cut")
    return
  seconds = time.perf_counter() - start
  tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
  summary = tail[0]
  if dry_run:
    found = re.search(r"(\d+) tests? collected", summary)
    table.add("tests", "collected (dry run: --collect-only)", int(found.group(1)) if found else -1,
              "tests", f"{' '.join(TEST_FILES)}; exit {proc.returncode}; {seconds:.0f} s")
  else:
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|error|errors|skipped)",
                                                summary)}
    table.add("tests", "passed", counts.get("passed", 0), "tests",
              f"{' '.join(TEST_FILES)} on {jax.default_backend()}; {seconds:.0f} s")
    table.add("tests", "failed", counts.get("failed", 0) + counts.get("error", 0)
              + counts.get("errors", 0), "tests", f"exit {proc.returncode}: {summary}")
    if proc.returncode != 0:
      print(proc.stdout[-8000:], proc.stderr[-4000:], sep="\n")


def model_config(size: dict, **overrides):
  """Qwen2.5-0.5B's shape with size's layers and vocabulary (and the dry run's width)."""
  return dataclasses.replace(qwen25_05b_config(size["layers"]), vocab_size=size["vocab"],
                             **size.get("width", {}), **overrides)


def check_dpo(table: Table, size: dict, peak: float | None):
  config = model_config(size, remat_policy="full")
  peak_note = f"dense bf16 peak {peak} TFLOP/s"
  if peak is None and size.get("nominal_peak_tflops"):
    peak = size["nominal_peak_tflops"]
    peak_note = f"NOMINAL peak {peak} TFLOP/s (dry run: no peak known for this device)"
  args = types.SimpleNamespace(dtype=size["dtype"], chunk=512, steps=size["dpo_steps"])
  batch = dpo_step.make_batch(np.random.default_rng(0), size["pairs"], size["seq"],
                              size["vocab"], size["prompt"])
  n = matmul_params(config)
  pair_tokens = size["pairs"] * size["seq"]
  forward = flops_per_token(config, size["seq"])  # 2N + attention, per row-token
  shape = (f"{size['layers']} layers, vocab {size['vocab']}, {size['pairs']} pairs x "
           f"{size['seq']}, {size['dtype']}, remat full; N={n:,}, T={pair_tokens} pair-tokens")
  for precomputed, factor, name in ((False, 4, "reference in step"),
                                    (True, 3, "precomputed reference")):
    seconds, memory = dpo_step.time_jax(args, config, batch, precomputed_reference=precomputed)
    flops = 2 * factor * forward * pair_tokens
    convention = (f"FLOPs = 2 rows x {factor} x (2N + attn) x T = {4 * factor}·N·T + "
                  f"{2 * factor}·attn·T = {flops:.4g}")
    table.add("dpo", f"{name}: step", seconds * 1e3, "ms", shape)
    table.add("dpo", f"{name}: pair-tokens/s", pair_tokens / seconds, "tok/s", convention)
    table.add("dpo", f"{name}: TFLOP/s", flops / seconds / 1e12, "TFLOP/s",
              f"peak memory {memory / 2**20:.0f} MiB")
    if peak:
      table.add("dpo", f"{name}: MFU", 100 * flops / seconds / (peak * 1e12), "%",
                peak_note)
    else:
      table.add("dpo", f"{name}: MFU", float("nan"), "%", "no peak known for this device")


def copy_bandwidth(mib: int) -> float:
  """Bytes/s of a jitted x + 1 (reads and writes every byte once) on a bf16 array."""
  x = jnp.ones((mib * 2**19,), jnp.bfloat16)
  fn = jax.jit(lambda a: a + 1)
  jax.block_until_ready(fn(x))
  times = []
  for _ in range(5):
    start = time.perf_counter()
    jax.block_until_ready(fn(x))
    times.append(time.perf_counter() - start)
  return 2 * x.nbytes / min(times)


def check_sampling(table: Table, size: dict, kind: str):
  config = model_config(size, pad_token_id=0)
  model = CausalLM(config)
  dtype = jnp.dtype(size["dtype"])
  params = model.init(jax.random.key(0), dtype=dtype)
  batch, prompt_len, new = size["batch"], size["prompt_len"], size["new_tokens"]
  rng = np.random.default_rng(0)
  ids = rng.integers(1, size["vocab"], (batch, prompt_len)).astype(np.int32)
  mask = np.ones_like(ids)
  run = lambda seed: jax.block_until_ready(sampling.generate(
      model, params, ids, mask, jax.random.key(seed), max_new_tokens=new, temperature=1.0,
      eos_token_id=None))
  run(0)  # compile
  times = []
  for i in range(size["sample_repeats"]):
    start = time.perf_counter()
    run(i + 1)
    times.append(time.perf_counter() - start)
  step_s = min(times) / new
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  slots = prompt_len + new - 1  # sampling.generate's preallocated cache length
  cache_bytes = (2 * config.num_layers * batch * slots * config.num_kv_heads * config.head_dim
                 * dtype.itemsize)
  step_bytes = param_bytes + cache_bytes
  measured_bw = copy_bandwidth(size["copy_mib"])
  peak_bw, peak_note = peak_bandwidth_tbps(kind), kind
  if peak_bw is None and size.get("nominal_peak_tbps"):
    peak_bw = size["nominal_peak_tbps"]
    peak_note = f"NOMINAL (dry run: no peak known for {kind!r})"
  shape = (f"{size['layers']} layers, vocab {size['vocab']}, batch {batch}, {prompt_len} + "
           f"{new} tokens, {size['dtype']}")
  table.add("sampling", "ms per new token (incl. prefill)", step_s * 1e3, "ms", shape)
  table.add("sampling", "new tokens/s", batch / step_s, "tok/s", shape)
  table.add("sampling", "bytes per decode step", step_bytes / 2**20, "MiB",
            f"params {param_bytes / 2**20:.1f} MiB + KV cache {cache_bytes / 2**20:.1f} MiB "
            f"({slots} slots)")
  table.add("sampling", "measured copy bandwidth", measured_bw / 1e12, "TB/s",
            f"jitted x + 1 over {size['copy_mib']} MiB bf16, 2 x bytes / best of 5")
  roof_measured = step_bytes / measured_bw
  table.add("sampling", "roofline step (measured bandwidth)", roof_measured * 1e3, "ms",
            f"achieved {100 * roof_measured / step_s:.1f}% of this roofline")
  if peak_bw:
    roof_peak = step_bytes / (peak_bw * 1e12)
    table.add("sampling", "roofline step (peak bandwidth)", roof_peak * 1e3, "ms",
              f"peak {peak_bw} TB/s ({peak_note}); achieved {100 * roof_peak / step_s:.1f}%")
  else:
    table.add("sampling", "roofline step (peak bandwidth)", float("nan"), "ms",
              f"no peak bandwidth known for {kind!r} (table: H100 SXM, H100 PCIe, H200)")


def _time_attention(impl, use_mask, q, k, v, mask, steps):
  def loss(q, k, v):
    out = jax.nn.dot_product_attention(q, k, v, mask=mask if use_mask else None,
                                       is_causal=impl == "cudnn" or not use_mask,
                                       implementation=impl)
    return jnp.sum(out.astype(jnp.float32))

  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  jax.block_until_ready(fn(q, k, v))
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn(q, k, v))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def check_attention(table: Table, size: dict):
  on_gpu = jax.default_backend() == "gpu"
  dtype = jnp.bfloat16 if on_gpu else jnp.float32
  width = size.get("width", {})
  heads, kv_heads = width.get("num_heads", 14), width.get("num_kv_heads", 2)
  dim, batch = width.get("head_dim", 64), size["attn_batch"]
  for seq in size["attn_seqs"]:
    keys = jax.random.split(jax.random.key(seq), 3)
    q = jax.random.normal(keys[0], (batch, seq, heads, dim), dtype)
    k = jax.random.normal(keys[1], (batch, seq, kv_heads, dim), dtype)
    v = jax.random.normal(keys[2], (batch, seq, kv_heads, dim), dtype)
    mask = attention_mask_B1TS(jnp.ones((batch, seq), jnp.int32),
                               jnp.arange(seq, dtype=jnp.int32), None)
    # Attention FLOPs, forward+backward = 3 x forward, causal half: 3 x 2 x 2·B·N·T²·H / 2.
    flops = 6 * batch * heads * seq * seq * dim
    shape = (f"B={batch}, T={seq}, {heads}/{kv_heads} heads, H={dim}, {jnp.dtype(dtype).name}, "
             "fwd+bwd")
    variants = [("xla", True, "xla + dense mask")]
    if on_gpu:
      variants += [("cudnn", True, "cudnn + dense mask"), ("cudnn", False, "cudnn is_causal")]
    for impl, use_mask, name in variants:
      seconds = _time_attention(impl, use_mask, q, k, v, mask, size["attn_steps"])
      table.add("attention", f"{name}, T={seq}", seconds * 1e3, "ms",
                f"{shape}; {flops / seconds / 1e12:.3g} TFLOP/s (causal FLOPs)")
    if not on_gpu:
      table.add("attention", f"cudnn, T={seq}", "unavailable", "",
                f"backend {jax.default_backend()}: cuDNN needs a GPU; XLA only")
  if on_gpu:
    check_cudnn_parity(table, heads, kv_heads, dim)


def check_cudnn_parity(table: Table, heads: int, kv_heads: int, dim: int,
                       impls=("xla", "cudnn")):
  """max |cuDNN - XLA| through layers._attend (explicit 'cudnn', no fallback), bf16, on real
  tokens: causal, a sliding window (local_window_size + the dense mask), packed segments."""
  from rlhf_jax.models.layers import _attend

  seq, batch = 1024, 2
  keys = jax.random.split(jax.random.key(1), 3)
  q = jax.random.normal(keys[0], (batch, seq, heads, dim), jnp.bfloat16)
  k = jax.random.normal(keys[1], (batch, seq, kv_heads, dim), jnp.bfloat16)
  v = jax.random.normal(keys[2], (batch, seq, kv_heads, dim), jnp.bfloat16)
  packed_BT = jnp.asarray(np.stack([np.repeat([1, 2, 3, 0], [300, 400, 300, 24]),
                                    np.repeat([0, 1], [100, 924])]), jnp.int32)
  cases = (("causal", jnp.ones((batch, seq), jnp.int32), None),
           ("sliding window 256", jnp.ones((batch, seq), jnp.int32), 256),
           ("packed segments + padding", packed_BT, None))
  for name, segments_BT, window in cases:
    mask = attention_mask_B1TS(segments_BT > 0, jnp.arange(seq, dtype=jnp.int32), window,
                               segments_BT)
    try:
      outs = [jax.jit(lambda q, k, v, impl=impl: _attend(
          q, k, v, mask, impl, False, auto=False, segment_ids_BT=segments_BT, window=window))(
              q, k, v).astype(jnp.float32) for impl in impls]
    except Exception as err:  # cuDNN rejecting a combination is a finding, not a crash
      table.add("attention", f"cudnn vs xla, {name}", "failed", "",
                f"{type(err).__name__}: {str(err)[:160]}")
      continue
    real = (segments_BT > 0)[:, :, None, None]
    diff = float(jnp.max(jnp.where(real, jnp.abs(outs[0] - outs[1]), 0.0)))
    table.add("attention", f"cudnn vs xla max abs diff, {name}", diff, "",
              f"B={batch}, T={seq}, bf16, real tokens; bf16 output resolution is about 4e-3")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dry-run", action="store_true", help="tiny shapes, any backend")
  parser.add_argument("--out", default=None, help="Markdown path (default: $ACCELERATOR_RESULTS,"
                      " else $OUT/accelerator_results.md, else benchmarks/accelerator_results.md)")
  parser.add_argument("--skip", default="", help="comma-separated sections to skip")
  args = parser.parse_args()
  out = (args.out or os.environ.get("ACCELERATOR_RESULTS")
         or (os.path.join(os.environ["OUT"], "accelerator_results.md") if os.environ.get("OUT")
             else os.path.join(REPO, "benchmarks", "accelerator_results.md")))
  size = DRY if args.dry_run else FULL
  device = jax.devices()[0]
  kind = device.device_kind
  peak = peak_tflops(None)
  import jaxlib
  versions = f"jax {jax.__version__}, jaxlib {jaxlib.__version__}"
  title = "# Accelerator check" + (" (DRY RUN: tiny shapes, not a measurement)"
                                   if args.dry_run else "")
  header = [title,
            "", f"Device: {kind} ({jax.default_backend()}, {jax.device_count()} devices); "
            f"{versions}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
            "FLOP and roofline conventions: see benchmarks/accelerator_check.py's docstring."]
  table = Table(out, header)
  skip = set(filter(None, args.skip.split(",")))
  sections = (("tests", lambda: check_tests(table, args.dry_run)),
              ("dpo", lambda: check_dpo(table, size, peak)),
              ("sampling", lambda: check_sampling(table, size, kind)),
              ("attention", lambda: check_attention(table, size)))
  failed, began = [], time.perf_counter()
  for name, fn in sections:
    if name in skip:
      continue
    start = time.perf_counter()
    if start - began > size["budget_s"]:  # leave the machine in time, with the table written
      table.add(name, "skipped", "nan", "", f"time budget of {size['budget_s']} s spent")
      table.write()
      continue
    try:
      fn()
    except Exception as err:  # one failing section must not lose the others' rows
      traceback.print_exc()
      table.add(name, "ERROR", "nan", "", f"{type(err).__name__}: {str(err)[:200]}")
      failed.append(name)
    print(f"[{name}] section took {time.perf_counter() - start:.1f} s", flush=True)
    table.write()
  print(f"wrote {out}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
