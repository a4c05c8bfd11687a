"""The per-user 3:1:1 split: counts, seeding, determinism, time order."""

import numpy as np
import pytest

from face_jax.data.split import eval_count, split_per_user, unique_pairs


def _pairs_with_counts(counts):
  """User u gets counts[u] distinct items (item ids 0..counts[u]-1)."""
  return np.array(
    [(user, item) for user, n in enumerate(counts) for item in range(n)],
    dtype=np.int32,
  ).reshape(-1, 2)


def _per_user(pairs, num_users):
  return np.bincount(pairs[:, 0], minlength=num_users)


@pytest.mark.parametrize(
  ("n", "expected"),
  [
    (1, (1, 0, 0)),
    (2, (2, 0, 0)),
    (3, (1, 1, 1)),
    (4, (2, 1, 1)),
    (5, (3, 1, 1)),
    (7, (5, 1, 1)),
    (8, (4, 2, 2)),
    (10, (6, 2, 2)),
    (13, (7, 3, 3)),
    (100, (60, 20, 20)),
  ],
)
def test_counts_per_user_follow_the_rounding_rule(n, expected):
  train, valid, test = split_per_user(_pairs_with_counts([n]), seed=3)
  assert (len(train), len(valid), len(test)) == expected
  assert int(eval_count(n)) == expected[1]


def test_split_is_a_partition_with_3_1_1_shares():
  rng = np.random.default_rng(0)
  counts = rng.integers(1, 40, size=200)
  pairs = _pairs_with_counts(counts)
  train, valid, test = split_per_user(pairs, seed=0)
  merged = np.concatenate([train, valid, test])
  assert len(np.unique(merged, axis=0)) == len(pairs)
  np.testing.assert_array_equal(unique_pairs(*merged.T), pairs)
  k = (counts + 2) // 5
  np.testing.assert_array_equal(_per_user(valid, 200), k)
  np.testing.assert_array_equal(_per_user(test, 200), k)
  np.testing.assert_array_equal(_per_user(train, 200), counts - 2 * k)
  share = len(train) / len(pairs)
  assert 0.55 < share < 0.65
  for part in (train, valid, test):
    assert part.dtype == np.int32
    order = np.lexsort((part[:, 1], part[:, 0]))
    np.testing.assert_array_equal(order, np.arange(len(part)))


def test_split_is_seeded_and_independent_of_row_order():
  pairs = _pairs_with_counts([20] * 30)
  first = split_per_user(pairs, seed=7)
  again = split_per_user(pairs[::-1].copy(), seed=7)
  other = split_per_user(pairs, seed=8)
  for a, b in zip(first, again, strict=True):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(first[2], other[2])


def test_time_split_puts_the_latest_items_in_test():
  pairs = _pairs_with_counts([5, 10])
  # Timestamps decrease with the item id, so the lowest ids are the latest.
  times = -pairs[:, 1].astype(float)
  train, valid, test = split_per_user(pairs, seed=0, order_keys=times)
  np.testing.assert_array_equal(test, [[0, 0], [1, 0], [1, 1]])
  np.testing.assert_array_equal(valid, [[0, 1], [1, 2], [1, 3]])
  assert set(map(tuple, train)) == {(0, 2), (0, 3), (0, 4)} | {
    (1, i) for i in range(4, 10)
  }


def test_unique_pairs_sorts_and_collapses():
  users = np.array([2, 0, 2, 0])
  items = np.array([1, 5, 1, 3])
  np.testing.assert_array_equal(
    unique_pairs(users, items), [[0, 3], [0, 5], [2, 1]]
  )
