"""BPR epochs: every train pair once, each with a fresh negative item.

Negatives are drawn exactly, without rejection: a user with d train items
has num_items - d candidates, so a uniform r in [0, num_items - d) is mapped
to the r-th item the user has not seen. With the user's train items sorted
p_0 < p_1 < ..., the r-th unseen item is r + #{j : p_j - j <= r}, because
p_j - j counts the unseen items below p_j. One `np.searchsorted` over all
train pairs answers that count for a whole epoch at once, so no draw can hit
a train positive and no user, however dense, makes the sampler loop.
"""

from __future__ import annotations

import numpy as np

from face_jax.data import DataError


class NegativeSampler:
  """Uniform negatives outside each user's train items.

  Args:
    train: [n, 2] (user, item) train pairs, unique and sorted by user then
      item (the `Dataset` form).
    num_users: number of users.
    num_items: number of items.

  Raises:
    DataError: the pairs are not unique and sorted, or a user has every item
      in its train set (no negative exists for it).
  """

  def __init__(self, train: np.ndarray, num_users: int, num_items: int):
    users = train[:, 0].astype(np.int64)
    items = train[:, 1].astype(np.int64)
    keys = users * num_items + items
    if np.any(np.diff(keys) <= 0):
      raise DataError(
        "Train pairs must be unique and sorted by user then item to sample "
        "negatives; build the Dataset with sorted, deduplicated pairs."
      )
    self._num_items = num_items
    self._degree = np.bincount(users, minlength=num_users)
    full = np.flatnonzero(self._degree >= num_items)
    if len(full):
      raise DataError(
        f"User {full[0]} (and {len(full) - 1} more) has all {num_items} "
        "items in its train set, so no negative item exists; drop such "
        "users from the dataset."
      )
    self._starts = np.concatenate([[0], np.cumsum(self._degree)[:-1]])
    rank_in_user = np.arange(len(train)) - self._starts[users]
    # Ascending: unseen-items-below counts never decrease within a user,
    # and stay below num_items, so users occupy disjoint key ranges.
    self._unseen_below = users * num_items + (items - rank_in_user)

  def sample(self, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draws one negative item per entry of `users`.

    Args:
      users: [n] user ids.
      rng: numpy random generator.

    Returns:
      [n] int32 items, each uniform over the items not in that user's train
      set.
    """
    users = np.asarray(users, dtype=np.int64)
    unseen_rank = rng.integers(0, self._num_items - self._degree[users])
    below = np.searchsorted(
      self._unseen_below, users * self._num_items + unseen_rank, side="right"
    )
    return (unseen_rank + below - self._starts[users]).astype(np.int32)


def num_batches(num_pairs: int, batch_size: int) -> int:
  """Batches per epoch: the last partial batch is kept (padded)."""
  return -(-num_pairs // batch_size)


def epoch_batches(
  train: np.ndarray,
  sampler: NegativeSampler,
  batch_size: int,
  rng: np.random.Generator,
) -> dict[str, np.ndarray]:
  """One epoch of (user, positive, negative) triples in fixed-size batches.

  Every train pair appears once, in a random order. The last batch, when
  partial, is filled up with the first pairs of the same shuffled order
  (with their own fresh negatives), so every step has the same shape and the
  train step compiles once; at most batch_size - 1 pairs appear twice.

  Args:
    train: [n, 2] (user, item) train pairs.
    sampler: negative sampler over the same pairs.
    batch_size: triples per step.
    rng: numpy random generator of this epoch.

  Returns:
    {"user", "pos", "neg"}: each [num_batches, batch_size] int32.
  """
  batches = num_batches(len(train), batch_size)
  order = np.resize(rng.permutation(len(train)), batches * batch_size)
  users = train[order, 0].astype(np.int32)
  positives = train[order, 1].astype(np.int32)
  negatives = sampler.sample(users, rng)
  shape = (batches, batch_size)
  return {
    "user": users.reshape(shape),
    "pos": positives.reshape(shape),
    "neg": negatives.reshape(shape),
  }
