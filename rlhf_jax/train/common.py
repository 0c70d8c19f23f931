"""What every trainer sets up the same way: model and tokenizer, data, mesh, sharded state.

Config sections shared by the offline and online trainers live here too (`ModelSpec`, `DataSpec`);
each trainer module adds its own loss section and top-level config.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import data as data_lib
from rlhf_jax import errors, models, parallel
from rlhf_jax.errors import CheckpointError
from rlhf_jax.train.state import TrainState

__all__ = [
    "ModelSpec",
    "DataSpec",
    "resolve_model_path",
    "load_tokenizer",
    "check_vocabulary",
    "check_reward_vocabulary",
    "check_run",
    "warn_once_loaded",
    "flush_warnings",
    "discard_warnings",
    "load_policy",
    "load_trained_policy",
    "adapt_reward_model",
    "load_data",
    "load_reference",
    "load_reward_model",
    "make_stream",
    "batch_shards",
    "round_prompts",
    "Placement",
    "make_placement",
    "export_causal_lm",
    "write_generation_config",
    "OnlineSetup",
    "load_online",
]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  # A local Hugging Face directory, a hub id, or "synthetic:tiny[:seed]" (the embedded task's
  # tokenizer and a randomly initialised 0.56M-parameter Llama, written once to the cache).
  path: str = "synthetic:tiny"
  tokenizer: str | None = None  # None: the model's path
  reference_path: str | None = None  # the frozen reference; None: the initial policy
  dtype: Literal["float32", "bfloat16"] = "float32"  # parameter and compute dtype
  # Gradient checkpointing per block (see ModelConfig); None: the model's ("none").
  remat_policy: Literal["none", "full", "dots", "dots_no_batch"] | None = None
  # None: automatic (cuDNN flash attention on GPU when possible)
  attention_impl: Literal["xla", "cudnn"] | None = None
  logps_chunk_size: int = 512  # tokens per block of the chunked log-prob op
  # LoRA / QLoRA adapters on the trained model (rank 0: full fine-tuning); see models/lora.py.
  lora: models.LoraConfig = models.LoraConfig()

  def validate(self):
    from rlhf_jax.config import check_choices  # noqa: PLC0415 — config imports nothing of train
    check_choices(self, "model.")
    self.lora.validate()


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """Where the data is and how it is cut and batched. Preference pairs, KTO rows and rankings
  are packed by default (`layout`; its comment says which row shapes a step compiles for)."""

  train: str = "synthetic:pair"  # a file, a saved Dataset dir, a hub id, or synthetic:<kind>
  eval: str | None = None  # None: hold out eval_fraction of the training rows
  eval_fraction: float = 0.1
  split: str = "train"  # for hub datasets
  eval_split: str | None = None  # the split of `eval` (e.g. "test_prefs"); None: `split`
  num_rows: int | None = None  # synthetic sources: how many rows to generate
  max_length: int = 512
  buckets: tuple[int, ...] = ()  # batch lengths (one compilation each); () = max_length / 2^k
  max_prompt_length: int | None = None
  on_overflow: Literal["truncate", "skip", "error"] = "truncate"
  on_bad_row: Literal["raise", "skip"] = "raise"  # skipped rows are counted in the logs
  packing: bool = False  # SFT only: several examples per row (attention stays within each)
  subset: str | None = None  # a hub dataset's configuration, e.g. "main" for openai/gsm8k
  # RL prompts: the column holding the prompt when it is neither "prompt" nor "messages" (e.g.
  # GSM8K's "question"); with chat=true a string prompt is sent as a user turn through the chat
  # template, after a system turn holding system_prompt when set. Other columns (e.g. "answer")
  # reach the reward functions.
  prompt_column: str | None = None
  chat: bool = False
  system_prompt: str | None = None
  # Rows identical in every field to an earlier row are counted in the load summary; "drop"
  # also removes them (before the held-out split is drawn, and from the `eval` file those equal
  # to a training row), so no row is in both the training and the held-out rows.
  duplicates: Literal["keep", "drop"] = "keep"
  # Preference pairs (DPO family, reward models), KTO rows and rankings: "packed" lays each
  # example out as one item [prompt | chosen | rejected] (KTO: [prompt | completion | mismatched
  # completion]; ranked: [prompt | completion 1 | ... | K]), several per row, so each prompt is
  # computed once and rows carry no padding between items; "padded" gives each completion its
  # own right-padded row [prompt | completion | pad], as before. Packed batches have R rows of L
  # tokens from a small set of budgets (one compilation each): L is data.row_length, or (None)
  # one of K times each bucket (K = 2 completions per item, or a ranking's K) and 2K times
  # data.max_length (two of the longest items); R is 1, 2, 3, 4, 6, 8, 12, ... times the
  # data-parallel size (up to the batch size); each batch takes the budget with the fewest
  # slots that holds it (see rlhf_jax.data.batching). SFT and prompt data ignore both.
  layout: Literal["packed", "padded"] = "packed"
  row_length: int | None = None

  def validate(self):
    """Ranges, and buckets against max_length, before anything is loaded."""
    from rlhf_jax.config import check_choices, require  # noqa: PLC0415 — see ModelSpec
    check_choices(self, "data.")
    require(self.max_length >= 1, "data.max_length", "an integer >= 1", self.max_length)
    require(0 <= self.eval_fraction < 1, "data.eval_fraction",
            "a fraction in [0, 1) (0: no held-out evaluation)", self.eval_fraction)
    if self.buckets:
      ordered = all(a < b for a, b in zip(self.buckets, self.buckets[1:]))
      require(ordered and self.buckets[0] >= 1 and self.buckets[-1] == self.max_length,
              "data.buckets", f"increasing lengths ending at data.max_length={self.max_length} "
              "(rows are cut to max_length, and each batch is padded to the first bucket that "
              "holds its longest row)", self.buckets)
    require(self.row_length is None or self.row_length >= 1, "data.row_length",
            "None or an integer >= 1", self.row_length)
    require(self.max_prompt_length is None or 1 <= self.max_prompt_length <= self.max_length,
            "data.max_prompt_length", f"None or a length in [1, data.max_length="
            f"{self.max_length}]", self.max_prompt_length)

  def prompt_options(self) -> dict:
    return {"prompt_column": self.prompt_column, "chat": self.chat,
            "system_prompt": self.system_prompt}


def cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("RLHF_JAX_CACHE", "~/.cache/rlhf_jax")).expanduser()


def resolve_model_path(path: str) -> str:
  """A loadable directory or hub id; "synthetic:tiny[:seed]" (the review task) and
  "synthetic:arith[:seed]" (the arithmetic task) assets are generated on first use."""
  if not path.startswith("synthetic:"):
    local = path.startswith(("/", ".", "~")) or path.count("/") > 1  # a hub id is "org/name"
    if local and not pathlib.Path(path).expanduser().exists():
      raise CheckpointError("expected a model directory, got nothing at that path", where=path)
    return path
  parts = path.split(":")
  tasks = {"tiny": "review", "arith": "arith"}
  if parts[1] not in tasks:
    raise ValueError(f"unknown synthetic model {path!r}; use 'synthetic:tiny[:<seed>]' or "
                     "'synthetic:arith[:<seed>]'")
  seed = int(parts[2]) if len(parts) > 2 else 0
  from rlhf_jax import embedded
  name = f"synthetic-{parts[1]}-{seed}"
  return embedded.ensure_assets(cache_dir() / name, task=tasks[parts[1]], seed=seed)


def load_tokenizer(spec: ModelSpec):
  from transformers import AutoTokenizer
  path = resolve_model_path(spec.tokenizer or spec.path)
  try:
    tokenizer = AutoTokenizer.from_pretrained(path)
  except OSError as err:  # transformers' "not a local folder and not a valid model identifier"
    raise CheckpointError(f"expected a model directory or hub id with a tokenizer, got none "
                          f"({errors.one_line(err)})", where=str(path)) from err
  if tokenizer.pad_token_id is None:
    # Pad tokens are masked everywhere, so any id works; EOS is the usual choice.
    tokenizer.pad_token = tokenizer.eos_token
  for model_path in filter(None, (spec.path, spec.reference_path)):
    check_vocabulary(tokenizer, path, resolve_model_path(model_path))
  return tokenizer


def check_vocabulary(tokenizer, tokenizer_path: str, model_path: str, *,
                     reward_key: str | None = None):
  """Every token id of the tokenizer must index a row of the model's embedding: checked from
  the model's config.json, before any weight is read (a larger embedding, padded to a multiple
  of 64 or 128 as many are, is fine). A hub id's config.json is fetched alone (the weights
  would be next); when it cannot be, the check is left to loading. `reward_key`: the model is
  the reward model that config key names, which scores the policy's token ids."""
  import json
  config_file = pathlib.Path(model_path).expanduser() / "config.json"
  where = str(config_file)  # for a hub id: "org/name/config.json", not the cache's path
  if reward_key is not None:
    where += f" ({reward_key})"
  if not config_file.is_file():
    if pathlib.Path(model_path).expanduser().exists() or model_path.count("/") != 1:
      return  # a directory without a config: loading reports it
    try:
      from huggingface_hub import hf_hub_download  # noqa: PLC0415
      config_file = pathlib.Path(hf_hub_download(model_path, "config.json"))
    except Exception:  # noqa: BLE001 — offline, gated, no such repo: loading says which
      return
  hf_config = json.loads(config_file.read_text())
  vocab_size = hf_config.get("vocab_size") or (hf_config.get("text_config") or {}).get(
      "vocab_size")
  if not isinstance(vocab_size, int):
    return
  largest = max(tokenizer.get_vocab().values())
  if largest >= vocab_size and reward_key is not None:
    raise CheckpointError(
        f"expected a vocab_size above every token id of the policy's tokenizer at "
        f"{tokenizer_path} (its largest is {largest}: {len(tokenizer)} tokens), got "
        f"vocab_size={vocab_size} (the reward model scores the policy's token ids: set "
        f"{reward_key} to a reward model trained with the policy's tokenizer)", where=where)
  if largest >= vocab_size:
    raise CheckpointError(
        f"expected a vocab_size above every token id of the tokenizer at {tokenizer_path} (its "
        f"largest is {largest}: {len(tokenizer)} tokens), got vocab_size={vocab_size} (set "
        "model.tokenizer to the model's own tokenizer, or resize the model's embedding)",
        where=where)


def check_reward_vocabulary(reward, tokenizer, spec: ModelSpec):
  """`check_vocabulary` of the reward model a RewardSpec names (kind="model": reward.path)
  against the policy's tokenizer, before any weight is read; nothing for reward functions."""
  if getattr(reward, "kind", None) != "model" or not reward.path:
    return
  check_vocabulary(tokenizer, resolve_model_path(spec.tokenizer or spec.path),
                   resolve_model_path(reward.path), reward_key="reward.path")


def check_run(run, num_devices: int | None = None, *, batch_size: int | None = None,
              key: str = "run.batch_size"):
  """Run settings that depend on the devices, checked before any file or weight is read: the
  global batch (`run.batch_size`, or the `batch_size` that `key` names) splits evenly over the
  mesh's batch axes (data x fsdp)."""
  from rlhf_jax.config import ConfigError, require  # noqa: PLC0415 — as in DataSpec.validate
  num_devices = jax.device_count() if num_devices is None else num_devices
  mesh = run.mesh
  try:
    data, fsdp, _ = parallel.mesh_shape(mesh, num_devices)
  except ValueError as err:
    raise ConfigError(str(err), where="run.mesh") from err
  batch_size = run.batch_size if batch_size is None else batch_size
  require(batch_size % (data * fsdp) == 0, key,
          f"a multiple of the mesh's data x fsdp = {data} x {fsdp} = {data * fsdp} (the batch "
          f"is split over them; run.mesh: data={mesh.data}, fsdp={mesh.fsdp}, "
          f"tensor={mesh.tensor} on {num_devices} devices)", batch_size)


# Warnings held until a model's weights have loaded (`warn_once_loaded`).
_PENDING_WARNINGS: list[str] = []


def warn_once_loaded(message: str):
  """Logs `message` as a warning once the first model's weights have loaded (`load_policy`,
  `load_reward_model`): after every check that runs before loading (config, devices, tokenizer
  and vocabulary, data) and the loading itself have passed. A run that fails before then
  prints its one error line alone, not a warning and an error (the CLI's toy-settings
  warning). `flush_warnings()` logs what is still held; `discard_warnings()` drops it."""
  _PENDING_WARNINGS.append(message)


def flush_warnings():
  while _PENDING_WARNINGS:
    logging.getLogger(__name__).warning("%s", _PENDING_WARNINGS.pop(0))


def discard_warnings():
  _PENDING_WARNINGS.clear()


def load_policy(spec: ModelSpec, path: str | None = None, *, mesh=None):
  """(CausalLM, params) with the spec's dtype and speed switches; with `mesh` (a MeshConfig),
  streamed straight into the shards the partition rules give them there (or a Mesh)."""
  model, params = _load_policy(spec, path, mesh=mesh)
  flush_warnings()
  return model, params


def _load_policy(spec: ModelSpec, path: str | None = None, *, mesh=None):
  overrides = {}
  if spec.remat_policy is not None:
    overrides["remat_policy"] = spec.remat_policy
  if spec.attention_impl is not None:
    overrides["attention_impl"] = spec.attention_impl
  dtype = jnp.dtype(spec.dtype)
  return models.from_pretrained(resolve_model_path(path or spec.path), dtype=dtype,
                                mesh=_as_mesh(mesh), **overrides)


def load_trained_policy(spec: ModelSpec, seed: int, *, mesh=None):
  """The policy a trainer optimises: `load_policy`, then LoRA adapters (and the quantised base)
  when `spec.lora.rank` > 0 — params `lora.Adapted(base, adapters)`."""
  spec.lora.validate()
  model, params = load_policy(spec, mesh=mesh)
  if not spec.lora.enabled:
    return model, params
  return models.lora.adapt(model, params, spec.lora, _adapter_key(seed))


def _adapter_key(seed: int) -> jax.Array:
  return jax.random.fold_in(jax.random.key(seed), 0x10AA)


def adapt_reward_model(spec: ModelSpec, rm, params, seed: int):
  """A reward model to train with LoRA: adapters on its backbone, the score head trained in full
  (PEFT's modules_to_save)."""
  spec.lora.validate()
  if not spec.lora.enabled:
    return rm, params
  backbone, adapted = models.lora.adapt(rm.backbone, params["backbone"], spec.lora,
                                        _adapter_key(seed))
  return dataclasses.replace(rm, lora=backbone.lora), {**params, "backbone": adapted}


def _as_mesh(mesh):
  """A jax Mesh from a MeshConfig (or a Mesh as it is; None stays None)."""
  return mesh if mesh is None or isinstance(mesh, jax.sharding.Mesh) else parallel.make_mesh(mesh)


def is_sequence_classifier(path: str) -> bool:
  config_file = pathlib.Path(path) / "config.json"
  if not config_file.exists():
    return False
  import json
  architectures = json.loads(config_file.read_text()).get("architectures") or []
  return any(a.endswith("ForSequenceClassification") for a in architectures)


def load_reward_model(path: str, spec: ModelSpec, num_heads: int = 1, seed: int = 0, *,
                      mesh=None):
  """(RewardModel, params): a *ForSequenceClassification checkpoint as it is, or a causal LM with
  a freshly initialised score head; with `mesh` (a MeshConfig) streamed onto it."""
  path = resolve_model_path(path)
  if is_sequence_classifier(path):
    rm, params = models.from_pretrained_reward_model(
        path, dtype=jnp.dtype(spec.dtype), mesh=_as_mesh(mesh))
    if rm.num_labels != num_heads:
      raise ValueError(f"{path} has {rm.num_labels} reward heads, expected {num_heads}")
    flush_warnings()
    return rm, params
  model, params = load_policy(spec, path, mesh=mesh)
  return models.RewardModel.from_causal_lm(model, params, jax.random.key(seed),
                                           num_labels=num_heads)


def load_data(kind: str, spec: DataSpec, tokenizer, seed: int):
  """(train_records, eval_records, stats): tokenised, with a seeded hold-out when no eval set."""
  spec.validate()  # before anything is read
  config = data_lib.TokenizeConfig(spec.max_length, spec.max_prompt_length, spec.on_overflow)
  options = spec.prompt_options() if kind == "prompt" else None
  records, stats = data_lib.prepare(kind, spec.train, tokenizer, config,
                                    on_bad_row=spec.on_bad_row, split=spec.split,
                                    num_rows=spec.num_rows, subset=spec.subset, options=options,
                                    duplicates=spec.duplicates)
  if spec.eval is not None:
    eval_split = spec.split if spec.eval_split is None else spec.eval_split
    eval_records, _ = data_lib.prepare(kind, spec.eval, tokenizer, config,
                                       on_bad_row=spec.on_bad_row, split=eval_split,
                                       num_rows=spec.num_rows, subset=spec.subset,
                                       options=options, duplicates=spec.duplicates,
                                       exclude=stats.row_keys)
    return records, eval_records, stats
  num_eval = int(round(len(records) * spec.eval_fraction))
  if num_eval == 0:
    return records, [], stats
  order = np.random.default_rng([seed, 7]).permutation(len(records))
  held = set(order[:num_eval].tolist())  # host: a NumPy permutation
  return ([r for i, r in enumerate(records) if i not in held],
          [r for i, r in enumerate(records) if i in held], stats)


def load_reference(spec: ModelSpec, policy_params, placement: "Placement"):
  """The frozen reference's params on the mesh: `spec.reference_path`, else the initial policy.

  A separate copy for full fine-tuning: the policy's buffers are donated to every step, and a
  reference that aliased them would be invalidated by the first update. The copy is made on the
  devices, shard by shard (a jitted copy's outputs are new buffers), never through the host.
  """
  if spec.reference_path:
    return placement.params(load_policy(spec, spec.reference_path, mesh=placement.mesh)[1])
  if isinstance(policy_params, models.lora.Adapted):
    # LoRA: the base with adapters off, sharing the policy's frozen base buffers (the steps never
    # donate those; see state.donating_step) — no second copy of the weights.
    return models.lora.Adapted(placement.params(policy_params.base), None)
  return _copy(placement.params(policy_params))


_copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))


def make_stream(records, spec: DataSpec, batch_size: int, pad_id: int, seed: int = 0, *,
                shuffle: bool = True, row_multiple: int = 1) -> data_lib.BatchStream:
  """Batches of `records` as `spec` lays them out; packed rows come in multiples of
  `row_multiple` (`batch_shards(run)`: every leading dim of a batch splits over the mesh)."""
  return data_lib.BatchStream(records, batch_size, spec.max_length, pad_id, seed, shuffle=shuffle,
                              buckets=spec.buckets or None, layout=spec.layout,
                              row_lengths=(spec.row_length,) if spec.row_length else None,
                              row_multiple=row_multiple)


def batch_shards(run) -> int:
  """How many ways a batch's leading dim is split: the mesh's data x fsdp."""
  data, fsdp, _ = parallel.mesh_shape(run.mesh, jax.device_count())
  return data * fsdp


def round_prompts(spec: DataSpec, tokenizer, prompts_per_round: int, seed: int):
  """Prompts for round-based trainers (sample, label or rerank, train): one padded length.

  Every round's prompts share the largest bucket so that the sampler compiles once. Returns
  (records, prompt_length, stream of `prompts_per_round` prompts per batch).
  """
  records, _, _ = load_data("prompt", spec, tokenizer, seed)
  length = max(spec.buckets or (spec.max_length,))
  one_bucket = dataclasses.replace(spec, buckets=(length,))
  return records, length, make_stream(records, one_bucket, prompts_per_round,
                                      tokenizer.pad_token_id, seed)


@dataclasses.dataclass
class Placement:
  """Where arrays live: the mesh, and how params, states and batches are put on it."""
  mesh: Any
  param_specs: Callable[[Any], Any]

  def params(self, params):
    specs = self.param_specs(params)
    return jax.device_put(params, jax.tree.map(
        lambda s: jax.sharding.NamedSharding(self.mesh, s), specs,
        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))

  def state(self, make_state: Callable[..., TrainState], params, *args):
    """Builds a train state from (sharded) params with every leaf placed by the partition rules."""
    params = self.params(params)
    # LoRA: the frozen bases stay out of the jitted build (its outputs would be new buffers) and
    # go into the state as placed, the very buffers `load_reference` shares.
    params, bases = models.lora.detach_bases(params)
    shapes = jax.eval_shape(make_state, params, *args)
    shardings = parallel.state_shardings(shapes, params, self.param_specs(params), self.mesh)
    if bases:  # the optimiser state is shaped like the adapters
      trainable = models.lora.trainable(params)
      shardings = shardings.replace(opt_state=parallel.state_shardings(
          shapes.opt_state, trainable, self.param_specs(trainable), self.mesh))
    state = jax.jit(make_state, out_shardings=shardings)(params, *args)
    return models.lora.attach_bases(state, bases)

  def batch(self, batch: dict) -> dict:
    return parallel.shard_batch(batch, self.mesh)

  def prompt_batch(self, batch: dict) -> dict:
    """A prompt batch on the mesh; its "index" (which records the rows are) stays on the host,
    the same on every process, for the reward functions that read the records."""
    placed = self.batch({k: v for k, v in batch.items() if k != "index"})
    return {**placed, "index": batch["index"]}


def make_placement(mesh_config: parallel.MeshConfig, model_config) -> Placement:
  from rlhf_jax.models.partitioning import param_partition_specs
  mesh = parallel.make_mesh(mesh_config)
  return Placement(mesh, lambda params: param_partition_specs(params, model_config, mesh=mesh))


def export_causal_lm(model, tokenizer, params_of=lambda state: state.params):
  """An export hook: the policy as a Hugging Face checkpoint, with its tokenizer.

  Streams: every process joins the gather of one tensor at a time and process 0 writes it, so
  the whole model is never in host memory. A LoRA policy is written merged (W + (alpha/r)·A·B);
  with adapters=True, as PEFT adapters (adapter_config.json + adapter_model.safetensors) on the
  base it was trained from instead.
  """
  def export(state, out_dir, adapters: bool = False):
    params = params_of(state)
    if adapters:
      models.lora.save_peft(model, params, out_dir,
                            base_model_name_or_path=getattr(tokenizer, "name_or_path", None))
    else:
      models.save_pretrained(model, params, out_dir)
    if parallel.is_main_process():
      tokenizer.save_pretrained(out_dir)
      if not adapters:
        write_generation_config(model, tokenizer, out_dir)
  export.lora = model.lora  # what `export --adapters` checks
  return export


def write_generation_config(model, tokenizer, out_dir) -> None:
  """generation_config.json with every id our sampler stops at (EOS, the model config's EOS
  ids, the chat template's end-of-turn), so transformers' `generate` stops where ours does; the
  source checkpoint's other generation settings are kept."""
  import transformers  # noqa: PLC0415
  from rlhf_jax import rollout  # noqa: PLC0415 — rollout imports train-free layers only
  source = pathlib.Path(getattr(tokenizer, "name_or_path", "") or ".") / "generation_config.json"
  config = (transformers.GenerationConfig.from_pretrained(str(source.parent)) if source.is_file()
            else transformers.GenerationConfig())
  config.eos_token_id = list(rollout.stop_ids(tokenizer, model))
  config.pad_token_id = tokenizer.pad_token_id
  if tokenizer.bos_token_id is not None:
    config.bos_token_id = tokenizer.bos_token_id
  config.save_pretrained(str(out_dir))


@dataclasses.dataclass
class OnlineSetup:
  """What the prompt-stream online trainers (PPO, GRPO, RLOO) load the same way."""
  tokenizer: Any
  model: Any
  params: Any  # the initial policy's
  records: list  # training prompts
  eval_records: list
  stream: data_lib.BatchStream
  placement: Placement
  ref_params: Any  # the frozen reference, on the mesh
  load_reward_model: Callable[[str], Any]


def load_online(config) -> OnlineSetup:
  """Tokenizer, policy, prompt data (and the held-out prompts), its batch stream, the mesh and
  the reference, from an online config's model, data and run sections."""
  run, spec = config.run, config.model
  check_run(run)
  tokenizer = load_tokenizer(spec)
  check_reward_vocabulary(getattr(config, "reward", None), tokenizer, spec)
  records, eval_records, _ = load_data("prompt", config.data, tokenizer, run.seed)
  model, params = load_trained_policy(spec, run.seed, mesh=run.mesh)
  stream = make_stream(records, config.data, run.batch_size, tokenizer.pad_token_id, run.seed)
  placement = make_placement(run.mesh, model.config)
  return OnlineSetup(tokenizer, model, params, records, eval_records, stream, placement,
                     load_reference(spec, params, placement),
                     lambda path: load_reward_model(path, spec, mesh=run.mesh))
