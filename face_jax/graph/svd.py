"""A truncated SVD of the normalised user x item matrix (LightGCL's view)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse
import scipy.sparse.linalg
from flax import struct


@struct.dataclass
class SvdView:
  """Rank-q factors R ~ U diag(s) V^T of the normalised matrix R.

  Attributes:
    users: [num_users, q] left singular vectors U.
    items: [num_items, q] right singular vectors V.
    values: [q] singular values s, largest first.
  """

  users: jax.Array
  items: jax.Array
  values: jax.Array


def svd_view(matrix: scipy.sparse.spmatrix, rank: int) -> SvdView:
  """The top-`rank` singular triplets of a sparse matrix.

  ARPACK starts from a fixed vector and each singular vector's sign is fixed
  (largest-magnitude entry positive), so the result is deterministic.

  Args:
    matrix: [num_users, num_items] normalised train matrix.
    rank: number of singular triplets, below min(matrix.shape).

  Returns:
    The factors, float32.

  Raises:
    ValueError: `rank` is not in [1, min(matrix.shape)).
  """
  if not 0 < rank < min(matrix.shape):
    raise ValueError(
      f"SVD rank {rank} must be in [1, {min(matrix.shape)}) for a "
      f"{matrix.shape[0]} x {matrix.shape[1]} matrix; lower "
      "config.model.lightgcl_rank."
    )
  start = np.full(min(matrix.shape), 1.0 / np.sqrt(min(matrix.shape)))
  left, values, right_t = scipy.sparse.linalg.svds(
    matrix.astype(np.float64), k=rank, v0=start, solver="arpack"
  )
  order = np.argsort(values)[::-1]
  left, values, right = left[:, order], values[order], right_t[order].T
  peak = np.argmax(np.abs(left), axis=0)
  signs = np.sign(left[peak, np.arange(rank)])
  return SvdView(
    users=jnp.asarray(left * signs, jnp.float32),
    items=jnp.asarray(right * signs, jnp.float32),
    values=jnp.asarray(values, jnp.float32),
  )


def to_users(view: SvdView, items: jax.Array) -> jax.Array:
  """U diag(s) V^T items: [num_items, d] -> [num_users, d]."""
  return (view.users * view.values) @ (view.items.T @ items)


def to_items(view: SvdView, users: jax.Array) -> jax.Array:
  """V diag(s) U^T users: [num_users, d] -> [num_items, d]."""
  return (view.items * view.values) @ (view.users.T @ users)
