"""Padding-free rows with shared prefixes: several items per row, each item's prefix computed once.

An item is a prefix (a prompt) and its continuations (a pair's chosen and rejected completions, a
group's G completions, or one completion). Items are laid end to end in rows of a fixed length:

    row:         [ p p p c c r r r | p p c c c r | pad pad ]
    segment_ids: [ 1 1 1 1 1 1 1 1 | 2 2 2 2 2 2 |  0   0  ]   0 = padding
    branch_ids:  [ 0 0 0 1 1 2 2 2 | 0 0 1 1 1 2 |  0   0  ]   0 = prefix, k = continuation k
    sequence_ids:[ . . . 0 0 1 1 1 | . . 2 2 2 3 |  .   .  ]   continuation number, -1 (.) else

`CausalLM.apply(segment_ids=, branch_ids=)` turns that into attention (a continuation sees its
prefix and itself, never a sibling) and positions (each continuation's restart at the prefix's
end), so every continuation's token log-probs equal those of the row [prefix | continuation]
alone, while the prefix's activations are computed once. `sequence_ids` numbers the
continuations item-major (item i's continuation k is sum of the earlier items' counts + k - 1),
so a segment sum of token log-probs over it gives one sequence log-prob per continuation.

Shape letters: R rows, L row length, N continuations in the batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

__all__ = ["Prefixed", "item_length", "plan_rows", "collate_prefixed", "rows_for"]


@dataclasses.dataclass(frozen=True)
class Prefixed:
  """One item: int token ids of a shared prefix and of each continuation (at least one)."""

  prefix: np.ndarray
  continuations: tuple[np.ndarray, ...]


def item_length(item: Prefixed) -> int:
  return len(item.prefix) + sum(len(c) for c in item.continuations)


def plan_rows(lengths: Sequence[int], row_length: int) -> list[list[int]]:
  """First-fit decreasing: item indices per row (longest items first, ties by index), each row's
  total <= row_length. Deterministic in its input. Raises ValueError on an item that cannot fit."""
  order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
  rows: list[list[int]] = []
  room: list[int] = []
  for i in order:
    if lengths[i] > row_length:
      raise ValueError(f"an item of {lengths[i]} tokens does not fit a row of {row_length}")
    for r, free in enumerate(room):
      if lengths[i] <= free:
        rows[r].append(i)
        room[r] -= lengths[i]
        break
    else:
      rows.append([i])
      room.append(row_length - lengths[i])
  return [sorted(row) for row in rows]


def rows_for(lengths: Sequence[int], row_length: int) -> int:
  """How many rows `plan_rows` needs."""
  return len(plan_rows(lengths, row_length))


def collate_prefixed(items: Sequence[Prefixed], row_length: int, num_rows: int | None = None,
                     pad_id: int = 0, *, ends: bool = False) -> dict:
  """Packs items into [R, L] arrays (R = num_rows, or as many as the plan needs).

  Returns input_ids, attention_mask (1 on real tokens), segment_ids, branch_ids, loss_mask (1 on
  continuation tokens that a prefix or an earlier continuation token predicts) and
  sequence_ids [R, L] int32 (N = the total number of continuations). With ends=True also
  sequence_ends [N] int32: the flat slot (row · L + column) of each continuation's last token (of
  its prefix's last token when the continuation is empty), where a reward model reads its score.
  Raises ValueError when the items need more than num_rows rows.
  """
  plan = plan_rows([item_length(item) for item in items], row_length)
  rows = len(plan) if num_rows is None else num_rows
  if len(plan) > rows:
    raise ValueError(f"{len(items)} items need {len(plan)} rows of {row_length} tokens, "
                     f"more than the {rows} available")
  first_sequence = np.cumsum([0] + [len(item.continuations) for item in items])
  out = {name: np.zeros((rows, row_length), np.int32)
         for name in ("input_ids", "attention_mask", "segment_ids", "branch_ids", "loss_mask")}
  out["input_ids"][:] = pad_id
  out["sequence_ids"] = np.full((rows, row_length), -1, np.int32)
  ends_N = np.zeros(first_sequence[-1], np.int32)
  for r, members in enumerate(plan):
    at = 0
    for segment, i in enumerate(members, 1):
      item = items[i]
      parts = [(item.prefix, 0)] + [(c, k) for k, c in enumerate(item.continuations, 1)]
      start = at
      for tokens, branch in parts:
        span = slice(at, at + len(tokens))
        out["input_ids"][r, span] = tokens
        out["segment_ids"][r, span] = segment
        out["branch_ids"][r, span] = branch
        if branch:
          out["sequence_ids"][r, span] = first_sequence[i] + branch - 1
          out["loss_mask"][r, span] = 1
          if len(item.prefix) == 0 and len(tokens):  # nothing predicts the first token
            out["loss_mask"][r, at] = 0
          last = at + len(tokens) - 1 if len(tokens) else start + len(item.prefix) - 1
          ends_N[first_sequence[i] + branch - 1] = r * row_length + max(last, start)
        at += len(tokens)
      out["attention_mask"][r, start:at] = 1
  if ends:
    out["sequence_ends"] = ends_N
  return out
