"""Sparse propagation over the normalised graph, with two kernels.

- "segment_sum": gather the neighbour rows, scale, and `jax.ops.segment_sum`
  them into their (sorted) rows. Portable, the form XLA shards and the fast
  one on TPU.
- "csr": `jax.experimental.sparse` BCSR products, which lower to a
  multithreaded CSR kernel on CPU (about 8x faster than segment_sum on
  Amazon-book) and to cuSPARSE on GPU.

Both are linear maps with custom VJPs: the cotangent is propagated with the
transposed operator (A^T, which differs from A after edge dropout) in the
same kernel, instead of the transpose JAX would derive (a scatter-add over
unsorted indices for segment_sum, a BCOO fallback for BCSR).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import sparse

from face_jax.graph.adjacency import PATHS, Block, Operator, compact

# Values of config.model.propagation.
PROPAGATION_OPTIONS = ("auto", *PATHS)


def resolve_path(name: str, backend: str | None = None) -> str:
  """Resolves a config.model.propagation value to a kernel.

  Args:
    name: "auto", "segment_sum" or "csr".
    backend: platform to decide "auto" for; `jax.default_backend()` when
      None.

  Returns:
    "segment_sum" or "csr". "auto" gives "csr" on CPU and GPU, where
    sparse kernels exist, and "segment_sum" elsewhere (TPU).

  Raises:
    ValueError: `name` is not one of `PROPAGATION_OPTIONS`.
  """
  if name not in PROPAGATION_OPTIONS:
    raise ValueError(
      f"Unknown propagation {name!r}; set config.model.propagation to one "
      f"of {list(PROPAGATION_OPTIONS)}."
    )
  if name != "auto":
    return name
  backend = backend or jax.default_backend()
  return "csr" if backend in ("cpu", "gpu", "cuda", "rocm") else "segment_sum"


def _num_rows(block: Block) -> int:
  return block.indptr.shape[0] - 1


def spmm(block: Block, x: jax.Array, path: str) -> jax.Array:
  """Multiplies one CSR block by dense rows.

  Args:
    block: [rows, cols] sparse block.
    x: [cols, d] dense rows.
    path: "segment_sum" or "csr".

  Returns:
    [rows, d] product.
  """
  num_rows = _num_rows(block)
  if path == "csr":
    matrix = sparse.BCSR(
      (block.values, block.indices, block.indptr),
      shape=(num_rows, x.shape[0]),
    )
    contract_columns = (([1], [0]), ([], []))
    return sparse.bcsr_dot_general(
      matrix, x, dimension_numbers=contract_columns
    )
  messages = block.values[:, None] * x[block.indices]
  return jax.ops.segment_sum(
    messages, block.rows, num_segments=num_rows, indices_are_sorted=True
  )


def spmm_rows(
  block: Block, row_ids: jax.Array, x: jax.Array, path: str
) -> jax.Array:
  """Some rows of a block times dense rows: (block @ x)[row_ids].

  On the CSR path only the selected rows' entries are visited: they are
  gathered into a small CSR matrix whose static capacity is
  len(row_ids) * block.max_degree (the kernel reads only the filled part).
  The segment_sum path has no such saving and computes the full product.

  Args:
    block: [rows, cols] sparse block.
    row_ids: [m] int rows to compute; repeats allowed.
    x: [cols, d] dense rows.
    path: "segment_sum" or "csr".

  Returns:
    [m, d] product rows.
  """
  num_ids = row_ids.shape[0]
  capacity = num_ids * block.max_degree
  if path != "csr" or capacity == 0:
    return spmm(block, x, path)[row_ids]
  starts = block.indptr[row_ids]
  ends = jnp.cumsum(block.indptr[row_ids + 1] - starts, dtype=jnp.int32)
  indptr = jnp.concatenate([jnp.zeros(1, ends.dtype), ends])
  # Slot s belongs to the number of selected rows that end at or before it.
  marks = jnp.zeros(capacity + 1, jnp.int32).at[ends].add(1, mode="drop")
  owner = jnp.minimum(jnp.cumsum(marks)[:-1], num_ids - 1)
  slots = jnp.arange(capacity, dtype=ends.dtype)
  filled = slots < ends[-1]
  entries = jnp.where(filled, starts[owner] + slots - indptr[owner], 0)
  selected = Block(
    indptr=indptr,
    indices=jnp.where(filled, block.indices[entries], 0),
    rows=None,
    values=jnp.where(filled, block.values[entries], 0.0),
    max_degree=block.max_degree,
  )
  return spmm(selected, x, path)


def restrict_columns(
  block: Block, column_ids: jax.Array, num_columns: int
) -> Block:
  """The block with only the entries whose column is among `column_ids`.

  `restrict_columns(block, ids, n) @ x` equals `block @ x` when x is zero
  outside the rows `ids`, and visits only those columns' entries. Only
  for the CSR path (segment_sum does not skip entries).

  Args:
    block: [rows, num_columns] CSR block, possibly compacted.
    column_ids: [m] int columns to keep; repeats allowed.
    num_columns: number of columns of the block.

  Returns:
    The compacted block.
  """
  selected = jnp.zeros(num_columns, bool).at[column_ids].set(True)
  stored = jnp.arange(block.indices.shape[0]) < block.indptr[-1]
  return compact(block, selected[block.indices] & stored)


def _apply(
  op: Operator, users: jax.Array, items: jax.Array
) -> tuple[jax.Array, jax.Array]:
  return spmm(op.user_rows, items, op.path), spmm(op.item_rows, users, op.path)


@jax.custom_vjp
def propagate(
  op: Operator, users: jax.Array, items: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """One layer: (users, items) -> A (users, items).

  Users receive their items' rows and items their users' rows. The operator
  is a constant: no gradient flows into its values.

  Args:
    op: the (possibly dropped) normalised adjacency.
    users: [num_users, d] user rows.
    items: [num_items, d] item rows.

  Returns:
    ([num_users, d], [num_items, d]) propagated rows.
  """
  return _apply(op, users, items)


def _propagate_fwd(op, users, items):
  return _apply(op, users, items), op


def _propagate_bwd(op, cotangents):
  user_cotangent, item_cotangent = cotangents
  users, items = _apply(op.transpose(), user_cotangent, item_cotangent)
  return None, users, items


propagate.defvjp(_propagate_fwd, _propagate_bwd)


def layers(
  op: Operator, users: jax.Array, items: jax.Array, num_layers: int
) -> list[tuple[jax.Array, jax.Array]]:
  """The layer-0..L embeddings of plain propagation.

  Returns:
    num_layers + 1 pairs ([num_users, d], [num_items, d]); entry 0 is the
    input.
  """
  outputs = [(users, items)]
  for _ in range(num_layers):
    outputs.append(propagate(op, *outputs[-1]))
  return outputs


def layer_sum(
  op: Operator, users: jax.Array, items: jax.Array, num_layers: int
) -> tuple[jax.Array, jax.Array]:
  """Sum of the layer-0..L embeddings of all users and items."""
  outputs = layers(op, users, items, num_layers)
  return (
    sum(user_rows for user_rows, _ in outputs),
    sum(item_rows for _, item_rows in outputs),
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_sum_rows(
  op: Operator,
  users: jax.Array,
  items: jax.Array,
  num_layers: int,
  user_ids: jax.Array,
  item_ids: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """Sum of the layer-0..L embeddings, at some rows only.

  Equals `layer_sum` gathered at the ids, but never materialises the sums of
  full tables, computes the last layer at the ids only (`spmm_rows`), and
  its backward pass is the transposed series evaluated Horner-style:
  h <- A^T h + S^T c, L times, where S^T c scatters the cotangents into
  their rows in place; its first step reads only the selected rows
  (`restrict_columns`). On the CSR path a training step of LightGCN is then
  2L - 2 full sparse products plus small ones, gathers and scatters.

  Args:
    op: the (possibly dropped) normalised adjacency.
    users: [num_users, d] layer-0 user rows.
    items: [num_items, d] layer-0 item rows.
    num_layers: L, static.
    user_ids: [m] int user rows to return (repeats allowed).
    item_ids: [n] int item rows to return.

  Returns:
    ([m, d], [n, d]) summed embeddings at the ids.
  """
  return _sum_rows(op, users, items, num_layers, user_ids, item_ids)


def _sum_rows(op, users, items, num_layers, user_ids, item_ids):
  user_sum, item_sum = users[user_ids], items[item_ids]
  for _ in range(num_layers - 1):
    users, items = _apply(op, users, items)
    user_sum += users[user_ids]
    item_sum += items[item_ids]
  if num_layers > 0:
    # The last layer is needed at the selected rows only.
    user_sum += spmm_rows(op.user_rows, user_ids, items, op.path)
    item_sum += spmm_rows(op.item_rows, item_ids, users, op.path)
  return user_sum, item_sum


def _layer_sum_rows_fwd(op, users, items, num_layers, user_ids, item_ids):
  outputs = _sum_rows(op, users, items, num_layers, user_ids, item_ids)
  return outputs, (op, user_ids, item_ids)


def _layer_sum_rows_bwd(num_layers, residuals, cotangents):
  op, user_ids, item_ids = residuals
  user_cotangent, item_cotangent = cotangents
  transposed = op.transpose()
  # h <- S^T c, then L times h <- A^T h + S^T c; the scatters are in place.
  users = (
    jnp.zeros(
      (_num_rows(op.user_rows), user_cotangent.shape[1]), user_cotangent.dtype
    )
    .at[user_ids]
    .add(user_cotangent)
  )
  items = (
    jnp.zeros(
      (_num_rows(op.item_rows), item_cotangent.shape[1]), item_cotangent.dtype
    )
    .at[item_ids]
    .add(item_cotangent)
  )
  for layer in range(num_layers):
    step = transposed
    if layer == 0 and op.path == "csr":
      # h is still zero outside the selected rows: skip the other columns.
      step = transposed.replace(
        user_rows=restrict_columns(
          transposed.user_rows, item_ids, items.shape[0]
        ),
        item_rows=restrict_columns(
          transposed.item_rows, user_ids, users.shape[0]
        ),
      )
    users, items = _apply(step, users, items)
    users = users.at[user_ids].add(user_cotangent)
    items = items.at[item_ids].add(item_cotangent)
  return None, users, items, None, None


layer_sum_rows.defvjp(_layer_sum_rows_fwd, _layer_sum_rows_bwd)
