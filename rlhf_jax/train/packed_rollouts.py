"""Padding-free layouts of a rollout for the online trainers' scoring and update passes.

A rollout's S sequences are rows [left-padded prompt | right-padded response] of width
W = P + N (prompt-major: sequence i·G + g is sample g of prompt i). Its packed layout lays the
same tokens into rows of a fixed length L without padding, the G completions of one prompt
sharing one copy of it (`rlhf_jax.data.packing`: an item is Prefixed(prompt, completions), the
prompt's activations computed once per item):

    row:            [ p p p c c r r r | p p c c c r | pad ]
    sequence_ids:   [ . . . 4 4 5 5 5 | . . 0 0 0 1 |  .  ]   the rollout row, -1 (.) else
    response_slots: [ . . . 0 1 0 1 2 | . . 0 1 2 0 |  .  ]   t of the response token [0, N)

Only real tokens travel: a prompt's real (unpadded) tokens and each response's tokens up to
and including its stop (response_mask 1). Positions and predictions are those of the padded
rows, so every response token's log-prob (and value) equals the padded layout's up to float32
rounding. Per-token quantities move between the per-sequence view [S, N] (the padded layout's
response columns) and packed slots [R, L] with `PackedRows.pack` / `unpack`; per-sequence
reductions of packed slots are `ops.packed_sequence_sums`.

Items: a group's completions (in rollout order) stay in one item while prompt + completions
fit a row; a group too long for one row is split into several items, each repeating the prompt.
Every single sequence fits (L >= W by default).

Minibatches: the update draws the same shuffled minibatches of sequences as the padded layout
(`online.shuffled_minibatches`, a permutation of all S sequences per epoch), so both layouts
train on identical minibatches. Inside a minibatch, the sequences of one prompt form one item
(its prompt computed once for them); a group spread over several minibatches has its prompt
repeated in each. With one minibatch (GRPO's default) every group is whole. Each minibatch's
layout numbers its sequences 0..S/M - 1 in minibatch order, like the rows `jnp.take` picks.

Fixed shapes: the row length is L (default W, the rollout's width: one per prompt bucket and
max_new_tokens, as the padded rows), and the row count is a multiple of a step that is 1/8 of
the padded token count in rows of L (S·W / L / 8, rounded up to a multiple of the data-parallel
size, so rows shard over the mesh's data axes): at most 8 row counts up to the padded layout's
token count (more only in a pathological packing), so the update compiles once per budget. All
minibatch layouts of one update share the largest one's budget.

Shape letters: S sequences (rollout rows), W rollout width, P prompt width, N response width,
R packed rows, L row length, K minibatch updates (epochs x minibatches).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from rlhf_jax import ops, parallel
from rlhf_jax.data import packing
from rlhf_jax.models.transformer import predictor_slots

__all__ = ["PackedRows", "RolloutLayouts", "BUDGETS", "plan_rows_of", "budget_rows",
           "layout_rollout", "packed_scores", "packed_predictor_values"]

BUDGETS = 8  # row-count steps up to the padded layout's token count


@flax.struct.dataclass
class PackedRows:
  """One packed layout of S sequences: every field [R, L] (or [K, R, L] for K minibatches)."""

  source: jax.Array  # int32 s·W + w: the token at row s, slot w of the padded rows; 0 on padding
  segment_ids: jax.Array  # int32, 0 = padding (`data.packing`)
  branch_ids: jax.Array  # int32, 0 = prompt, k = the item's k-th completion
  sequence_ids: jax.Array  # int32: the sequence (row of the padded rows) of a response token
  response_slots: jax.Array  # int32: t of that response token, -1 elsewhere

  @property
  def loss_mask(self) -> jax.Array:
    """float32 [R, L]: 1 on response tokens."""
    return (self.sequence_ids >= 0).astype(jnp.float32)

  @property
  def attention_mask(self) -> jax.Array:
    """int32 [R, L]: 1 on every real slot (prompt or response), 0 on padding."""
    return (self.segment_ids > 0).astype(jnp.int32)

  def tokens(self, input_ids_SW: jax.Array) -> jax.Array:
    """int32 [R, L] token ids gathered from the padded rows (0 on padding)."""
    ids_RL = jnp.take(input_ids_SW.reshape(-1), self.source)
    return jnp.where(self.segment_ids > 0, ids_RL, 0).astype(jnp.int32)

  def pack(self, x_SN: jax.Array) -> jax.Array:
    """[R, L]: the per-sequence view's value at each response token, 0 elsewhere."""
    valid_RL = self.sequence_ids >= 0
    got_RL = x_SN[jnp.maximum(self.sequence_ids, 0), jnp.maximum(self.response_slots, 0)]
    return jnp.where(valid_RL, got_RL, jnp.zeros((), x_SN.dtype))

  def pack_sequences(self, x_S: jax.Array) -> jax.Array:
    """[R, L]: a per-sequence value broadcast over the sequence's response tokens, 0 elsewhere."""
    got_RL = jnp.take(x_S, jnp.maximum(self.sequence_ids, 0))
    return jnp.where(self.sequence_ids >= 0, got_RL, jnp.zeros((), x_S.dtype))

  def unpack(self, x_RL: jax.Array, num_sequences: int, width: int) -> jax.Array:
    """[S, N] per-sequence view of packed response values (0 where no token lies)."""
    valid_RL = self.sequence_ids >= 0
    rows = jnp.where(valid_RL, self.sequence_ids, num_sequences)  # out of range: dropped
    return jnp.zeros((num_sequences, width), x_RL.dtype).at[
        rows, jnp.maximum(self.response_slots, 0)].set(x_RL, mode="drop")

  def sequence_sums(self, x_RL: jax.Array, num_sequences: int, reduction: str = "sum"):
    """[S] per-sequence sums (or means) of packed response values."""
    return ops.packed_sequence_sums(x_RL, self.loss_mask, self.sequence_ids, num_sequences,
                                    reduction=reduction)


@flax.struct.dataclass
class RolloutLayouts:
  """full: the whole rollout (the scoring passes); minibatches: [K, R, L], minibatch k's."""

  full: PackedRows
  minibatches: PackedRows


def budget_rows(needed: int, step: int) -> int:
  """The smallest multiple of `step` >= needed (at least one step)."""
  return max(1, math.ceil(needed / step)) * step


def row_step(num_sequences: int, width: int, row_length: int, multiple: int = 1) -> int:
  """Rows per budget step: 1/BUDGETS of the padded token count in rows of row_length, rounded up
  to a multiple of `multiple` (the data-parallel size)."""
  rows = math.ceil(num_sequences * width / row_length / BUDGETS)
  return max(1, math.ceil(rows / multiple)) * multiple


def _items(prompt_mask_SP, response_mask_SN, prompt_index_S, sequences: Sequence[int],
           row_length: int):
  """(items, item-major sequence order): `sequences` (rollout rows) grouped by prompt in order
  of first appearance, each group cut into items that fit a row; tokens are flat source indices
  s·W + w into the padded rows."""
  p = prompt_mask_SP.shape[1]
  width = p + response_mask_SN.shape[1]
  groups: dict[int, list[int]] = {}
  for s in sequences:
    groups.setdefault(int(prompt_index_S[s]), []).append(int(s))
  items, order = [], []
  for members in groups.values():
    first = members[0]
    prompt = first * width + np.flatnonzero(prompt_mask_SP[first] > 0)
    if not len(prompt):
      raise ValueError(f"rollout row {first} has an empty prompt: nothing predicts its response")
    chunk: list[np.ndarray] = []
    chunk_rows: list[int] = []
    used = len(prompt)
    for s in members:
      completion = s * width + p + np.flatnonzero(response_mask_SN[s] > 0)
      if len(prompt) + len(completion) > row_length:
        raise ValueError(f"rollout row {s} ({len(prompt)} prompt + {len(completion)} response "
                         f"tokens) does not fit a packed row of {row_length} tokens")
      if chunk and used + len(completion) > row_length:
        items.append(packing.Prefixed(prompt, tuple(chunk)))
        order += chunk_rows
        chunk, chunk_rows, used = [], [], len(prompt)
      chunk.append(completion)
      chunk_rows.append(s)
      used += len(completion)
    items.append(packing.Prefixed(prompt, tuple(chunk)))
    order += chunk_rows
  return items, order


def plan_rows_of(prompt_mask_SP, response_mask_SN, prompt_index_S, sequences: Sequence[int],
                 row_length: int) -> int:
  """How many packed rows the sequences `sequences` need."""
  items, _ = _items(prompt_mask_SP, response_mask_SN, prompt_index_S, sequences, row_length)
  return packing.rows_for([packing.item_length(item) for item in items], row_length)


def _layout(prompt_mask_SP, response_mask_SN, prompt_index_S, sequences: Sequence[int],
            row_length: int, num_rows: int) -> dict:
  """NumPy fields of the PackedRows of `sequences`, numbered 0..len - 1 in the given order."""
  items, order = _items(prompt_mask_SP, response_mask_SN, prompt_index_S, sequences, row_length)
  out = packing.collate_prefixed(items, row_length, num_rows)
  local = {s: j for j, s in enumerate(sequences)}  # rollout row -> number in `sequences`
  # host: a list of Python ints (item-major order -> local numbers)
  numbers = np.asarray([local[s] for s in order] + [-1], np.int32)
  is_response = out["sequence_ids"] >= 0
  width = prompt_mask_SP.shape[1] + response_mask_SN.shape[1]
  source = out["input_ids"]
  # Sources index the whole rollout's rows; a minibatch's tokens come from its own rows.
  lookup_S = np.zeros(prompt_mask_SP.shape[0], np.int64)
  lookup_S[list(sequences)] = np.arange(len(sequences))
  local_source = np.where(out["segment_ids"] > 0,
                          lookup_S[source // width] * width + source % width, 0)
  return {
      "source": local_source.astype(np.int32), "segment_ids": out["segment_ids"],
      "branch_ids": out["branch_ids"],
      "sequence_ids": np.where(is_response, numbers[out["sequence_ids"]], -1).astype(np.int32),
      "response_slots": np.where(is_response, source % width - prompt_mask_SP.shape[1],
                                 -1).astype(np.int32)}


def _place(fields: dict, like: jax.Array, leading: int) -> PackedRows:
  """The fields as a PackedRows on the rollout's mesh (rows over its batch axes), or plain
  device arrays when the rollout is not on a named mesh."""
  sharding = getattr(like, "sharding", None)
  if isinstance(sharding, NamedSharding) and sharding.spec and sharding.spec[0] is not None:
    spec = PartitionSpec(*([None] * leading), sharding.spec[0], None)
    target = NamedSharding(sharding.mesh, spec)
    return PackedRows(**{k: parallel.put_rows(v, target) for k, v in fields.items()})
  return PackedRows(**{k: jnp.asarray(v) for k, v in fields.items()})


def _row_multiple(like: jax.Array) -> int:
  sharding = getattr(like, "sharding", None)
  if not isinstance(sharding, NamedSharding) or not sharding.spec or sharding.spec[0] is None:
    return 1
  axes = sharding.spec[0]
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(sharding.mesh.shape[a] for a in axes)


def layout_rollout(rollout, order_KS, row_length: int | None = None) -> RolloutLayouts:
  """The packed layouts of a rollout (host-side planning, then placed like its rows).

  order_KS: [K, S/M] the minibatches' rollout rows (`online.shuffled_minibatches`, K = epochs x
  minibatches). row_length: L, default the rollout's width W. Reads the rollout's masks on the
  host (every process plans the same layout from the same values).
  """
  prompt_mask_SP, response_mask_SN, prompt_index_S, order_KS = parallel.host_get(
      (rollout.attention_mask[:, :rollout.prompt_length], rollout.response_mask,
       rollout.prompt_index, order_KS))
  num_sequences, width = rollout.input_ids.shape
  length = width if row_length is None else int(row_length)
  multiple = _row_multiple(rollout.input_ids)
  args = (prompt_mask_SP, response_mask_SN, prompt_index_S)
  every = list(range(num_sequences))
  full_rows = budget_rows(plan_rows_of(*args, every, length),
                          row_step(num_sequences, width, length, multiple))
  full = _layout(*args, every, length, full_rows)
  batches = [[int(s) for s in rows] for rows in order_KS]
  needed = max(plan_rows_of(*args, rows, length) for rows in batches)
  batch_rows = budget_rows(needed, row_step(len(batches[0]), width, length, multiple))
  per_batch = [_layout(*args, rows, length, batch_rows) for rows in batches]
  stacked = {k: np.stack([b[k] for b in per_batch]) for k in per_batch[0]}
  return RolloutLayouts(full=_place(full, rollout.input_ids, 0),
                        minibatches=_place(stacked, rollout.input_ids, 1))


def packed_scores(model, params, rollout, layout: PackedRows, temperature: float,
                  chunk_size: int):
  """(token log-probs [R, L], entropies [R, L], hidden states [R, L, D]) of the packed rows at
  the sampling temperature, from one forward pass: `online.policy_scores` in packed slots
  (log-probs and entropies 0 outside `layout.loss_mask`)."""
  ids_RL = layout.tokens(rollout.input_ids)
  scores = model.score_tokens(params, ids_RL, layout.attention_mask,
                              temperature=temperature, chunk_size=chunk_size, entropy=True,
                              segment_ids=layout.segment_ids, branch_ids=layout.branch_ids,
                              score_mask=layout.loss_mask)  # response tokens only
  return scores.logps, scores.entropy, scores.hidden


def packed_predictor_values(values_RL: jax.Array, layout: PackedRows) -> jax.Array:
  """[R, L]: per-slot values (a value head on the hidden states) read at the slot that predicts
  each token (`predictor_slots`): V of the state each response token is chosen in."""
  slots_RL = predictor_slots(layout.segment_ids, layout.branch_ids)
  got_RL = jnp.take_along_axis(values_RL, jnp.maximum(slots_RL, 0), axis=1)
  return jnp.where(slots_RL >= 0, got_RL, 0.0)
