"""LoRA / QLoRA on the decoder (models/lora.py): the closed forms, quantisation error, sharding,
and the PEFT round trip (peft loads our adapters onto the transformers model: same logits)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import Mesh, NamedSharding

from hf_reference import forward_logits, make_hf_model, max_real_diff, padded_batch, torch_logits
from rlhf_jax import models
from rlhf_jax.models import lora

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  directory = tmp_path_factory.mktemp("lora_llama")
  make_hf_model("llama", directory)
  model, params = models.from_pretrained(str(directory))
  return directory, model, params


def _batch():
  return padded_batch(3, [9, 6, 12], 12)


def _trained(adapted, seed=1, scale=0.3):
  """The adapters moved away from B = 0, as training would."""
  leaves, treedef = jax.tree.flatten(adapted.adapters)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  moved = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  return lora.Adapted(adapted.base, treedef.unflatten(moved))


def test_fresh_adapters_leave_the_model_unchanged_and_off_is_the_base(llama):
  _, model, params = llama
  ids, mask = _batch()
  base = forward_logits(model, params, ids, mask)
  adapted_model, adapted = lora.adapt(model, params, lora.LoraConfig(rank=4), jax.random.key(0))
  # B = 0: the update is exactly zero (the adapted matmul path rounds differently: float32 eps).
  assert max_real_diff(forward_logits(adapted_model, adapted, ids, mask), base, mask) < 1e-5
  off = lora.Adapted(adapted.base, None)
  np.testing.assert_array_equal(forward_logits(adapted_model, off, ids, mask), base)
  # Shapes: A [L, D_in, r], B [L, r, D_out] on every projection ("all"); B starts at zero.
  q = adapted.adapters["layers"]["attn"]["q"]
  assert q["kernel_lora_a"].shape == (2, 32, 4) and q["kernel_lora_b"].shape == (2, 4, 32)
  assert not np.any(np.asarray(q["kernel_lora_b"]))
  assert set(adapted.adapters["layers"]["mlp"]) == {"gate", "up", "down"}


def test_adapted_forward_equals_the_merged_kernels(llama):
  """x·W + (alpha/r)·x·A·B == x·(W + (alpha/r)·A·B), for the targets only."""
  _, model, params = llama
  ids, mask = _batch()
  config = lora.LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v", "down"))
  adapted_model, adapted = lora.adapt(model, params, config, jax.random.key(0))
  adapted = _trained(adapted)
  assert set(adapted.adapters["layers"]["attn"]) == {"q", "v"}
  assert set(adapted.adapters["layers"]["mlp"]) == {"down"}
  ours = forward_logits(adapted_model, adapted, ids, mask)
  merged = lora.merged_params(adapted_model, adapted)
  assert max_real_diff(ours, forward_logits(model, merged, ids, mask), mask) < 1e-5
  assert max_real_diff(ours, forward_logits(model, params, ids, mask), mask) > 1e-2  # it moved
  # The merge by hand for one layer's q: alpha / r = 2.
  ab = adapted.adapters["layers"]["attn"]["q"]
  expected = (np.asarray(params["layers"]["attn"]["q"]["kernel"][1], np.float64)
              + 2.0 * np.asarray(ab["kernel_lora_a"][1], np.float64)
              @ np.asarray(ab["kernel_lora_b"][1], np.float64))
  np.testing.assert_allclose(merged["layers"]["attn"]["q"]["kernel"][1], expected, atol=1e-6)
  np.testing.assert_array_equal(merged["layers"]["attn"]["k"]["kernel"],
                                params["layers"]["attn"]["k"]["kernel"])


# Stated tolerances of the quantised base on this random model (Gaussian weights), int8 per
# output channel, 4-bit with one scale per 16 input rows. Weights: relative RMS error of the
# dequantised kernels (measured 0.55% int8, 8.7% int4, 8.2% NF4: a 16-level grid over each
# group's absmax). Logits: max |error| / max |logit| (measured 0.8%, 11.7%, 12.6%): the weight
# error passes through 2 layers x 7 projections at about 1.5x, never blowing up.
WEIGHT_TOLERANCE = {"int8": 0.01, "int4": 0.1, "nf4": 0.1}
LOGIT_TOLERANCE = {"int8": 0.01, "int4": 0.15, "nf4": 0.15}


def _weight_error(model, params, adapted):
  merged = lora.merged_params(model, lora.Adapted(adapted.base, None))
  ours = [np.asarray(x) for x in jax.tree.leaves(merged["layers"])]
  theirs = [np.asarray(x) for x in jax.tree.leaves(params["layers"])]
  return float(np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(ours, theirs))
                       / sum(np.sum(b ** 2) for b in theirs)))


@pytest.mark.parametrize("quantize", ["int8", "int4", "nf4"])
def test_quantised_base_is_close_to_the_float_base(llama, quantize):
  _, model, params = llama
  ids, mask = _batch()
  config = lora.LoraConfig(rank=4, quantize=quantize, group_size=16)
  qmodel, adapted = lora.adapt(model, params, config, jax.random.key(0))
  kernel = adapted.base["layers"]["attn"]["q"]["kernel"]
  assert kernel.array.qvalue.dtype.itemsize == 1 and kernel.array.qvalue.shape == (2, 32, 32)
  if quantize != "int8":
    assert jnp.dtype(kernel.array.qvalue.dtype).name in ("int4", "uint4")
    assert kernel.array.scale.shape == (2, 2, 32)  # one scale per 16 input rows per column
  weight_error = _weight_error(qmodel, params, adapted)
  assert 0 < weight_error < WEIGHT_TOLERANCE[quantize], weight_error
  base = forward_logits(model, params, ids, mask)
  quantised = forward_logits(qmodel, adapted, ids, mask)
  error = max_real_diff(quantised, base, mask) / float(np.abs(base).max())
  assert 0 < error < LOGIT_TOLERANCE[quantize], error
  # Adapters off on the quantised base is the same quantised model (B = 0 at the start).
  off = forward_logits(qmodel, lora.Adapted(adapted.base, None), ids, mask)
  assert max_real_diff(off, quantised, mask) < 1e-5
  # The merge dequantises: the merged float model reproduces the quantised adapted one.
  trained = _trained(adapted)
  merged = lora.merged_params(qmodel, trained)
  assert max_real_diff(forward_logits(model, merged, ids, mask),
                       forward_logits(qmodel, trained, ids, mask), mask) < 1e-4


def test_nf4_fits_gaussian_weights_better_than_int4(llama):
  """NF4's levels are normal quantiles (Dettmers et al.): on Gaussian weights, a smaller error
  than the uniform int4 grid at the same group size."""
  _, model, params = llama
  errors = {}
  for quantize in ("int4", "nf4"):
    config = lora.LoraConfig(rank=2, quantize=quantize, group_size=16)
    qmodel, adapted = lora.adapt(model, params, config, jax.random.key(0))
    errors[quantize] = _weight_error(qmodel, params, adapted)
  assert errors["nf4"] < errors["int4"], errors


def test_lora_config_errors_name_the_key(llama):
  _, model, params = llama
  with pytest.raises(ValueError, match=r"model.lora.targets: unknown module 'qkv'"):
    lora.LoraConfig(rank=4, targets=("qkv",)).validate()
  with pytest.raises(ValueError, match=r"model.lora.dropout: only 0.0"):
    lora.LoraConfig(rank=4, dropout=0.1).validate()
  with pytest.raises(ValueError, match=r"model.lora.quantize='int8' needs LoRA adapters"):
    lora.LoraConfig(quantize="int8").validate()
  with pytest.raises(ValueError, match=r"model.lora.quantize: expected one of"):
    lora.LoraConfig(rank=2, quantize="fp4").validate()
  with pytest.raises(ValueError, match=r"model.lora.group_size=24 does not divide the q "
                                       r"projection's 32 input features"):
    lora.adapt(model, params, lora.LoraConfig(rank=2, quantize="int4", group_size=24),
               jax.random.key(0))


def test_trainable_split_and_bases_detach(llama):
  _, model, params = llama
  _, adapted = lora.adapt(model, params, lora.LoraConfig(rank=2), jax.random.key(0))
  tree = {"policy": adapted, "value_head": {"kernel": jnp.ones((32, 1))}}
  trainable, join = lora.split(tree)
  assert jax.tree.structure(trainable["policy"]) == jax.tree.structure(adapted.adapters)
  assert trainable["value_head"]["kernel"] is tree["value_head"]["kernel"]
  assert join(trainable)["policy"].base is adapted.base
  detached, bases = lora.detach_bases(tree)
  assert detached["policy"].base is None and bases == [adapted.base]
  assert lora.attach_bases(detached, bases)["policy"].base is adapted.base
  assert lora.adapter_bytes(tree) == sum(
      x.nbytes for x in jax.tree.leaves((adapted.adapters, tree["value_head"])))
  plain, join_plain = lora.split(params)
  assert plain is params and join_plain(plain) is params


def test_sharded_adapted_forward_equals_single_device(llama):
  """Adapters and a quantised base take the kernels' splits on the 8-device test mesh."""
  _, model, params = llama
  ids, mask = _batch()
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(1, 2, 4), ("data", "fsdp", "tensor"))
  qmodel, adapted = lora.adapt(model, params, lora.LoraConfig(rank=4, quantize="int8"),
                               jax.random.key(0))
  adapted = _trained(adapted)
  specs = models.param_partition_specs(adapted, model.config, mesh=mesh)
  q = specs.adapters["layers"]["attn"]["q"]
  assert tuple(q["kernel_lora_a"]) == (None, "fsdp", None)
  assert tuple(q["kernel_lora_b"]) == (None, None, "tensor")
  assert tuple(specs.base["layers"]["attn"]["q"]["kernel"].array.qvalue) == (None, "fsdp",
                                                                            "tensor")
  sharded = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), adapted, specs)
  expected = forward_logits(qmodel, adapted, ids, mask)
  assert max_real_diff(forward_logits(qmodel, sharded, ids, mask), expected, mask) < 1e-5


def test_peft_loads_our_adapters_onto_the_transformers_model(llama, tmp_path):
  peft = pytest.importorskip("peft")
  directory, model, params = llama
  ids, mask = _batch()
  config = lora.LoraConfig(rank=4, alpha=8.0, targets=("q", "k", "v", "o", "up", "down"))
  adapted_model, adapted = lora.adapt(model, params, config, jax.random.key(0))
  adapted = _trained(adapted)
  lora.save_peft(adapted_model, adapted, str(tmp_path / "adapter"),
                 base_model_name_or_path=str(directory))
  saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
  assert saved["r"] == 4 and saved["lora_alpha"] == 8.0 and saved["peft_type"] == "LORA"
  assert saved["target_modules"] == ["down_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                     "v_proj"]
  base = transformers.AutoModelForCausalLM.from_pretrained(str(directory),
                                                           attn_implementation="eager")
  peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
  ours = forward_logits(adapted_model, adapted, ids, mask)
  theirs = torch_logits(peft_model, ids, mask)
  assert max_real_diff(ours, theirs, mask) < 1e-4
  # And the merged export is the same model for plain transformers.
  models.save_pretrained(adapted_model, adapted, str(tmp_path / "merged"))
  merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"),
                                                             attn_implementation="eager")
  assert max_real_diff(ours, torch_logits(merged.eval(), ids, mask), mask) < 1e-4
  with torch.no_grad():  # peft's own merge agrees with ours
    peft_merged = peft_model.merge_and_unload()
  assert max_real_diff(ours, torch_logits(peft_merged, ids, mask), mask) < 1e-4


def test_peft_export_refuses_fused_projections(tmp_path):
  make_hf_model("phi3", tmp_path / "phi3")
  model, params = models.from_pretrained(str(tmp_path / "phi3"))
  adapted_model, adapted = lora.adapt(model, params, lora.LoraConfig(rank=2), jax.random.key(0))
  with pytest.raises(ValueError, match=r"the q projection is stored fused in transformers "
                                       r"\(model.layers.\{i\}.self_attn.qkv_proj.weight\)"):
    lora.save_peft(adapted_model, adapted, str(tmp_path / "out"))


@pytest.mark.parametrize("quantize", ["none", "int8", "nf4"])
def test_sampler_decodes_adapted_params_like_the_scanned_forward(llama, quantize):
  """generate runs the layers unrolled on `unstack_layers` params (module paths layers_0/...):
  the adapters and the quantised base must act there exactly as in the scanned forward."""
  from rlhf_jax import sampling

  _, model, params = llama
  ids, mask = padded_batch(4, [5, 3], 6)
  group = 16 if quantize == "nf4" else 64
  adapted_model, adapted = lora.adapt(
      model, params, lora.LoraConfig(rank=4, quantize=quantize, group_size=group,
                                     targets=("q", "v", "down")), jax.random.key(0))
  adapted = _trained(adapted, scale=0.5)
  out = sampling.generate(adapted_model, adapted, ids, mask, jax.random.key(1), max_new_tokens=5)
  full_ids = jnp.concatenate([jnp.asarray(ids), out.tokens], axis=1)
  full_mask = jnp.concatenate([jnp.asarray(mask), out.mask], axis=1)
  want = adapted_model.token_logps(adapted, full_ids, full_mask)[:, 6:]
  np.testing.assert_allclose(out.logps, want, atol=2e-5)
  # The adapters matter: the base alone scores these tokens differently.
  base = adapted_model.token_logps(lora.Adapted(adapted.base, None), full_ids, full_mask)[:, 6:]
  assert np.max(np.abs(np.asarray(base) - np.asarray(want))) > 1e-2
