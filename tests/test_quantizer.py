"""Greedy distinct-token quantiser against a naive numpy greedy."""

import itertools

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from face_jax.models import quantizer
from face_jax.parallel import search

_NO_INDEX = np.iinfo(np.int32).max

# Compiled once per shape; eager dispatch of the scan is slower.
_quantize = jax.jit(quantizer.quantize, static_argnums=2)


def _naive_distances(z, codebook):
  """[n, W, v] squared distances in float64, by the direct formula."""
  diff = z.astype(np.float64)[:, :, None, :] - codebook.astype(np.float64)
  return np.sum(diff * diff, axis=-1)


def _naive_greedy(z, codebook):
  """Word by word, the lowest-index nearest token not yet taken."""
  dist = _naive_distances(z, codebook)
  chosen = np.zeros(z.shape[:2], np.int64)
  for entity in range(z.shape[0]):
    taken = []
    for word in range(z.shape[1]):
      row = dist[entity, word].copy()
      row[taken] = np.inf
      chosen[entity, word] = np.argmin(row)  # first of equal minima
      taken.append(chosen[entity, word])
  return chosen


def _integer_case(rng, n, num_words, vocab, width, low=-2, high=3):
  z = rng.integers(low, high, (n, num_words, width)).astype(np.float32)
  codebook = rng.integers(low, high, (vocab, width)).astype(np.float32)
  return z, codebook


def _dyadic_case(rng, n, num_words, vocab, width):
  """Random values on a 1/8 grid: float32 arithmetic on them is exact."""
  z = np.round(rng.normal(size=(n, num_words, width)) * 8) / 8
  codebook = np.round(rng.normal(size=(vocab, width)) * 8) / 8
  return z.astype(np.float32), codebook.astype(np.float32)


# (entities, words, vocabulary, width, chunk)
_SIZES = [
  (5, 4, 30, 3, 7),  # chunk does not divide the vocabulary
  (4, 16, 40, 2, 64),  # vocabulary smaller than one chunk
  (3, 16, 16, 3, 5),  # exactly W tokens: every token is used
  (6, 16, 203, 4, 3),  # chunk smaller than W
  (4, 8, 500, 3, 64),  # many chunks, many exact ties
  (2, 1, 9, 2, 4),  # a single word
  # Chunks of more blocks than words, so the block pre-selection decides.
  (4, 4, 700, 3, 300),
  (3, 16, 2000, 2, 1024),  # width 2: many equal block minima
]


@pytest.mark.parametrize("sizes", _SIZES)
@pytest.mark.parametrize("make", [_integer_case, _dyadic_case])
def test_quantize_equals_naive_greedy(sizes, make):
  n, num_words, vocab, width, chunk = sizes
  rng = np.random.default_rng(sum(sizes))
  for _ in range(3):
    z, codebook = make(rng, n, num_words, vocab, width)
    result = _quantize(jnp.asarray(z), jnp.asarray(codebook), chunk)
    expected = _naive_greedy(z, codebook)
    np.testing.assert_array_equal(result.token_index, expected)
    assert result.token_index.dtype == jnp.int32


@pytest.mark.parametrize("w", [1, 3, 16])
def test_block_top_w_equals_stable_sort(w):
  # Integers: equal entries within and across blocks, equal block minima,
  # and blocks whose order by minimum is not their order by position. The
  # result must be the first w of a stable sort.
  rng = np.random.default_rng(w)
  offsets = rng.integers(0, 8, (50, 24, 1))
  dist = rng.integers(0, 12, (50, 24, 32)) + offsets
  dist = dist.reshape(50, 24 * 32).astype(np.float32)
  dist[:, 40:70] = np.inf  # padding rows of a last chunk
  got_dist, got_pos = jax.jit(quantizer._block_top_w, static_argnums=(1, 2))(
    jnp.asarray(dist), w, 32
  )
  order = np.argsort(dist, axis=-1, kind="stable")[:, :w]
  np.testing.assert_array_equal(got_pos, order)
  np.testing.assert_array_equal(
    got_dist, np.take_along_axis(dist, order, axis=-1)
  )


def test_rows_at_infinite_distance_beat_empty_slots():
  # ||c||^2 overflows float32 to +inf for the two far rows: they are still
  # codebook rows and must be chosen before an empty candidate slot.
  z = np.zeros((1, 2, 2), np.float32)
  codebook = np.array(
    [[0, 0], [1e20, 0], [3e20, 0], [2e20, 0], [1e20, 0]], np.float32
  )
  # Chunks below W start from empty slots; the others from the first
  # chunk's rows, over one chunk or several.
  for chunk in (1, 2, 3, 8):
    _, idx = quantizer.top_w_candidates(
      jnp.asarray(z[0]), jnp.asarray(codebook), 2, chunk
    )
    np.testing.assert_array_equal(idx, [[0, 1], [0, 1]])
    result = _quantize(jnp.asarray(z), jnp.asarray(codebook), chunk)
    np.testing.assert_array_equal(result.token_index, [[0, 1]])


def test_a_nan_row_hides_only_itself():
  # Row 1 is NaN: it is never preferred to a real row, and rows 0 and 2..
  # of its block stay candidates (four blocks of 32, two words: the block
  # pre-selection decides).
  codebook = np.arange(128, dtype=np.float32)[:, None] + 1
  codebook[0], codebook[1] = 0, np.nan
  dist, idx = quantizer.top_w_candidates(
    jnp.zeros((1, 1)), jnp.asarray(codebook), 2, 128
  )
  np.testing.assert_array_equal(idx, [[0, 2]])
  np.testing.assert_array_equal(dist, [[0.0, 9.0]])


def test_integer_cases_do_have_ties():
  # The exactness cases above are only a tie test if ties really occur.
  z, codebook = _integer_case(np.random.default_rng(0), 4, 8, 500, 3)
  dist = _naive_distances(z, codebook)
  nearest = np.sort(dist, axis=-1)
  assert np.mean(nearest[..., 0] == nearest[..., 1]) > 0.5


def test_random_floats_follow_greedy_rule():
  # Float rounding may reorder near-equal distances, so check the rule
  # itself: each word's token is, up to rounding, the nearest among the
  # tokens the earlier words left.
  rng = np.random.default_rng(7)
  z = rng.normal(size=(12, 16, 8)).astype(np.float32)
  codebook = rng.normal(size=(300, 8)).astype(np.float32)
  index = np.asarray(_quantize(z, codebook, 37).token_index)
  dist = _naive_distances(z, codebook)
  for entity in range(z.shape[0]):
    assert len(set(index[entity])) == z.shape[1]
    for word in range(z.shape[1]):
      row = dist[entity, word].copy()
      row[index[entity, :word]] = np.inf
      assert dist[entity, word, index[entity, word]] <= row.min() + 1e-4
  # Nearly all words agree with the float64 naive greedy exactly.
  agree = np.mean(index == _naive_greedy(z, codebook))
  assert agree > 0.95


def test_tokens_are_distinct_per_entity():
  # All words of an entity equal: without the distinctness rule they would
  # all take the same token.
  rng = np.random.default_rng(3)
  word = rng.normal(size=(4, 1, 5)).astype(np.float32)
  z = np.repeat(word, 16, axis=1)
  codebook = rng.normal(size=(100, 5)).astype(np.float32)
  index = np.asarray(_quantize(z, codebook, 32).token_index)
  for row in index:
    assert len(set(row)) == 16
  order = np.argsort(_naive_distances(word, codebook)[:, 0], axis=-1)
  np.testing.assert_array_equal(index, order[:, :16])


@pytest.mark.parametrize("chunk", [1, 4, 7, 100])
def test_top_w_candidates_are_the_lexicographic_best(chunk):
  z, codebook = _integer_case(np.random.default_rng(chunk), 3, 5, 41, 2)
  flat = z.reshape(-1, 2)
  dist, index = quantizer.top_w_candidates(flat, codebook, 5, chunk)
  full = _naive_distances(flat[:, None], codebook)[:, 0]
  ids = np.broadcast_to(np.arange(41), full.shape)
  order = np.lexsort((ids, full), axis=-1)[:, :5]
  np.testing.assert_array_equal(index, order)
  np.testing.assert_array_equal(dist, np.take_along_axis(full, order, -1))


def test_top_w_candidates_pads_a_small_shard():
  z, codebook = _integer_case(np.random.default_rng(1), 2, 1, 3, 2)
  dist, index = quantizer.top_w_candidates(
    z[:, 0], codebook, 5, 2, index_offset=10
  )
  assert np.all(np.isinf(dist[:, 3:]))
  assert np.all(index[:, 3:] == _NO_INDEX)
  assert np.all((index[:, :3] >= 10) & (index[:, :3] < 13))


def test_merge_over_split_codebook_equals_unsplit():
  rng = np.random.default_rng(11)
  z, codebook = _integer_case(rng, 6, 16, 257, 3)
  flat = z.reshape(-1, 3)
  bounds = [0, 3, 90, 91, 200, 257]  # uneven shards, one smaller than W
  lists = []
  for start, stop in itertools.pairwise(bounds):
    lists.append(
      quantizer.top_w_candidates(
        flat, codebook[start:stop], 16, 17, index_offset=start
      )
    )
  # Shard order does not matter to the merge.
  lists = [lists[i] for i in (3, 0, 4, 1, 2)]
  merged = search.merge_candidates(
    jnp.concatenate([d for d, _ in lists], -1),
    jnp.concatenate([i for _, i in lists], -1),
    16,
  )
  whole = quantizer.top_w_candidates(flat, codebook, 16, 17)
  np.testing.assert_array_equal(merged[1], whole[1])
  np.testing.assert_array_equal(merged[0], whole[0])
  greedy = quantizer.greedy_distinct(
    merged[0].reshape(6, 16, 16), merged[1].reshape(6, 16, 16)
  )
  np.testing.assert_array_equal(greedy, _naive_greedy(z, codebook))


def test_greedy_does_not_need_sorted_candidates():
  z, codebook = _integer_case(np.random.default_rng(5), 4, 6, 50, 2)
  dist, index = quantizer.top_w_candidates(z.reshape(-1, 2), codebook, 6, 8)
  shuffle = np.random.default_rng(0).permutation(6)
  greedy = quantizer.greedy_distinct(
    dist[:, shuffle].reshape(4, 6, 6), index[:, shuffle].reshape(4, 6, 6)
  )
  np.testing.assert_array_equal(greedy, _naive_greedy(z, codebook))


def test_greedy_rejects_too_few_candidates():
  with pytest.raises(quantizer.QuantizerError, match="at least 4"):
    quantizer.greedy_distinct(jnp.zeros((2, 4, 3)), jnp.zeros((2, 4, 3)))


def test_quantize_rejects_vocabulary_smaller_than_words():
  with pytest.raises(quantizer.QuantizerError, match="distinct tokens"):
    quantizer.quantize(jnp.zeros((2, 4, 3)), jnp.zeros((3, 3)), 8)


def _shapes_in(jaxpr):
  """Every intermediate shape of a jaxpr, including nested ones."""
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      yield tuple(var.aval.shape)
    for param in eqn.params.values():
      for sub in param if isinstance(param, tuple | list) else [param]:
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from _shapes_in(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from _shapes_in(sub)


def test_no_full_distance_matrix_forward_or_backward():
  n, num_words, vocab, width = 4, 8, 1000, 6
  z = jnp.ones((n, num_words, width))
  codebook = jnp.ones((vocab, width))

  def loss(z, codebook):
    out = quantizer.quantize(z, codebook, 64)
    return jnp.sum(out.z_q_st**2) + out.vq_loss

  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(z, codebook)
  shapes = list(_shapes_in(jaxpr.jaxpr))
  assert (n * num_words, 64) in shapes  # the per-chunk distances
  # The largest intermediate is the (padded) codebook itself, far below
  # the [n * W, vocab] matrix of a naive search.
  largest = max(int(np.prod(shape)) for shape in shapes)
  assert largest <= 1024 * width < n * num_words * vocab


def test_straight_through_gradient():
  rng = np.random.default_rng(2)
  z_e = jnp.asarray(rng.normal(size=(3, 4, 5)), jnp.float32)
  codebook = jnp.asarray(rng.normal(size=(20, 5)), jnp.float32)
  weights = jnp.asarray(rng.normal(size=(3, 4, 5)), jnp.float32)

  def head(values):
    return jnp.sum(jnp.sin(values) * weights)

  out = quantizer.quantize(z_e, codebook, 6)
  np.testing.assert_allclose(out.z_q_st, codebook[out.token_index], atol=1e-6)
  through = jax.grad(lambda z: head(quantizer.quantize(z, codebook, 6).z_q_st))
  np.testing.assert_allclose(through(z_e), jax.grad(head)(out.z_q), rtol=1e-6)


def test_vq_loss_hand_computed():
  # One entity, two words (1, 0) and (0, 1); codebook (1, 1), (0, 0), (2, 0).
  # Word 1 is at distance 1 from all three rows: the tie goes to row 0.
  # Word 2 is at distance 1 from rows 0 and 1; row 0 is taken, so row 1.
  # z_q - z_e = [[0, 1], [0, -1]]: both terms are 2 / 4 = 0.5, so
  # loss = 0.75 * 0.5 + 0.25 * 0.5 = 0.5.
  z_e = jnp.array([[[1.0, 0.0], [0.0, 1.0]]])
  codebook = jnp.array([[1.0, 1.0], [0.0, 0.0], [2.0, 0.0]])
  out = quantizer.quantize(z_e, codebook, 2)
  np.testing.assert_array_equal(out.token_index, [[0, 1]])
  np.testing.assert_allclose(out.vq_loss, 0.5)

  def loss(z_e, codebook):
    return quantizer.quantize(z_e, codebook, 2).vq_loss

  grad_z, grad_code = jax.grad(loss, argnums=(0, 1))(z_e, codebook)
  # Commitment term only: 0.25 * 2 * (z_e - z_q) / 4.
  np.testing.assert_allclose(grad_z, [[[0.0, -0.125], [0.0, 0.125]]])
  # Codebook term only, through the gathered rows: 0.75 * 2 * (z_q - z_e) / 4.
  np.testing.assert_allclose(
    grad_code, [[0.0, 0.375], [0.0, -0.375], [0.0, 0.0]]
  )


def test_squared_distances_match_direct_formula():
  rng = np.random.default_rng(4)
  z = rng.normal(size=(7, 3)).astype(np.float32)
  codebook = rng.normal(size=(9, 3)).astype(np.float32)
  np.testing.assert_allclose(
    quantizer.squared_distances(z, codebook),
    _naive_distances(z[:, None], codebook)[:, 0],
    rtol=1e-5,
    atol=1e-5,
  )
