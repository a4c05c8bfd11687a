"""Full-ranking metrics against a brute-force numpy computation."""

import numpy as np
import pytest

from face_jax.data import Dataset
from face_jax.evaluation import prepare_ranking, rank_metrics

KS = (5, 10, 20)


def _sorted_pairs(pairs):
  pairs = np.asarray(pairs, dtype=np.int32).reshape(-1, 2)
  return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


def _reference(user_table, item_table, train, split, ks):
  """Per-user loop: rank non-train items by (-score, item id)."""
  scores = user_table.astype(np.float64) @ item_table.astype(np.float64).T
  recalls = {k: [] for k in ks}
  ndcgs = {k: [] for k in ks}
  for user in np.unique(split[:, 0]):
    relevant = set(split[split[:, 0] == user, 1].tolist())
    seen = set(train[train[:, 0] == user, 1].tolist())
    candidates = np.array(
      [item for item in range(len(item_table)) if item not in seen]
    )
    order = np.lexsort((candidates, -scores[user, candidates]))
    ranked = candidates[order]
    for k in ks:
      hits = np.array([item in relevant for item in ranked[:k]], float)
      discount = 1.0 / np.log2(np.arange(2, len(hits) + 2))
      ideal = np.sum(1.0 / np.log2(np.arange(2, min(k, len(relevant)) + 2)))
      recalls[k].append(hits.sum() / len(relevant))
      ndcgs[k].append(np.sum(hits * discount) / ideal)
  metrics = {}
  for k in ks:
    metrics[f"recall@{k}"] = float(np.mean(recalls[k]))
    metrics[f"ndcg@{k}"] = float(np.mean(ndcgs[k]))
  return metrics


def _random_case(seed, num_users, num_items, dim=4):
  """Small-integer embeddings: exact float32 scores with many ties."""
  rng = np.random.default_rng(seed)
  user_table = rng.integers(-2, 3, (num_users, dim)).astype(np.float32)
  item_table = rng.integers(-2, 3, (num_items, dim)).astype(np.float32)
  train, valid, test = [], [], []
  for user in range(num_users):
    size = rng.integers(1, num_items // 2)
    items = rng.choice(num_items, size=size, replace=False)
    for position, item in enumerate(items):
      # Some users get no test pair, some exactly one.
      target = (train, train, valid, test)[position % 4]
      target.append((user, item))
  dataset = Dataset(
    "random",
    num_users,
    num_items,
    _sorted_pairs(train),
    _sorted_pairs(valid),
    _sorted_pairs(test),
  )
  return dataset, user_table, item_table


@pytest.mark.parametrize(
  "seed,num_users,num_items,batch_size",
  [(0, 13, 24, 4), (1, 30, 40, 64), (2, 25, 60, 1), (3, 40, 21, 7)],
)
def test_metrics_match_brute_force(seed, num_users, num_items, batch_size):
  dataset, user_table, item_table = _random_case(seed, num_users, num_items)
  test_users = np.unique(dataset.test[:, 0])
  # The case covers users without test pairs and with exactly one.
  assert len(test_users) < num_users
  assert np.any(np.bincount(dataset.test[:, 0]) == 1)
  task = prepare_ranking(dataset, "test", batch_size)
  assert task.num_users == len(test_users)
  got = rank_metrics(user_table, item_table, task, KS)
  expected = _reference(user_table, item_table, dataset.train, dataset.test, KS)
  assert got.keys() == expected.keys()
  for name, value in expected.items():
    np.testing.assert_allclose(got[name], value, rtol=1e-5, err_msg=name)


def test_ties_rank_lower_item_id_first():
  # Every item scores the same for the user; the split item is item 7, so
  # with lower ids first it sits at rank 8: outside the top 5, inside 10.
  user_table = np.ones((1, 2), np.float32)
  item_table = np.ones((30, 2), np.float32)
  empty = np.zeros((0, 2), np.int32)
  dataset = Dataset(
    "ties", 1, 30, _sorted_pairs([(0, 29)]), empty, _sorted_pairs([(0, 7)])
  )
  got = rank_metrics(
    user_table, item_table, prepare_ranking(dataset, "test", 4)
  )
  assert got["recall@5"] == 0.0
  assert got["recall@10"] == 1.0
  np.testing.assert_allclose(got["ndcg@10"], 1.0 / np.log2(9.0), rtol=1e-6)


def test_train_items_are_never_ranked():
  # Train items 0..9 score highest; the split item 10 comes next, so it is
  # first once train items are excluded (and 11th if they were not).
  item_table = np.linspace(1.0, 0.0, 30, dtype=np.float32)[:, None]
  user_table = np.ones((1, 1), np.float32)
  train = _sorted_pairs([(0, item) for item in range(10)])
  empty = np.zeros((0, 2), np.int32)
  dataset = Dataset("seen", 1, 30, train, empty, _sorted_pairs([(0, 10)]))
  got = rank_metrics(
    user_table, item_table, prepare_ranking(dataset, "test", 2)
  )
  assert got == {f"{name}@{k}": 1.0 for k in KS for name in ("recall", "ndcg")}


def test_fewer_candidates_than_k():
  # 25 items, 20 of them train items: only 5 candidates for a top 20; the
  # masked train items filling the rest must not count as hits.
  rng = np.random.default_rng(4)
  user_table = rng.normal(size=(1, 3)).astype(np.float32)
  item_table = rng.normal(size=(25, 3)).astype(np.float32)
  train = _sorted_pairs([(0, item) for item in range(20)])
  test = _sorted_pairs([(0, 21), (0, 23)])
  dataset = Dataset("dense", 1, 25, train, np.zeros((0, 2), np.int32), test)
  got = rank_metrics(
    user_table, item_table, prepare_ranking(dataset, "test", 3)
  )
  assert got["recall@20"] == 1.0
  expected = _reference(user_table, item_table, train, test, KS)
  for name, value in expected.items():
    np.testing.assert_allclose(got[name], value, rtol=1e-5, err_msg=name)


def test_rejects_bad_cutoffs_and_empty_split():
  dataset, user_table, item_table = _random_case(5, 6, 21)
  task = prepare_ranking(dataset, "test", 4)
  with pytest.raises(ValueError, match=r"1\.\.21"):
    rank_metrics(user_table, item_table, task, (5, 22))
  empty = Dataset(
    "empty", 6, 21, dataset.train, dataset.valid, np.zeros((0, 2), np.int32)
  )
  with pytest.raises(ValueError, match="test split is empty"):
    prepare_ranking(empty, "test", 4)
