"""The normalised user-item graph and the per-step operators made from it.

The graph is the bipartite (users + items) adjacency of the train split,
symmetric, without self loops, normalised as D^-1/2 A D^-1/2. Its two
off-diagonal blocks are stored as two rectangular CSR matrices: user rows
over item columns, and item rows over user columns. Propagating the two
halves separately never concatenates the user and item tables into one
(U+I) x (U+I) product, which saves two full-table copies per layer.

Edge dropout, as the authors apply it, drops each stored entry of the
(U+I) x (U+I) matrix independently: (u, i) and (i, u) are separate entries,
so a dropped matrix is no longer symmetric. An `Operator` therefore carries
the forward blocks and the blocks of its transpose; backpropagation uses the
latter (see `face_jax.graph.propagation`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse
from absl import logging
from flax import struct

# Kernels a graph can propagate with, see `face_jax.graph.propagation`.
PATHS = ("segment_sum", "csr")


@struct.dataclass
class Block:
  """One rectangular block of the adjacency in CSR form.

  Attributes:
    indptr: [rows + 1] int32 offsets of each row's entries.
    indices: [nnz] int32 column of each entry.
    rows: [nnz] int32 row of each entry (sorted), for the segment_sum
      path; None when only the CSR path will read the block.
    values: [nnz] float32 weight of each entry. Entries past indptr[-1]
      (left by compaction) are never read.
    max_degree: an upper bound on the entries of any row, static.
  """

  indptr: jax.Array
  indices: jax.Array
  rows: jax.Array | None
  values: jax.Array
  max_degree: int = struct.field(pytree_node=False)


@struct.dataclass
class Operator:
  """A (possibly edge-dropped) normalised adjacency, ready to propagate.

  Attributes:
    user_rows: block of A with user rows and item columns.
    item_rows: block of A with item rows and user columns.
    user_rows_t: block of A^T with user rows, i.e. A's item-row block
      transposed into user-row order.
    item_rows_t: block of A^T with item rows.
    path: the kernel, one of `PATHS`.
  """

  user_rows: Block
  item_rows: Block
  user_rows_t: Block
  item_rows_t: Block
  path: str = struct.field(pytree_node=False)

  def transpose(self) -> Operator:
    return self.replace(
      user_rows=self.user_rows_t,
      item_rows=self.item_rows_t,
      user_rows_t=self.user_rows,
      item_rows_t=self.item_rows,
    )


@struct.dataclass
class Graph:
  """The normalised train graph, built once on the host.

  Attributes:
    user_rows: the user-row block of D^-1/2 A D^-1/2.
    item_rows: the item-row block; without dropout it equals the transpose
      of `user_rows`, entry for entry.
    item_from_user: [nnz] int32; `x[item_from_user]` reorders a per-entry
      array from user-row order into item-row order.
    user_from_item: [nnz] int32, the inverse permutation.
    num_users: number of users (rows of the user block).
    num_items: number of items.
    path: the propagation kernel, one of `PATHS`.
  """

  user_rows: Block
  item_rows: Block
  item_from_user: jax.Array
  user_from_item: jax.Array
  num_users: int = struct.field(pytree_node=False)
  num_items: int = struct.field(pytree_node=False)
  path: str = struct.field(pytree_node=False)

  @property
  def num_edges(self) -> int:
    """Number of (user, item) pairs; A stores twice as many entries."""
    return self.item_from_user.shape[0]


def normalized_matrix(
  pairs: np.ndarray, num_users: int, num_items: int
) -> scipy.sparse.csr_matrix:
  """The user x item block of D^-1/2 A D^-1/2 for the bipartite graph.

  Entry (u, i) is 1 / sqrt(deg(u) deg(i)) for every distinct train pair;
  users and items without pairs simply have empty rows or columns.

  Args:
    pairs: [n, 2] (user, item) train pairs; duplicates count once.
    num_users: number of users.
    num_items: number of items.

  Returns:
    [num_users, num_items] float32 CSR matrix with sorted indices.
  """
  binary = scipy.sparse.csr_matrix(
    (np.ones(len(pairs), np.float32), (pairs[:, 0], pairs[:, 1])),
    shape=(num_users, num_items),
  )
  binary.sum_duplicates()
  binary.data[:] = 1.0
  user_degree = np.diff(binary.indptr)
  item_degree = np.bincount(binary.indices, minlength=num_items)
  rows = np.repeat(np.arange(num_users), user_degree)
  scale = user_degree[rows].astype(np.float64) * item_degree[binary.indices]
  binary.data = (1.0 / np.sqrt(scale)).astype(np.float32)
  return binary


def build_graph(
  pairs: np.ndarray, num_users: int, num_items: int, path: str
) -> Graph:
  """Builds the normalised graph of the train pairs.

  Args:
    pairs: [n, 2] int (user, item) train pairs.
    num_users: number of users.
    num_items: number of items.
    path: propagation kernel, one of `PATHS` (resolve "auto" first with
      `face_jax.graph.propagation.resolve_path`). "csr" on GPU switches on
      JAX's cuSPARSE lowering of BCSR products for the whole process.

  Returns:
    The graph, its arrays on the default device.

  Raises:
    ValueError: `path` is not one of `PATHS`.
  """
  if path not in PATHS:
    raise ValueError(
      f"Unknown propagation path {path!r}; use one of {list(PATHS)}."
    )
  if path == "csr" and jax.default_backend() == "gpu":
    # BCSR products reach cuSPARSE only behind this (process-wide) flag;
    # without it they fall back to a generic gather/scatter.
    logging.info("Enabling jax_bcoo_cusparse_lowering for CSR propagation.")
    jax.config.update("jax_bcoo_cusparse_lowering", True)
  user_block = normalized_matrix(pairs, num_users, num_items)
  users = np.repeat(np.arange(num_users), np.diff(user_block.indptr))
  items = user_block.indices
  # Item-row order is the user-row entries sorted by (item, user).
  item_from_user = np.lexsort((users, items))
  user_from_item = np.argsort(item_from_user)
  item_indptr = np.zeros(num_items + 1, np.int64)
  np.cumsum(np.bincount(items, minlength=num_items), out=item_indptr[1:])

  def block(indptr, indices, rows, values):
    return Block(
      indptr=jnp.asarray(indptr, jnp.int32),
      indices=jnp.asarray(indices, jnp.int32),
      rows=jnp.asarray(rows, jnp.int32),
      values=jnp.asarray(values, jnp.float32),
      max_degree=int(np.diff(indptr).max(initial=0)),
    )

  return Graph(
    user_rows=block(user_block.indptr, items, users, user_block.data),
    item_rows=block(
      item_indptr,
      users[item_from_user],
      items[item_from_user],
      user_block.data[item_from_user],
    ),
    item_from_user=jnp.asarray(item_from_user, jnp.int32),
    user_from_item=jnp.asarray(user_from_item, jnp.int32),
    num_users=num_users,
    num_items=num_items,
    path=path,
  )


def full_operator(graph: Graph) -> Operator:
  """The operator without dropout; the matrix is symmetric."""
  return Operator(
    user_rows=graph.user_rows,
    item_rows=graph.item_rows,
    user_rows_t=graph.user_rows,
    item_rows_t=graph.item_rows,
    path=graph.path,
  )


def dropped_operator(
  graph: Graph, rng: jax.Array, keep_rate: float
) -> Operator:
  """The operator after edge dropout, as the authors drop edges.

  Every stored entry of the (U+I) x (U+I) matrix is kept independently with
  probability `keep_rate`; kept values are not rescaled (the authors'
  SpAdjEdgeDrop). On the CSR path the dropped entries are also removed
  (compacted), so the kernel skips them.

  Args:
    graph: the normalised graph.
    rng: key for the keep masks.
    keep_rate: probability of keeping each entry.

  Returns:
    The dropped operator with its transpose blocks.
  """
  user_rng, item_rng = jax.random.split(rng)
  shape = (graph.num_edges,)
  return masked_operator(
    graph,
    jax.random.bernoulli(user_rng, keep_rate, shape),
    jax.random.bernoulli(item_rng, keep_rate, shape),
  )


def masked_operator(
  graph: Graph, keep_user: jax.Array, keep_item: jax.Array
) -> Operator:
  """The operator keeping only the given entries of A, unscaled.

  Args:
    graph: the normalised graph.
    keep_user: [num_edges] bool, entry (u, i) of A is kept; in user-row
      order (train pairs sorted by user, then item).
    keep_item: [num_edges] bool, entry (i, u) of A is kept; in item-row
      order (pairs sorted by item, then user).

  Returns:
    The operator with its transpose blocks.
  """
  # A^T's user-row block holds A's (i, u) entries: their masks reordered
  # into user-row order, and vice versa.
  keep_user_t = keep_item[graph.user_from_item]
  keep_item_t = keep_user[graph.item_from_user]
  mask = compact if graph.path == "csr" else _zero_dropped
  return Operator(
    user_rows=mask(graph.user_rows, keep_user),
    item_rows=mask(graph.item_rows, keep_item),
    user_rows_t=mask(graph.user_rows, keep_user_t),
    item_rows_t=mask(graph.item_rows, keep_item_t),
    path=graph.path,
  )


def _zero_dropped(block: Block, keep: jax.Array) -> Block:
  return block.replace(values=jnp.where(keep, block.values, 0.0))


def compact(block: Block, keep: jax.Array) -> Block:
  """Keeps some entries of a CSR block, moved to the front in CSR order.

  The arrays keep their static length; entries past the new indptr[-1] are
  zeros that the CSR kernel never reads, so it skips the dropped work.

  Args:
    block: the block; its `rows` are not carried over.
    keep: [nnz] bool, which stored entries to keep. Entries past the
      block's indptr[-1] must not be kept.

  Returns:
    The compacted block.
  """
  kept_before = jnp.concatenate(
    [jnp.zeros(1, jnp.int32), jnp.cumsum(keep, dtype=jnp.int32)]
  )
  num_entries = keep.shape[0]
  # source[j] = the entry that lands at position j; dropped entries are sent
  # out of range, where mode="drop" discards them.
  target = jnp.where(keep, kept_before[:-1], num_entries)
  source = (
    jnp.zeros(num_entries, jnp.int32)
    .at[target]
    .set(jnp.arange(num_entries, dtype=jnp.int32), mode="drop")
  )
  filled = jnp.arange(num_entries) < kept_before[-1]
  return Block(
    indptr=kept_before[block.indptr],
    indices=jnp.where(filled, block.indices[source], 0),
    rows=None,
    values=jnp.where(filled, block.values[source], 0.0),
    max_degree=block.max_degree,
  )
