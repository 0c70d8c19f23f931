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

from rlhf_jax.errors import UserError

__all__ = [
    "AXES",
    "BATCH_AXES",
    "MeshConfig",
    "make_mesh",
    "state_shardings",
    "mesh_shape",
    "shard_batch",
    "replicate",
    "host_get",
    "host_get_all_processes",
    "put_rows",
    "is_main_process",
    "initialize_distributed",
    "distributed_settings",
    "LaunchError",
]

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int = -1  # -1: whatever the other axes leave
  fsdp: int = 1
  tensor: int = 1


def mesh_shape(config: MeshConfig, num_devices: int) -> tuple[int, int, int]:
  """The (data, fsdp, tensor) sizes `make_mesh` gives `config` on `num_devices` devices."""
  sizes = [config.data, config.fsdp, config.tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {config}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"mesh {config} does not divide {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) > num_devices:
    raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = "
                     f"{int(np.prod(sizes))} devices, but {num_devices} are available")
  return tuple(sizes)


def make_mesh(config: MeshConfig = MeshConfig(), devices=None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(config, len(devices))
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


def host_get_all_processes(x: np.ndarray) -> np.ndarray:
  """[process_count, ...]: every process's value of the host array `x` (same shape on all)."""
  if jax.process_count() == 1:
    return np.asarray(x)[None]
  from jax.experimental import multihost_utils  # noqa: PLC0415 — only multi-host needs it
  return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=False))


def put_rows(x: np.ndarray, sharding) -> jax.Array:
  """A host array (the same on every process) placed with `sharding`: each process fills the
  shards its devices hold, so it works across processes as on one."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def is_main_process() -> bool:
  """Whether this process writes run files (config, metrics, exports): process 0 only."""
  return jax.process_index() == 0


def replicate(tree, mesh: Mesh):
  return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


# Launch settings: (flag, variable) pairs; a flag wins over its variable.
_LAUNCH_VARIABLES = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
                     "process_id": "JAX_PROCESS_ID"}
_LAUNCH_FLAGS = {"coordinator": "--coordinator", "num_processes": "--num-processes",
                 "process_id": "--process-id"}


class LaunchError(UserError):
  """The multi-process launch settings (flags, JAX_* or cluster variables) are inconsistent."""


def _launch_int(name: str, raw, source: str) -> int:
  try:
    return int(raw)
  except (TypeError, ValueError):
    raise LaunchError(f"{source}: expected an integer for the {name.replace('_', ' ')}, got "
                      f"{raw!r}") from None


def _cluster(env) -> str | None:
  """The launcher that started several processes, when its variables say so (jax reads them)."""
  slurm_tasks = env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1"))
  # SLURM_STEP_NODELIST is set inside `srun` only: a batch script's own process is not one of
  # several tasks even when the allocation has many. One node with several tasks counts too.
  if ("SLURM_STEP_NODELIST" in env and "SLURM_PROCID" in env
      and _launch_int("process count", slurm_tasks, "SLURM_STEP_NUM_TASKS") > 1):
    return "slurm"
  if "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return "ompi"
  if ("," in env.get("TPU_WORKER_HOSTNAMES", "") or "," in env.get("TPU_PROCESS_ADDRESSES", "")
      or env.get("MEGASCALE_COORDINATOR_ADDRESS")):
    return "tpu"
  return None


def distributed_settings(coordinator: str | None = None, num_processes: int | None = None,
                         process_id: int | None = None, *, force: bool = False,
                         env=None) -> dict | None:
  """The `jax.distributed.initialize` arguments for this launch, or None for one process.

  In order: explicit values (the CLI's --coordinator / --num-processes / --process-id), the
  JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables, then a cluster that
  jax detects itself (SLURM tasks under srun, one node with several tasks included; Open MPI's
  mpirun; a TPU slice on GKE). `force` (--distributed) initialises even when nothing is detected:
  jax then asks the TPU metadata server, as on a Cloud TPU VM slice. Raises LaunchError, naming
  the flag or variable, when the settings are incomplete or out of range.
  """
  env = os.environ if env is None else env
  given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
  settings, sources = {}, {}
  for name, value in given.items():
    source = _LAUNCH_FLAGS[name]
    if value is None and env.get(_LAUNCH_VARIABLES[name], "") != "":
      value, source = env[_LAUNCH_VARIABLES[name]], _LAUNCH_VARIABLES[name]
    if value is not None:
      settings[name] = value if name == "coordinator" else _launch_int(name, value, source)
      sources[name] = source
  cluster = _cluster(env)
  if not settings:
    return {} if (cluster or force) else None
  if cluster is None:
    missing = [f"{_LAUNCH_FLAGS[n]} (or {_LAUNCH_VARIABLES[n]})" for n in _LAUNCH_VARIABLES
               if n not in settings]
    if missing:
      raise LaunchError(f"a multi-process launch with {', '.join(sources.values())} also needs "
                        f"{' and '.join(missing)}: every process gets the coordinator's "
                        "host:port, the number of processes and its own id (0 on the "
                        "coordinator's host)")
  if "coordinator" in settings and ":" not in settings["coordinator"]:
    raise LaunchError(f"{sources['coordinator']}: expected host:port (e.g. 10.0.0.1:1234), got "
                      f"{settings['coordinator']!r}")
  if "num_processes" in settings and settings["num_processes"] < 1:
    raise LaunchError(f"{sources['num_processes']}: expected at least 1 process, got "
                      f"{settings['num_processes']}")
  if "num_processes" in settings and "process_id" in settings and not (
      0 <= settings["process_id"] < settings["num_processes"]):
    raise LaunchError(f"{sources['process_id']}: expected a process id in [0, "
                      f"{settings['num_processes']}), got {settings['process_id']}")
  return {{"coordinator": "coordinator_address"}.get(k, k): v for k, v in settings.items()}


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, force: bool = False, env=None,
                           initialize: Callable = jax.distributed.initialize) -> bool:
  """Calls `jax.distributed.initialize` when launched as one of several processes.

  See `distributed_settings` for where the settings come from. Returns whether it initialised.
  """
  settings = distributed_settings(coordinator, num_processes, process_id, force=force, env=env)
  if settings is None:
    return False
  if initialize is jax.distributed.initialize and jax.distributed.is_initialized():
    return True  # a driver that runs several experiments in one process initialises once
  initialize(**settings)
  return True
