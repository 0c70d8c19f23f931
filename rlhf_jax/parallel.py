"""Device mesh, state and batch sharding.

One mesh with axes ("data", "fsdp", "tensor"). Batches are split along their leading axis over
("data", "fsdp") — FSDP ranks see different examples too, as in ZeRO-3 — and parameters follow the
model's partition specs (fsdp on one large dim, Megatron-style tensor parallelism on the other).
Optimiser moments mirror the parameters they belong to, so any sub-tree of a train state with the
parameters' structure gets the parameters' specs; every other leaf is replicated. The same step
runs on 1 CPU, 8 fake CPU devices in the tests, a GPU, or a TPU slice.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "AXES",
    "BATCH_AXES",
    "MeshConfig",
    "make_mesh",
    "state_shardings",
    "shard_batch",
    "replicate",
    "host_get",
    "is_main_process",
    "initialize_distributed",
]

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int = -1  # -1: whatever the other axes leave
  fsdp: int = 1
  tensor: int = 1


def make_mesh(config: MeshConfig = MeshConfig(), devices=None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  sizes = [config.data, config.fsdp, config.tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {config}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh {config} does not divide {len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) > len(devices):
    raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = "
                     f"{int(np.prod(sizes))} devices, but {len(devices)} are available")
  # An explicit mesh smaller than the host uses its first devices (e.g. 1x1x1: one device).
  return Mesh(np.array(devices[:int(np.prod(sizes))]).reshape(sizes), AXES)


def _is_spec(x) -> bool:
  return isinstance(x, PartitionSpec)


def state_shardings(state_shapes: Any, params_shapes: Any, param_specs: Any, mesh: Mesh):
  """NamedShardings for a whole state: param-shaped sub-trees get `param_specs`, the rest P().

  Args:
    state_shapes: the state (or its `jax.eval_shape`).
    params_shapes: the parameters (or their shapes); any sub-tree of the state with exactly this
      tree structure and these shapes is sharded like the parameters (params, Adam's mu and nu).
    param_specs: PartitionSpecs for the parameters (the model's partition rules).
  """
  params_def = jax.tree.structure(params_shapes)
  param_leaf_shapes = [x.shape for x in jax.tree.leaves(params_shapes)]
  spec_leaves = jax.tree.leaves(param_specs, is_leaf=_is_spec)

  def like_params(x) -> bool:
    try:
      return (jax.tree.structure(x) == params_def
              and [leaf.shape for leaf in jax.tree.leaves(x)] == param_leaf_shapes)
    except Exception:  # noqa: BLE001 — unhashable / odd nodes are simply not param-like
      return False

  def to_sharding(x):
    if like_params(x):
      return jax.tree.unflatten(params_def, [NamedSharding(mesh, s) for s in spec_leaves])
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree.map(to_sharding, state_shapes, is_leaf=like_params)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def shard_batch(batch: dict, mesh: Mesh, *, per_process: bool | None = None) -> dict:
  """Puts a global batch on the mesh, split along the leading axis over (data, fsdp).

  `batch` is the whole global batch, the same on every process: batch i is a pure function of
  (seed, i), so every process builds it and each contributes the rows its own devices hold
  (`make_array_from_callback`), whatever the device order. `per_process` forces that path (the
  default takes it only when there are several processes; one process uses `device_put`).
  """
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if per_process is None:
    per_process = jax.process_count() > 1

  def put(x):
    x = np.asarray(x)
    if x.ndim == 0:
      return jax.device_put(x, NamedSharding(mesh, PartitionSpec()))
    if x.shape[0] % shards:
      raise ValueError(f"a batch axis of {x.shape[0]} rows does not split over data x fsdp = "
                       f"{shards} devices; choose a batch size divisible by {shards}")
    sharding = batch_sharding(mesh, x.ndim)
    if not per_process:
      return jax.device_put(x, sharding)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return {key: put(value) for key, value in batch.items()}


def host_get(tree):
  """The values of a (possibly sharded) pytree as NumPy arrays, on every process.

  `jax.device_get` where each array is fully addressable (one process, or replicated); across
  processes, sharded arrays are all-gathered first, so exports and caches see whole arrays.
  """
  def get(x):
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
      from jax.experimental import multihost_utils  # noqa: PLC0415 — only multi-host needs it
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

  return jax.tree.map(get, tree)


def is_main_process() -> bool:
  """Whether this process writes run files (config, metrics, exports): process 0 only."""
  return jax.process_index() == 0


def replicate(tree, mesh: Mesh):
  return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def initialize_distributed(initialize: Callable = jax.distributed.initialize) -> bool:
  """Calls `jax.distributed.initialize()` when launched as one of several processes.

  Detects the usual launchers (an explicit coordinator address, multi-node SLURM, Open MPI, a
  multi-host TPU slice), whose variables `initialize()` then reads. Returns whether it did.
  """
  env = os.environ
  multi = (bool(env.get("JAX_COORDINATOR_ADDRESS"))
           or int(env.get("SLURM_JOB_NUM_NODES", "1")) > 1
           or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
           or "," in env.get("TPU_WORKER_HOSTNAMES", ""))
  if multi:
    initialize()
  return multi
