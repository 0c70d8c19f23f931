"""Hugging Face checkpoint import/export: safetensors (single or sharded) <-> our params dict.

Every HF tensor name is mapped explicitly (`tensor_map`). Loading fails with a message naming
the tensor on: a missing tensor, a wrong shape (name, expected, got), a tensor nothing maps, an
unsupported architecture or config field. Tied checkpoints may omit `lm_head.weight`. A hub id
downloads only the config files and the checkpoint's own safetensors (`checkpoint_files`: the
shards the index names, else model.safetensors), never e.g. mistralai's consolidated copy.

Kinds of mapping: "copy" (same layout), "linear" (torch nn.Linear [out, in] <-> our kernel
[in, out]), "split3" (GPT-2's fused Conv1D c_attn [in, 3·out] <-> our q/k/v kernels [in, out]).
Per-layer tensors ("{i}" in the name) are stacked on a leading [L] axis on import.
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

from rlhf_jax.models.config import ModelConfig, UnsupportedModelError

__all__ = ["TensorRule", "tensor_map", "checkpoint_files", "resolve_checkpoint_dir",
           "read_safetensors", "params_from_hf_tensors", "params_to_hf_tensors",
           "write_safetensors", "from_pretrained", "save_pretrained", "CheckpointError",
           "base_prefix", "dtype_string", "load_hf_config"]

Path = tuple[str, ...]


class CheckpointError(ValueError):
  """A checkpoint that does not match its config: missing, unexpected or mis-shaped tensors."""


@dataclasses.dataclass(frozen=True)
class TensorRule:
  hf_name: str  # may contain "{i}" (layer index)
  ours: tuple[Path, ...]  # our param paths (3 for split3, else 1)
  kind: str  # "copy" | "linear" | "split3"

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
    norm(L + "input_layernorm", "attn_norm", True)
    for hf_name, ours, bias in (("q_proj", "q", config.qkv_bias), ("k_proj", "k", config.qkv_bias),
                                ("v_proj", "v", config.qkv_bias), ("o_proj", "o", config.out_bias)):
      add(L + f"self_attn.{hf_name}.weight", ("layers", "attn", ours, "kernel"), "linear")
      if bias:
        add(L + f"self_attn.{hf_name}.bias", ("layers", "attn", ours, "bias"))
    norm(L + "post_attention_layernorm", "mlp_norm", True)
    for name in ("gate", "up", "down"):
      add(L + f"mlp.{name}_proj.weight", ("layers", "mlp", name, "kernel"), "linear")
      if config.mlp_bias:
        add(L + f"mlp.{name}_proj.bias", ("layers", "mlp", name, "bias"))
    norm(base + "norm", "final_norm", False)
  if head == "lm" and not config.tie_embeddings:
    add("lm_head.weight", ("lm_head", "kernel"), "linear")
  elif head == "score":
    add("score.weight", ("score", "kernel"), "linear")
  return rules


def _p(layered: bool, *names) -> Path:
  return ("layers", *names) if layered else names


# ------------------------------------------------------------------------------------ files
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
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


def read_safetensors(directory: str, dtype=None) -> dict[str, np.ndarray]:
  """name -> numpy array from model.safetensors or the shards listed in the index file."""
  from safetensors import safe_open

  index = os.path.join(directory, _INDEX)
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  elif os.path.exists(os.path.join(directory, _SINGLE)):
    files = [_SINGLE]
  else:
    raise CheckpointError(
        f"no model.safetensors or model.safetensors.index.json in {directory!r} "
        f"(only safetensors checkpoints are supported)")
  tensors = {}
  for file in files:
    with safe_open(os.path.join(directory, file), framework="np") as f:
      for name in f.keys():
        array = f.get_tensor(name)
        tensors[name] = array if dtype is None else array.astype(dtype)
  return tensors


def write_safetensors(tensors: dict[str, np.ndarray], out_dir: str) -> None:
  from safetensors.numpy import save_file

  os.makedirs(out_dir, exist_ok=True)
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
            os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})


# ------------------------------------------------------------------------------- conversion
def _hf_shape(kind: str, our_shape: tuple[int, ...]) -> tuple[int, ...]:
  if kind == "linear":
    return tuple(reversed(our_shape))
  if kind == "split3":
    return (*our_shape[:-1], 3 * our_shape[-1])
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


def params_from_hf_tensors(rules: list[TensorRule], tensors: dict[str, np.ndarray],
                           our_shapes: dict, num_layers: int, *, base_prefix: str = "",
                           optional: Iterable[str] = (), dtype=jnp.float32) -> dict:
  """Our params from HF tensors, checking names and shapes against `our_shapes` (eval_shape tree).

  Names without `base_prefix` (GPT-2's "h.0...", as in openai-community/gpt2, saved from the
  bare GPT2Model) are accepted too.
  """
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
  for name in tensors:
    for canonical in (name, base_prefix + name):
      if canonical in expected_names:
        names.setdefault(canonical, name)
  used, missing, flat = set(), [], {}
  for rule in rules:
    layers = range(num_layers) if rule.per_layer else [None]
    stacked = {path: [] for path in rule.ours}
    for i in layers:
      hf_name = rule.hf_name.format(i=i)
      if hf_name not in names:
        if hf_name not in optional:
          missing.append(hf_name)
        continue
      array = tensors[names[hf_name]]
      used.add(names[hf_name])
      our_shape = flat_shapes[rule.ours[0]][1:] if rule.per_layer else flat_shapes[rule.ours[0]]
      expected = _hf_shape(rule.kind, our_shape)
      if tuple(array.shape) != expected:
        raise CheckpointError(
            f"tensor {hf_name!r} has the wrong shape: expected {expected}, "
            f"got {tuple(array.shape)}")
      for path, part in zip(rule.ours, _to_ours(rule.kind, array, len(rule.ours))):
        stacked[path].append(part)
    for path, parts in stacked.items():
      if parts:
        flat[path] = np.stack(parts) if rule.per_layer else parts[0]
  if missing:
    raise CheckpointError(f"checkpoint is missing tensor(s): {missing[:8]}"
                          + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
  unexpected = sorted(n for n in tensors if n not in used and not _IGNORED.search(n)
                      and n not in optional)
  if unexpected:
    raise CheckpointError(f"checkpoint has unexpected tensor(s) nothing maps: {unexpected[:8]}")
  return _unflatten({k: jnp.asarray(v, dtype) for k, v in flat.items()})


def _to_ours(kind: str, array: np.ndarray, parts: int) -> list[np.ndarray]:
  if kind == "linear":
    return [array.T]
  if kind == "split3":
    return np.split(array, parts, axis=-1)
  return [array]


def params_to_hf_tensors(rules: list[TensorRule], params: dict, num_layers: int,
                         dtype=None) -> dict[str, np.ndarray]:
  """HF tensors from our params (optionally cast to `dtype`, e.g. np.float32)."""
  flat = {k: np.asarray(jax.device_get(v)) for k, v in _flatten(params).items()}
  out = {}
  for rule in rules:
    for i in range(num_layers) if rule.per_layer else [None]:
      parts = [flat[path][i] if rule.per_layer else flat[path] for path in rule.ours]
      if rule.kind == "linear":
        array = parts[0].T
      elif rule.kind == "split3":
        array = np.concatenate(parts, axis=-1)
      else:
        array = parts[0]
      out[rule.hf_name.format(i=i)] = array if dtype is None else array.astype(dtype)
  return out


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
                    **config_overrides):
  """(CausalLM, params) from a local HF directory or a hub id (safetensors, single or sharded).

  config_overrides replace ModelConfig fields (e.g. remat_policy="full", attention_impl="xla").
  """
  from rlhf_jax.models.transformer import CausalLM

  directory = resolve_checkpoint_dir(path_or_repo_id, revision)
  config = ModelConfig.from_hf(load_hf_config(directory), **config_overrides)
  model = CausalLM(config)
  tensors = read_safetensors(directory)
  shapes = jax.eval_shape(lambda k: model.init(k, dtype), jax.random.key(0))
  optional = ["lm_head.weight"] if config.tie_embeddings else []
  params = params_from_hf_tensors(tensor_map(config), tensors, shapes, config.num_layers,
                                  base_prefix=base_prefix(config), optional=optional,
                                  dtype=dtype)
  return model, params


def save_pretrained(model, params: dict, out_dir: str, *, dtype=None) -> None:
  """config.json + model.safetensors that transformers.AutoModelForCausalLM loads.

  dtype: None keeps the params' dtype; e.g. np.float32 casts on write.
  """
  config = model.config
  hf_config = config.to_hf("ForCausalLM")
  hf_config.dtype = dtype_string(params, dtype)
  os.makedirs(out_dir, exist_ok=True)
  hf_config.save_pretrained(out_dir)
  tensors = params_to_hf_tensors(tensor_map(config), params, config.num_layers, dtype)
  write_safetensors(tensors, out_dir)


def dtype_string(params, dtype) -> str:
  """The numpy name of the dtype a checkpoint is written in (for config.json's "dtype")."""
  leaf = jax.tree_util.tree_leaves(params)[0]
  return str(np.dtype(dtype if dtype is not None else leaf.dtype))
