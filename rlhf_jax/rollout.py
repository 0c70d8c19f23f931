"""Rollouts on top of sampling: sample responses, then score them.

Shared by PPO, GRPO, RLOO, best-of-N, rejection sampling, iterative DPO and the evaluation.

A rollout samples `num_samples` responses per prompt with the jitted KV-cache sampler (rows are
prompt-major: row i·G + g is sample g of prompt i) and lays each out as one training sequence
[left-padded prompt | right-padded response], so positions from the attention mask are right and
the response's token log-probs are `token_logps(...)[:, P:]`.

Scores come from a reward model (read at the last real token; `ModelScorer`) or from Python
reward functions (`FunctionScorer`: verifiable rewards, the embedded tasks' gold rewards), each
called with TRL's convention (`rlhf_jax.rewards.RewardFunction`):

    fn(prompts, completions, **columns) -> list[float | None]

`prompts` holds each row's prompt as the dataset gave it (a string, or a list of message dicts),
`completions` the decoded responses (strings; for conversational prompts, a list with one
assistant message each), and the keyword arguments every other column of the prompt's dataset
row, one value per completion, plus `completion_ids` (the sampled token ids, stop token included).
None means "does not apply to this row". Several functions are combined with weights; each is
logged on its own (`reward/<name>`).

Multi-process runs: the rollout is sharded over the batch axes; every process reads the whole
rollout (`parallel.host_get`), decodes and scores every row, and checks that all processes got the
same scores (a reward function must be a deterministic function of its arguments) before the
scores are placed back on the mesh like the rollout's rows.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Literal, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import parallel, sampling
from rlhf_jax.rewards.loading import RewardError, RewardFunction

__all__ = ["GenerationConfig", "RewardSpec", "Rollout", "make_sampler", "stop_ids",
           "completion_ids", "decode_responses", "group_rows", "take_rows", "ModelScorer",
           "FunctionScorer", "make_scorer", "gold_function"]


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  max_new_tokens: int = 32
  temperature: float = 1.0  # the trainer scores with the same temperature (one log-prob function)
  top_k: int = 0
  top_p: float = 1.0
  num_samples: int = 1  # responses per prompt (the group size G of GRPO / RLOO)

  def validate(self):
    if self.temperature <= 0:
      raise ValueError("RL needs a stochastic policy: generation.temperature must be > 0")
    if self.num_samples < 1 or self.max_new_tokens < 1:
      raise ValueError("generation.num_samples and generation.max_new_tokens must be >= 1")


@flax.struct.dataclass
class Rollout:
  input_ids: jax.Array  # [B, P + N] int32
  attention_mask: jax.Array  # [B, P + N] int32
  response_mask: jax.Array  # [B, N] float32: 1 on response tokens, up to and incl. the stop
  sampler_logps: jax.Array  # [B, N]: the sampler's log-probs of its tokens
  has_stop: jax.Array  # [B] bool: the response emitted a stop token
  prompt_index: jax.Array  # [B] int32: which prompt of the batch each row answers

  @property
  def prompt_length(self) -> int:
    return self.input_ids.shape[1] - self.response_mask.shape[1]

  def responses(self) -> jax.Array:
    return self.input_ids[:, self.prompt_length:]


def end_of_turn_id(tokenizer) -> int | None:
  """The special token the chat template closes an assistant turn with (Qwen's <|im_end|>,
  Llama 3's <|eot_id|>, Gemma's <end_of_turn>), found by rendering a probe conversation; None
  without a chat template or when the turn ends in plain text."""
  if not getattr(tokenizer, "chat_template", None):
    return None
  probe = "Zq7 probe reply"
  try:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}, {"role": "assistant", "content": probe}],
        tokenize=False)
  except Exception:  # noqa: BLE001 — a template that cannot render this is not ours to judge
    return None
  if probe not in text:
    return None
  special = set(tokenizer.all_special_ids) | {
      i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special}
  for token_id in tokenizer(text[text.rindex(probe) + len(probe):],
                            add_special_tokens=False)["input_ids"]:
    if token_id in special:
      return int(token_id)
    if tokenizer.decode([token_id]).strip():
      return None
  return None


def stop_ids(tokenizer, model) -> tuple[int, ...]:
  """Every id that ends a response: the tokenizer's EOS, the model config's EOS ids, and the
  chat template's end-of-turn token."""
  ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
  config_eos = getattr(model.config, "eos_token_id", None)
  # host: config values
  ids |= set(np.atleast_1d(config_eos).tolist()) if config_eos is not None else set()
  if (turn_end := end_of_turn_id(tokenizer)) is not None:
    ids.add(turn_end)
  if not ids:
    raise ValueError("neither the tokenizer nor the model config defines an EOS token: set "
                     "tokenizer.eos_token so generation can stop")
  return tuple(sorted(int(i) for i in ids))


def make_sampler(model, config: GenerationConfig, eos_ids, pad_id: int):
  """sample(params, prompt_ids [B, P], prompt_mask [B, P], key) -> Rollout with B·G rows."""
  stops = tuple(int(i) for i in np.atleast_1d(eos_ids).tolist())  # host: config values
  g = config.num_samples

  def sample(params, prompt_ids, prompt_mask, key):
    # Each prompt is prefilled once; its KV cache is copied to its G rows b·G + g.
    out = sampling.generate(model, params, prompt_ids, prompt_mask, key,
                            max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                            top_k=config.top_k, top_p=config.top_p, eos_token_id=stops,
                            num_samples=g)
    ids, mask = _repeat_rows(prompt_ids, prompt_mask, g)
    return _assemble(ids, mask, out, stops, g)

  return sample


@functools.partial(jax.jit, static_argnums=2)
def _repeat_rows(ids, mask, g):
  return jnp.repeat(ids, g, axis=0), jnp.repeat(mask, g, axis=0)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _assemble(ids, mask, out, stops, g):
  response_mask = out.mask.astype(jnp.float32)
  is_stop = jnp.isin(out.tokens, jnp.asarray(stops)) & (out.mask > 0)
  return Rollout(
      input_ids=jnp.concatenate([ids, out.tokens], axis=1),
      attention_mask=jnp.concatenate([mask, out.mask.astype(mask.dtype)], axis=1),
      response_mask=response_mask, sampler_logps=out.logps, has_stop=jnp.any(is_stop, axis=1),
      prompt_index=jnp.repeat(jnp.arange(ids.shape[0] // g, dtype=jnp.int32), g))


def completion_ids(rollout: Rollout) -> list[list[int]]:
  """Each row's sampled token ids (stop token included), read on every process."""
  tokens, mask = parallel.host_get((rollout.responses(), rollout.response_mask))
  # host: read through parallel.host_get just above
  return [row[keep > 0].tolist() for row, keep in zip(tokens, mask)]


def decode_responses(rollout: Rollout, tokenizer) -> list[str]:
  """Each row's response as text (special tokens dropped), read on every process."""
  return [tokenizer.decode(ids, skip_special_tokens=True) for ids in completion_ids(rollout)]


def group_rows(scores, group_size: int, *, best: bool = True) -> jax.Array:
  """[B] row indices of each group's best (or worst) of `group_size` consecutive scores.

  `scores` is [B·G], prompt-major as a rollout's rows; ties go to the first row of the group.
  Best-of-N, rejection sampling and iterative DPO's (best, worst) pairs all select with this.
  """
  grouped = jnp.reshape(jnp.asarray(scores), (-1, group_size))
  pick = jnp.argmax(grouped, axis=1) if best else jnp.argmin(grouped, axis=1)
  return jnp.arange(grouped.shape[0]) * group_size + pick


@jax.jit
def take_rows(tree, rows):
  """The rows `rows` of every array of a pytree (a Rollout, a dict of batches)."""
  return jax.tree.map(lambda x: jnp.take(x, rows, axis=0), tree)


# ----------------------------------------------------------------------------- scorers


@dataclasses.dataclass(frozen=True)
class RewardSpec:
  kind: Literal["model", "function"] = "model"
  path: str | None = None  # the reward model's directory or hub id (kind="model")
  # kind="function": "module:name", "path/to/file.py:name" or "module:factory(arg=value)";
  # "auto": the embedded task's gold reward, for synthetic:* data only.
  functions: tuple[str, ...] = ("auto",)
  weights: tuple[float, ...] = ()  # one per function; (): all 1
  # Evaluation only: the true reward, where one exists. "auto": the embedded task's, for
  # synthetic:* data (none otherwise); None: no gold reward.
  gold_function: str | None = "auto"
  missing_eos_penalty: float | None = None  # subtracted from responses that never stop

  def validate(self):
    from rlhf_jax.config import check_choices  # noqa: PLC0415
    check_choices(self, "reward.")
    if self.kind == "model" and not self.path:
      raise ValueError("reward.kind='model' needs reward.path (a reward-model checkpoint)")
    if self.kind == "function" and not self.functions:
      raise ValueError("reward.kind='function' needs reward.functions (e.g. "
                       "rlhf_jax.rewards:math_answer)")
    if self.weights and len(self.weights) != len(self.functions):
      raise ValueError(f"reward.weights has {len(self.weights)} values for "
                       f"{len(self.functions)} reward.functions; give one per function")
    if any(not math.isfinite(w) for w in self.weights):
      raise ValueError(f"reward.weights must be finite, got {self.weights}")

  def resolved(self, data_source: str, *, scorer: bool = True) -> "RewardSpec":
    """'auto' replaced by the embedded task's gold reward for its data (an error for other data
    when the reward functions are used: `scorer`), or None for the gold function."""
    from rlhf_jax.data import loading  # noqa: PLC0415 — only the names of the embedded tasks
    gold = loading.synthetic_gold_function(data_source)
    functions = self.functions
    if scorer and self.kind == "function" and "auto" in functions:
      if gold is None:
        raise ValueError(
            f"reward.functions='auto' is the embedded task's gold reward, which applies only to "
            f"synthetic:* data, but data.train is {data_source!r}: set reward.functions to your "
            "reward function(s), e.g. rlhf_jax.rewards:math_answer (see rlhf_jax.rewards)")
      functions = tuple(gold if f == "auto" else f for f in functions)
    gold_function = gold if self.gold_function == "auto" else self.gold_function
    return dataclasses.replace(self, functions=functions, gold_function=gold_function)


def _penalise(scores, rollout: Rollout, penalty):
  if penalty is None:
    return scores
  return jnp.where(rollout.has_stop, scores, scores - penalty)


class ModelScorer:
  """Scores with a reward model (head 0) at each sequence's last real token."""

  def __init__(self, rm, params, missing_eos_penalty=None):
    self.rm, self.params, self.penalty = rm, params, missing_eos_penalty
    self._score = jax.jit(lambda p, ids, mask: rm.apply(p, ids, mask)[:, 0])

  def __call__(self, rollout: Rollout, records: Sequence[Any] = ()) -> tuple[jax.Array, dict]:
    scores = _penalise(self._score(self.params, rollout.input_ids, rollout.attention_mask),
                       rollout, self.penalty)
    return scores, {}


class FunctionScorer:
  """Scores decoded responses with weighted reward functions on the host.

  `__call__(rollout, records)` takes the batch's prompt records (row i of the rollout answers
  `records[rollout.prompt_index[i]]`) and returns (scores [B·G] on the mesh like the rollout's
  rows, metrics): the weighted sum over the functions that apply to each row (0 where none does;
  `reward/unscored` counts them), and `reward/<name>`, each function's mean where it applies.
  """

  def __init__(self, functions: Sequence[RewardFunction], tokenizer, weights=(),
               missing_eos_penalty=None):
    self.functions, self.tokenizer = list(functions), tokenizer
    self.weights = np.asarray(weights or [1.0] * len(self.functions), np.float64)  # host: config
    self.penalty = missing_eos_penalty

  def values(self, rollout: Rollout, records: Sequence[Any]):
    """(per-function values [F, B·G] with NaN = not applicable, the per-row records, texts)."""
    ids = completion_ids(rollout)
    texts = [self.tokenizer.decode(row, skip_special_tokens=True) for row in ids]
    rows = [records[i] for i in parallel.host_get(rollout.prompt_index)]
    return np.stack([fn(rows, texts, ids) for fn in self.functions]), rows, texts

  def __call__(self, rollout: Rollout, records: Sequence[Any]) -> tuple[jax.Array, dict]:
    values, _, _ = self.values(rollout, records)
    applies = ~np.isnan(values)
    total = np.sum(np.where(applies, values, 0.0) * self.weights[:, None], axis=0)
    self._check_processes_agree(values)
    metrics = {}
    for fn, row_values, ok in zip(self.functions, values, applies):
      metrics[f"reward/{fn.name}"] = float(np.mean(row_values[ok])) if ok.any() else 0.0
    if not applies.any(axis=0).all():
      metrics["reward/unscored"] = float(np.mean(~applies.any(axis=0)))
    scores = parallel.put_rows(total.astype(np.float32), rollout.has_stop.sharding)
    return _penalise(scores, rollout, self.penalty), metrics


  def _check_processes_agree(self, values):
    """Every process scored every row: they must agree (a reward function must be a pure
    function of its arguments, or the processes would train on different rewards)."""
    if jax.process_count() == 1:
      return
    everyone = parallel.host_get_all_processes(np.nan_to_num(values, nan=np.inf))
    for process, theirs in enumerate(everyone):
      differs = np.argwhere(theirs != everyone[0])
      if differs.size:
        f, row = differs[0]
        raise RewardError(
            f"reward function {self.functions[f].name!r} gave rollout row {row} a different "
            f"value on process {process} ({theirs[f, row]}) than on process 0 "
            f"({everyone[0][f, row]}): a reward function must be a deterministic function of "
            "its arguments (seed any randomness from them)")


def _names(specs: Sequence[str]) -> list[str]:
  names = [spec.partition(":")[2].split("(")[0].strip() for spec in specs]
  return [f"{n}_{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def make_scorer(spec: RewardSpec, tokenizer, load_reward_model: Callable[[str], Any]):
  """The scorer a (resolved) RewardSpec describes."""
  spec.validate()
  if spec.kind == "function":
    functions = [RewardFunction.load(s, name) for s, name in zip(spec.functions,
                                                                  _names(spec.functions))]
    return FunctionScorer(functions, tokenizer, spec.weights, spec.missing_eos_penalty)
  rm, params = load_reward_model(spec.path)
  return ModelScorer(rm, params, spec.missing_eos_penalty)


def gold_function(spec: RewardSpec) -> RewardFunction | None:
  """The evaluation's gold reward of a resolved RewardSpec, or None."""
  if spec.gold_function in (None, "auto"):
    return None
  return RewardFunction.load(spec.gold_function, "gold")
