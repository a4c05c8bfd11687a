"""Nearest-token search over a codebook sharded along the vocabulary.

The quantiser needs, for each of m query words, its w nearest codebook rows
(w = the number of words per entity; the greedy distinct-token pass then
works on those candidates alone). With the codebook split by rows over the
vocabulary mesh axes, each device searches its own rows, keeps its local
top-w with GLOBAL row indices, and only these [m, w] candidate lists travel:
an all-gather over the vocabulary axes, then a merge to the global top-w.
The codebook itself is never gathered.

Ties: among equal distances the lowest global index wins, at every stage,
which is what an argmin over the whole, unsharded codebook gives.

Model code calls `vocab_top_w`, which picks the sharded search or the local
one from the logical axis "vocab" of the active `use_mesh` block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from face_jax.parallel.mesh import ShardingError, mesh_axis_size
from face_jax.parallel.rules import (
  current_context,
  logical_to_spec,
  pad_rows_to,
)

# Index of an empty candidate slot (padding rows, fewer rows than w); it
# sorts after every real index and comes with distance +inf. It equals the
# quantiser's own marker, so lists from both can be merged.
NO_INDEX = int(jnp.iinfo(jnp.int32).max)

# (queries [m, h], codebook rows [v, h], w, chunk, index_offset) ->
# (distances [m, w], indices [m, w] int32), sorted by distance then index,
# indices offset by index_offset, empty slots (+inf, NO_INDEX). This is the
# signature of face_jax.models.quantizer.top_w_candidates.
LocalSearch = Callable[
  [jax.Array, jax.Array, int, int, jax.Array],
  tuple[jax.Array, jax.Array],
]


def merge_candidates(
  distances: jax.Array, indices: jax.Array, w: int
) -> tuple[jax.Array, jax.Array]:
  """The w best of concatenated candidate lists, by (distance, index).

  Args:
    distances: [m, k] candidate distances, k >= w, in any order.
    indices: [m, k] int32 global indices of those candidates.
    w: candidates kept per row.

  Returns:
    (distances [m, w], indices [m, w]) sorted by distance, then index.
  """
  distances, indices = lax.sort(
    (distances, indices.astype(jnp.int32)), dimension=-1, num_keys=2
  )
  return distances[:, :w], indices[:, :w]


def _axes(axes: str | Sequence[str] | None) -> tuple[str, ...]:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def sharded_top_w(
  z: jax.Array,
  codebook: jax.Array,
  *,
  w: int,
  chunk: int,
  mesh: Mesh,
  vocab_axis: str | Sequence[str],
  local_search: LocalSearch,
  num_valid: int | None = None,
  batch_axis: str | Sequence[str] | None = None,
) -> tuple[jax.Array, jax.Array]:
  """The w nearest codebook rows of each query, codebook sharded by rows.

  Call it inside a jitted step whose codebook is sharded over `vocab_axis`
  (logical axis "vocab"); then each device reads only its own rows. Pad
  the codebook (and the frozen token table it is mapped from) to a multiple
  of the vocabulary shard count where it is created (`pad_rows_to`) and
  pass the real row count as `num_valid`: rows from `num_valid` on are
  never returned. A codebook whose rows the shard count does not divide
  is padded here, which costs a copy.

  No gradient flows through the search (the quantiser gathers the chosen
  rows to differentiate).

  Args:
    z: [m, h] queries.
    codebook: [rows, h] codebook.
    w: candidates per query, at most the number of real rows.
    chunk: codebook rows compared per scan step within a shard.
    mesh: the device mesh.
    vocab_axis: mesh axis (or axes) the codebook rows are split over.
    local_search: the search within one shard, with the quantiser's
      `top_w_candidates` signature (see `LocalSearch`).
    num_valid: rows that are real; rows from this index on are padding.
      All rows when None.
    batch_axis: mesh axis (or axes) the queries are split over, disjoint
      from `vocab_axis`; None keeps every query on every device.

  Returns:
    (distances [m, w], indices [m, w] int32): sorted by distance, then by
    global index; equal to the top-w over the whole codebook.

  Raises:
    ShardingError: for w or num_valid out of range or overlapping axes.
  """
  vocab_axes, batch_axes = _axes(vocab_axis), _axes(batch_axis)
  if set(vocab_axes) & set(batch_axes):
    raise ShardingError(
      f"vocab_axis {vocab_axes} and batch_axis {batch_axes} share a mesh "
      "axis; give the queries and the codebook rows different axes."
    )
  rows = codebook.shape[0]
  num_valid = rows if num_valid is None else num_valid
  if not 0 < num_valid <= rows:
    raise ShardingError(
      f"num_valid={num_valid} is outside 1..{rows}, the codebook rows."
    )
  if not 0 < w <= num_valid:
    raise ShardingError(
      f"w={w} candidates asked of a codebook of {num_valid} real rows; "
      f"use 1 <= w <= {num_valid}."
    )

  shards = mesh_axis_size(mesh, vocab_axes)
  codebook = pad_rows_to(lax.stop_gradient(codebook), shards)
  shard_rows = codebook.shape[0] // shards
  # A shard holds at most this many padding rows; asking the local search
  # for that many more than w leaves w real rows after they are masked.
  keep = w + min(codebook.shape[0] - num_valid, shard_rows)

  num_queries = z.shape[0]
  z = pad_rows_to(lax.stop_gradient(z), mesh_axis_size(mesh, batch_axes))

  def search_shard(queries, rows_here):
    offset = lax.axis_index(vocab_axes) * shard_rows
    dist, idx = local_search(queries, rows_here, keep, chunk, offset)
    real = idx < num_valid
    dist, idx = merge_candidates(
      jnp.where(real, dist, jnp.inf), jnp.where(real, idx, NO_INDEX), w
    )
    # Only the [m, w] candidates of every shard travel; the merged result
    # is the same on all of them.
    dist, idx = lax.all_gather((dist, idx), vocab_axes, axis=1, tiled=True)
    return merge_candidates(dist, idx, w)

  queries_spec = PartitionSpec(batch_axes or None, None)
  # The outputs are replicated over the vocabulary axes by construction
  # (all-gather, then the same merge everywhere). JAX's varying-value check
  # stays off because it rejects ordinary local searches: a scan whose
  # initial carry is a constant but whose body reads the shard's rows.
  search = jax.shard_map(
    search_shard,
    mesh=mesh,
    in_specs=(queries_spec, PartitionSpec(vocab_axes, None)),
    out_specs=(queries_spec, queries_spec),
    check_vma=False,
  )
  dist, idx = search(z, codebook)
  return dist[:num_queries], idx[:num_queries]


def _spec_axes(entry) -> tuple[str, ...]:
  """The mesh axes of one PartitionSpec entry, () when not split."""
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def vocab_top_w(
  z: jax.Array,
  codebook: jax.Array,
  *,
  w: int,
  chunk: int,
  local_search: LocalSearch,
  num_valid: int | None = None,
) -> tuple[jax.Array, jax.Array]:
  """The w nearest codebook rows, searched where the rows live.

  Model code calls this rather than `sharded_top_w`, so that it never names
  a mesh axis. Inside a `use_mesh` block whose rules split the logical axis
  "vocab" of this codebook over more than one device, the search runs
  shard by shard (`sharded_top_w`) over those mesh axes, with the queries
  split over the mesh axes of "batch" that "vocab" leaves free. Outside a
  block, or where "vocab" is kept whole (a rule to None, a single device,
  or a row count the shard count does not divide), it is `local_search`
  over the real rows. Both give the same candidates.

  Args:
    z: [m, h] queries.
    codebook: [rows, h] codebook, laid out by the logical axes
      ("vocab", "embed").
    w: candidates per query.
    chunk: codebook rows compared per scan step.
    local_search: the one-device search (see `LocalSearch`).
    num_valid: real rows; rows from this index on are padding and never
      returned. All rows when None.

  Returns:
    (distances [m, w], indices [m, w] int32), sorted by distance, then by
    index.
  """
  rows = codebook.shape[0]
  num_valid = rows if num_valid is None else num_valid
  context = current_context()
  if context is not None:
    mesh, rules = context.mesh, context.rules
    # The codebook's rows are split as the rules split an array of this
    # shape; the queries only need the batch rule's axes.
    vocab_spec = logical_to_spec(("vocab", None), rules, mesh, codebook.shape)
    vocab_axes = _spec_axes(vocab_spec[0])
    if mesh_axis_size(mesh, vocab_axes) > 1:
      batch_spec = logical_to_spec(("batch", None), rules)
      batch_axes = tuple(
        axis for axis in _spec_axes(batch_spec[0]) if axis not in vocab_axes
      )
      return sharded_top_w(
        z,
        codebook,
        w=w,
        chunk=chunk,
        mesh=mesh,
        vocab_axis=vocab_axes,
        local_search=local_search,
        num_valid=num_valid,
        batch_axis=batch_axes or None,
      )
  if num_valid != rows:
    if not 0 < num_valid <= rows:
      raise ShardingError(
        f"num_valid={num_valid} is outside 1..{rows}, the codebook rows."
      )
    codebook = codebook[:num_valid]
  return local_search(z, codebook, w, chunk, 0)
