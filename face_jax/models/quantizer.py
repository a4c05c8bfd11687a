"""Greedy distinct-token vector quantisation against a large codebook.

Each entity has W words; word 1 takes its nearest codebook row (squared
Euclidean distance), word 2 the nearest among the rows not taken yet, and so
on in word order, so the W tokens of an entity are distinct.

The search never forms the full [entities * W, vocabulary] distance matrix.
A word can lose at most W - 1 tokens to the words before it, so its W nearest
rows always contain its greedy choice. `top_w_candidates` finds those W
candidates with a scan over vocabulary chunks that keeps a running top-W,
and `greedy_distinct` runs the greedy pass on the [entities, W, W]
candidates. Memory is O(n * W * W) plus an [n * W, chunk] transient.

The two stages are separate so that a vocabulary-sharded codebook can be
searched shard by shard (`top_w_candidates` with the shard's
`index_offset`), the per-shard lists concatenated and reduced by
`face_jax.parallel.search.merge_candidates`, and only then handed to
`greedy_distinct`. `quantize` does this by itself when it is traced inside
a `face_jax.parallel.use_mesh` block whose rules split the logical axis
"vocab" over several devices (`face_jax.parallel.vocab_top_w`); the
codebook is never gathered.

Ties: at every stage, among equal distances the lowest codebook index wins
(the same rule as an argmin over the full row).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from face_jax.parallel import search

# Weights of the codebook term and the commitment term of the VQ loss.
CODEBOOK_WEIGHT = 0.75
COMMITMENT_WEIGHT = 0.25

# Index given to padding rows and empty candidate slots; it sorts after any
# real codebook index, and their distance is +inf.
_NO_INDEX = jnp.iinfo(jnp.int32).max

# Codebook rows per block of the two-level top-W of a chunk; 32 was the
# fastest of 16-128 on CPU (batch 256, W 16, 7,957 tokens).
_BLOCK = 32


class QuantizerError(ValueError):
  """Shapes or sizes that the quantiser cannot work with."""


def squared_distances(
  z: jax.Array, codebook: jax.Array, valid: jax.Array | None = None
) -> jax.Array:
  """||z - c||^2 expanded as ||z||^2 - 2 z.c + ||c||^2.

  The expansion can be slightly negative or unequal for equal true distances
  through float rounding; integer-valued inputs are exact.

  Args:
    z: [m, h] query vectors.
    codebook: [v, h] codebook rows.
    valid: optional [v] bool; rows where it is False are at distance +inf
      (padding). Masking the [v] norms costs nothing, masking the [m, v]
      result would be another pass over it.

  Returns:
    [m, v] squared distances.
  """
  z_sq = jnp.sum(z * z, axis=-1, keepdims=True)
  code_sq = jnp.sum(codebook * codebook, axis=-1)
  if valid is not None:
    code_sq = jnp.where(valid, code_sq, jnp.inf)
  return z_sq - 2.0 * (z @ codebook.T) + code_sq


def top_w_candidates(
  z: jax.Array,
  codebook: jax.Array,
  w: int,
  chunk: int,
  index_offset: int | jax.Array = 0,
) -> tuple[jax.Array, jax.Array]:
  """The w nearest codebook rows of each query, scanning vocabulary chunks.

  No gradient flows through the search; gather rows by the returned indices
  to differentiate.

  Args:
    z: [m, h] queries (m = entities * W words).
    codebook: [v, h] codebook rows (one shard of it, or all of it).
    w: candidates kept per query (W for the greedy pass).
    chunk: codebook rows compared per scan step; it need not divide v.
    index_offset: added to the returned indices, the position of this
      shard's first row in the whole codebook.

  Returns:
    (distances [m, w], indices [m, w] int32) sorted by distance, then
    index. When v < w the tail holds +inf distances and index 2**31 - 1.
    A row whose distance overflows float32 (or that holds a NaN or inf)
    comes back at the largest finite float32 distance.
  """
  if chunk < 1 or w < 1:
    raise QuantizerError(
      f"Got chunk={chunk}, w={w}; both must be positive integers."
    )
  if z.shape[-1] != codebook.shape[-1]:
    raise QuantizerError(
      f"Query width {z.shape[-1]} differs from codebook width "
      f"{codebook.shape[-1]}; map the codebook to the word size first."
    )
  z = lax.stop_gradient(z)
  codebook = lax.stop_gradient(codebook)
  vocab = codebook.shape[0]
  # A shard smaller than a chunk is one chunk of its own size; a chunk is
  # a whole number of blocks (padding rows are never chosen).
  chunk = min(chunk, max(vocab, 1))
  block = min(_BLOCK, chunk)
  chunk = -(-chunk // block) * block
  num_chunks = -(-vocab // chunk)
  padded = jnp.pad(codebook, ((0, num_chunks * chunk - vocab), (0, 0)))
  chunks = padded.reshape(num_chunks, chunk, codebook.shape[-1])
  starts = jnp.arange(num_chunks, dtype=jnp.int32) * chunk

  def search_chunk(rows, start):
    positions = start + jnp.arange(chunk, dtype=jnp.int32)
    is_row = positions < vocab
    # A row with a NaN or inf entry (a broken token embedding) is put at
    # distance +inf: as NaN it would make its whole block's minimum NaN
    # and hide the block's other rows from the search.
    finite = jnp.all(jnp.isfinite(rows), axis=-1)
    rows = jnp.where(finite[:, None], rows, 0.0)
    dist = squared_distances(z, rows, jnp.logical_and(is_row, finite))
    chunk_dist, local = _block_top_w(dist, w, block)
    return chunk_dist, jnp.where(is_row, positions, _NO_INDEX)[local]

  def step(best, xs):
    chunk_dist, found = search_chunk(*xs)
    # Every real index in `best` is below this chunk's, and both lists are
    # in (distance, index) order, so top_k's lower-position-first rule
    # among equal distances keeps that order without a two-key sort. The
    # empty slots of `best` (+inf, index 2**31 - 1) must still come after
    # this chunk's real rows, also those whose distance overflowed to +inf:
    # the chunk's distances are capped at the largest finite float.
    chunk_dist = jnp.minimum(chunk_dist, jnp.finfo(chunk_dist.dtype).max)
    both_idx = jnp.concatenate([best[1], found], axis=-1)
    neg_dist, pick = lax.top_k(
      -jnp.concatenate([best[0], chunk_dist], axis=-1), w
    )
    return (-neg_dist, jnp.take_along_axis(both_idx, pick, axis=-1)), None

  empty = (
    jnp.full((z.shape[0], w), jnp.inf, z.dtype),
    jnp.full((z.shape[0], w), _NO_INDEX, jnp.int32),
  )
  (distances, indices), _ = lax.scan(step, empty, (chunks, starts))
  real = indices != _NO_INDEX
  indices = jnp.where(real, indices + index_offset, _NO_INDEX)
  return jnp.where(real, distances, jnp.inf), indices.astype(jnp.int32)


def _block_top_w(
  dist: jax.Array, w: int, block: int
) -> tuple[jax.Array, jax.Array]:
  """The w smallest of each row, in (distance, position) order.

  Each of the w smallest entries lies in one of the w blocks with the
  smallest minima (a block holding one of them has its minimum at or below
  the w-th smallest value, and at most w blocks are needed; among equal
  minima the lower block wins, as among equal entries the lower position
  does). So only those w blocks go to the final top_k: on CPU, top_k over
  the whole [m, chunk] rows took longer than the distance product that
  made them, over the w * block candidates it takes a fraction of that.

  Args:
    dist: [m, chunk] distances, chunk a multiple of `block`.
    w: how many to keep.
    block: entries per block.

  Returns:
    (distances [m, k], positions [m, k] int32 in 0..chunk-1), k = min(w,
    chunk).
  """
  m, chunk = dist.shape
  blocks = dist.reshape(m, chunk // block, block)
  num_blocks = min(w, chunk // block)
  _, block_id = lax.top_k(-jnp.min(blocks, axis=-1), num_blocks)
  # In position order, so the final top_k breaks ties by position.
  block_id = jnp.sort(block_id, axis=-1)
  candidates = jnp.take_along_axis(blocks, block_id[:, :, None], axis=1)
  positions = block_id[:, :, None] * block + jnp.arange(block, dtype=jnp.int32)
  neg_dist, pick = lax.top_k(
    -candidates.reshape(m, num_blocks * block), min(w, num_blocks * block)
  )
  found = jnp.take_along_axis(
    positions.reshape(m, num_blocks * block), pick, axis=-1
  )
  return -neg_dist, found.astype(jnp.int32)


def greedy_distinct(
  candidate_dist: jax.Array, candidate_idx: jax.Array
) -> jax.Array:
  """Distinct tokens per entity, chosen word by word from candidates.

  Word k takes the candidate with the smallest distance (lowest index among
  equals) that no earlier word of the same entity took. With each word's
  W nearest rows as candidates this equals the greedy over the whole
  codebook, since earlier words can take at most W - 1 of them.

  Args:
    candidate_dist: [n, W, w] distances of each word's candidates, w >= W.
    candidate_idx: [n, W, w] int32 codebook indices of those candidates.

  Returns:
    [n, W] int32 token indices, distinct within each entity.
  """
  _, num_words, w = candidate_idx.shape
  if w < num_words:
    raise QuantizerError(
      f"Each of the {num_words} words has only {w} candidates; the greedy "
      f"pass needs at least {num_words} (call top_w_candidates with "
      f"w={num_words})."
    )
  candidate_idx = candidate_idx.astype(jnp.int32)

  def step(chosen, word):
    dist, idx = candidate_dist[:, word], candidate_idx[:, word]
    taken = jnp.any(idx[:, :, None] == chosen[:, None, :], axis=-1)
    dist = jnp.where(taken, jnp.inf, dist)
    best = jnp.min(dist, axis=-1, keepdims=True)
    eligible = jnp.logical_and(~taken, dist == best)
    pick = jnp.min(jnp.where(eligible, idx, _NO_INDEX), axis=-1)
    return chosen.at[:, word].set(pick), None

  # -1 marks words not chosen yet; it never equals a codebook index.
  start = jnp.full(candidate_idx.shape[:2], -1, jnp.int32)
  chosen, _ = lax.scan(step, start, jnp.arange(num_words))
  return chosen


class Quantized(NamedTuple):
  """Result of `quantize`.

  Attributes:
    z_q: [n, W, h] the chosen codebook rows; gradients reach the codebook.
    z_q_st: [n, W, h] straight-through output: the value of z_q, the
      gradient of z_e.
    token_index: [n, W] int32 indices into the codebook.
    vq_loss: scalar, `vq_loss(z_e, z_q)`.
  """

  z_q: jax.Array
  z_q_st: jax.Array
  token_index: jax.Array
  vq_loss: jax.Array


def vq_loss(z_e: jax.Array, z_q: jax.Array) -> jax.Array:
  """0.75 * mean((z_q - sg(z_e))^2) + 0.25 * mean((z_e - sg(z_q))^2).

  The first term moves the codebook towards the encoder outputs, the second
  commits the encoder to its tokens.

  Args:
    z_e: [..., h] encoder outputs.
    z_q: [..., h] the codebook rows chosen for them.

  Returns:
    Scalar loss.
  """
  codebook_term = jnp.mean((z_q - lax.stop_gradient(z_e)) ** 2)
  commitment_term = jnp.mean((z_e - lax.stop_gradient(z_q)) ** 2)
  return CODEBOOK_WEIGHT * codebook_term + COMMITMENT_WEIGHT * commitment_term


def quantize(
  z_e: jax.Array,
  codebook: jax.Array,
  chunk: int,
  num_valid: int | None = None,
) -> Quantized:
  """Greedy distinct-token quantisation with a straight-through estimator.

  Inside a `use_mesh` block that splits "vocab", each device searches its
  own codebook rows (see the module docstring); the result is the same.

  Args:
    z_e: [n, W, h] encoder outputs, W words per entity.
    codebook: [v, h] mapped codebook, v >= W.
    chunk: codebook rows compared per scan step of the search.
    num_valid: real codebook rows; rows from this index on are padding
      (a table padded to the vocabulary shard count) and never chosen.
      All rows when None.

  Returns:
    A `Quantized`.
  """
  n, num_words, width = z_e.shape
  if num_valid is not None and not 0 < num_valid <= codebook.shape[0]:
    raise QuantizerError(
      f"num_valid={num_valid} is outside 1..{codebook.shape[0]}, the "
      "codebook rows; pass the token table's real row count."
    )
  rows = codebook.shape[0] if num_valid is None else num_valid
  if rows < num_words:
    raise QuantizerError(
      f"The codebook has {rows} rows but each entity needs "
      f"{num_words} distinct tokens; use a larger vocabulary or fewer words."
    )
  dist, idx = search.vocab_top_w(
    z_e.reshape(n * num_words, width),
    codebook,
    w=num_words,
    chunk=chunk,
    local_search=top_w_candidates,
    num_valid=num_valid,
  )
  token_index = greedy_distinct(
    dist.reshape(n, num_words, num_words),
    idx.reshape(n, num_words, num_words),
  )
  z_q = codebook[token_index]
  z_q_st = z_e + lax.stop_gradient(z_q - z_e)
  return Quantized(z_q, z_q_st, token_index, vq_loss(z_e, z_q))
