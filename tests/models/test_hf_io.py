"""HF checkpoint import/export: round trips through transformers, sharded files, clear errors."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from hf_reference import (FAMILIES, forward_logits, hf_config, max_real_diff, padded_batch,
                          torch_logits)
from rlhf_jax.models import (CausalLM, CheckpointError, ModelConfig, UnsupportedModelError,
                             from_pretrained, save_pretrained)
from rlhf_jax.models import hf_io

def _noisy(params, seed=0):
  """Params with noise on every leaf (norm scales off 1, biases off 0)."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
                            for x, k in zip(leaves, keys)])


def _assert_trees_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_loads_in_transformers_with_the_same_logits(tmp_path, family):
  """Our random model -> save_pretrained -> AutoModelForCausalLM: same logits; and back."""
  model = CausalLM(ModelConfig.from_hf(hf_config(family)))
  params = _noisy(model.init(jax.random.key(1)))
  save_pretrained(model, params, str(tmp_path))
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), attn_implementation="eager").eval()
  assert type(torch_model).__name__ == model.config.to_hf().architectures[0]
  ids, mask = padded_batch(11, lengths=(10, 7, 3), total=10)
  ours = forward_logits(model, params, ids, mask)
  diff = max_real_diff(ours, torch_logits(torch_model, ids, mask), mask)
  print(f"{family}: export max |logits diff| = {diff:.2e}")
  assert diff <= 1e-4
  reloaded_model, reloaded = from_pretrained(str(tmp_path))
  assert reloaded_model == model
  _assert_trees_equal(reloaded, params)


@pytest.mark.parametrize("family", FAMILIES)
def test_import_then_export_reproduces_the_hf_tensors(hf_lm_dirs, tmp_path, family):
  _, directory = hf_lm_dirs[family]
  model, params = from_pretrained(str(directory))
  save_pretrained(model, params, str(tmp_path))
  original = load_file(os.path.join(directory, "model.safetensors"))
  written = load_file(os.path.join(tmp_path, "model.safetensors"))
  if model.config.tie_embeddings:
    original.pop("lm_head.weight", None)
  assert sorted(written) == sorted(original)
  for name in original:
    np.testing.assert_array_equal(written[name], original[name], err_msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_config_round_trip(family):
  config = ModelConfig.from_hf(hf_config(family))
  assert ModelConfig.from_hf(config.to_hf()) == config
  assert ModelConfig.from_hf(config.to_hf().to_dict()) == config


def test_qwen2_mixed_window_config_round_trip():
  hf = hf_config("qwen2", use_sliding_window=True, sliding_window=3, max_window_layers=1)
  config = ModelConfig.from_hf(hf)
  assert config.sliding_window == 3 and config.layer_is_sliding == (False, True)
  assert ModelConfig.from_hf(config.to_hf()) == config


def test_config_overrides_and_hashable(hf_lm_dirs):
  model, _ = from_pretrained(str(hf_lm_dirs["llama"][1]), remat_policy="full",
                             attention_impl="xla")
  assert model.config.remat_policy == "full" and model.config.attention_impl == "xla"
  assert hash(model) == hash(CausalLM(dataclasses.replace(model.config)))
  assert model.config.rope_type == "llama3" and not model.config.tie_embeddings


def test_bfloat16_load_and_save(hf_lm_dirs, tmp_path):
  model, params = from_pretrained(str(hf_lm_dirs["qwen2"][1]), dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(params))
  save_pretrained(model, params, str(tmp_path / "bf16"))
  save_pretrained(model, params, str(tmp_path / "f32"), dtype=np.float32)
  assert load_file(str(tmp_path / "bf16" / "model.safetensors"))["model.norm.weight"].dtype == \
      jnp.bfloat16
  with open(tmp_path / "f32" / "config.json") as f:
    assert json.load(f)["dtype"] == "float32"
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16"))
  assert torch_model.dtype == torch.bfloat16


def test_sharded_checkpoint(hf_lm_dirs, tmp_path):
  """model.safetensors.index.json + two shard files load to the same params."""
  directory = hf_lm_dirs["llama"][1]
  model, params = from_pretrained(str(directory))
  tensors = load_file(os.path.join(directory, "model.safetensors"))
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
            "model-00002-of-00002.safetensors": names[len(names) // 2:]}
  weight_map = {}
  for file, file_names in shards.items():
    save_file({n: tensors[n] for n in file_names}, str(tmp_path / file), metadata={"format": "pt"})
    weight_map.update({n: file for n in file_names})
  with open(tmp_path / "model.safetensors.index.json", "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  (tmp_path / "config.json").write_text(open(os.path.join(directory, "config.json")).read())
  _assert_trees_equal(from_pretrained(str(tmp_path))[1], params)


def test_gpt2_names_without_prefix(hf_lm_dirs, tmp_path):
  """openai-community/gpt2 stores the bare GPT2Model names ("h.0.attn...", "wte.weight")."""
  directory = hf_lm_dirs["gpt2"][1]
  _, params = from_pretrained(str(directory))
  tensors = load_file(os.path.join(directory, "model.safetensors"))
  bare = {n.removeprefix("transformer."): t for n, t in tensors.items() if n != "lm_head.weight"}
  bare["h.0.attn.bias"] = np.tril(np.ones((1, 1, 8, 8), np.float32))  # old causal-mask buffer
  _write_checkpoint(tmp_path, directory, bare)
  _assert_trees_equal(from_pretrained(str(tmp_path))[1], params)


# --------------------------------------------------------------------------------- bad inputs
def _write_checkpoint(out_dir, config_dir, tensors, config_edit=None):
  with open(os.path.join(config_dir, "config.json")) as f:
    config = json.load(f)
  if config_edit:
    config_edit(config)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config, f)
  save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture()
def llama_tensors(hf_lm_dirs):
  directory = hf_lm_dirs["llama"][1]
  return directory, load_file(os.path.join(directory, "model.safetensors"))


def test_missing_tensor_is_named(llama_tensors, tmp_path):
  directory, tensors = llama_tensors
  del tensors["model.layers.1.mlp.up_proj.weight"]
  _write_checkpoint(tmp_path, directory, tensors)
  with pytest.raises(CheckpointError, match=r"missing.*model\.layers\.1\.mlp\.up_proj\.weight"):
    from_pretrained(str(tmp_path))


def test_untied_checkpoint_without_lm_head_is_an_error(llama_tensors, tmp_path):
  directory, tensors = llama_tensors
  del tensors["lm_head.weight"]
  _write_checkpoint(tmp_path, directory, tensors)
  with pytest.raises(CheckpointError, match=r"missing.*lm_head\.weight"):
    from_pretrained(str(tmp_path))


def test_wrong_shape_names_tensor_expected_and_got(llama_tensors, tmp_path):
  directory, tensors = llama_tensors
  tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 32), np.float32)
  _write_checkpoint(tmp_path, directory, tensors)
  with pytest.raises(CheckpointError, match=r"k_proj\.weight.*expected \(16, 32\), got \(8, 32\)"):
    from_pretrained(str(tmp_path))


def test_unexpected_tensor_is_named(llama_tensors, tmp_path):
  directory, tensors = llama_tensors
  tensors["model.layers.0.self_attn.q_norm.weight"] = np.ones((8,), np.float32)
  _write_checkpoint(tmp_path, directory, tensors)
  with pytest.raises(CheckpointError, match=r"unexpected.*q_norm\.weight"):
    from_pretrained(str(tmp_path))


def test_unknown_architecture_is_named(llama_tensors, tmp_path):
  directory, tensors = llama_tensors
  _write_checkpoint(tmp_path, directory, tensors,
                    lambda c: c.update(model_type="gemma", architectures=["GemmaForCausalLM"]))
  with pytest.raises(UnsupportedModelError, match=r"unsupported architecture.*gemma"):
    from_pretrained(str(tmp_path))
  _write_checkpoint(tmp_path, directory, tensors, lambda c: c.update(model_type="no_such_model"))
  with pytest.raises(UnsupportedModelError, match=r"no_such_model"):
    from_pretrained(str(tmp_path))


def test_unsupported_rope_type_is_named(llama_tensors, tmp_path):
  directory, tensors = llama_tensors
  _write_checkpoint(tmp_path, directory, tensors, lambda c: c.update(rope_parameters={
      "rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
      "original_max_position_embeddings": 64}))
  with pytest.raises(UnsupportedModelError, match=r"rope type.*'yarn'"):
    from_pretrained(str(tmp_path))


def test_phi3_fused_tensors_split_and_fuse(hf_lm_dirs):
  """qkv_proj rows are q (N·H), k (K·H), v (K·H); gate_up_proj rows gate (F) then up (F)."""
  directory = hf_lm_dirs["phi3"][1]
  _, params = from_pretrained(str(directory))
  tensors = load_file(os.path.join(directory, "model.safetensors"))
  qkv = tensors["model.layers.1.self_attn.qkv_proj.weight"]
  attn = params["layers"]["attn"]
  np.testing.assert_array_equal(attn["q"]["kernel"][1], qkv[:32].T)
  np.testing.assert_array_equal(attn["k"]["kernel"][1], qkv[32:48].T)
  np.testing.assert_array_equal(attn["v"]["kernel"][1], qkv[48:].T)
  gate_up = tensors["model.layers.0.mlp.gate_up_proj.weight"]
  np.testing.assert_array_equal(params["layers"]["mlp"]["gate"]["kernel"][0], gate_up[:64].T)
  np.testing.assert_array_equal(params["layers"]["mlp"]["up"]["kernel"][0], gate_up[64:].T)


def test_unsupported_family_values_are_named():
  with pytest.raises(UnsupportedModelError, match=r"partial_rotary_factor=0.5"):
    ModelConfig.from_hf(hf_config("phi3", rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}))
  with pytest.raises(UnsupportedModelError, match=r"rope_parameters\['rope_type'\]='dynamic'"):
    ModelConfig.from_hf(hf_config("qwen3", rope_parameters={
        "rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}))
  moe = transformers.AutoConfig.for_model("qwen3_moe", vocab_size=128, hidden_size=32,
                                          num_hidden_layers=2, num_attention_heads=4)
  with pytest.raises(UnsupportedModelError, match=r"unsupported architecture.*'qwen3_moe'"):
    ModelConfig.from_hf(moe)
  with pytest.raises(UnsupportedModelError, match=r"use_bidirectional_attention=True"):
    ModelConfig.from_hf(hf_config("gemma2", use_bidirectional_attention=True))
  with pytest.raises(UnsupportedModelError, match=r"attn_logit_softcapping=50.0 for gemma3_text"):
    ModelConfig.from_hf(hf_config("gemma3_text", attn_logit_softcapping=50.0))
  local_linear = {"sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10.0},
                  "full_attention": {"rope_type": "default", "rope_theta": 10000.0}}
  with pytest.raises(UnsupportedModelError,
                     match=r"\['sliding_attention'\]\['rope_type'\]='linear'"):
    ModelConfig.from_hf(hf_config("gemma3_text", rope_parameters=local_linear))
  with pytest.raises(UnsupportedModelError, match=r"per-layer-type rope_parameters .*'qwen3'"):
    ModelConfig.from_hf({**hf_config("qwen3").to_dict(), "rope_parameters": local_linear})
  with pytest.raises(UnsupportedModelError, match=r"cannot be expressed as a transformers 'olmo2'"):
    dataclasses.replace(ModelConfig.from_hf(hf_config("olmo2")), qk_norm="head").to_hf()


def test_unsupported_field_values_are_named():
  with pytest.raises(UnsupportedModelError, match=r"activation hidden_act='tanh'"):
    ModelConfig.from_hf(hf_config("llama", hidden_act="tanh"))
  with pytest.raises(UnsupportedModelError, match=r"scale_attn_by_inverse_layer_idx"):
    ModelConfig.from_hf(hf_config("gpt2", scale_attn_by_inverse_layer_idx=True))
  with pytest.raises(UnsupportedModelError, match=r"remat_policy='sometimes'"):
    ModelConfig.from_hf(hf_config("llama"), remat_policy="sometimes")


MISTRAL_LISTING = [  # as in mistralai repos: consolidated weights beside the HF shards
    ".gitattributes", "README.md", "config.json", "generation_config.json", "params.json",
    "consolidated.safetensors", "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.model",
    "tokenizer.json", "pytorch_model.bin"]
MISTRAL_INDEX = {"metadata": {}, "weight_map": {
    "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
    "model.norm.weight": "model-00002-of-00002.safetensors",
    "lm_head.weight": "model-00002-of-00002.safetensors"}}


def test_checkpoint_files_fetch_only_the_indexed_shards():
  assert hf_io.checkpoint_files(MISTRAL_LISTING, MISTRAL_INDEX) == [
      "config.json", "generation_config.json", "model-00001-of-00002.safetensors",
      "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
  single = ["config.json", "model.safetensors", "consolidated.safetensors", "adapter.safetensors"]
  assert hf_io.checkpoint_files(single) == ["config.json", "model.safetensors"]
  with pytest.raises(CheckpointError, match="consolidated.safetensors"):  # names what it found
    hf_io.checkpoint_files(["config.json", "consolidated.safetensors", "pytorch_model.bin"])
  with pytest.raises(CheckpointError, match="model-00002-of-00002"):
    hf_io.checkpoint_files([f for f in MISTRAL_LISTING if "00002" not in f], MISTRAL_INDEX)


def test_hub_ids_download_only_the_checkpoint_files(monkeypatch, tmp_path, hf_lm_dirs):
  """resolve_checkpoint_dir lists the repo, reads the index, then fetches only its shards."""
  import huggingface_hub
  from huggingface_hub import constants

  index_path = tmp_path / "model.safetensors.index.json"
  index_path.write_text(json.dumps(MISTRAL_INDEX))
  calls = []

  class FakeApi:
    def list_repo_files(self, repo_id, revision=None):
      calls.append(("list", repo_id, revision))
      return list(MISTRAL_LISTING)

  def fake_hf_hub_download(repo_id, filename, revision=None):
    calls.append(("download", repo_id, filename))
    return str(index_path)

  def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
    calls.append(("snapshot", repo_id, tuple(allow_patterns)))
    return str(hf_lm_dirs["qwen2"][1])

  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
  monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
  monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_hub_download)
  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
  model, _ = from_pretrained("mistralai/tiny", revision="abc")
  assert model.config.model_type == "qwen2"
  assert calls == [
      ("list", "mistralai/tiny", "abc"),
      ("download", "mistralai/tiny", "model.safetensors.index.json"),
      ("snapshot", "mistralai/tiny",
       tuple(hf_io.checkpoint_files(MISTRAL_LISTING, MISTRAL_INDEX)))]
  assert "consolidated.safetensors" not in calls[-1][2]


def test_offline_hub_ids_use_the_cached_snapshot(monkeypatch, hf_lm_dirs):
  import huggingface_hub
  from huggingface_hub import constants

  calls = []

  def fake_snapshot_download(repo_id, revision=None, local_files_only=False):
    calls.append((repo_id, revision, local_files_only))
    return str(hf_lm_dirs["qwen2"][1])

  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
  assert hf_io.resolve_checkpoint_dir("someone/tiny-qwen2") == str(hf_lm_dirs["qwen2"][1])
  assert calls == [("someone/tiny-qwen2", None, True)]


def test_incomplete_tensor_map_is_a_clear_error(hf_lm_dirs):
  directory = str(hf_lm_dirs["llama"][1])
  config = ModelConfig.from_hf(transformers.AutoConfig.from_pretrained(directory))
  shapes = jax.eval_shape(CausalLM(config).init, jax.random.key(0))
  rules = [r for r in hf_io.tensor_map(config) if "post_attention_layernorm" not in r.hf_name]
  with pytest.raises(CheckpointError, match=r"no rule maps: \['layers.mlp_norm.scale'\]"):
    hf_io.params_from_hf_tensors(rules, hf_io.read_safetensors(directory), shapes,
                                 config.num_layers, base_prefix="model.")


def test_tensor_map_covers_every_param():
  """Every leaf of every family's params has exactly one HF name (checked inside the loader too)."""
  for family in FAMILIES:
    config = ModelConfig.from_hf(hf_config(family))
    shapes = jax.eval_shape(CausalLM(config).init, jax.random.key(0))
    paths = [p for rule in hf_io.tensor_map(config) for p in rule.ours]
    assert len(paths) == len(set(paths)) == len(jax.tree_util.tree_leaves(shapes)), family
