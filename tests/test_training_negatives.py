"""Negative sampling and epoch batches."""

import numpy as np
import pytest

from face_jax.data import DataError
from face_jax.training import NegativeSampler, epoch_batches


def _pairs_with_dense_users(seed, num_users=30, num_items=50):
  """Random train pairs; user 0 lacks one item, user 1 lacks two."""
  rng = np.random.default_rng(seed)
  pairs = [(0, item) for item in range(num_items) if item != 17]
  pairs += [(1, item) for item in range(num_items) if item not in (0, 49)]
  for user in range(2, num_users):
    size = rng.integers(1, num_items)
    pairs += [(user, item) for item in rng.choice(num_items, size, False)]
  pairs = np.array(pairs, dtype=np.int32)
  return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


def _is_positive(train, users, items, num_items=50):
  keys = train[:, 0].astype(np.int64) * num_items + train[:, 1]
  return np.isin(users.astype(np.int64) * num_items + items, keys)


def test_negatives_are_never_train_positives():
  train = _pairs_with_dense_users(0)
  sampler = NegativeSampler(train, 30, 50)
  rng = np.random.default_rng(1)
  users = np.repeat(np.arange(30), 400)
  negatives = sampler.sample(users, rng)
  assert negatives.dtype == np.int32
  assert not _is_positive(train, users, negatives).any()
  assert set(negatives[users == 0]) == {17}
  assert set(negatives[users == 1]) == {0, 49}


def test_negatives_are_uniform_over_unseen_items():
  train = _pairs_with_dense_users(2)
  sampler = NegativeSampler(train, 30, 50)
  user = 5
  unseen = sorted(set(range(50)) - set(train[train[:, 0] == user, 1]))
  draws = 200 * len(unseen)
  negatives = sampler.sample(np.full(draws, user), np.random.default_rng(3))
  counts = np.array([np.sum(negatives == item) for item in unseen])
  assert counts.sum() == draws
  # Pearson chi-square with len(unseen) - 1 degrees of freedom; the bound
  # is far beyond the 99.9% quantile for up to 50 degrees of freedom.
  chi_square = np.sum((counts - 200) ** 2 / 200)
  assert chi_square < 100


def test_user_with_every_item_is_refused():
  train = np.array([[0, 0], [0, 1], [0, 2], [1, 0]], dtype=np.int32)
  with pytest.raises(DataError, match="User 0"):
    NegativeSampler(train, 2, 3)


def test_unsorted_pairs_are_refused():
  train = np.array([[1, 0], [0, 1]], dtype=np.int32)
  with pytest.raises(DataError, match="sorted"):
    NegativeSampler(train, 2, 3)


@pytest.mark.parametrize("batch_size", [7, 64, 10000])
def test_each_train_pair_once_per_epoch(batch_size):
  train = _pairs_with_dense_users(4)
  sampler = NegativeSampler(train, 30, 50)
  orders = []
  for epoch in range(3):
    batches = epoch_batches(
      train, sampler, batch_size, np.random.default_rng(epoch)
    )
    num_batches = -(-len(train) // batch_size)
    for name in ("user", "pos", "neg"):
      assert batches[name].shape == (num_batches, batch_size)
      assert batches[name].dtype == np.int32
    users = batches["user"].ravel()
    pairs = np.stack([users, batches["pos"].ravel()], axis=1)
    # The first len(train) triples are every train pair exactly once; the
    # rest pad the last batch with pairs of the same epoch.
    head = pairs[: len(train)]
    np.testing.assert_array_equal(
      head[np.lexsort((head[:, 1], head[:, 0]))], train
    )
    assert _is_positive(train, *pairs[len(train) :].T).all()
    assert not _is_positive(train, users, batches["neg"].ravel()).any()
    orders.append(head)
  # A fresh shuffle every epoch.
  assert not np.array_equal(orders[0], orders[1])
