"""Mesh construction, state shardings, and a sharded training step equal to the unsharded one."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from rlhf_jax import parallel
from rlhf_jax import embedded
from rlhf_jax.parallel import MeshConfig
from rlhf_jax.train import common, loop, preference
from rlhf_jax.train.state import OptimizerConfig, TrainState


def test_make_mesh_fills_and_checks():
  assert jax.device_count() == 8
  assert dict(parallel.make_mesh(MeshConfig()).shape) == {"data": 8, "fsdp": 1, "tensor": 1}
  assert dict(parallel.make_mesh(MeshConfig(data=-1, fsdp=2, tensor=2)).shape) == {
      "data": 2, "fsdp": 2, "tensor": 2}
  assert parallel.make_mesh(MeshConfig(1, 1, 1)).devices.size == 1  # a smaller explicit mesh
  with pytest.raises(ValueError, match="at most one"):
    parallel.make_mesh(MeshConfig(-1, -1, 1))
  with pytest.raises(ValueError, match="16 devices, but 8"):
    parallel.make_mesh(MeshConfig(4, 4, 1))
  with pytest.raises(ValueError, match="does not divide"):
    parallel.make_mesh(MeshConfig(-1, 3, 1))


def test_optimizer_moments_are_sharded_like_their_params():
  mesh = parallel.make_mesh(MeshConfig(data=2, fsdp=4))
  params = {"w": jnp.zeros((8, 4)), "b": jnp.zeros((4,))}
  specs = {"w": P("fsdp", None), "b": P()}
  state = TrainState.create(params, optax.adam(1e-3), jax.random.key(0))
  shardings = parallel.state_shardings(state, params, specs, mesh)
  assert shardings.params["w"].spec == P("fsdp", None)
  adam = shardings.opt_state[0]
  assert adam.mu["w"].spec == P("fsdp", None) and adam.nu["w"].spec == P("fsdp", None)
  assert adam.count.spec == P() and shardings.step.spec == P()


def test_shard_batch_rejects_an_indivisible_batch():
  mesh = parallel.make_mesh(MeshConfig(data=2, fsdp=4))
  batch = parallel.shard_batch({"x": np.zeros((16, 3))}, mesh)
  assert batch["x"].sharding.spec == P(("data", "fsdp"), None)
  with pytest.raises(ValueError, match="divisible by 8"):
    parallel.shard_batch({"x": np.zeros((12, 3))}, mesh)


def test_per_process_batch_placement_equals_device_put():
  # The multi-host path (each process fills the shards its devices hold from the global batch)
  # gives the same global array as device_put, on a mesh whose device order is scrambled.
  devices = np.array(jax.devices())[[3, 0, 6, 1, 7, 2, 5, 4]]
  mesh = parallel.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), devices=list(devices))
  batch = {"ids": np.arange(8 * 5).reshape(8, 5), "weight": np.linspace(0, 1, 8, dtype=np.float32)}
  direct = parallel.shard_batch(batch, mesh)
  per_process = parallel.shard_batch(batch, mesh, per_process=True)
  for key in batch:
    assert per_process[key].sharding == direct[key].sharding
    for a, b in zip(direct[key].addressable_shards, per_process[key].addressable_shards):
      assert a.device == b.device and a.index == b.index
      np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_array_equal(parallel.host_get(per_process[key]), batch[key])


JAX_VARIABLES = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2",
                 "JAX_PROCESS_ID": "1"}


def test_launch_settings_come_from_flags_then_jax_variables():
  assert parallel.distributed_settings(env={}) is None  # one process: no initialize
  expected = {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}
  assert parallel.distributed_settings(env=JAX_VARIABLES) == expected
  assert parallel.distributed_settings("127.0.0.1:9", 4, 3, env=JAX_VARIABLES) == {
      "coordinator_address": "127.0.0.1:9", "num_processes": 4, "process_id": 3}
  calls = []
  assert parallel.initialize_distributed(env=JAX_VARIABLES,
                                         initialize=lambda **kw: calls.append(kw))
  assert calls == [expected]
  assert not parallel.initialize_distributed(env={}, initialize=lambda **kw: calls.append(kw))


@pytest.mark.parametrize("env, message", [
    ({"JAX_COORDINATOR_ADDRESS": "h:1"}, r"with JAX_COORDINATOR_ADDRESS also needs "
                                          r"--num-processes \(or JAX_NUM_PROCESSES\) and "
                                          r"--process-id \(or JAX_PROCESS_ID\)"),
    ({**JAX_VARIABLES, "JAX_PROCESS_ID": "2"}, r"JAX_PROCESS_ID: expected a process id in "
                                                r"\[0, 2\), got 2"),
    ({**JAX_VARIABLES, "JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES: expected an integer"),
    ({**JAX_VARIABLES, "JAX_COORDINATOR_ADDRESS": "10.0.0.1"}, "expected host:port"),
])
def test_incomplete_launch_settings_name_what_is_missing(env, message):
  with pytest.raises(parallel.LaunchError, match=message):
    parallel.distributed_settings(env=env)


def test_clusters_that_jax_detects_start_it_with_no_arguments():
  srun = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node1", "SLURM_PROCID": "0",
          "SLURM_LOCALID": "0"}
  # One node with several tasks counts; a batch script's own process (no step) does not.
  assert parallel.distributed_settings(env={**srun, "SLURM_STEP_NUM_TASKS": "2"}) == {}
  assert parallel.distributed_settings(env={**srun, "SLURM_NTASKS": "1"}) is None
  assert parallel.distributed_settings(env={"SLURM_NTASKS": "8", "SLURM_JOB_ID": "7"}) is None
  ompi = {"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1", "OMPI_COMM_WORLD_SIZE": "4"}
  assert parallel.distributed_settings(env=ompi) == {}
  assert parallel.distributed_settings(env={"TPU_WORKER_HOSTNAMES": "a,b"}) == {}
  assert parallel.distributed_settings(env={}, force=True) == {}  # --distributed: a TPU VM slice
  # A coordinator with a cluster: jax fills in the rest.
  assert parallel.distributed_settings(env={**srun, "SLURM_STEP_NUM_TASKS": "2",
                                            "JAX_COORDINATOR_ADDRESS": "h:1"}) == {
      "coordinator_address": "h:1"}


@pytest.fixture(scope="module")
def sharding_model_dir(tmp_path_factory):
  # Width and heads divisible by 4, so tensor=4 really splits every projection.
  return embedded.ensure_assets(tmp_path_factory.mktemp("shard"), hidden_size=64,
                                 intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4)


def _dpo_steps(model_dir, tmp_path, mesh, num_steps=2, chunk_size=512):
  config = preference.PreferenceConfig(
      model=common.ModelSpec(path=model_dir, logps_chunk_size=chunk_size),
      data=common.DataSpec(train="synthetic:pair", num_rows=64, max_length=32, buckets=(32,)),
      # SGD with lr 1: the parameter change is the gradient itself, so comparing parameters
      # compares gradients. (Adam divides each entry by its own magnitude, which turns float32
      # summation-order noise in near-cancelling entries, |g| ~ eps, into lr-sized updates.)
      optimizer=OptimizerConfig(name="sgd", lr=1.0, schedule="constant"),
      run=loop.RunConfig(steps=num_steps, batch_size=16, mesh=mesh, output_dir=str(tmp_path)))
  task = preference.build_task(config)
  state = task.init_state()
  metrics = []
  for i in range(num_steps):
    state, m = task.train_step(state, task.put(task.batch(i)))
    metrics.append(jax.device_get(m))
  return jax.device_get(state.params), metrics, state


@pytest.mark.slow
# Chunk 16: the head's chunk loop (`ops.scored_token_logps`) runs several chunks and stops
# after the last scored one, with the vocabulary split over the tensor axis; at 512 one chunk
# covers the batch.
@pytest.mark.parametrize("mesh, chunk_size", [(MeshConfig(data=2, fsdp=4, tensor=1), 512),
                                              (MeshConfig(data=2, fsdp=1, tensor=4), 16)])
def test_sharded_dpo_step_equals_single_device(sharding_model_dir, tmp_path, mesh, chunk_size):
  single_params, single_metrics, _ = _dpo_steps(sharding_model_dir, tmp_path / "one",
                                                MeshConfig(1, 1, 1), chunk_size=chunk_size)
  params, metrics, state = _dpo_steps(sharding_model_dir, tmp_path / "many", mesh,
                                      chunk_size=chunk_size)
  # The state really is split over the mesh.
  kernel = state.params["layers"]["mlp"]["up"]["kernel"]  # [layers, width, hidden]
  layers, width, hidden = kernel.shape
  assert kernel.sharding.shard_shape(kernel.shape) == (
      (layers, width // 4, hidden) if mesh.fsdp == 4 else (layers, width, hidden // 4))
  for got, want in zip(metrics, single_metrics):
    for key in want:
      np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5, err_msg=key)
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(single_params)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
