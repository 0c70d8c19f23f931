"""Array ops shared by losses, trainers and the sampler: masked reductions and token log-probs.

Shape letters: B batch, T sequence, D model width, V vocabulary, N flattened tokens, C chunk.

Token log-probs come in two flavours with identical values:
  * `token_logps_from_logits`: from [..., V] logits (the sampler and small models use this);
  * `chunked_token_logps`: from the final hidden states [..., D] and the unembedding [D, V],
    never materialising the [N, V] float32 logits. It walks over chunks of C tokens with a
    rematerialised `lax.scan`, so the forward and the backward pass each hold one [C, V] block
    at a time. This is what trainers use: at V = 152k a [4, 1024, V] float32 log-softmax is
    2.5 GB, and its gradient another 2.5 GB.

Both take a `temperature`: the sampler draws from softmax(logits / temperature), and the trainer
must score tokens under the same distribution, or the PPO ratio and the KL silently compare two
different policies.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp

__all__ = [
    "masked_sum",
    "masked_mean",
    "sequence_logps",
    "packed_sequence_sums",
    "token_logps_from_logits",
    "chunked_token_logps",
    "entropy_from_logits",
    "softcap",
]


def masked_sum(values: chex.Array, mask: chex.Array, axis=None) -> chex.Array:
  """Σ values·mask over `axis` (all axes when None). `mask` has the shape of `values`."""
  chex.assert_equal_shape([values, mask])
  return jnp.sum(values * mask.astype(values.dtype), axis=axis)


def masked_mean(values: chex.Array, mask: chex.Array, axis=None) -> chex.Array:
  """Σ values·mask / Σ mask over `axis`; 0 where the mask is empty (never a NaN, nor a NaN grad).

  An empty mask is a data error that the loaders reject with a message naming the row; this
  guard only keeps a stray empty row from turning the whole batch's gradient into NaN.
  """
  chex.assert_equal_shape([values, mask])
  mask = mask.astype(values.dtype)
  total = jnp.sum(values * mask, axis=axis)
  count = jnp.sum(mask, axis=axis)
  nonempty = count > 0
  return jnp.where(nonempty, total / jnp.where(nonempty, count, 1), 0)


def sequence_logps(token_logps_BT: chex.Array, mask_BT: chex.Array, *, reduction: str = "sum"):
  """Per-sequence log-prob [B] from per-token log-probs: "sum" (log π(y|x)) or "mean" (per token).

  DPO, RPO and KTO use the sum, as their papers do; IPO, SimPO and ORPO the mean.
  """
  chex.assert_rank([token_logps_BT, mask_BT], 2)
  if reduction == "sum":
    return masked_sum(token_logps_BT, mask_BT, axis=-1)
  if reduction == "mean":
    return masked_mean(token_logps_BT, mask_BT, axis=-1)
  raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


def packed_sequence_sums(values_RL: chex.Array, mask_RL: chex.Array, sequence_ids_RL: chex.Array,
                         num_sequences: int, *, reduction: str = "sum"):
  """Per-sequence sums (or means) [N] of packed rows' per-token values [R, L].

  sequence_ids_RL numbers the sequence each token belongs to (0..N-1, -1 for none; see
  `rlhf_jax.data.packing`); only tokens with mask 1 count. "mean" is 0 for an empty sequence.
  The packed layout's counterpart of `sequence_logps`: with one sequence per row the two agree.
  """
  chex.assert_equal_shape([values_RL, mask_RL, sequence_ids_RL])
  counted_RL = (mask_RL > 0) & (sequence_ids_RL >= 0)
  ids_N = jnp.where(counted_RL, sequence_ids_RL, num_sequences).ravel()
  sums_N = jax.ops.segment_sum(jnp.where(counted_RL, values_RL, 0).ravel(), ids_N,
                               num_sequences + 1)[:-1]
  if reduction == "sum":
    return sums_N
  if reduction == "mean":
    counts_N = jax.ops.segment_sum(counted_RL.astype(values_RL.dtype).ravel(), ids_N,
                                   num_sequences + 1)[:-1]
    return jnp.where(counts_N > 0, sums_N / jnp.where(counts_N > 0, counts_N, 1), 0)
  raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


def softcap(logits: chex.Array, cap: float | None) -> chex.Array:
  """cap·tanh(logits / cap), or logits unchanged when cap is None (Gemma 2's final-logit
  soft-capping, Gemma Team, 2024, arXiv:2408.00118). Applied before any temperature."""
  if cap is None:
    return logits
  return cap * jnp.tanh(logits / cap)


def token_logps_from_logits(logits: chex.Array, labels: chex.Array, *, temperature: float = 1.0):
  """log softmax(logits / temperature)[label], in float32. logits [..., V], labels [...] int."""
  chex.assert_equal_shape_prefix([logits, labels], labels.ndim)
  chex.assert_rank(logits, labels.ndim + 1)
  logits = logits.astype(jnp.float32) / temperature
  label_logits = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  return label_logits - jax.nn.logsumexp(logits, axis=-1)


def entropy_from_logits(logits: chex.Array, *, temperature: float = 1.0) -> chex.Array:
  """Entropy of softmax(logits / temperature) over the last axis, in float32: [..., V] -> [...].

  Entries at -inf (a masked or filtered vocabulary) have probability 0 and contribute 0, as
  p log p -> 0; their gradient is 0 too.
  """
  chex.assert_rank(logits, {1, 2, 3, 4})
  logits = logits.astype(jnp.float32) / temperature
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  finite = jnp.isfinite(log_probs)
  plogp = jnp.exp(log_probs) * jnp.where(finite, log_probs, 0.0)
  return -jnp.sum(jnp.where(finite, plogp, 0.0), axis=-1)


def chunked_token_logps(
    hidden: chex.Array,
    unembed_DV: chex.Array,
    labels: chex.Array,
    *,
    temperature: float = 1.0,
    chunk_size: int = 512,
    return_entropy: bool = False,
    logit_softcap: float | None = None,
):
  """Token log-probs log softmax(cap(h·W) / temperature)[label] without the full [N, V] logits.

  Args:
    hidden: final (normalised) hidden states [..., D], any float dtype.
    unembed_DV: the unembedding matrix [D, V] (the transposed embedding for tied models).
    labels: int token ids [...], the tokens to score (already shifted by the caller).
    temperature: divides the logits, as in the sampler.
    chunk_size: tokens per block; peak extra memory is about chunk_size·V·4 bytes per pass.
    return_entropy: also return the entropy of each position's distribution.
    logit_softcap: the model's final-logit soft-cap (`softcap` above, applied before the
      temperature), or None.

  Returns:
    float32 log-probs [...] (and float32 entropies [...]), differentiable w.r.t. `hidden` and
    `unembed_DV`. The matmul runs in the inputs' dtype with float32 accumulation; the softmax
    runs in float32.
  """
  chex.assert_rank(unembed_DV, 2)
  chex.assert_equal_shape_prefix([hidden, labels], labels.ndim)
  chex.assert_rank(hidden, labels.ndim + 1)
  lead_shape = labels.shape
  width = hidden.shape[-1]
  hidden_ND = hidden.reshape(-1, width)
  labels_N = labels.reshape(-1)
  num_tokens = hidden_ND.shape[0]
  chunk = max(1, min(chunk_size, num_tokens))
  num_chunks = -(-num_tokens // chunk)
  pad = num_chunks * chunk - num_tokens
  hidden_KCD = jnp.pad(hidden_ND, ((0, pad), (0, 0))).reshape(num_chunks, chunk, width)
  labels_KC = jnp.pad(labels_N, (0, pad)).reshape(num_chunks, chunk)

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def block(hidden_CD, labels_C):
    # Rematerialised: the backward pass recomputes this block's logits instead of storing them.
    logits_CV = jnp.dot(hidden_CD, unembed_DV, preferred_element_type=jnp.float32)
    logits_CV = softcap(logits_CV, logit_softcap) / temperature
    logsumexp_C = jax.nn.logsumexp(logits_CV, axis=-1)
    label_logits_C = jnp.take_along_axis(logits_CV, labels_C[:, None], axis=-1)[:, 0]
    if not return_entropy:
      return label_logits_C - logsumexp_C, None
    probs_CV = jnp.exp(logits_CV - logsumexp_C[:, None])
    return label_logits_C - logsumexp_C, logsumexp_C - jnp.sum(probs_CV * logits_CV, axis=-1)

  def body(carry, xs):
    return carry, block(*xs)

  _, (logps_KC, entropy_KC) = jax.lax.scan(body, None, (hidden_KCD, labels_KC))
  logps = logps_KC.reshape(-1)[:num_tokens].reshape(lead_shape)
  if not return_entropy:
    return logps
  return logps, entropy_KC.reshape(-1)[:num_tokens].reshape(lead_shape)
