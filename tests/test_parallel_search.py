"""Nearest-token search over a vocabulary-sharded codebook."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import base
from face_jax import parallel


def _mesh(shape):
  config = base.get_base_config().mesh
  config.shape = shape
  return parallel.make_mesh(config)


def _local_top_w(z, codebook, w, chunk, index_offset):
  """A one-shard search with the quantiser's contract: a scan over chunks
  of rows keeping a running top-w, as a memory-bound search is written."""
  rows = codebook.shape[0]
  steps = -(-rows // chunk)
  padded = jnp.pad(codebook, ((0, steps * chunk - rows), (0, 0)))

  def step(best, start):
    block = lax.dynamic_slice_in_dim(padded, start, chunk)
    position = start + jnp.arange(chunk, dtype=jnp.int32)
    dist = (
      jnp.sum(z * z, -1, keepdims=True)
      - 2.0 * z @ block.T
      + jnp.sum(block * block, -1)
    )
    dist = jnp.where(position < rows, dist, jnp.inf)
    index = jnp.where(position < rows, position, parallel.NO_INDEX)
    index = jnp.broadcast_to(index, dist.shape)
    merged = parallel.merge_candidates(
      jnp.concatenate([best[0], dist], 1),
      jnp.concatenate([best[1], index], 1),
      w,
    )
    return merged, None

  # A constant initial carry: inside shard_map it does not vary by shard.
  empty = (
    jnp.full((z.shape[0], w), jnp.inf),
    jnp.full((z.shape[0], w), parallel.NO_INDEX, jnp.int32),
  )
  starts = jnp.arange(steps, dtype=jnp.int32) * chunk
  (dist, index), _ = lax.scan(step, empty, starts)
  real = index != parallel.NO_INDEX
  return dist, jnp.where(real, index + index_offset, parallel.NO_INDEX)


def _numpy_top_w(z, codebook, w):
  """Exact top-w in float64 by (distance, index)."""
  z, codebook = np.float64(z), np.float64(codebook)
  dist = ((z[:, None, :] - codebook[None]) ** 2).sum(-1)
  index = np.broadcast_to(np.arange(codebook.shape[0]), dist.shape)
  order = np.lexsort((index, dist), axis=-1)[:, :w]
  return np.take_along_axis(dist, order, -1), order


CASES = [
  ((1, 8), "model", None),
  ((2, 4), "model", "data"),
  ((4, 2), "model", "data"),
  ((8, 1), "data", None),
  ((2, 4), ("data", "model"), None),
]


@pytest.mark.parametrize(("shape", "vocab_axis", "batch_axis"), CASES)
def test_sharded_top_w_equals_exact_search_with_ties(
  shape, vocab_axis, batch_axis
):
  # Small integers: many exactly equal distances, all exact in float32;
  # 37 rows divide no shard count, 10 queries not the data axis.
  rng = np.random.default_rng(0)
  z = rng.integers(-2, 3, (10, 3)).astype(np.float32)
  codebook = rng.integers(-2, 3, (37, 3)).astype(np.float32)
  search = jax.jit(
    lambda z, codebook: parallel.sharded_top_w(
      z,
      codebook,
      w=5,
      chunk=4,
      mesh=_mesh(shape),
      vocab_axis=vocab_axis,
      local_search=_local_top_w,
      batch_axis=batch_axis,
    )
  )
  dist, idx = search(z, codebook)
  want_dist, want_idx = _numpy_top_w(z, codebook, 5)
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_array_equal(dist, want_dist)
  assert idx.dtype == jnp.int32


def test_sharded_top_w_float_codebook_sharded_input():
  mesh = _mesh((2, 4))
  rng = np.random.default_rng(1)
  z = rng.normal(size=(24, 16)).astype(np.float32)
  codebook = rng.normal(size=(1000, 16)).astype(np.float32)
  codebook = jax.device_put(codebook, NamedSharding(mesh, P("model", None)))
  dist, idx = jax.jit(
    lambda z, codebook: parallel.sharded_top_w(
      z,
      codebook,
      w=6,
      chunk=64,
      mesh=mesh,
      vocab_axis="model",
      local_search=_local_top_w,
      batch_axis="data",
    )
  )(z, codebook)
  want_dist, want_idx = _numpy_top_w(z, np.asarray(codebook), 6)
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_allclose(dist, want_dist, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("shape", [(1, 8), (4, 2)])
def test_padding_rows_are_never_returned(shape):
  # Rows 9.. are padding and sit right on the queries, so a search that did
  # not mask them would return them first. Real row 8 (zeros) is the
  # nearest real row of every query and shares its shard with padding rows
  # that all come before it; with 2 shards of 8 rows, 4 local candidates
  # would be all padding.
  rng = np.random.default_rng(2)
  z = rng.integers(-2, 3, (6, 3)).astype(np.float32)
  real = rng.integers(6, 10, (9, 3)).astype(np.float32)
  real[8] = 0.0
  codebook = np.concatenate([real, np.repeat(z, 2, axis=0)[:7]])
  dist, idx = parallel.sharded_top_w(
    z,
    codebook,
    w=4,
    chunk=4,
    mesh=_mesh(shape),
    vocab_axis="model",
    local_search=_local_top_w,
    num_valid=9,
  )
  want_dist, want_idx = _numpy_top_w(z, real, 4)
  assert np.all(want_idx[:, 0] == 8)
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_array_equal(dist, want_dist)


def test_only_candidates_travel_between_devices():
  mesh = _mesh((2, 4))
  vocab, width, queries, w = 4096, 32, 24, 4
  codebook = jax.ShapeDtypeStruct(
    (vocab, width), jnp.float32, sharding=NamedSharding(mesh, P("model"))
  )
  z = jax.ShapeDtypeStruct((queries, width), jnp.float32)
  search = jax.jit(
    lambda z, codebook: parallel.sharded_top_w(
      z,
      codebook,
      w=w,
      chunk=256,
      mesh=mesh,
      vocab_axis="model",
      local_search=_local_top_w,
      batch_axis="data",
    )
  )
  hlo = search.lower(z, codebook).compile().as_text()
  collectives = re.findall(
    r"= \w+\[([\d,]*)\][^\n]*? (all-gather|all-reduce|all-to-all|"
    r"collective-permute|reduce-scatter)\(",
    hlo,
  )
  assert collectives, "expected the candidate all-gather"
  largest = max(
    np.prod([int(d) for d in dims.split(",")]) for dims, _ in collectives
  )
  # The [queries / data, w * shards] candidate lists, not the codebook.
  assert largest == queries // 2 * w * 4


@pytest.mark.parametrize(
  ("kwargs", "message"),
  [
    ({"w": 40}, r"w=40 candidates .* 37 real rows"),
    ({"w": 3, "num_valid": 38}, r"num_valid=38 is outside 1..37"),
    ({"w": 3, "batch_axis": "model"}, r"share a mesh axis"),
  ],
)
def test_bad_arguments_raise(kwargs, message):
  with pytest.raises(parallel.ShardingError, match=message):
    parallel.sharded_top_w(
      jnp.zeros((4, 3)),
      jnp.zeros((37, 3)),
      chunk=4,
      mesh=_mesh((2, 4)),
      vocab_axis="model",
      local_search=_local_top_w,
      **kwargs,
    )
