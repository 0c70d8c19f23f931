"""Partition specs and a forward sharded over 8 CPU devices (tests/conftest.py forces 8)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hf_reference import forward_logits, hf_config, padded_batch
from rlhf_jax.models import (CausalLM, ModelConfig, RewardModel, from_pretrained,
                             param_partition_specs)


@pytest.fixture(scope="module")
def llama():
  """Untied Llama, 4 query heads and 2 KV heads, vocab 128, width 32, MLP 64."""
  model = CausalLM(ModelConfig.from_hf(hf_config("llama")))
  return model, model.init(jax.random.key(0))


def _mesh(data, fsdp, tensor):
  devices = np.array(jax.devices()[: data * fsdp * tensor]).reshape(data, fsdp, tensor)
  return Mesh(devices, ("data", "fsdp", "tensor"))


def test_megatron_layout_without_a_mesh(llama):
  model, params = llama
  specs = param_partition_specs(params, model.config)
  assert specs["embed"]["embedding"] == P("tensor", "fsdp")
  assert specs["lm_head"]["kernel"] == P("fsdp", "tensor")
  assert specs["layers"]["attn"]["q"]["kernel"] == P(None, "fsdp", "tensor")
  assert specs["layers"]["attn"]["o"]["kernel"] == P(None, "tensor", "fsdp")
  assert specs["layers"]["mlp"]["gate"]["kernel"] == P(None, "fsdp", "tensor")
  assert specs["layers"]["mlp"]["down"]["kernel"] == P(None, "tensor", "fsdp")
  assert specs["layers"]["attn_norm"]["scale"] == P(None, None)
  assert specs["final_norm"]["scale"] == P(None)


def test_splits_that_do_not_divide_fall_back_to_replicated(llama):
  model, params = llama
  specs = param_partition_specs(params, model.config, mesh=_mesh(1, 1, 4))
  # 2 KV heads cannot be split 4 ways (whole heads only); 4 query heads can.
  assert specs["layers"]["attn"]["k"]["kernel"] == P(None, "fsdp", None)
  assert specs["layers"]["attn"]["q"]["kernel"] == P(None, "fsdp", "tensor")
  odd = {"embed": {"embedding": jax.ShapeDtypeStruct((130, 32), jnp.float32)}}
  assert param_partition_specs(odd, mesh=_mesh(1, 4, 2))["embed"]["embedding"] == P("tensor",
                                                                                    "fsdp")
  assert param_partition_specs(odd, mesh=_mesh(1, 2, 4))["embed"]["embedding"] == P(None, "fsdp")
  # Every split requested divides its dim.
  mesh = _mesh(2, 2, 2)
  for spec, leaf in zip(jax.tree_util.tree_leaves(param_partition_specs(params, mesh=mesh),
                                                  is_leaf=lambda x: isinstance(x, P)),
                        jax.tree_util.tree_leaves(params)):
    for axis, dim in zip(spec, leaf.shape):
      assert axis is None or dim % mesh.shape[axis] == 0


def test_reward_model_params_get_specs(llama):
  model, params = llama
  rm, rm_params = RewardModel.from_causal_lm(model, params, jax.random.key(1))
  specs = param_partition_specs(rm_params, model.config)
  assert specs["backbone"]["layers"]["attn"]["q"]["kernel"] == P(None, "fsdp", "tensor")
  assert specs["score"]["kernel"] == P("fsdp", None)


@pytest.fixture(scope="module")
def loaded_lms(hf_lm_dirs):
  """family -> (CausalLM, params) of the perturbed checkpoints (biases and norms off 0 and 1)."""
  return {family: from_pretrained(str(directory)) for family, (_, directory) in hf_lm_dirs.items()}


# (2, 2, 2) splits fsdp and tensor at once; one forward per family there. Qwen2 adds the q/k/v
# bias rules, GPT-2 the fused c_attn (split into q/k/v on import), learned positions and MLP
# biases, Mistral the sliding window; Qwen3 / Gemma 3 per-head q/k norms, OLMo 2 full-width
# q/k norms over a tensor-split projection, Gemma 2 the soft-capped attention, Phi-3 the split
# fused projections.
@pytest.mark.parametrize("family,shape,batch_axes", [
    ("llama", (2, 4, 1), ("data", "fsdp")), ("llama", (2, 1, 4), ("data",)),
    ("llama", (2, 2, 2), ("data", "fsdp")), ("qwen2", (2, 2, 2), ("data", "fsdp")),
    ("gpt2", (2, 2, 2), ("data", "fsdp")), ("mistral", (2, 2, 2), ("data",)),
    *((family, (2, 2, 2), ("data", "fsdp"))
      for family in ("qwen3", "gemma2", "gemma3_text", "phi3", "olmo2"))])
def test_sharded_forward_equals_single_device(loaded_lms, family, shape, batch_axes):
  model, params = loaded_lms[family]
  ids, mask = padded_batch(0, lengths=(10, 9, 8, 7, 6, 5, 4, 3), total=10)
  expected = np.asarray(forward_logits(model, params, ids, mask))
  mesh = _mesh(*shape)
  specs = param_partition_specs(params, model.config, mesh=mesh)
  sharded = jax.tree_util.tree_map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)),
                                   params, specs)
  up = sharded["layers"]["mlp"]["up"]["kernel"]  # [L, D, F]: really split over the mesh
  assert up.sharding.spec == P(None, "fsdp", "tensor")
  layers, width, inner = up.shape
  assert up.addressable_shards[0].data.shape == (layers, width // shape[1], inner // shape[2])
  if model.config.qkv_bias:  # biases follow their kernel's output split (whole KV heads)
    assert sharded["layers"]["attn"]["k"]["bias"].sharding.spec == P(None, "tensor")
  if model.config.positions == "learned":
    assert sharded["pos_embed"]["embedding"].sharding.spec == P(None, "fsdp")
  batch_sharding = NamedSharding(mesh, P(batch_axes, None))
  ids_s, mask_s = (jax.device_put(x, batch_sharding) for x in (ids, mask))
  logits = jax.jit(lambda p, i, m: model.apply(p, i, m).logits)(sharded, ids_s, mask_s)
  np.testing.assert_allclose(logits, expected, atol=1e-5)
