"""Pair arrays and the seeded per-user 3:1:1 split.

Rounding rule of the split: a user with n interactions gives
k = round(n / 5) = (n + 2) // 5 of them to validation, k to test and the
other n - 2k to train. So 5 interactions split 3/1/1, 4 split 2/1/1, 3 split
1/1/1, 8 split 4/2/2, and users with 1 or 2 interactions keep them all in
train (they are still scored nowhere, but their embeddings are trained).
Validation and test get the same count per user, train never gets fewer than
a third, and over many users the shares approach 60/20/20.
"""

from __future__ import annotations

import numpy as np


def unique_pairs(users: np.ndarray, items: np.ndarray) -> np.ndarray:
  """Returns the distinct (user, item) pairs sorted by user, then item.

  Args:
    users: [n] integer user ids.
    items: [n] integer item ids.

  Returns:
    [m, 2] int32 unique pairs, m <= n.
  """
  pairs = np.stack(
    [np.asarray(users, np.int64), np.asarray(items, np.int64)], axis=1
  ).reshape(-1, 2)
  return np.unique(pairs, axis=0).astype(np.int32)


def eval_count(num_interactions: np.ndarray) -> np.ndarray:
  """Per-user size of the validation (and of the test) part: round(n / 5)."""
  return (np.asarray(num_interactions) + 2) // 5


def split_per_user(
  pairs: np.ndarray,
  seed: int,
  order_keys: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Splits each user's interactions 3:1:1 into train, validation and test.

  Args:
    pairs: [n, 2] int32 unique (user, item) pairs.
    seed: seed of the random order; the result depends only on the pair set,
      `order_keys` and this seed, not on the row order of `pairs`.
    order_keys: optional [n] keys aligned with `pairs` (timestamps) for a
      chronological split: each user's earliest interactions go to train, the
      latest to test. Ties are broken at random.

  Returns:
    (train, valid, test): [*, 2] int32 pairs, each sorted by user then item.
  """
  pairs = np.asarray(pairs, np.int32).reshape(-1, 2)
  # Canonical row order, so the draw below does not depend on input order.
  canonical = np.lexsort((pairs[:, 1], pairs[:, 0]))
  pairs = pairs[canonical]
  rng = np.random.default_rng(seed)
  tie_break = rng.random(len(pairs))
  if order_keys is None:
    order = np.lexsort((tie_break, pairs[:, 0]))
  else:
    keys = np.asarray(order_keys)[canonical]
    order = np.lexsort((tie_break, keys, pairs[:, 0]))
  ordered = pairs[order]

  users = ordered[:, 0]
  starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
  counts = np.diff(np.r_[starts, len(users)])
  # Rank of each interaction within its user's (shuffled or timed) list.
  rank = np.arange(len(users)) - np.repeat(starts, counts)
  per_row_count = np.repeat(counts, counts)
  per_row_eval = np.repeat(eval_count(counts), counts)
  num_train = per_row_count - 2 * per_row_eval
  is_train = rank < num_train
  is_valid = (rank >= num_train) & (rank < num_train + per_row_eval)
  is_test = rank >= num_train + per_row_eval
  return tuple(_sorted(ordered[mask]) for mask in (is_train, is_valid, is_test))


def _sorted(pairs: np.ndarray) -> np.ndarray:
  return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))].astype(np.int32)
