"""Array ops shared by losses, trainers and the sampler: masked reductions and token log-probs.

Shape letters: B batch, T sequence, D model width, V vocabulary, N flattened tokens, C chunk.

Token log-probs come in two flavours with identical values:
  * `token_logps_from_logits`: from [..., V] logits (the sampler and small models use this);
  * `chunked_token_logps`: from the final hidden states [..., D] and the unembedding [D, V],
    never materialising the [N, V] float32 logits. It walks over chunks of C tokens with a
    rematerialised `lax.scan`, so the forward and the backward pass each hold one [C, V] block
    at a time. This is what trainers use: at V = 152k a [4, 1024, V] float32 log-softmax is
    2.5 GB, and its gradient another 2.5 GB.
  * `scored_token_logps`: the same at a mask's positions only (0 elsewhere), what trainers use,
    since only completion tokens reach a loss: the chunk loop stops after the scored columns,
    so a long prompt costs its layers but not its head (at vocabulary 32k the head is as wide
    as two decoder layers of Qwen2.5-0.5B).

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
    "scored_token_logps",
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


def scored_token_logps(
    hidden_BTD: chex.Array,
    unembed_DV: chex.Array,
    labels_BT: chex.Array,
    where_BT: chex.Array,
    *,
    temperature: float = 1.0,
    chunk_size: int = 512,
    return_entropy: bool = False,
    logit_softcap: float | None = None,
):
  """`chunked_token_logps` at the positions `where_BT` only: the head's cost follows the scored
  tokens (a DPO pair's completions, not its prompt), not the row length.

  Each row's scored positions are moved to its front (a stable sort), and the chunk loop runs
  over columns only as far as the row with the most scored positions: a `while` loop with a
  trip count read from the data, one compiled program for every mask. Its gradient is written
  out (`jax.custom_vjp`), since a loop whose length is data cannot be differentiated
  automatically: the backward pass walks the same chunks, recomputes each chunk's logits and
  takes dlogits = g·(onehot - softmax) (plus the entropy's term), so it too skips the unscored
  columns. Rows stay rows (the batch axis keeps its data-parallel sharding).

  Args:
    hidden_BTD: final hidden states [B, T, D]; unembed_DV, temperature, logit_softcap: as in
      `chunked_token_logps`.
    labels_BT: int token ids [B, T] scored by hidden_BTD[:, t].
    where_BT: [B, T] bool or 0/1: the positions to score.
    chunk_size: about this many tokens per block (columns per block: chunk_size // B, >= 1).

  Returns:
    float32 log-probs [B, T] (and entropies [B, T]), 0 wherever `where_BT` is 0; equal to
    `chunked_token_logps` elsewhere, gradients included.
  """
  chex.assert_rank([hidden_BTD, unembed_DV, labels_BT, where_BT], [3, 2, 2, 2])
  chex.assert_equal_shape([labels_BT, where_BT])
  chex.assert_equal_shape_prefix([hidden_BTD, labels_BT], 2)
  num_rows, length, _ = hidden_BTD.shape
  where_BT = where_BT.astype(bool)
  width = max(1, min(length, chunk_size // max(num_rows, 1)))
  num_chunks = -(-length // width)
  if num_chunks == 1:  # one block covers every row: nothing to skip, and the sort costs
    return _every_slot_token_logps(hidden_BTD, unembed_DV, labels_BT, where_BT,
                                   temperature=temperature, chunk_size=chunk_size,
                                   return_entropy=return_entropy, logit_softcap=logit_softcap)
  pad = num_chunks * width - length
  order_BT = jnp.argsort(~where_BT, axis=1, stable=True)  # scored positions first, in order
  gather = lambda x: jnp.take_along_axis(x, order_BT.reshape(order_BT.shape + (1,) * (x.ndim - 2)),
                                         axis=1)
  pad_T = lambda x: jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
  hidden_c = pad_T(gather(hidden_BTD))
  labels_c = pad_T(gather(labels_BT))
  chunks = -(-jnp.max(jnp.sum(where_BT, axis=1)) // width)  # [] int: the chunks with a score
  head = _scored_head(float(temperature), logit_softcap, return_entropy, width)
  logps_c, entropy_c = head(hidden_c, unembed_DV, labels_c, chunks.astype(jnp.int32))
  inverse_BT = jnp.argsort(order_BT, axis=1)
  unsort = lambda x: jnp.where(where_BT, jnp.take_along_axis(x[:, :length], inverse_BT, axis=1),
                               0.0)
  if not return_entropy:
    return unsort(logps_c)
  return unsort(logps_c), unsort(entropy_c)


def _every_slot_token_logps(hidden_BTD, unembed_DV, labels_BT, where_BT, *, temperature=1.0,
                            chunk_size=512, return_entropy=False, logit_softcap=None):
  """`scored_token_logps` computed at every slot and masked afterwards: its one-chunk case,
  and the all-slot baseline of benchmarks/shared_prompt.py."""
  scored = chunked_token_logps(hidden_BTD, unembed_DV, labels_BT, temperature=temperature,
                               chunk_size=chunk_size, return_entropy=return_entropy,
                               logit_softcap=logit_softcap)
  keep = lambda x: jnp.where(where_BT, x, 0.0)
  return tuple(map(keep, scored)) if return_entropy else keep(scored)


@functools.lru_cache(maxsize=None)
def _scored_head(temperature: float, cap: float | None, with_entropy: bool, width: int):
  """The custom-gradient chunk loop of `scored_token_logps`, for one static configuration:
  f(hidden [B, T, D], unembed [D, V], labels [B, T] int, chunks [] int) -> (logps, entropy)
  [B, T] float32, computed for columns [0, chunks·width) and 0 beyond."""

  def logits_of(hidden_BCD, unembed_DV):
    raw_BCV = jnp.einsum("bcd,dv->bcv", hidden_BCD, unembed_DV,
                         preferred_element_type=jnp.float32)
    return raw_BCV, softcap(raw_BCV, cap) / temperature

  def columns(x, k):
    return jax.lax.dynamic_slice_in_dim(x, k * width, width, axis=1)

  def put(x, k, value):
    return jax.lax.dynamic_update_slice_in_dim(x, value, k * width, axis=1)

  def forward(hidden_BTD, unembed_DV, labels_BT, chunks):
    def body(k, carry):
      logps_BT, lse_BT, entropy_BT = carry
      _, logits_BCV = logits_of(columns(hidden_BTD, k), unembed_DV)
      lse_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
      label_BC = jnp.take_along_axis(logits_BCV, columns(labels_BT, k)[..., None], axis=-1)[..., 0]
      carry = (put(logps_BT, k, label_BC - lse_BC), put(lse_BT, k, lse_BC), entropy_BT)
      if with_entropy:
        probs_BCV = jnp.exp(logits_BCV - lse_BC[..., None])
        carry = carry[:2] + (put(entropy_BT, k, lse_BC - jnp.sum(probs_BCV * logits_BCV, -1)),)
      return carry

    zeros = jnp.zeros(labels_BT.shape, jnp.float32)
    return jax.lax.fori_loop(0, chunks, body, (zeros, zeros, zeros))

  @jax.custom_vjp
  def head(hidden_BTD, unembed_DV, labels_BT, chunks):
    logps_BT, _, entropy_BT = forward(hidden_BTD, unembed_DV, labels_BT, chunks)
    return logps_BT, entropy_BT

  def head_fwd(hidden_BTD, unembed_DV, labels_BT, chunks):
    logps_BT, lse_BT, entropy_BT = forward(hidden_BTD, unembed_DV, labels_BT, chunks)
    return (logps_BT, entropy_BT), (hidden_BTD, unembed_DV, labels_BT, chunks, lse_BT, entropy_BT)

  def head_bwd(residuals, cotangents):
    hidden_BTD, unembed_DV, labels_BT, chunks, lse_BT, entropy_BT = residuals
    g_logps_BT, g_entropy_BT = cotangents
    def body(k, carry):
      d_hidden_BTD, d_unembed_DV = carry
      hidden_BCD = columns(hidden_BTD, k)
      raw_BCV, logits_BCV = logits_of(hidden_BCD, unembed_DV)
      lse_BC = columns(lse_BT, k)
      probs_BCV = jnp.exp(logits_BCV - lse_BC[..., None])
      g_BC = columns(g_logps_BT, k)
      onehot_BCV = jax.lax.broadcasted_iota(jnp.int32, probs_BCV.shape, 2) == columns(
          labels_BT, k)[..., None]
      d_logits_BCV = g_BC[..., None] * (onehot_BCV - probs_BCV)
      if with_entropy:  # dH/dz_j = -p_j (z_j - lse + H)
        term_BCV = logits_BCV - (lse_BC - columns(entropy_BT, k))[..., None]
        d_logits_BCV = d_logits_BCV - columns(g_entropy_BT, k)[..., None] * probs_BCV * term_BCV
      d_raw_BCV = d_logits_BCV / temperature
      if cap is not None:
        d_raw_BCV = d_raw_BCV * (1.0 - jnp.square(jnp.tanh(raw_BCV / cap)))
      d_raw_BCV = d_raw_BCV.astype(unembed_DV.dtype)
      d_hidden_BCD = jnp.einsum("bcv,dv->bcd", d_raw_BCV, unembed_DV,
                                preferred_element_type=jnp.float32)
      d_unembed_DV = d_unembed_DV + jnp.einsum("bcd,bcv->dv", hidden_BCD, d_raw_BCV,
                                               preferred_element_type=jnp.float32)
      return put(d_hidden_BTD, k, d_hidden_BCD.astype(d_hidden_BTD.dtype)), d_unembed_DV

    init = (jnp.zeros_like(hidden_BTD), jnp.zeros(unembed_DV.shape, jnp.float32))
    d_hidden_BTD, d_unembed_DV = jax.lax.fori_loop(0, chunks, body, init)
    return d_hidden_BTD, d_unembed_DV.astype(unembed_DV.dtype), None, None

  head.defvjp(head_fwd, head_bwd)
  return head
