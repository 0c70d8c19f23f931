"""`rlhf_jax.sampling.generate` against Tunix's sampler (the JAX anchor) on the same weights.

Both decode one random Qwen2-style model (Qwen2.5-0.5B widths: hidden 896, 14 heads, 2 KV heads,
head_dim 64, MLP 4864, tied embeddings, q/k/v biases; 2 layers by default): our params are built
with `CausalLM.init` and copied into Tunix's `tunix.models.qwen2.model.Qwen2`, so greedy tokens
can be compared. Prompts are B rows of P random ids (no padding); no stop token fires (every row
makes all N tokens). Needs google-tunix (e.g. the venv it is installed in) with this repository
on PYTHONPATH:

  PYTHONPATH=. python benchmarks/sampling_tunix.py                      # greedy, vocab 8192
  PYTHONPATH=. python benchmarks/sampling_tunix.py --vocab 151936 --top-p 0.9 --embed-scale 10

Timing: rounds interleave the two systems (ours full, Tunix full, ours prefill, Tunix prefill),
each call blocked on its result; figures are medians over rounds. "prefill" is a call with one
new token (prefill + first draw), decode ms/token = (full - prefill) / (N - 1), tokens/s =
B·N / full. Tunix's time is its `Sampler.__call__` (token ids passed through a trivial
tokenizer of space-separated ids, so tokenising costs nothing).

Roofline: a decode step must read every weight once (the embedding as the tied unembedding; the
gather of B rows is negligible) and the KV cache (all S slots, as both samplers attend over the
whole cache); bytes / the read bandwidth measured here (a jitted sum over a 512 MiB array) is
the fastest a step can be on this machine.

--embed-scale multiplies the embedding (both systems get the scaled weights): random weights
give flat logits, whose top-0.9 nucleus is most of the vocabulary; a scale of 10 peaks them as a
trained model's are, so the nucleus is a few tokens (our top-p prefilter's case).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import sampling
from rlhf_jax.models import CausalLM, ModelConfig


def config_for(args) -> ModelConfig:
  return ModelConfig(
      model_type="qwen2", vocab_size=args.vocab, hidden_size=896, num_layers=args.layers,
      num_heads=14, num_kv_heads=2, head_dim=64, intermediate_size=4864, norm="rmsnorm",
      norm_eps=1e-6, positions="rope", max_position_embeddings=32768, rope_theta=1_000_000.0,
      mlp="gated", activation="silu", qkv_bias=True, tie_embeddings=True, pad_token_id=0)


class IdTokenizer:
  """Strings of space-separated ids <-> ids: lets Tunix's string API take our token ids."""

  def encode(self, text, **kwargs):
    return [int(t) for t in text.split()]

  def decode(self, ids, **kwargs):
    return " ".join(str(int(i)) for i in ids)

  def bos_id(self):
    return 0  # falsy: Tunix adds no BOS

  def eos_id(self):
    return -1  # never sampled

  def pad_id(self):
    return 0


def tunix_model(config: ModelConfig, params):
  """Tunix's Qwen2 holding our params (same math: RMSNorm, rotate-half RoPE, biased q/k/v)."""
  from flax import nnx
  from tunix.models.qwen2 import model as qwen2

  n, k, h, d = config.num_heads, config.num_kv_heads, config.head_dim, config.hidden_size
  tconfig = qwen2.ModelConfig(
      num_layers=config.num_layers, vocab_size=config.vocab_size, embed_dim=d,
      hidden_dim=config.intermediate_size, num_heads=n, head_dim=h, num_kv_heads=k,
      rope_theta=int(config.rope_theta), norm_eps=config.norm_eps, use_tied_embedding=True,
      dtype=jnp.float32, param_dtype=jnp.float32)
  model = qwen2.Qwen2(tconfig, rngs=nnx.Rngs(0))
  model.embedder.input_embedding.value = params["embed"]["embedding"]
  model.final_norm.w.value = params["final_norm"]["scale"]
  for i, layer in enumerate(model.layers):
    ours = jax.tree.map(lambda x, i=i: x[i], params["layers"])
    attn = ours["attn"]
    layer.input_layernorm.w.value = ours["attn_norm"]["scale"]
    layer.post_attention_layernorm.w.value = ours["mlp_norm"]["scale"]
    layer.attn.q_proj.w.value = attn["q"]["kernel"].reshape(d, n, h)
    layer.attn.k_proj.w.value = attn["k"]["kernel"].reshape(d, k, h)
    layer.attn.v_proj.w.value = attn["v"]["kernel"].reshape(d, k, h)
    layer.attn.o_proj.w.value = attn["o"]["kernel"].reshape(n, h, d)
    layer.attn.q_bias.value = attn["q"]["bias"]
    layer.attn.k_bias.value = attn["k"]["bias"]
    layer.attn.v_bias.value = attn["v"]["bias"]
    for name in ("gate", "up", "down"):
      getattr(layer.mlp, f"{name}_proj").kernel.value = ours["mlp"][name]["kernel"]
  return model


def read_bandwidth() -> float:
  """Bytes/s of a jitted float32 sum over 512 MiB (best of 5)."""
  x = jnp.ones((128 * 1024 * 1024,), jnp.float32)
  total = jax.jit(jnp.sum)
  total(x).block_until_ready()
  best = float("inf")
  for _ in range(5):
    start = time.perf_counter()
    total(x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return x.nbytes / best


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--vocab", type=int, default=8192)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--prompt-len", type=int, default=32)
  parser.add_argument("--new-tokens", type=int, default=32)
  parser.add_argument("--top-p", type=float, default=None, help="sample (temperature 1) with it")
  parser.add_argument("--embed-scale", type=float, default=1.0)
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args()

  from tunix.generate import sampler as tunix_sampler
  import importlib.metadata

  config = config_for(args)
  model = CausalLM(config)
  params = model.init(jax.random.key(0), jnp.float32)
  if args.embed_scale != 1.0:
    params = {**params, "embed": {"embedding": params["embed"]["embedding"] * args.embed_scale}}
  b, p, n = args.batch, args.prompt_len, args.new_tokens
  ids = np.random.default_rng(0).integers(1, args.vocab, (b, p)).astype(np.int32)
  mask = np.ones_like(ids)
  sample_kw = (dict(temperature=0.0) if args.top_p is None
               else dict(temperature=1.0, top_p=args.top_p))

  def ours(num_new, seed):
    out = sampling.generate(model, params, ids, mask, jax.random.key(seed),
                            max_new_tokens=num_new, eos_token_id=None, **sample_kw)
    return np.asarray(jax.block_until_ready(out.tokens))

  cache = tunix_sampler.CacheConfig(cache_size=p + n, num_layers=config.num_layers,
                                    num_kv_heads=config.num_kv_heads, head_dim=config.head_dim)
  tsampler = tunix_sampler.Sampler(tunix_model(config, params), IdTokenizer(), cache)
  prompts = [" ".join(str(int(t)) for t in row) for row in ids]
  tunix_kw = (dict(temperature=0.0) if args.top_p is None
              else dict(temperature=1.0, top_p=args.top_p))

  def theirs(num_new, seed):
    out = tsampler(prompts, max_generation_steps=num_new, max_prompt_length=p, eos_tokens=[-1],
                   seed=seed, **tunix_kw)
    return np.asarray([IdTokenizer().encode(t) for t in out.text])

  # Warm-up (compiles) and greedy agreement.
  first_ours, first_theirs = ours(n, 0), theirs(n, 0)
  ours(1, 0), theirs(1, 0)
  agree = float(np.mean(first_ours == first_theirs[:, :n])) if first_theirs.shape[1] >= n else None
  times = {k: [] for k in ("ours_full", "tunix_full", "ours_prefill", "tunix_prefill")}
  for r in range(args.rounds):
    for key, fn, num in (("ours_full", ours, n), ("tunix_full", theirs, n),
                         ("ours_prefill", ours, 1), ("tunix_prefill", theirs, 1)):
      start = time.perf_counter()
      fn(num, r + 1)
      times[key].append(time.perf_counter() - start)
  med = {k: statistics.median(v) for k, v in times.items()}

  weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  kv_bytes = 2 * config.num_layers * b * (p + n) * config.num_kv_heads * config.head_dim * 4
  bandwidth = read_bandwidth()
  roofline_ms = 1000 * (weight_bytes + kv_bytes) / bandwidth
  rows = {}
  for system in ("ours", "tunix"):
    full, prefill = med[f"{system}_full"], med[f"{system}_prefill"]
    decode_ms = 1000 * (full - prefill) / (n - 1)
    rows[system] = dict(prefill_ms=round(1000 * prefill, 1),
                        decode_ms_per_token=round(decode_ms, 2),
                        tokens_per_s=round(b * n / full, 1),
                        decode_over_roofline=round(decode_ms / roofline_ms, 2))
  print(json.dumps({
      "shapes": dict(layers=args.layers, vocab=args.vocab, batch=b, prompt_len=p, new_tokens=n,
                     top_p=args.top_p, embed_scale=args.embed_scale, dtype="float32"),
      "tunix_version": importlib.metadata.version("google-tunix"), "jax": jax.__version__,
      "device": jax.devices()[0].device_kind, "rounds": args.rounds,
      "greedy_token_agreement": agree if args.top_p is None else None,
      "weight_MB": round(weight_bytes / 1e6, 1), "kv_MB": round(kv_bytes / 1e6, 2),
      "read_GB_per_s": round(bandwidth / 1e9, 1), "roofline_ms_per_step": round(roofline_ms, 2),
      **rows,
      "ours_over_tunix_tokens_per_s": round(rows["ours"]["tokens_per_s"]
                                            / rows["tunix"]["tokens_per_s"], 2)}, indent=1))


if __name__ == "__main__":
  main()
