"""Batches: fixed bucket shapes, masks, seeded resumable order, full evaluation coverage."""

import numpy as np
import pytest

from rlhf_jax.data import BatchStream, TokenizeConfig, default_buckets, prepare
from rlhf_jax.data.batching import collate_unpaired, record_length


@pytest.fixture(scope="module")
def pair_records(word_tokenizer):
  records, _ = prepare("pair", "synthetic:pair", word_tokenizer, TokenizeConfig(max_length=48),
                       num_rows=64)
  return records


def test_default_buckets():
  assert default_buckets(1024) == (128, 256, 512, 1024)
  assert default_buckets(48) == (8, 16, 24, 48)
  assert default_buckets(10) == (8, 10)


def test_pair_batch_layout_and_masks(pair_records):
  stream = BatchStream(pair_records, batch_size=4, max_length=48, seed=0)
  batch = stream.batch(0)
  ids, attn, loss = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
  assert ids.shape[0] == 8 and ids.shape[1] in stream.buckets
  order = stream._order(0)[:4]
  for i, index in enumerate(order):
    record = pair_records[index]
    for row, completion in ((i, record.chosen), (i + 4, record.rejected)):
      p, c = len(record.prompt), len(completion)
      np.testing.assert_array_equal(ids[row, :p + c], np.concatenate([record.prompt, completion]))
      assert attn[row].sum() == p + c and attn[row, :p + c].all()
      # The loss sees exactly the completion: never the prompt, never padding.
      assert loss[row, :p].sum() == 0 and loss[row, p:p + c].all() and loss[row, p + c:].sum() == 0


def test_order_is_a_pure_function_of_seed_and_step(pair_records):
  a = BatchStream(pair_records, batch_size=4, max_length=48, seed=1)
  b = BatchStream(pair_records, batch_size=4, max_length=48, seed=1)
  c = BatchStream(pair_records, batch_size=4, max_length=48, seed=2)
  for step in (0, 5, 17, 40):  # 16 batches per epoch: 17 and 40 are in later epochs
    for key in a.batch(step):
      np.testing.assert_array_equal(a.batch(step)[key], b.batch(step)[key])
  assert not np.array_equal(a.batch(0)["input_ids"][:, :8], c.batch(0)["input_ids"][:, :8])
  # Every example appears exactly once per epoch.
  seen = np.concatenate([a._order(1)])
  assert sorted(seen.tolist()) == list(range(64))


def test_shapes_stay_within_the_buckets(pair_records):
  stream = BatchStream(pair_records, batch_size=4, max_length=48, seed=0)
  lengths = {stream.batch(i)["input_ids"].shape for i in range(32)}
  assert {shape[1] for shape in lengths} <= set(stream.buckets)


def test_epoch_covers_every_example_once_with_weights(pair_records):
  stream = BatchStream(pair_records[:10], batch_size=4, max_length=48, shuffle=False)
  batches = list(stream.epoch())
  assert len(batches) == 3
  weights = np.concatenate([b["weight"] for b in batches])
  np.testing.assert_array_equal(weights, [1] * 10 + [0, 0])


def test_unpaired_mismatched_rows_for_odd_batch_sizes(word_tokenizer):
  records, _ = prepare("unpaired", "synthetic:unpaired", word_tokenizer,
                       TokenizeConfig(max_length=48), num_rows=5)
  batch = collate_unpaired(records, 48)
  for i in range(5):  # prompt i with completion (i + 1) mod 5: every completion used once
    r, nxt = records[i], records[(i + 1) % 5]
    p, c = len(r.prompt), len(nxt.completion)
    np.testing.assert_array_equal(batch["kl_input_ids"][i, :p + c],
                                  np.concatenate([r.prompt, nxt.completion]))
    assert batch["kl_loss_mask"][i, p:p + c].all() and batch["kl_loss_mask"][i].sum() == c
  assert batch["input_ids"].shape == batch["kl_input_ids"].shape


def _unpaired(prompt, completion, label=True):
  return {"prompt": prompt, "completion": completion, "label": label}


@pytest.mark.parametrize("rows, matched_bucket", [
    # A long prompt with a short answer, and the reverse: the KL row 0 pairs the long prompt with
    # the long answer (19 + 26 = 45 tokens), which must be cut to max_length like a matched row.
    ([_unpaired("review the show " + "the plot is good . " * 3, "the end ."),
      _unpaired("review the show", "the plot is good . " * 5, False)], 32),
    # Matched rows fit 16, the KL row 0 (8 + 9 = 17 tokens) does not: rounded up to 32, not 17.
    ([_unpaired("review the show the plot is good", "the end ."),
      _unpaired("review the show", "the plot is good . the end .", False)], 16),
])
def test_kto_kl_rows_are_bucketed_and_truncated_like_the_matched_rows(word_tokenizer, rows,
                                                                       matched_bucket):
  records, _ = prepare("unpaired", rows, word_tokenizer, TokenizeConfig(max_length=32))
  assert max(record_length(r) for r in records) <= matched_bucket
  assert len(records[0].prompt) + len(records[1].completion) > 16
  stream = BatchStream(records, batch_size=2, max_length=32, buckets=(16, 32), shuffle=False)
  batch = stream.batch(0)
  # One compiled shape per bucket: both row sets share a bucket length, never over max_length.
  assert batch["input_ids"].shape == batch["kl_input_ids"].shape == (2, 32)
  for i in range(2):
    prompt, completion = records[i].prompt, records[(i + 1) % 2].completion
    kept = min(len(completion), 32 - len(prompt))  # the matched rows' budget
    np.testing.assert_array_equal(batch["kl_input_ids"][i, :len(prompt) + kept],
                                  np.concatenate([prompt, completion[:kept]]))
    assert batch["kl_attention_mask"][i].sum() == len(prompt) + kept
    assert batch["kl_loss_mask"][i, len(prompt):].sum() == kept


def test_kto_batch_shapes_over_many_batches_are_the_buckets(word_tokenizer):
  records, _ = prepare("unpaired", "synthetic:unpaired", word_tokenizer,
                       TokenizeConfig(max_length=32), num_rows=96)
  stream = BatchStream(records, batch_size=3, max_length=32, buckets=(16, 32), seed=0)
  shapes = set()
  for i in range(stream.batches_per_epoch):
    batch = stream.batch(i)
    assert batch["input_ids"].shape == batch["kl_input_ids"].shape
    shapes.add(batch["kl_input_ids"].shape)
  assert shapes <= {(3, 16), (3, 32)}


# One 3-completion and one 2-completion ranked row: K differs between rows.
RANKED_ROWS = [
    {"prompt": "review the cafe", "ranks": [1, 2, 0],
     "completions": ["the food is ok .", "the food is bad .", "the staff is good ."]},
    {"prompt": "review the show", "completions": ["the plot is ok .", "the plot is bad ."],
     "ranks": [0, 1]}]


def test_ranked_batches_have_one_k_when_rows_differ(word_tokenizer):
  records, _ = prepare("ranked", RANKED_ROWS, word_tokenizer, TokenizeConfig(max_length=32))
  stream = BatchStream(records, batch_size=1, max_length=32, shuffle=False)
  # Batch 1 holds only the 2-completion row: K stays 3 (masked), so the step does not recompile.
  shapes = {(stream.batch(i)["input_ids"].shape, stream.batch(i)["ranks"].shape)
            for i in range(2)}
  assert {ranks for _, ranks in shapes} == {(1, 3)} and {ids[0] for ids, _ in shapes} == {3}
  np.testing.assert_array_equal(stream.batch(1)["rank_mask"], [[1, 1, 0]])
  with pytest.raises(ValueError, match="num_completions=2, but a record has 3"):
    BatchStream(records, batch_size=1, max_length=32, num_completions=2)


def test_ranked_batches_pad_missing_slots(word_tokenizer):
  records, _ = prepare("ranked", RANKED_ROWS, word_tokenizer, TokenizeConfig(max_length=32))
  batch = BatchStream(records, batch_size=2, max_length=32, shuffle=False).batch(0)
  assert batch["input_ids"].shape[0] == 6
  np.testing.assert_array_equal(batch["ranks"], [[1, 2, 0], [0, 1, 0]])
  np.testing.assert_array_equal(batch["rank_mask"], [[1, 1, 1], [1, 1, 0]])


def test_too_few_examples_for_a_training_batch_is_an_error(pair_records):
  with pytest.raises(ValueError, match="cannot fill one training batch"):
    BatchStream(pair_records[:3], batch_size=4, max_length=48).batch(0)
  # Evaluation still sees all three, padded with zero-weight filler.
  (batch,) = BatchStream(pair_records[:3], batch_size=4, max_length=48, shuffle=False).epoch()
  np.testing.assert_array_equal(batch["weight"], [1, 1, 1, 0])


def test_prompt_batches_are_left_padded(word_tokenizer):
  rows = [{"prompt": [{"role": "user", "content": "review the cafe"}]},
          {"messages": [{"role": "user", "content": "review the phone"}]}]
  records, _ = prepare("prompt", rows, word_tokenizer, TokenizeConfig(max_length=16))
  assert records[0].text == ({"role": "user", "content": "review the cafe"},)
  batch = BatchStream(records, batch_size=2, max_length=16, shuffle=False).batch(0)
  ids, mask = batch["prompt_ids"], batch["prompt_mask"]
  assert ids.shape == (2, 8)  # bucket 8 holds the 6-token prompts
  tokens = word_tokenizer.convert_ids_to_tokens(ids[0, 2:].tolist())
  assert tokens == ["<bos>", "<|user|>", "review", "the", "cafe", "<|assistant|>"]
  np.testing.assert_array_equal(mask[:, :2], 0)
  np.testing.assert_array_equal(mask[:, 2:], 1)


def test_packing_places_every_example_once_within_the_length(word_tokenizer):
  from rlhf_jax.data.batching import collate_packed, pack_sft
  records, _ = prepare("sft", "synthetic:sft", word_tokenizer, TokenizeConfig(max_length=32),
                       num_rows=200)
  packed = pack_sft(records, 64)
  assert all(len(row.input_ids) <= 64 for row in packed)
  total = sum(len(r.prompt) + len(r.completion) for r in records)
  assert sum(len(row.input_ids) for row in packed) == total
  assert len(packed) < 0.5 * len(records)  # ~2.5 examples per 64-token row
  segments = [row.segment_ids.max() for row in packed]
  assert sum(segments) == len(records)
  batch = collate_packed(packed[:4], 64)
  first_of_segment = np.c_[np.ones((4, 1), bool),
                           batch["segment_ids"][:, 1:] != batch["segment_ids"][:, :-1]]
  assert not np.any(batch["loss_mask"] & first_of_segment)
  assert not np.any(batch["loss_mask"] & (batch["segment_ids"] == 0))
