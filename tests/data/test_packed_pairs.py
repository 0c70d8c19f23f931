"""Packed preference batches: each pair (and KTO row with its mismatched completion) one item
[prompt | first | second], rows from a small set of budgets, sequences in block order."""

import numpy as np
import pytest

from rlhf_jax.data import BatchStream, TokenizeConfig, prepare
from rlhf_jax.data.batching import mismatched_pairs, row_counts
from rlhf_jax.errors import UserError


@pytest.fixture(scope="module")
def pair_records(word_tokenizer):
  records, _ = prepare("pair", "synthetic:pair", word_tokenizer, TokenizeConfig(max_length=48),
                       num_rows=64)
  return records


def test_row_counts_step_by_at_most_one_and_a_half():
  assert row_counts(8) == (1, 2, 3, 4, 6, 8)
  assert row_counts(16, 8) == (8, 16)
  assert row_counts(12, 8) == (8, 16)  # up to the batch size rounded up to the multiple
  assert row_counts(1) == (1,)


def _sequences(batch):
  """Each sequence's (prefix tokens, continuation tokens), read back from the packed rows."""
  ids, seq, seg, branch = (batch[k] for k in ("input_ids", "sequence_ids", "segment_ids",
                                               "branch_ids"))
  out = {}
  for n in range(len(batch["sequence_ends"])):
    rows, cols = np.nonzero(seq == n)
    r = rows[0]
    prefix = ids[r][(seg[r] == seg[r, cols[0]]) & (branch[r] == 0)]
    out[n] = (prefix, ids[r, cols])
    assert batch["sequence_ends"][n] == r * ids.shape[1] + cols[-1]
  return out


def test_packed_pairs_hold_each_prompt_once_in_block_order(pair_records):
  padded = BatchStream(pair_records, batch_size=8, max_length=48, seed=3)
  packed = BatchStream(pair_records, batch_size=8, max_length=48, seed=3, layout="packed")
  for step in (0, 5):
    batch, order = packed.batch(step), packed._order(0)[step * 8:(step + 1) * 8]
    np.testing.assert_array_equal(batch["index"], padded.batch(step)["index"])  # same records
    np.testing.assert_array_equal(batch["index"], order)
    rows, length = batch["input_ids"].shape
    assert rows in packed.row_counts and length in packed.row_lengths
    # Padding-free: only the trailing slots of rows are empty; every prompt is laid out once.
    real = sum(len(pair_records[i].prompt) + len(pair_records[i].chosen)
               + len(pair_records[i].rejected) for i in order)
    assert batch["attention_mask"].sum() == real
    sequences = _sequences(batch)
    for i, index in enumerate(order):
      record = pair_records[index]
      for n, completion in ((i, record.chosen), (i + 8, record.rejected)):
        prefix, tokens = sequences[n]
        np.testing.assert_array_equal(prefix, record.prompt)
        np.testing.assert_array_equal(tokens, completion)
        assert batch["loss_mask"][batch["sequence_ids"] == n].all()
    assert batch["loss_mask"].sum() == sum(len(pair_records[i].chosen)
                                          + len(pair_records[i].rejected) for i in order)
    np.testing.assert_array_equal(batch["margin"], [pair_records[i].margin for i in order])


def test_packed_budgets_are_few_and_rows_divide_by_the_multiple(pair_records):
  stream = BatchStream(pair_records, batch_size=8, max_length=48, seed=0, layout="packed",
                       row_multiple=4)
  shapes = {stream.batch(i)["input_ids"].shape for i in range(stream.batches_per_epoch * 2)}
  assert all(rows % 4 == 0 for rows, _ in shapes)
  assert {rows for rows, _ in shapes} <= {4, 8}
  assert stream.row_lengths == tuple(sorted({2 * b for b in stream.buckets} | {4 * 48}))
  assert {length for _, length in shapes} <= set(stream.row_lengths)
  # Each batch takes the budget with the fewest slots that holds it.
  batch = stream.batch(0)
  assert batch["input_ids"].size <= 8 * 2 * 48


def test_packed_evaluation_fills_the_last_batch_with_weightless_filler(pair_records):
  stream = BatchStream(pair_records[:10], batch_size=4, max_length=48, shuffle=False,
                       layout="packed")
  batches = list(stream.epoch())
  np.testing.assert_array_equal(np.concatenate([b["weight"] for b in batches]),
                                [1] * 10 + [0, 0])
  assert all(b["sequence_ends"].shape == (8,) for b in batches)


def test_packed_kto_rows_pair_each_prompt_with_its_mismatched_completion(word_tokenizer):
  records, _ = prepare("unpaired", "synthetic:unpaired", word_tokenizer,
                       TokenizeConfig(max_length=32), num_rows=5)
  stream = BatchStream(records, batch_size=5, max_length=32, shuffle=False, layout="packed")
  batch = stream.batch(0)
  mismatched = mismatched_pairs(records, 32)
  sequences = _sequences(batch)
  for i, record in enumerate(records):
    np.testing.assert_array_equal(sequences[i][0], record.prompt)
    np.testing.assert_array_equal(sequences[i][1], record.completion)
    np.testing.assert_array_equal(sequences[i + 5][0], record.prompt)
    np.testing.assert_array_equal(sequences[i + 5][1], mismatched[i][1])
  np.testing.assert_array_equal(batch["label"], [r.label for r in records])
  assert "kl_input_ids" not in batch


def test_an_item_longer_than_the_row_budget_names_the_key(pair_records, word_tokenizer):
  with pytest.raises(UserError, match=r"more than the longest row of 16; raise data.row_length"):
    BatchStream(pair_records, batch_size=4, max_length=48, layout="packed", row_lengths=(16,))
  # KTO: the check before batching sees the dataset's neighbours; a batch's mismatched
  # completions may make a longer item, which is refused the same way.
  long, short = "the plot is good . " * 3, "the end ."
  rows = [{"prompt": "review the show", "completion": c, "label": True}
          for c in (long, short, long, short)]
  records, _ = prepare("unpaired", rows, word_tokenizer, TokenizeConfig(max_length=32))
  # Dataset neighbours pair a long completion with a short one only; the first batch of three
  # pairs prompt 2 (long completion) with completion 0 (long).
  fits = len(records[0].prompt) + len(records[0].completion) + len(records[1].completion)
  stream = BatchStream(records, batch_size=3, max_length=32, layout="packed", shuffle=False,
                       row_lengths=(fits,))
  with pytest.raises(UserError, match=r"a batch makes a packed item of \d+ tokens"):
    list(stream.epoch())


def test_other_records_ignore_the_packed_layout(word_tokenizer):
  records, _ = prepare("sft", "synthetic:sft", word_tokenizer, TokenizeConfig(max_length=32),
                       num_rows=8)
  packed = BatchStream(records, batch_size=4, max_length=32, layout="packed").batch(0)
  padded = BatchStream(records, batch_size=4, max_length=32).batch(0)
  assert packed.keys() == padded.keys()
  for key in padded:
    np.testing.assert_array_equal(packed[key], padded[key])
