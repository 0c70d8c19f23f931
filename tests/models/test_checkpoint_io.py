"""Checkpoints at size: streamed loads into sharded buffers, sharded saves with an index."""

import json
import os
import tracemalloc

import jax
import numpy as np
import pytest
import transformers
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hf_reference import padded_batch, torch_logits
from rlhf_jax import models
from rlhf_jax.models import hf_io, safetensors_io
from rlhf_jax.models.partitioning import param_partition_specs


def _mesh():
  return Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))


def _shardings_on(mesh):
  def shardings(shapes):
    specs = param_partition_specs(shapes, mesh=mesh)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))
  return shardings


def _assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# GPT-2 reads its fused c_attn in column slices ("split3"), Llama its linears transposed, Phi-3
# row slices of its fused qkv_proj / gate_up_proj ("fused_linear"), Gemma 3 its extra norms.
@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3", "gemma3_text"])
def test_streamed_load_equals_the_plain_load_with_the_mesh_shardings(hf_lm_dirs, family):
  directory = str(hf_lm_dirs[family][1])
  mesh = _mesh()
  _, plain = models.from_pretrained(directory)
  _, streamed = models.from_pretrained(directory, shardings=_shardings_on(mesh))
  _assert_same(plain, streamed)
  expected = param_partition_specs(plain, mesh=mesh)
  for leaf, spec in zip(jax.tree.leaves(streamed), jax.tree.leaves(
      expected, is_leaf=lambda x: isinstance(x, PartitionSpec))):
    assert leaf.sharding == NamedSharding(mesh, spec)
  up = streamed["layers"]["mlp"]["up"]["kernel"]
  assert up.sharding.spec == PartitionSpec(None, "fsdp", "tensor")  # really split


def test_reward_model_streams_onto_the_mesh(tmp_path):
  config = models.ModelConfig(model_type="llama", vocab_size=64, hidden_size=16, num_layers=2,
                              num_heads=2, num_kv_heads=1, head_dim=8, intermediate_size=32)
  model = models.CausalLM(config)
  rm, params = models.RewardModel.from_causal_lm(model, model.init(jax.random.key(0)),
                                                 jax.random.key(1))
  models.save_pretrained_reward_model(rm, params, str(tmp_path))
  _, streamed = models.from_pretrained_reward_model(str(tmp_path), shardings=_shardings_on(_mesh()))
  _assert_same(params, streamed)
  assert streamed["score"]["kernel"].sharding.spec == PartitionSpec("fsdp", None)


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory):
  """A checkpoint whose largest tensor (the 8 MiB embedding) is a quarter of the model."""
  config = models.ModelConfig(model_type="llama", vocab_size=8192, hidden_size=256, num_layers=6,
                              num_heads=4, num_kv_heads=2, head_dim=64, intermediate_size=1024)
  model = models.CausalLM(config)
  params = model.init(jax.random.key(0))
  directory = tmp_path_factory.mktemp("wide")
  models.save_pretrained(model, params, str(directory))
  return model, params, str(directory)


def test_streamed_load_holds_about_one_tensor_in_host_memory(wide_checkpoint):
  _, params, directory = wide_checkpoint
  total = sum(x.nbytes for x in jax.tree.leaves(params))
  largest = max(x.nbytes for x in jax.tree.leaves(params))
  assert total >= 4 * largest
  shardings = _shardings_on(_mesh())
  models.from_pretrained(directory, shardings=shardings)  # compiles outside the trace
  tracemalloc.start()
  try:
    _, streamed = models.from_pretrained(directory, shardings=shardings)
    retained, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  # On the CPU backend placed shards may alias host buffers (retained); what the load needed on
  # top of what it placed is the transient: at most about one tensor, never the model.
  assert peak - retained <= 1.25 * largest, (peak - retained, largest, total)
  _assert_same(params, streamed)


def test_sharded_save_writes_capped_files_and_an_index_transformers_loads(hf_lm_dirs, tmp_path):
  model, params = models.from_pretrained(str(hf_lm_dirs["llama"][1]))
  placed = jax.device_put(params, _shardings_on(_mesh())(params))
  cap = 16 * 2**10
  models.save_pretrained(model, placed, str(tmp_path), max_shard_size="16KiB")
  with open(tmp_path / safetensors_io.INDEX) as f:
    index = json.load(f)
  files = sorted(set(index["weight_map"].values()))
  assert len(files) >= 4 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
  assert not (tmp_path / safetensors_io.SINGLE).exists()
  largest = max(x.nbytes for x in jax.tree.leaves(params))
  for file in files:  # a tensor over the cap gets a file of its own
    assert os.path.getsize(tmp_path / file) <= max(cap, largest) + 2**12, file
  assert index["metadata"]["total_size"] == sum(x.nbytes for x in jax.tree.leaves(params))
  _, reloaded = models.from_pretrained(str(tmp_path))
  _assert_same(params, reloaded)
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager")
  ids, mask = padded_batch(0, [5, 8], 8)
  ours = np.asarray(model.apply(params, ids, mask).logits)
  np.testing.assert_allclose(torch_logits(hf, ids, mask) * mask[..., None],
                             ours * mask[..., None], atol=1e-4)


def test_a_save_that_fits_one_file_removes_a_stale_index(hf_lm_dirs, tmp_path):
  model, params = models.from_pretrained(str(hf_lm_dirs["qwen2"][1]))
  models.save_pretrained(model, params, str(tmp_path), max_shard_size="8KB")
  assert (tmp_path / safetensors_io.INDEX).exists()
  models.save_pretrained(model, params, str(tmp_path))
  assert not (tmp_path / safetensors_io.INDEX).exists()
  _, reloaded = models.from_pretrained(str(tmp_path))
  _assert_same(params, reloaded)


def test_writer_checks_sizes_names_and_shapes(tmp_path):
  assert safetensors_io.parse_size("2GB") == 2 * 10**9
  assert safetensors_io.parse_size("5GiB") == 5 * 2**30
  with pytest.raises(ValueError, match="max_shard_size='lots'"):
    safetensors_io.parse_size("lots")
  entry = lambda name, shape, value: safetensors_io.Entry(name, shape, np.dtype("float32"),
                                                          lambda: value)
  with pytest.raises(ValueError, match="duplicate tensor names: \\['a'\\]"):
    safetensors_io.write_checkpoint([entry("a", (1,), np.ones(1))] * 2, str(tmp_path))
  with pytest.raises(ValueError, match="tensor 'b': produced shape \\(3,\\), planned \\(2,\\)"):
    safetensors_io.write_checkpoint([entry("b", (2,), np.ones(3))], str(tmp_path))


def test_a_directory_without_safetensors_names_what_is_missing(tmp_path):
  with pytest.raises(hf_io.CheckpointError, match="no model.safetensors or "
                     "model.safetensors.index.json in"):
    hf_io.open_checkpoint(str(tmp_path))
