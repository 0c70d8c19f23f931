"""LoRA and QLoRA on the scanned decoder, through qwix (Google's JAX LoRA + quantisation library).

LoRA (Hu et al., 2021, arXiv:2106.09685): a target projection x·W becomes
x·W + (alpha / rank)·x·A·B, W frozen, A [D_in, r] and B [r, D_out] trained, B = 0 at the start.
QLoRA (Dettmers et al., 2023, arXiv:2305.14314): the frozen W is stored quantised (int8 per
output channel, or 4-bit int4 / NF4 with one scale per `group_size` input rows).

How params look. A LoRA policy's params are `Adapted(base, adapters)`: `base` is the plain (or
quantised) CausalLM params dict, `adapters` the LoRA tree
  {"layers": {"attn": {"q": {"kernel_lora_a": [L, D, r], "kernel_lora_b": [L, r, F]}, ...},
              "mlp": {...}}}
with qwix's names, next to the kernel they adapt. `Adapted(base, None)` is the base with adapters
off: the frozen reference of every trainer, holding the policy's own base buffers (no copy).

What is trained. `split(params)` gives the trainable part (adapters in place of each Adapted; a
reward model's score head or PPO's value head stay trainable in full) and a function putting it
back; the step differentiates and optimises only that part, so the optimiser state holds adapter
moments only. `detach_bases` / `attach_bases` take the frozen bases out of a state (they are
passed to the jitted step undonated, so the reference may share them, and are never written to
training checkpoints: resume reloads them from the model path).

Why qwix fits here: it intercepts the `dot_general` inside each targeted `nn.Dense` by module
path ("layers/attn/q", ...), so the scanned Linen decoder needs no change; inside `nn.scan` its
LoRA params take the stacked [L, ...] layout of the kernels (`CausalLM.unstack_layers` splits
both for the sampler's unrolled decoder, whose module paths are "layers_0/attn/q", ...). Its
`quantize_params` assumes unstacked kernels, so the base is quantised here per layer (vmap over
L) with qwix's own quantiser.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.config import ConfigError, check_choices

__all__ = ["LoraConfig", "Adapted", "parts", "split", "trainable", "detach_bases",
           "attach_bases", "adapt", "init_adapters", "quantize_base", "decoder_module",
           "merged_params", "adapter_bytes", "save_peft", "PROJECTIONS"]

# Our projection modules -> their place in the decoder's params.
PROJECTIONS = {"q": "attn", "k": "attn", "v": "attn", "o": "attn",
               "gate": "mlp", "up": "mlp", "down": "mlp"}
# Hugging Face / PEFT module names users write in target_modules.
_ALIASES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate",
            "up_proj": "up", "down_proj": "down"}
QUANTIZATIONS = ("none", "int8", "int4", "nf4")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  rank: int = 0  # 0: off (full fine-tuning)
  alpha: float = 16.0  # the update is scaled by alpha / rank (PEFT's lora_alpha)
  dropout: float = 0.0  # only 0.0: the decoder's forward takes no dropout key
  targets: tuple[str, ...] = ("all",)  # "all" projections, or names: q k v o gate up down
  quantize: Literal["none", "int8", "int4", "nf4"] = "none"  # the frozen base (QUANTIZATIONS)
  group_size: int = 64  # 4-bit: one scale per this many input rows of each output column
  dtype: Literal["float32", "bfloat16"] = "float32"  # the adapters' parameter dtype

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  def validate(self, prefix: str = "model.lora") -> None:
    check_choices(self, f"{prefix}.")
    if self.rank < 0:
      raise ConfigError(f"{prefix}.rank: expected an integer >= 0 (0 = off), got {self.rank}")
    if not self.enabled:
      if self.quantize != "none":
        raise ConfigError(f"{prefix}.quantize={self.quantize!r} needs LoRA adapters: set "
                          f"{prefix}.rank >= 1 (a quantised base cannot be fine-tuned in full)")
      return
    if not self.alpha > 0:
      raise ConfigError(f"{prefix}.alpha: expected a number > 0, got {self.alpha}")
    if self.dropout != 0.0:
      raise ConfigError(f"{prefix}.dropout: only 0.0 is supported (the forward pass takes no "
                        f"dropout key), got {self.dropout}")
    if self.group_size < 1:
      raise ConfigError(f"{prefix}.group_size: expected an integer >= 1, got {self.group_size}")
    self.target_names()

  def target_names(self) -> tuple[str, ...]:
    """Our module names the adapters go on (aliases resolved); "all" = every projection."""
    if tuple(self.targets) == ("all",):
      return tuple(PROJECTIONS)
    names = []
    for name in self.targets:
      ours = _ALIASES.get(name, name)
      if ours not in PROJECTIONS:
        raise ConfigError(f"model.lora.targets: unknown module {name!r}; expected 'all' or names "
                          f"from {', '.join(PROJECTIONS)} (or their *_proj forms)")
      names.append(ours)
    return tuple(dict.fromkeys(names))


@flax.struct.dataclass
class Adapted:
  """A LoRA policy's params: the frozen `base` and the trained `adapters` (None: adapters off)."""
  base: Any
  adapters: Any = None


def _is_adapted(x) -> bool:
  return isinstance(x, Adapted)


def parts(params) -> tuple[Any, Any]:
  """(base, adapters or None) of CausalLM params, plain or Adapted."""
  if isinstance(params, Adapted):
    return params.base, params.adapters
  return params, None


def split(params):
  """(trainable, join): the adapters in place of every Adapted node (everything else as it is),
  and join(trainable) -> params with the frozen bases put back. Identity without LoRA."""
  leaves, treedef = jax.tree_util.tree_flatten(params, is_leaf=_is_adapted)
  if not any(_is_adapted(x) for x in leaves):
    return params, lambda t: t
  trainable_tree = treedef.unflatten([x.adapters if _is_adapted(x) else x for x in leaves])

  def join(t):
    subtrees = treedef.flatten_up_to(t)
    return treedef.unflatten([Adapted(x.base, s) if _is_adapted(x) else s
                              for x, s in zip(leaves, subtrees)])

  return trainable_tree, join


def trainable(params):
  return split(params)[0]


def detach_bases(tree):
  """(tree with every Adapted's base replaced by None, [bases]) — for a state or any pytree."""
  bases = []

  def take(x):
    if _is_adapted(x):
      bases.append(x.base)
      return Adapted(None, x.adapters)
    return x

  return jax.tree.map(take, tree, is_leaf=_is_adapted), bases


def attach_bases(tree, bases):
  """The inverse of `detach_bases`."""
  if not bases:
    return tree
  it = iter(bases)
  return jax.tree.map(lambda x: Adapted(next(it), x.adapters) if _is_adapted(x) else x, tree,
                      is_leaf=_is_adapted)


def _target_regex(names) -> str:
  attn = [n for n in names if PROJECTIONS[n] == "attn"]
  mlp = [n for n in names if PROJECTIONS[n] == "mlp"]
  alternatives = ([f"attn/(?:{'|'.join(attn)})"] if attn else []) + (
      [f"mlp/(?:{'|'.join(mlp)})"] if mlp else [])
  # "layers": the scanned decoder; "layers_0", ...: the unrolled one (CausalLM.unstack_layers).
  return f"layers(?:_[0-9]+)?/(?:{'|'.join(alternatives)})"


def _qtype_rule(lora: LoraConfig) -> dict:
  if lora.quantize == "none":
    return {}
  if lora.quantize == "int8":
    return {"weight_qtype": "int8"}  # per output channel
  # qwix tiles the contracting (input) axis of the weight: one scale per group_size rows.
  return {"weight_qtype": lora.quantize, "tile_size": lora.group_size}


@functools.lru_cache(maxsize=64)
def decoder_module(decoder, lora: LoraConfig, with_adapters: bool):
  """The decoder with qwix's interception: LoRA on the targets (and the quantised base's
  dequantising matmuls on every projection); with_adapters=False: the base alone."""
  import qwix
  quant = _qtype_rule(lora)
  every = _target_regex(tuple(PROJECTIONS))
  if with_adapters:
    rules = [qwix.LoraRule(module_path=_target_regex(lora.target_names()), rank=lora.rank,
                           alpha=float(lora.alpha), **quant)]
    if quant:
      rules.append(qwix.QuantizationRule(module_path=every, **quant))
    provider = qwix.LoraProvider(rules, disable_jit=True)
  elif quant:
    provider = qwix.PtqProvider([qwix.QuantizationRule(module_path=every, **quant)],
                                disable_jit=True)
  else:
    return decoder
  return qwix.quantize_model(decoder, provider)


def _kernel_shape(leaf) -> tuple[int, ...]:
  array = getattr(leaf, "array", None)
  return tuple((array.qvalue if array is not None else leaf).shape)


def init_adapters(lora: LoraConfig, base: dict, key: jax.Array) -> dict:
  """A [L, D_in, r] ~ U(±1/sqrt(D_in)) (PEFT's kaiming-uniform(a=sqrt 5) bound), B [L, r, D_out]
  zeros, for each target projection the decoder has. A target it lacks is an error."""
  layers = base["layers"]
  dtype = jnp.dtype(lora.dtype)
  adapters: dict = {}
  names = lora.target_names()
  missing = [n for n in names if n not in layers.get(PROJECTIONS[n], {})]
  if missing and tuple(lora.targets) != ("all",):
    present = ", ".join(n for n in PROJECTIONS if n in layers[PROJECTIONS[n]])
    raise ConfigError(f"model.lora.targets: the model has no {', '.join(missing)} projection "
                      f"(it has {present})")
  for i, name in enumerate(n for n in names if n not in missing):
    group = PROJECTIONS[name]
    num_layers, d_in, d_out = _kernel_shape(layers[group][name]["kernel"])
    bound = 1.0 / np.sqrt(d_in)
    a = jax.random.uniform(jax.random.fold_in(key, i), (num_layers, d_in, lora.rank),
                           jnp.float32, -bound, bound)
    adapters.setdefault("layers", {}).setdefault(group, {})[name] = {
        "kernel_lora_a": a.astype(dtype),
        "kernel_lora_b": jnp.zeros((num_layers, lora.rank, d_out), dtype)}
  return adapters


def quantize_base(model, base: dict) -> dict:
  """The base params with every decoder projection kernel quantised as `model.lora` says (qwix
  QArrays with their scales; embeddings, norms, biases and lm_head stay as they are)."""
  import qwix
  lora = model.lora
  if lora is None or lora.quantize == "none":
    return base
  if lora.quantize != "int8":
    for group in ("attn", "mlp"):
      for name in PROJECTIONS:
        kernel = base["layers"][group].get(name, {}).get("kernel")
        if kernel is not None and kernel.shape[1] % lora.group_size:
          raise ConfigError(f"model.lora.group_size={lora.group_size} does not divide the {name} "
                            f"projection's {kernel.shape[1]} input features")
  decoder = decoder_module(model._decoder(model.compute_dtype(base)), lora, with_adapters=False)
  ids = jnp.zeros((1, 1), jnp.int32)
  abstract = jax.eval_shape(decoder.init, jax.random.key(0), ids, ids, jnp.ones_like(ids))
  abstract = abstract["params"]["layers"]
  layers = dict(base["layers"])
  for group in ("attn", "mlp"):
    layers[group] = dict(layers[group])
    for name, leaves in layers[group].items():
      spec = abstract.get(group, {}).get(name, {}).get("kernel")
      if name not in PROJECTIONS or not _is_quantized(spec):
        continue
      how = spec.how
      quantize = lambda w: qwix.quantize(w, how.qtype, channelwise_axes=how.channelwise_axes,
                                         tiled_axes=how.tiled_axes,
                                         calibration_method=how.calibration_method)
      kernel = leaves["kernel"]
      layers[group][name] = {**leaves, "kernel": spec.replace(array=jax.jit(jax.vmap(quantize))(
          kernel))}
  return {**base, "layers": layers}


def _is_quantized(x) -> bool:
  return hasattr(x, "how") and hasattr(x, "array")


def _dequantized(leaf, dtype):
  array = getattr(leaf, "array", None)
  if array is None:
    return leaf
  import qwix
  return jax.vmap(qwix.dequantize)(array).astype(dtype)


def merged_params(model, params, dtype=None) -> dict:
  """Plain CausalLM params with W + (alpha / r)·A·B folded into each adapted kernel (a quantised
  base dequantised first), for export and for checking against the adapted forward."""
  base, adapters = parts(params)
  dtype = dtype or model.compute_dtype(base)
  layers = jax.tree.map(lambda x: _dequantized(x, dtype), base["layers"], is_leaf=_is_quantized)
  if adapters is not None:
    scale = model.lora.alpha / model.lora.rank
    for group, names in adapters["layers"].items():
      for name, ab in names.items():
        kernel = layers[group][name]["kernel"]
        delta = jnp.einsum("ldr,lrf->ldf", ab["kernel_lora_a"].astype(jnp.float32),
                           ab["kernel_lora_b"].astype(jnp.float32)) * scale
        layers[group][name] = {**layers[group][name],
                               "kernel": (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)}
  return {**base, "layers": layers}


def adapt(model, params: dict, lora: LoraConfig, key: jax.Array):
  """(CausalLM with `lora`, Adapted(base, fresh adapters)), the base quantised if asked."""
  lora.validate()
  model = dataclasses.replace(model, lora=lora)
  base = quantize_base(model, params)
  return model, Adapted(base, init_adapters(lora, base, key))


def adapter_bytes(params) -> int:
  """Bytes of the trainable part (adapters, plus any fully trained heads)."""
  return int(sum(np.dtype(x.dtype).itemsize * x.size for x in jax.tree.leaves(trainable(params))))


def save_peft(model, params, out_dir: str, *, base_model_name_or_path: str | None = None,
              dtype=None) -> None:
  """The adapters in PEFT's format: adapter_config.json + adapter_model.safetensors, which
  `peft.PeftModel.from_pretrained(<the base transformers model>, out_dir)` loads (LoRA A as
  lora_A.weight [r, D_in], B as lora_B.weight [D_out, r], scaling alpha / r). Only projections
  that are one Linear in transformers (not Phi-3's or GPT-2's fused ones) can be written."""
  import json
  import os

  import safetensors.numpy

  from rlhf_jax.models import hf_io
  _, adapters = parts(params)
  if adapters is None or model.lora is None:
    raise ConfigError("save_peft needs LoRA params (lora.Adapted with adapters)")
  config = model.config
  hf_names = {}
  for rule in hf_io.tensor_map(config):
    for path in rule.ours:
      if path[:1] == ("layers",) and path[-1] == "kernel" and path[-2] in PROJECTIONS:
        hf_names[path[-2]] = (rule, path)
  tensors, modules = {}, []
  for group, names in adapters["layers"].items():
    for name, ab in names.items():
      rule, _ = hf_names[name]
      if rule.kind != "linear":
        raise ConfigError(f"PEFT export: the {name} projection is stored fused in transformers "
                          f"({rule.hf_name}) for model_type={config.model_type!r}; export the "
                          f"merged checkpoint instead")
      modules.append(rule.hf_name.rsplit(".", 2)[-2])
      a = np.asarray(jax.device_get(ab["kernel_lora_a"]))
      b = np.asarray(jax.device_get(ab["kernel_lora_b"]))
      if dtype is not None:
        a, b = a.astype(dtype), b.astype(dtype)
      for i in range(config.num_layers):
        stem = "base_model.model." + rule.hf_name.format(i=i).removesuffix(".weight")
        tensors[stem + ".lora_A.weight"] = np.ascontiguousarray(a[i].T)
        tensors[stem + ".lora_B.weight"] = np.ascontiguousarray(b[i].T)
  if jax.process_index() != 0:
    return
  os.makedirs(out_dir, exist_ok=True)
  lora = model.lora
  adapter_config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank,
      "lora_alpha": float(lora.alpha), "lora_dropout": float(lora.dropout),
      "target_modules": sorted(set(modules)), "bias": "none", "fan_in_fan_out": False,
      "use_rslora": False, "use_dora": False, "modules_to_save": None,
      "base_model_name_or_path": base_model_name_or_path, "inference_mode": True}
  with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
    json.dump(adapter_config, f, indent=2)
  # Adapters are small (rank x width per projection): one file, written at once.
  safetensors.numpy.save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"),
                              metadata={"format": "pt"})
