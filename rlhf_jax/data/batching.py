"""Tokenised records -> fixed-shape numpy batches, in a seeded order that resumes exactly.

Training batches are right-padded: [prompt | completion | pad]; generation prompts (RL) are
left-padded: [pad | prompt]. The sequence length of a batch is
the smallest bucket that holds its longest row, so a jitted step compiles once per bucket, not once
per length. `loss_mask` marks completion tokens (the tokens whose log-probs count); prompt and
padding never reach a loss.

Batch i of a stream is a pure function of (seed, i): epoch e = i // batches_per_epoch reads the
permutation drawn from (seed, e). Resuming at step i therefore needs only i — no iterator state.
Every batch carries `weight` [B] (1 for a real example, 0 for the filler that completes the last
evaluation batch), so evaluation covers every example without a ragged shape, and `index` [B],
the records it holds (precomputed reference log-probs are looked up by it).

Pairwise batches put the B chosen rows first and the B rejected rows after them ([2B, L]): the
policy and the reference each score both in one forward pass.

Packed layout (`layout="packed"`, for pairs, KTO's unpaired rows and ranked rows): each example
is one item [prompt | chosen | rejected] (KTO: [prompt | completion | mismatched completion];
ranked: [prompt | completion 1 | ... | completion K], missing ones empty) of
`rlhf_jax.data.packing`, several items per row, so the prompt is computed once and no slot is
spent on padding between them. `sequence_ids` number the continuations in block order (first
continuations 0..B-1, second ones B..2B-1, ...), the order of the padded layout's pair rows,
and `sequence_ends` [K·B] gives each one's last slot. A batch's shape (R rows of L tokens) is
one of a small set of budgets, so a step compiles once per budget: L is one of `row_lengths`
(default: K = 2 (pairs, KTO) or num_completions (ranked) times each bucket, the longest item a
bucket's rows make, and 2K x max_length, two of the longest items), R one of the row counts
`row_counts(batch_size, row_multiple)` (1, 2, 3, 4, 6, 8, 12, ... times `row_multiple`, the
data-parallel size, up to the batch size rounded up to it); of the budgets that hold the batch
(first-fit decreasing), the one with the fewest slots R·L, then the shortest rows.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import numpy as np

from rlhf_jax.data.packing import Prefixed, collate_prefixed, item_length, plan_rows
from rlhf_jax.data.tokenize import (TokenizedPair, TokenizedPrompt, TokenizedRanked,
                                    TokenizedSFT, TokenizedUnpaired)
from rlhf_jax.errors import UserError

__all__ = [
    "default_buckets",
    "bucket_length",
    "record_length",
    "collate_sft",
    "collate_pairs",
    "mismatched_pairs",
    "collate_unpaired",
    "collate_ranked",
    "LAYOUTS",
    "row_counts",
    "prefixed_items",
    "collate_prefixed_blocks",
    "collate_prompts",
    "PackedSFT",
    "pack_sft",
    "collate_packed",
    "COLLATORS",
    "BatchStream",
]


def default_buckets(max_length: int, num_buckets: int = 4) -> tuple[int, ...]:
  """max_length / 2^k for k < num_buckets, rounded up to multiples of 8 (and at least 8)."""
  sizes = {min(max(8, -(-max_length // 2**k // 8) * 8), max_length) for k in range(num_buckets)}
  return tuple(sorted(sizes | {max_length}))


def bucket_length(length: int, buckets: Sequence[int]) -> int:
  for bucket in buckets:
    if length <= bucket:
      return bucket
  raise ValueError(f"a row of {length} tokens exceeds the largest bucket {buckets[-1]}")


def record_length(record) -> int:
  """Longest prompt+completion sequence a record puts in a batch."""
  if isinstance(record, TokenizedSFT):
    return len(record.prompt) + len(record.completion)
  if isinstance(record, TokenizedPair):
    return len(record.prompt) + max(len(record.chosen), len(record.rejected))
  if isinstance(record, TokenizedUnpaired):
    return len(record.prompt) + len(record.completion)
  if isinstance(record, TokenizedRanked):
    return len(record.prompt) + max(len(c) for c in record.completions)
  if isinstance(record, TokenizedPrompt):
    return len(record.prompt)
  if isinstance(record, PackedSFT):
    return len(record.input_ids)
  raise TypeError(type(record).__name__)


def _rows(pairs, length: int, pad_id: int):
  """(prompt, completion) id pairs -> right-padded input_ids, attention_mask, loss_mask [N, L]."""
  n = len(pairs)
  input_ids = np.full((n, length), pad_id, np.int32)
  attention_mask = np.zeros((n, length), np.int32)
  loss_mask = np.zeros((n, length), np.int32)
  for i, (prompt, completion) in enumerate(pairs):
    p, c = len(prompt), len(completion)
    if p + c > length:
      raise ValueError(f"row of {p + c} tokens does not fit length {length}")
    input_ids[i, :p] = prompt
    input_ids[i, p:p + c] = completion
    attention_mask[i, :p + c] = 1
    loss_mask[i, p:p + c] = 1
  loss_mask[:, 0] = 0  # position 0 is never predicted
  return input_ids, attention_mask, loss_mask


def collate_sft(records, length: int, pad_id: int = 0) -> dict:
  ids, attn, loss = _rows([(r.prompt, r.completion) for r in records], length, pad_id)
  return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


def _example_arrays(records, num_completions: int | None = None) -> dict:
  """The per-example arrays a batch carries beside its rows, in either layout: a pair's margin
  and objective [B]; a KTO row's label [B]; a ranking's ranks and rank_mask [B, K] (K =
  num_completions, else the batch's most; slots past a row's completions masked)."""
  if isinstance(records[0], TokenizedRanked):
    k = num_completions or max(len(r.completions) for r in records)
    ranks, rank_mask = np.zeros((len(records), k), np.int32), np.zeros((len(records), k), np.int32)
    for i, record in enumerate(records):
      ranks[i, :len(record.ranks)] = record.ranks
      rank_mask[i, :len(record.completions)] = 1
    return {"ranks": ranks, "rank_mask": rank_mask}
  if isinstance(records[0], TokenizedPair):
    return {"margin": np.array([r.margin for r in records], np.float32),
            "objective": np.array([r.objective for r in records], np.int32)}
  return {"label": np.array([r.label for r in records], np.float32)}


def collate_pairs(records, length: int, pad_id: int = 0) -> dict:
  pairs = [(r.prompt, r.chosen) for r in records] + [(r.prompt, r.rejected) for r in records]
  ids, attn, loss = _rows(pairs, length, pad_id)
  return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss, **_example_arrays(records)}


def mismatched_pairs(records, max_length: int) -> list[tuple]:
  """KTO's KL rows: prompt i with the completion of row (i + 1) mod B, under the matched rows'
  truncation rule (the completion is cut to `max_length - len(prompt)`), so they fit the same
  buckets and never exceed max_length."""
  n = len(records)
  pairs = []
  for i, record in enumerate(records):
    budget = max_length - len(record.prompt)
    pairs.append((record.prompt, records[(i + 1) % n].completion[:budget]))
  return pairs


def collate_unpaired(records, length: int, pad_id: int = 0, max_length: int | None = None) -> dict:
  """KTO batches, plus the mismatched rows for the KL reference point.

  Row i of the `kl_*` arrays pairs prompt i with the completion of row (i + 1) mod B, so every
  completion appears once with a prompt it was not written for, for any B >= 2 (odd B included).
  A mismatched completion is cut to `max_length - len(prompt)` (default: `length`), as
  tokenisation cuts the matched ones; both sets of rows have shape [B, length], and `length` must
  hold the mismatched rows too (`BatchStream` picks the bucket that holds both).
  """
  ids, attn, loss = _rows([(r.prompt, r.completion) for r in records], length, pad_id)
  kl_ids, kl_attn, kl_loss = _rows(mismatched_pairs(records, max_length or length), length, pad_id)
  return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss, **_example_arrays(records),
          "kl_input_ids": kl_ids, "kl_attention_mask": kl_attn, "kl_loss_mask": kl_loss}


def collate_ranked(records, length: int, pad_id: int = 0, num_completions: int | None = None):
  """K-wise batches: [B·K, L] rows (example-major), ranks [B, K] and rank_mask [B, K].

  K is `num_completions` (`BatchStream` passes the dataset's largest count, so every batch has
  one shape); rows with fewer completions are padded with masked slots. None: this batch's largest.
  """
  k = num_completions or max(len(r.completions) for r in records)
  pairs = []
  for record in records:
    if len(record.completions) > k:
      raise ValueError(f"a row has {len(record.completions)} completions, more than K={k}")
    # Empty slots repeat the first completion (a valid sequence) and are masked out.
    pairs += [(record.prompt, record.completions[j if j < len(record.completions) else 0])
              for j in range(k)]
  ids, attn, loss = _rows(pairs, length, pad_id)
  return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss,
          **_example_arrays(records, k)}


LAYOUTS = ("packed", "padded")


def row_counts(batch_size: int, multiple: int = 1) -> tuple[int, ...]:
  """The row counts a packed batch of `batch_size` items may have: c · multiple for c in 1, 2, 3,
  4, 6, 8, 12, ... (steps of at most 1.5x), up to batch_size rounded up to a multiple (one item
  per row is the most a batch needs)."""
  cap = -(-batch_size // multiple)
  counts = {c for j in range(cap.bit_length() + 1) for c in (2**j, 3 * 2**j) if c < cap}
  return tuple(c * multiple for c in sorted(counts | {cap}))


def prefixed_items(records, max_length: int | None = None,
                   num_completions: int | None = None) -> list[Prefixed]:
  """The packed layout's items: a pair's prompt with (chosen, rejected); a KTO row's prompt with
  (its completion, the mismatched completion of `mismatched_pairs`, cut to `max_length`); a
  ranked row's prompt with its completions, then empty ones up to `num_completions` (K; masked
  by rank_mask, as the padded layout's repeated slots are)."""
  if isinstance(records[0], TokenizedRanked):
    k = num_completions or max(len(r.completions) for r in records)
    empty = np.zeros(0, np.int32)
    return [Prefixed(r.prompt, tuple(r.completions) + (empty,) * (k - len(r.completions)))
            for r in records]
  if isinstance(records[0], TokenizedPair):
    return [Prefixed(r.prompt, (r.chosen, r.rejected)) for r in records]
  if isinstance(records[0], TokenizedUnpaired):
    if max_length is None:
      raise ValueError("KTO items need max_length (the mismatched completions' cut)")
    mismatched = mismatched_pairs(records, max_length)
    return [Prefixed(r.prompt, (r.completion, m)) for r, (_, m) in zip(records, mismatched)]
  raise TypeError(f"no packed layout for {type(records[0]).__name__} records")


def collate_prefixed_blocks(items, row_length: int, num_rows: int, pad_id: int = 0) -> dict:
  """`collate_prefixed` of items with K continuations each, renumbered in block order: item i's
  continuation k is sequence k·B + i (sequence_ids [R, L], sequence_ends [K·B])."""
  k = len(items[0].continuations)
  if any(len(item.continuations) != k for item in items):
    raise ValueError("block order needs the same number of continuations in every item")
  batch = collate_prefixed(items, row_length, num_rows, pad_id, ends=True)
  ids = batch["sequence_ids"]
  item, branch = np.divmod(np.maximum(ids, 0), k)
  batch["sequence_ids"] = np.where(ids >= 0, branch * len(items) + item, -1).astype(np.int32)
  batch["sequence_ends"] = np.ascontiguousarray(batch["sequence_ends"].reshape(-1, k).T.ravel())
  return batch


@dataclasses.dataclass(frozen=True)
class PackedSFT:
  """Several SFT examples in one row: ids, segment ids (1, 2, ...), and the loss mask."""
  input_ids: np.ndarray
  segment_ids: np.ndarray
  loss_mask: np.ndarray


def pack_sft(records, length: int, seed: int = 0, window: int = 64) -> list[PackedSFT]:
  """First-fit packing of SFT examples into rows of at most `length` tokens.

  Examples are taken in a seeded order and each goes into the first of the last `window` open
  rows with room for it (bounded work per example). Attention never crosses examples: the model
  masks by segment id and restarts positions at each segment.
  """
  order = np.random.default_rng([seed, 11]).permutation(len(records))
  rows: list[list] = []
  room: list[int] = []
  for i in order:
    record = records[i]
    n = len(record.prompt) + len(record.completion)
    if n > length:
      raise ValueError(f"an example of {n} tokens cannot be packed into rows of {length}")
    start = max(0, len(rows) - window)
    target = next((j for j in range(start, len(rows)) if room[j] >= n), None)
    if target is None:
      rows.append([])
      room.append(length)
      target = len(rows) - 1
    rows[target].append(record)
    room[target] -= n
  packed = []
  for members in rows:
    ids, segments, loss = [], [], []
    for segment, record in enumerate(members, 1):
      ids += [record.prompt, record.completion]
      segments.append(np.full(len(record.prompt) + len(record.completion), segment, np.int32))
      loss += [np.zeros(len(record.prompt), np.int32), np.ones(len(record.completion), np.int32)]
    packed.append(PackedSFT(np.concatenate(ids).astype(np.int32), np.concatenate(segments),
                            np.concatenate(loss)))
  return packed


def collate_packed(records, length: int, pad_id: int = 0) -> dict:
  n = len(records)
  batch = {"input_ids": np.full((n, length), pad_id, np.int32),
           "segment_ids": np.zeros((n, length), np.int32),
           "loss_mask": np.zeros((n, length), np.int32)}
  for i, record in enumerate(records):
    k = len(record.input_ids)
    batch["input_ids"][i, :k] = record.input_ids
    batch["segment_ids"][i, :k] = record.segment_ids
    # A segment's first token is predicted by nothing inside its segment.
    first = np.r_[True, record.segment_ids[1:] != record.segment_ids[:-1]]
    batch["loss_mask"][i, :k] = record.loss_mask * ~first
  batch["attention_mask"] = (batch["segment_ids"] > 0).astype(np.int32)
  return batch


def collate_prompts(records, length: int, pad_id: int = 0) -> dict:
  """Generation prompts, LEFT-padded so every row's last prompt token sits at the same slot."""
  prompt_ids = np.full((len(records), length), pad_id, np.int32)
  prompt_mask = np.zeros((len(records), length), np.int32)
  for i, record in enumerate(records):
    n = len(record.prompt)
    prompt_ids[i, length - n:] = record.prompt
    prompt_mask[i, length - n:] = 1
  return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask}


COLLATORS: dict[type, Callable] = {
    TokenizedSFT: collate_sft,
    TokenizedPair: collate_pairs,
    TokenizedUnpaired: collate_unpaired,
    TokenizedRanked: collate_ranked,
    TokenizedPrompt: collate_prompts,
    PackedSFT: collate_packed,
}


@dataclasses.dataclass
class BatchStream:
  """Seeded, stateless batches over a list of records (see the module docstring)."""
  records: list
  batch_size: int
  max_length: int
  pad_id: int = 0
  seed: int = 0
  shuffle: bool = True
  buckets: tuple[int, ...] | None = None
  group_by_length: bool = True  # sort within windows of 32 batches, then shuffle the batches
  # Ranked records: K slots per example in every batch; None: the most completions of any record.
  num_completions: int | None = None
  # "packed" (pairs, unpaired and ranked rows only; see the module docstring) | "padded"
  layout: str = "padded"
  row_lengths: tuple[int, ...] | None = None  # packed: row lengths; None: see the docstring
  row_multiple: int = 1  # packed: row counts are multiples of it (the data-parallel size)

  def __post_init__(self):
    if not self.records:
      raise ValueError("no records to batch")
    if self.batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
    self.buckets = tuple(self.buckets or default_buckets(self.max_length))
    kind = type(self.records[0])
    self.collate = COLLATORS[kind]
    if kind is TokenizedUnpaired:
      self.collate = functools.partial(collate_unpaired, max_length=self.max_length)
    if kind is TokenizedRanked:
      most = max(len(r.completions) for r in self.records)
      if self.num_completions is not None and self.num_completions < most:
        raise ValueError(f"num_completions={self.num_completions}, but a record has {most} "
                         "completions")
      self.num_completions = self.num_completions or most
      self.collate = functools.partial(collate_ranked, num_completions=self.num_completions)
    self.lengths = np.array([record_length(r) for r in self.records])
    if self.layout not in LAYOUTS:
      raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
    self.packed = self.layout == "packed" and kind in (TokenizedPair, TokenizedUnpaired,
                                                       TokenizedRanked)
    if self.packed:
      per_item = self.num_completions or 2  # completions per item: a bucket holds one each
      # K x each bucket, and rows that hold two of the longest items (long items pack better).
      self.row_lengths = tuple(sorted(self.row_lengths or (
          {per_item * b for b in self.buckets} | {2 * per_item * self.max_length})))
      self.row_counts = row_counts(self.batch_size, self.row_multiple)
      # Every record's item, checked against the longest row once, before any batch.
      items = prefixed_items(self.records, self.max_length, self.num_completions)
      longest = max(range(len(items)), key=lambda i: item_length(items[i]))
      if item_length(items[longest]) > self.row_lengths[-1]:
        raise self._too_long(f"record {longest}", item_length(items[longest]))

  def _too_long(self, what: str, length: int) -> UserError:
    return UserError(f"{what} makes a packed item of {length} tokens (its prompt and every "
                     f"completion), more than the longest row of {self.row_lengths[-1]}; raise "
                     "data.row_length (or lower data.max_length, or set data.layout=padded)")

  def _packed_batch(self, records) -> dict:
    items = prefixed_items(records, self.max_length, self.num_completions)
    lengths = [item_length(item) for item in items]
    best = None
    for row_length in self.row_lengths:
      if row_length < max(lengths):
        continue
      needed = len(plan_rows(lengths, row_length))
      rows = next(c for c in self.row_counts if c >= needed)
      if best is None or rows * row_length < best[0] * best[1]:
        best = (rows, row_length)
    if best is None:  # KTO: a batch's mismatched completions can make a longer item
      raise self._too_long("a batch", max(lengths))
    batch = collate_prefixed_blocks(items, best[1], best[0], self.pad_id)
    return {**batch, **_example_arrays(records, self.num_completions)}

  @property
  def batches_per_epoch(self) -> int:
    """Full training batches per epoch (the remainder waits for the next epoch's order)."""
    if len(self.records) < self.batch_size:
      raise UserError(f"{len(self.records)} examples cannot fill one training batch of "
                      f"{self.batch_size}; lower the batch size (run.batch_size) or add data")
    return len(self.records) // self.batch_size

  def _order(self, epoch: int) -> np.ndarray:
    n = len(self.records)
    if not self.shuffle:
      return np.arange(n)
    rng = np.random.default_rng([self.seed, epoch])
    order = rng.permutation(n)[: self.batches_per_epoch * self.batch_size]
    if self.group_by_length:
      window = 32 * self.batch_size
      for start in range(0, len(order), window):
        chunk = order[start:start + window]
        order[start:start + window] = chunk[np.argsort(self.lengths[chunk], kind="stable")]
      batches = order.reshape(-1, self.batch_size)
      order = batches[rng.permutation(len(batches))].reshape(-1)
    return order

  def _collate(self, indices, weight) -> dict:
    records = [self.records[i] for i in indices]
    if self.packed:
      return {**self._packed_batch(records), "weight": weight,
              "index": np.asarray(indices, np.int32)}
    longest = int(self.lengths[indices].max())
    if isinstance(records[0], TokenizedUnpaired):  # the KL rows share the batch's one length
      longest = max(longest, *(len(p) + len(c) for p, c in mismatched_pairs(records,
                                                                             self.max_length)))
    length = bucket_length(longest, self.buckets)
    batch = self.collate(records, length, self.pad_id)
    batch["weight"] = weight
    batch["index"] = np.asarray(indices, np.int32)  # which records: for per-record caches
    return batch

  def batch(self, index: int) -> dict:
    """Training batch number `index` (0-based, counting across epochs)."""
    epoch, k = divmod(index, self.batches_per_epoch)
    indices = self._order(epoch)[k * self.batch_size:(k + 1) * self.batch_size]
    return self._collate(indices, np.ones(self.batch_size, np.float32))

  def epoch(self):
    """Every record once, in order; the last batch is completed with zero-weight filler."""
    n = len(self.records)
    for start in range(0, n, self.batch_size):
      indices = np.arange(start, min(start + self.batch_size, n))
      weight = np.ones(self.batch_size, np.float32)
      if len(indices) < self.batch_size:
        weight[len(indices):] = 0
        indices = np.concatenate([indices, np.zeros(self.batch_size - len(indices), int)])
      yield self._collate(indices, weight)
