"""Partition specs for model params over a ("data", "fsdp", "tensor") device mesh.

Megatron-style tensor parallelism (Shoeybi et al., 2019, arXiv:1909.08053): q/k/v/gate/up
kernels split on their output features, o/down on their input features, the embedding and
lm_head on the vocabulary; FSDP (ZeRO-3, Rajbhandari et al., 2019, arXiv:1910.02054) splits the
other large dim. Norm scales are replicated; biases follow their kernel's output split. Params
are replicated over "data". A dim is split only where the mesh axis divides it (and, for
attention projections with a config, only on whole heads); otherwise that dim is replicated.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import PartitionSpec

from rlhf_jax.models.config import ModelConfig

__all__ = ["param_partition_specs", "MESH_AXES"]

MESH_AXES = ("data", "fsdp", "tensor")
F, T = "fsdp", "tensor"
# (module name, param name) -> spec of the unstacked param.
_RULES = {
    ("embed", "embedding"): (T, F),
    ("pos_embed", "embedding"): (None, F),
    ("lm_head", "kernel"): (F, T),
    ("q", "kernel"): (F, T), ("k", "kernel"): (F, T), ("v", "kernel"): (F, T),
    ("q", "bias"): (T,), ("k", "bias"): (T,), ("v", "bias"): (T,),
    ("o", "kernel"): (T, F), ("o", "bias"): (None,),
    ("gate", "kernel"): (F, T), ("up", "kernel"): (F, T),
    ("gate", "bias"): (T,), ("up", "bias"): (T,),
    ("down", "kernel"): (T, F), ("down", "bias"): (None,),
    ("score", "kernel"): (F, None),
    ("value_head", "kernel"): (F, None),
}
# LoRA (models/lora.py): A [D_in, r] splits its input like the kernel, B [r, D_out] its output;
# the rank is never split. A quantised kernel's values (…/kernel/array/qvalue) split like the
# kernel; its scales are replicated.
for _module in ("q", "k", "v", "o", "gate", "up", "down"):
  _in, _out = _RULES[(_module, "kernel")]
  _RULES[(_module, "kernel_lora_a")] = (_in, None)
  _RULES[(_module, "kernel_lora_b")] = (None, _out)


def param_partition_specs(params_or_shapes: Any, config: ModelConfig | None = None, *,
                          mesh: jax.sharding.Mesh | None = None) -> Any:
  """The tree of PartitionSpecs matching `params_or_shapes` (arrays or ShapeDtypeStructs).

  Works for CausalLM params, RewardModel params ({"backbone", "score"}) and any tree holding
  them. mesh: used to drop splits the axis size does not divide and axes the mesh lacks; without
  it every rule's split is returned as is. config: adds the whole-heads check on q/k/v/o.
  """
  axis_sizes = dict(mesh.shape) if mesh is not None else None

  def spec_for(path, leaf):
    names = [getattr(p, "key", getattr(p, "name", str(p))) for p in path]
    shape = tuple(leaf.shape)
    stacked = "layers" in names
    if names[-2:] == ["array", "qvalue"]:
      names = names[:-2]
    rule = _RULES.get(tuple(names[-2:])) if len(names) >= 2 else None
    if rule is None or len(rule) + stacked != len(shape):
      rule = (None,) * (len(shape) - stacked)
    dims = shape[1:] if stacked else shape
    heads = _heads_per_dim(names, config)
    parts = [_checked(axis, dim, axis_sizes, heads if axis == T else None)
             for axis, dim in zip(rule, dims)]
    return PartitionSpec(*(([None] if stacked else []) + parts))

  return jax.tree_util.tree_map_with_path(spec_for, params_or_shapes)


def _heads_per_dim(names, config: ModelConfig | None) -> int | None:
  if config is None or len(names) < 2 or names[-3:-2] != ["attn"]:
    return None
  return config.num_kv_heads if names[-2] in ("k", "v") else config.num_heads


def _checked(axis: str | None, dim: int, axis_sizes: dict | None, heads: int | None):
  if axis is None or axis_sizes is None:
    return axis
  size = axis_sizes.get(axis)
  if size is None or dim % size or (heads is not None and heads % size):
    return None
  return axis
