"""Hugging Face checkpoint import/export: safetensors (single or sharded) <-> our params dict.

Every HF tensor name is mapped explicitly (`tensor_map`). Loading fails with a message naming
the tensor on: a missing tensor, a wrong shape (name, expected, got), a tensor nothing maps, an
unsupported architecture or config field. Tied checkpoints may omit `lm_head.weight`. A hub id
downloads only the config files and the checkpoint's own safetensors (`checkpoint_files`: the
shards the index names, else model.safetensors), never e.g. mistralai's consolidated copy.

Families: GPT-2, Llama, Qwen2, Mistral, Qwen3 (q_norm / k_norm per head), Gemma 2 and Gemma 3
text (input / post_attention / pre_feedforward / post_feedforward layernorms; Gemma 3 q/k
norms), Phi-3 (fused qkv_proj and gate_up_proj), OLMo 2 (post_attention / post_feedforward
layernorms only, q/k norms over the whole projection).

Kinds of mapping: "copy" (same layout), "linear" (torch nn.Linear [out, in] <-> our kernel
[in, out]), "split3" (GPT-2's fused Conv1D c_attn [in, 3·out] <-> our q/k/v kernels [in, out]),
"fused_linear" (Phi-3's qkv_proj [N·H + 2·K·H, in] and gate_up_proj [2·F, in]: an nn.Linear
whose output rows are our kernels' outputs in rule order, split on import and concatenated on
export). Per-layer tensors ("{i}" in the name) are stacked on a leading [L] axis on import.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import parallel
from rlhf_jax.errors import CheckpointError
from rlhf_jax.models import lora, safetensors_io
from rlhf_jax.models.config import ModelConfig, UnsupportedModelError
from rlhf_jax.models.partitioning import param_partition_specs

__all__ = ["TensorRule", "tensor_map", "checkpoint_files", "resolve_checkpoint_dir",
           "read_safetensors", "params_from_hf_tensors", "params_to_hf_tensors",
           "write_safetensors", "from_pretrained", "save_pretrained", "CheckpointError",
           "base_prefix", "dtype_string", "load_hf_config", "open_checkpoint", "hf_entries"]

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class TensorRule:
  hf_name: str  # may contain "{i}" (layer index)
  ours: tuple[Path, ...]  # our param paths (3 for split3, several for fused_linear, else 1)
  kind: str  # "copy" | "linear" | "split3" | "fused_linear"

  @property
  def per_layer(self) -> bool:
    return "{i}" in self.hf_name


# HF buffers some old checkpoints carry that hold no parameters (causal-mask buffers, rotary
# inverse frequencies): skipped on import.
_IGNORED = re.compile(
    r"(^|\.)(h\.\d+\.attn\.(masked_)?bias|layers\.\d+\.self_attn\.rotary_emb\.inv_freq)$")


def base_prefix(config: ModelConfig) -> str:
  """The backbone's tensor-name prefix in *ForCausalLM / *ForSequenceClassification files."""
  return "transformer." if config.model_type == "gpt2" else "model."


def tensor_map(config: ModelConfig, *, head: str = "lm") -> list[TensorRule]:
  """All HF tensors of a config, as rules.

  head: "lm" (…ForCausalLM: lm_head unless tied) or "score" (…ForSequenceClassification).
  """
  base = base_prefix(config)
  rules: list[TensorRule] = []

  def add(hf, ours, kind="copy"):
    ours = ours if isinstance(ours[0], tuple) else (ours,)
    rules.append(TensorRule(hf, tuple(ours), kind))

  def norm(hf_prefix, ours_name, layered):
    add(hf_prefix + ".weight", _p(layered, ours_name, "scale"))
    if config.norm == "layernorm":
      add(hf_prefix + ".bias", _p(layered, ours_name, "bias"))

  if config.model_type == "gpt2":
    L = base + "h.{i}."
    add(base + "wte.weight", ("embed", "embedding"))
    add(base + "wpe.weight", ("pos_embed", "embedding"))
    norm(L + "ln_1", "attn_norm", True)
    qkv = ("q", "k", "v")
    add(L + "attn.c_attn.weight", tuple(("layers", "attn", n, "kernel") for n in qkv), "split3")
    add(L + "attn.c_attn.bias", tuple(("layers", "attn", n, "bias") for n in qkv), "split3")
    add(L + "attn.c_proj.weight", ("layers", "attn", "o", "kernel"))
    add(L + "attn.c_proj.bias", ("layers", "attn", "o", "bias"))
    norm(L + "ln_2", "mlp_norm", True)
    add(L + "mlp.c_fc.weight", ("layers", "mlp", "up", "kernel"))
    add(L + "mlp.c_fc.bias", ("layers", "mlp", "up", "bias"))
    add(L + "mlp.c_proj.weight", ("layers", "mlp", "down", "kernel"))
    add(L + "mlp.c_proj.bias", ("layers", "mlp", "down", "bias"))
    norm(base + "ln_f", "final_norm", False)
  else:
    L = base + "layers.{i}."
    add(base + "embed_tokens.weight", ("embed", "embedding"))
    for hf_name, ours in _block_norm_names(config):
      norm(L + hf_name, ours, True)
    attn = lambda name, leaf="kernel": ("layers", "attn", name, leaf)
    if config.model_type == "phi3":
      add(L + "self_attn.qkv_proj.weight", (attn("q"), attn("k"), attn("v")), "fused_linear")
    else:
      for hf_name, ours in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")):
        add(L + f"self_attn.{hf_name}.weight", attn(ours), "linear")
    add(L + "self_attn.o_proj.weight", attn("o"), "linear")
    for hf_name, ours, bias in (("q_proj", "q", config.qkv_bias), ("k_proj", "k", config.qkv_bias),
                                ("v_proj", "v", config.qkv_bias), ("o_proj", "o", config.out_bias)):
      if bias:
        add(L + f"self_attn.{hf_name}.bias", attn(ours, "bias"))
    if config.qk_norm != "none":
      add(L + "self_attn.q_norm.weight", attn("q_norm", "scale"))
      add(L + "self_attn.k_norm.weight", attn("k_norm", "scale"))
    mlp = lambda name, leaf="kernel": ("layers", "mlp", name, leaf)
    if config.model_type == "phi3":
      add(L + "mlp.gate_up_proj.weight", (mlp("gate"), mlp("up")), "fused_linear")
      add(L + "mlp.down_proj.weight", mlp("down"), "linear")
    else:
      for name in ("gate", "up", "down"):
        add(L + f"mlp.{name}_proj.weight", mlp(name), "linear")
    for name in ("gate", "up", "down") if config.mlp_bias else ():
      add(L + f"mlp.{name}_proj.bias", mlp(name, "bias"))
    norm(base + "norm", "final_norm", False)
  if head == "lm" and not config.tie_embeddings:
    add("lm_head.weight", ("lm_head", "kernel"), "linear")
  elif head == "score":
    add("score.weight", ("score", "kernel"), "linear")
  return rules


def _block_norm_names(config: ModelConfig) -> tuple[tuple[str, str], ...]:
  """(HF name, ours) of a block's norms. The same HF name means different norms by family:
  Llama's post_attention_layernorm is the MLP's pre-norm, Gemma's and OLMo 2's a post-norm."""
  pre = (("input_layernorm", "attn_norm"),)
  if config.norm_placement == "pre":
    return pre + (("post_attention_layernorm", "mlp_norm"),)
  post = (("post_attention_layernorm", "post_attn_norm"),
          ("post_feedforward_layernorm", "post_mlp_norm"))
  if config.norm_placement == "post":
    return post
  return pre + (("pre_feedforward_layernorm", "mlp_norm"),) + post


def _p(layered: bool, *names) -> Path:
  return ("layers", *names) if layered else names


# ------------------------------------------------------------------------------------ files
_INDEX, _SINGLE = safetensors_io.INDEX, safetensors_io.SINGLE
_CONFIG_FILES = ("config.json", "generation_config.json")


def checkpoint_files(repo_files: Iterable[str], index: dict | None = None) -> list[str]:
  """The files of a hub listing that `read_safetensors` reads, plus the configs (sorted).

  A sharded checkpoint (`model.safetensors.index.json` in the listing; `index` its parsed JSON)
  gives the index and exactly the shards its weight_map names; else `model.safetensors`. Other
  safetensors files (mistralai's consolidated.safetensors, adapters, ...) are never fetched.
  Raises CheckpointError when there is no loadable safetensors checkpoint or a named shard is
  missing from the listing.
  """
  repo_files = set(repo_files)
  wanted = {name for name in _CONFIG_FILES if name in repo_files}
  if _INDEX in repo_files:
    if index is None:
      raise ValueError(f"{_INDEX} is in the repo: pass its parsed contents as `index`")
    shards = set(index["weight_map"].values())
    absent = sorted(shards - repo_files)
    if absent:
      raise CheckpointError(f"{_INDEX} names shard(s) the repo does not hold: {absent}")
    wanted |= {_INDEX, *shards}
  elif _SINGLE in repo_files:
    wanted.add(_SINGLE)
  else:
    raise CheckpointError(
        f"no {_SINGLE} or {_INDEX} in the repo (only safetensors checkpoints are supported); "
        f"its safetensors files: {sorted(f for f in repo_files if f.endswith('.safetensors'))}")
  return sorted(wanted)


def resolve_checkpoint_dir(path_or_repo_id: str, revision: str | None = None) -> str:
  """A local directory as is; otherwise a hub snapshot of the configs + the checkpoint's files.

  Lists the repo, reads the shard index if there is one, and downloads only what
  `checkpoint_files` selects. Offline (HF_HUB_OFFLINE), the cached snapshot is used as is.
  """
  if os.path.isdir(path_or_repo_id):
    return path_or_repo_id
  # deferred: local use needs no hub client
  from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download

  if constants.HF_HUB_OFFLINE:
    return snapshot_download(path_or_repo_id, revision=revision, local_files_only=True)
  repo_files = HfApi().list_repo_files(path_or_repo_id, revision=revision)
  index = None
  if _INDEX in repo_files:
    with open(hf_hub_download(path_or_repo_id, _INDEX, revision=revision)) as f:
      index = json.load(f)
  return snapshot_download(path_or_repo_id, revision=revision,
                           allow_patterns=checkpoint_files(repo_files, index))


def open_checkpoint(directory: str) -> safetensors_io.SafetensorsSource:
  """The checkpoint's tensors, read lazily (headers now, data slice by slice when placed)."""
  try:
    return safetensors_io.SafetensorsSource(directory)
  except FileNotFoundError as error:
    raise CheckpointError(str(error)) from None


def read_safetensors(directory: str, dtype=None) -> dict[str, np.ndarray]:
  """name -> numpy array of every tensor (the whole checkpoint in host memory: small models)."""
  source = open_checkpoint(directory)
  return {name: source.read(name) if dtype is None else source.read(name).astype(dtype)
          for name in source.keys()}


def write_safetensors(tensors: dict[str, np.ndarray], out_dir: str) -> None:
  entries = [safetensors_io.Entry(name, tuple(np.shape(v)), np.asarray(v).dtype,
                                  lambda v=v: v) for name, v in tensors.items()]
  safetensors_io.write_checkpoint(entries, out_dir)


# ------------------------------------------------------------------------------- conversion
def _hf_shape(kind: str, our_shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
  """The HF tensor's shape from the (unstacked) shapes of the params a rule maps it to."""
  our_shape = our_shapes[0]
  if kind == "linear":
    return tuple(reversed(our_shape))
  if kind == "split3":
    return (*our_shape[:-1], 3 * our_shape[-1])
  if kind == "fused_linear":  # kernels [in, out_i] -> torch [Σ out_i, in]
    return (sum(shape[-1] for shape in our_shapes), our_shape[0])
  return tuple(our_shape)


def _flatten(tree, prefix=()) -> dict[Path, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def _unflatten(flat: dict[Path, Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def params_from_hf_tensors(rules: list[TensorRule], tensors, our_shapes: dict, num_layers: int,
                           *, base_prefix: str = "", optional: Iterable[str] = (),
                           dtype=jnp.float32, shardings=None) -> dict:
  """Our params from HF tensors, checking names and shapes against `our_shapes` (eval_shape tree).

  tensors: a dict of arrays, or a `SafetensorsSource` (names and shapes are checked from its
  headers before any data is read). shardings: None gives single-device arrays; a tree of
  `jax.sharding.Sharding` like `our_shapes` streams each tensor straight into its shards (see
  `_place`). Names without `base_prefix` (GPT-2's "h.0...", as in openai-community/gpt2, saved
  from the bare GPT2Model) are accepted too.
  """
  source = tensors if hasattr(tensors, "read") else safetensors_io.DictSource(tensors)
  flat_shapes = {k: tuple(v.shape) for k, v in _flatten(our_shapes).items()}
  covered = {path for rule in rules for path in rule.ours}
  if covered != set(flat_shapes):  # a bug of tensor_map for this config, not of the checkpoint
    unmapped = sorted(".".join(p) for p in set(flat_shapes) - covered)
    extra = sorted(".".join(p) for p in covered - set(flat_shapes))
    raise CheckpointError(
        f"the tensor map does not match the model's params: params no rule maps: {unmapped}; "
        f"rules for params the model does not have: {extra}")
  expected_names = {rule.hf_name.format(i=i) for rule in rules
                    for i in (range(num_layers) if rule.per_layer else [None])}
  names = {}  # canonical HF name -> name in the checkpoint
  for name in source.keys():
    for canonical in (name, base_prefix + name):
      if canonical in expected_names:
        names.setdefault(canonical, name)
  used, missing = set(), []
  plan: dict[Path, list] = {}  # our path -> [(name in the file, rule, part)] per layer
  for rule in rules:
    for i in range(num_layers) if rule.per_layer else [None]:
      hf_name = rule.hf_name.format(i=i)
      if hf_name not in names:
        if hf_name not in optional:
          missing.append(hf_name)
        continue
      used.add(names[hf_name])
      rule_shapes = [flat_shapes[path][1:] if rule.per_layer else flat_shapes[path]
                     for path in rule.ours]
      expected, got = _hf_shape(rule.kind, rule_shapes), source.shape(names[hf_name])
      if got != expected:
        raise CheckpointError(
            f"tensor {hf_name!r} has the wrong shape: expected {expected}, got {got}")
      for part, path in enumerate(rule.ours):
        plan.setdefault(path, []).append((names[hf_name], rule, part, rule_shapes))
  if missing:
    raise CheckpointError(f"checkpoint is missing tensor(s): {missing[:8]}"
                          + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
  unexpected = sorted(n for n in source.keys() if n not in used and not _IGNORED.search(n)
                      and n not in optional)
  if unexpected:
    raise CheckpointError(f"checkpoint has unexpected tensor(s) nothing maps: {unexpected[:8]}")
  flat_shardings = None if shardings is None else _flatten(shardings)
  flat = {}
  for path, layers in plan.items():
    stacked = layers[0][1].per_layer
    if flat_shardings is None:
      parts = [_read_ours(source, name, rule, part, rule_shapes)
               for name, rule, part, rule_shapes in layers]
      flat[path] = jnp.asarray(np.stack(parts) if stacked else parts[0], dtype)
    else:
      flat[path] = _place(source, layers, flat_shapes[path], jnp.dtype(dtype),
                          flat_shardings[path], stacked)
  return _unflatten(flat)


def _normalised(index, shape) -> tuple[slice, ...]:
  return tuple(slice(*s.indices(dim)) for s, dim in zip(index, shape))


def _read_ours(source, name: str, rule: TensorRule, part: int, rule_shapes, index=None):
  """Our [index] of one param part from one HF tensor, reading only that slice of the file.

  rule_shapes: the (unstacked) shapes of all the params the rule maps the tensor to.
  """
  our_shape = rule_shapes[part]
  index = _normalised(index or (slice(None),) * len(our_shape), our_shape)
  if rule.kind == "copy":
    return source.read(name, index)
  if rule.kind == "linear":
    return source.read(name, index[::-1]).T
  if rule.kind == "split3":
    width = our_shape[-1]
    columns = slice(part * width + index[-1].start, part * width + index[-1].stop)
    return source.read(name, (*index[:-1], columns))
  if rule.kind == "fused_linear":  # our kernel [in, out_p] is rows offset_p + out_p of [Σ out, in]
    offset = sum(shape[-1] for shape in rule_shapes[:part])
    rows = slice(offset + index[1].start, offset + index[1].stop)
    return source.read(name, (rows, index[0])).T
  return _to_ours(rule.kind, source.read(name), rule_shapes)[part][index]


def _place(source, layers, shape, dtype, sharding, stacked: bool) -> jax.Array:
  """One param put straight into its shards, read from the file tensor by tensor.

  Each device shard is read as a slice of its tensor (equal shards read once). A stacked
  [L, ...] param is filled layer by layer into a zero buffer (a donated in-place update), so the
  host holds at most one layer's addressable shards at a time, whatever the model's size.
  """
  def callback_for(name, rule, part, rule_shapes):
    seen = {}

    def callback(index):
      key = tuple((s.start, s.stop) for s in _normalised(index, rule_shapes[part]))
      if key not in seen:
        seen[key] = _read_ours(source, name, rule, part, rule_shapes, index).astype(dtype)
      return seen[key]
    return callback

  if not stacked:
    return jax.make_array_from_callback(shape, sharding, callback_for(*layers[0]))
  layer_sharding = jax.sharding.NamedSharding(sharding.mesh,
                                              jax.sharding.PartitionSpec(*sharding.spec[1:]))
  buffer = jnp.zeros(shape, dtype, device=sharding)
  for i, layer_plan in enumerate(layers):
    layer = jax.make_array_from_callback(shape[1:], layer_sharding, callback_for(*layer_plan))
    buffer = _set_layer(buffer, layer, i)
    del layer
  return buffer


# In place (the stack is donated); the output keeps the stack's sharding.
_set_layer = jax.jit(lambda stack, layer, i: jax.lax.dynamic_update_index_in_dim(stack, layer, i, 0),
                     donate_argnums=0)


def _to_ours(kind: str, array: np.ndarray, our_shapes: list) -> list[np.ndarray]:
  if kind == "linear":
    return [array.T]
  if kind == "split3":
    return np.split(array, len(our_shapes), axis=-1)
  if kind == "fused_linear":
    ends = np.cumsum([shape[-1] for shape in our_shapes])[:-1]
    return [part.T for part in np.split(array, ends, axis=0)]
  return [array]


def _from_ours(kind: str, parts: list[np.ndarray]) -> np.ndarray:
  if kind == "linear":
    return parts[0].T
  if kind == "split3":
    return np.concatenate(parts, axis=-1)
  if kind == "fused_linear":
    return np.concatenate([part.T for part in parts], axis=0)
  return parts[0]


def hf_entries(rules: list[TensorRule], params: dict, num_layers: int,
               dtype=None) -> list[safetensors_io.Entry]:
  """The HF tensors of our (possibly sharded) params as write entries, fetched one at a time.

  Each entry's `produce` gathers just that tensor's layer slice to the host (an all-gather when
  the params span several processes: every process must call them, in order).
  """
  flat = _flatten(params)
  entries = []
  for rule in rules:
    arrays = [flat[path] for path in rule.ours]
    rule_shapes = [tuple(a.shape[1:] if rule.per_layer else a.shape) for a in arrays]
    out_dtype = np.dtype(dtype if dtype is not None else arrays[0].dtype)
    for i in range(num_layers) if rule.per_layer else [None]:
      def produce(arrays=arrays, i=i, kind=rule.kind):
        return _from_ours(kind, [parallel.host_get(_layer(a, i)) for a in arrays])
      entries.append(safetensors_io.Entry(rule.hf_name.format(i=i),
                                          _hf_shape(rule.kind, rule_shapes), out_dtype, produce))
  return entries


def _layer(array, i: int | None):
  """Layer i of a stacked param (a device-side slice: only that layer is ever gathered)."""
  if i is None:
    return array
  if isinstance(array, jax.Array):
    return _take_layer(array, i)  # one compilation per param, not per layer
  return np.asarray(array)[i]


_take_layer = jax.jit(lambda array, i: jax.lax.dynamic_index_in_dim(array, i, 0, keepdims=False))


def params_to_hf_tensors(rules: list[TensorRule], params: dict, num_layers: int,
                         dtype=None) -> dict[str, np.ndarray]:
  """HF tensors from our params (optionally cast to `dtype`, e.g. np.float32), all in memory."""
  return {entry.name: entry.produce().astype(entry.dtype, copy=False)
          for entry in hf_entries(rules, params, num_layers, dtype)}


# ------------------------------------------------------------------------------ public API
def load_hf_config(directory: str):
  import transformers

  try:
    return transformers.AutoConfig.from_pretrained(directory)
  except (KeyError, ValueError) as error:  # an unknown model_type fails inside transformers
    with open(os.path.join(directory, "config.json")) as f:
      raw = json.load(f)
    raise UnsupportedModelError(
        f"unsupported architecture: model_type={raw.get('model_type')!r} "
        f"(architectures={raw.get('architectures')}): {error}") from error


def from_pretrained(path_or_repo_id: str, dtype=jnp.float32, *, revision: str | None = None,
                    mesh: jax.sharding.Mesh | None = None, shardings=None, **config_overrides):
  """(CausalLM, params) from a local HF directory or a hub id (safetensors, single or sharded).

  mesh: streams each tensor into its shards on the mesh, laid out by `param_partition_specs`,
  each process reading only the slices its devices hold (never the whole model in host memory).
  shardings: instead of mesh, a tree of Shardings like the params, or a function of the params'
  shapes returning one. Neither: single-device arrays.
  config_overrides replace ModelConfig fields (e.g. remat_policy="full", attention_impl="xla").
  """
  from rlhf_jax.models.transformer import CausalLM

  directory = resolve_checkpoint_dir(path_or_repo_id, revision)
  config = ModelConfig.from_hf(load_hf_config(directory), **config_overrides)
  model = CausalLM(config)
  shapes = jax.eval_shape(lambda k: model.init(k, dtype), jax.random.key(0))
  optional = ["lm_head.weight"] if config.tie_embeddings else []
  params = params_from_hf_tensors(tensor_map(config), open_checkpoint(directory), shapes,
                                  config.num_layers, base_prefix=base_prefix(config),
                                  optional=optional, dtype=dtype,
                                  shardings=mesh_shardings(shapes, config, mesh, shardings))
  return model, params


def mesh_shardings(shapes, config: ModelConfig, mesh=None, shardings=None):
  """The shardings a load places params with: `shardings` (a tree, or a function of the shapes),
  else the partition rules' on `mesh`, else None (single device)."""
  if shardings is not None:
    return shardings(shapes) if callable(shardings) else shardings
  if mesh is None:
    return None
  specs = param_partition_specs(shapes, config, mesh=mesh)
  return jax.tree.map(lambda spec: jax.sharding.NamedSharding(mesh, spec), specs,
                      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def save_pretrained(model, params: dict, out_dir: str, *, dtype=None,
                    max_shard_size: int | str = safetensors_io.DEFAULT_MAX_SHARD_BYTES) -> None:
  """config.json + safetensors that transformers.AutoModelForCausalLM loads.

  Streams: one tensor at a time is gathered to the host and written, into files of at most
  `max_shard_size` (bytes or e.g. "2GB"; several files get model.safetensors.index.json).
  With params sharded over several processes every process must call it; process 0 writes.
  dtype: None keeps the params' dtype; e.g. np.float32 casts on write.
  """
  config = model.config
  write = jax.process_index() == 0
  if isinstance(params, lora.Adapted):  # LoRA: W + (alpha / r)·A·B, a quantised base dequantised
    params = lora.merged_params(model, params)
  if write:
    hf_config = config.to_hf("ForCausalLM")
    hf_config.dtype = dtype_string(params, dtype)
    os.makedirs(out_dir, exist_ok=True)
    hf_config.save_pretrained(out_dir)
  safetensors_io.write_checkpoint(
      hf_entries(tensor_map(config), params, config.num_layers, dtype), out_dir,
      max_shard_bytes=safetensors_io.parse_size(max_shard_size), write=write)


def dtype_string(params, dtype) -> str:
  """The numpy name of the dtype a checkpoint is written in (for config.json's "dtype")."""
  leaf = jax.tree_util.tree_leaves(params)[0]
  return str(np.dtype(dtype if dtype is not None else leaf.dtype))
