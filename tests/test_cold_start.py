"""Cold start: the split, the decoder path, the metrics and a tiny run."""

import itertools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from _face_fixtures import (
  cache_folder,
  shared_compilation_cache,
  text_dataset,
  tiny_config,
  write_tiny_bert,
)

from face_jax import cold_start, train
from face_jax.data import Dataset
from face_jax.data import cold_start as split_lib
from face_jax.models import backbones
from face_jax.models import face as face_lib


def _pair_set(pairs):
  return {tuple(pair) for pair in np.asarray(pairs).tolist()}


def test_split_draws_the_shares_seeded_and_reloads(tmp_path):
  dataset = text_dataset(num_users=40, num_items=30)
  split = split_lib.make_split(dataset, 0.2, 0.25, seed=3)
  assert len(split.cold_items) == 6 and len(split.cold_users) == 10
  assert np.all(np.diff(split.cold_items) > 0)
  again = split_lib.make_split(dataset, 0.2, 0.25, seed=3)
  np.testing.assert_array_equal(again.cold_users, split.cold_users)
  other = split_lib.make_split(dataset, 0.2, 0.25, seed=4)
  assert not np.array_equal(other.cold_users, split.cold_users)
  stored = split_lib.split_for_run(dataset, 0.2, 0.25, 3, tmp_path)
  assert (tmp_path / split_lib.SPLIT_FILE).exists()
  # A second draw with another seed would differ; the stored one is kept.
  reloaded = split_lib.split_for_run(dataset, 0.2, 0.25, 3, tmp_path)
  np.testing.assert_array_equal(reloaded.cold_items, stored.cold_items)
  with pytest.raises(split_lib.ColdStartError, match="fresh workdir"):
    split_lib.split_for_run(dataset, 0.3, 0.25, 3, tmp_path)
  with pytest.raises(split_lib.ColdStartError, match=r"item_share=1\.0"):
    split_lib.make_split(dataset, 1.0, 0.2, 0)


def test_cold_entities_never_reach_the_training_data_or_the_graph():
  dataset = text_dataset(num_users=40, num_items=30)
  split = split_lib.make_split(dataset, 0.2, 0.2, seed=0)
  warm = split_lib.warm_dataset(dataset, split)
  users, items = split.warm_users, split.warm_items
  assert (warm.num_users, warm.num_items) == (32, 24)
  for name in ("train", "valid", "test"):
    original = getattr(dataset, name)
    expected = {
      (u, i)
      for u, i in original.tolist()
      if u not in split.cold_users and i not in split.cold_items
    }
    pairs = getattr(warm, name)
    back = np.stack([users[pairs[:, 0]], items[pairs[:, 1]]], axis=1)
    assert _pair_set(back) == expected
    assert not np.isin(back[:, 0], split.cold_users).any()
    assert not np.isin(back[:, 1], split.cold_items).any()
  assert warm.item_text == tuple(dataset.item_text[i] for i in items)
  assert warm.user_text[5] == dataset.user_text[users[5]]
  config = ml_collections.ConfigDict(
    {
      "backbone": "lightgcn",
      "embed_dim": 4,
      "num_layers": 1,
      "keep_rate": 1.0,
      "propagation": "segment_sum",
    }
  )
  _, graph = backbones.build(config, warm)
  assert (graph.num_users, graph.num_items) == (32, 24)
  block = graph.user_rows
  edge_users = np.asarray(block.rows)[: graph.num_edges]
  edge_items = np.asarray(block.indices)[: graph.num_edges]
  edges = np.stack([users[edge_users], items[edge_items]], axis=1)
  assert _pair_set(edges) == {
    (u, i)
    for u, i in dataset.train.tolist()
    if u not in split.cold_users and i not in split.cold_items
  }


def test_cold_pairs_are_the_interactions_with_one_cold_side():
  pairs = np.array(
    [[0, 0], [0, 1], [1, 3], [2, 1], [2, 2], [3, 3], [3, 0]], np.int32
  )
  dataset = Dataset("hand", 4, 4, pairs[:3], pairs[3:5], pairs[5:])
  split = split_lib.ColdStartSplit(
    num_users=4,
    num_items=4,
    cold_users=np.array([2], np.int32),
    cold_items=np.array([1, 3], np.int32),
    user_share=0.25,
    item_share=0.5,
    seed=0,
  )
  # Warm users 0, 1, 3 -> 0, 1, 2; cold items 1, 3 -> 0, 1.
  assert _pair_set(split_lib.cold_item_pairs(dataset, split)) == {
    (0, 0),
    (1, 1),
    (2, 1),
  }
  # Cold user 2 -> 0; warm items 0, 2 -> 0, 1; (2, 1) is cold x cold.
  assert _pair_set(split_lib.cold_user_pairs(dataset, split)) == {(0, 1)}
  assert split_lib.cold_cold_count(dataset, split) == 1
  warm = split_lib.warm_dataset(dataset, split)
  assert _pair_set(warm.train) == {(0, 0)}
  assert _pair_set(warm.test) == {(2, 0)}


def _metrics_by_hand(order, relevant, ks):
  """Recall@K and NDCG@K of one ranking, straight from the definitions."""
  result = {}
  for k in ks:
    hits = [rank for rank, item in enumerate(order[:k]) if item in relevant]
    ideal = sum(1 / np.log2(r + 2) for r in range(min(k, len(relevant))))
    result[f"recall@{k}"] = len(hits) / len(relevant)
    result[f"ndcg@{k}"] = sum(1 / np.log2(r + 2) for r in hits) / ideal
  return result


def test_tied_cold_items_fall_in_seeded_order_not_by_id():
  # Every cold item scores the same (as for a collapsed model); each of
  # 10 users' one relevant item is among the 10 highest of 50 ids, where
  # breaking ties by id would never place it in a top 5.
  users = np.ones((10, 1), np.float32)
  tied = np.ones((50, 1), np.float32)
  pairs = np.stack([np.arange(10), np.arange(40, 50)], axis=1)
  other = cold_start.Side(
    warm_cf=users, warm_profiles=users, cold_profiles=np.zeros((0, 1))
  )
  result = cold_start.score_cold(
    kind="item",
    pairs=pairs.astype(np.int32),
    cold_tables={"face": tied, "alpharec": tied, "text": tied},
    other=other,
    ks=(5,),
    batch_size=4,
    tie_seed=4,
  )
  # The seeded order puts these relevant items in every user's top 5.
  top5 = set(np.random.default_rng(4).permutation(50)[:5].tolist())
  expected = len(top5 & set(range(40, 50))) / 10
  assert expected > 0
  for method in ("face", "alpharec", "text"):
    assert result[method]["recall@5"] == pytest.approx(expected)


def test_cold_item_metrics_rank_only_cold_items_for_their_users():
  # Warm users 0 and 1 have cold-item interactions, user 2 has none.
  users = np.array([[1.0], [-1.0], [1.0]], np.float32)
  cold_items = np.array([[3.0], [2.0], [1.0]], np.float32)
  pairs = np.array([[0, 1], [1, 0], [1, 2]], np.int32)
  other = cold_start.Side(
    warm_cf=users, warm_profiles=users, cold_profiles=np.zeros((0, 1))
  )
  result = cold_start.score_cold(
    kind="item",
    pairs=pairs,
    cold_tables={
      "face": cold_items,
      "alpharec": -cold_items,
      "text": cold_items,
    },
    other=other,
    ks=(1, 2),
    batch_size=2,
  )
  assert (result["queries"], result["candidates"], result["pairs"]) == (2, 3, 3)
  # User 0 ranks the cold items 0, 1, 2 and user 1 ranks them 2, 1, 0.
  by_hand = [
    _metrics_by_hand([0, 1, 2], {1}, (1, 2)),
    _metrics_by_hand([2, 1, 0], {0, 2}, (1, 2)),
  ]
  expected = {m: np.mean([h[m] for h in by_hand]) for m in by_hand[0]}
  assert expected["recall@1"] == 0.25 and expected["ndcg@1"] == 0.5
  for metric, value in expected.items():
    assert result["face"][metric] == pytest.approx(value, abs=1e-6)
  # Negated item scores reverse both rankings.
  reversed_hand = [
    _metrics_by_hand([2, 1, 0], {1}, (1, 2)),
    _metrics_by_hand([0, 1, 2], {0, 2}, (1, 2)),
  ]
  for metric in expected:
    value = np.mean([h[metric] for h in reversed_hand])
    assert result["alpharec"][metric] == pytest.approx(value, abs=1e-6)
  # The random floor is the mean over all 3! rankings.
  every = [
    [
      _metrics_by_hand(list(p), rel, (1, 2))
      for p in itertools.permutations(range(3))
    ]
    for rel in ({1}, {0, 2})
  ]
  for metric in expected:
    value = np.mean([np.mean([h[metric] for h in user]) for user in every])
    assert result["random"][metric] == pytest.approx(value, abs=1e-12)


def _same_tables(table):
  return {"face": table, "alpharec": table, "text": table}


def test_cold_user_metrics_rank_all_warm_items():
  warm_items = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], np.float32)
  cold_users = np.array([[0.0, 1.0], [1.0, 0.2]], np.float32)
  other = cold_start.Side(
    warm_cf=warm_items, warm_profiles=warm_items, cold_profiles=cold_users
  )
  pairs = np.array([[0, 2], [1, 0], [1, 1]], np.int32)
  cold_tables = {method: cold_users for method in ("face", "alpharec", "text")}
  result = cold_start.score_cold(
    kind="user",
    pairs=pairs,
    cold_tables=cold_tables,
    other=other,
    ks=(1, 3),
    batch_size=8,
  )
  # User 0 ranks items 1, 2, 0; user 1 ranks 0, 2, 1.
  by_hand = [
    _metrics_by_hand([1, 2, 0], {2}, (1, 3)),
    _metrics_by_hand([0, 2, 1], {0, 1}, (1, 3)),
  ]
  for metric in by_hand[0]:
    value = np.mean([h[metric] for h in by_hand])
    assert result["text"][metric] == pytest.approx(value, abs=1e-6)
  assert result["candidates"] == 3
  with pytest.raises(cold_start.ColdStartStageError, match="ks"):
    cold_start.score_cold(
      kind="user",
      pairs=pairs,
      cold_tables=cold_tables,
      other=other,
      ks=(5,),
      batch_size=8,
    )


def test_decoder_path_is_deterministic_and_matches_face():
  model = face_lib.FACE(
    embed_dim=6,
    token_dim=5,
    num_words=3,
    word_dim=8,
    ff_dim=16,
    chunk_size=7,
  )
  rng = np.random.default_rng(0)
  table = jnp.asarray(rng.normal(size=(40, 5)), jnp.float32)
  params = face_lib.init_params(model, jax.random.key(1), table)
  x = jnp.asarray(rng.normal(size=(10, 6)), jnp.float32)
  outputs = model.apply({"params": params}, x, table, deterministic=True)
  words = np.asarray(outputs["z_q"])
  tokens, embeddings = cold_start.words_to_embeddings(
    model, params, table, words, batch_size=4
  )
  # Words that are already codebook rows keep their tokens, and the
  # decoder gives what FACE's forward pass decodes from them.
  np.testing.assert_array_equal(tokens, outputs["token_index"])
  np.testing.assert_allclose(embeddings, outputs["decoded"], atol=1e-5)
  again = cold_start.words_to_embeddings(
    model, params, table, words + 1e-4, batch_size=4
  )
  np.testing.assert_array_equal(again[0], tokens)
  repeat = cold_start.words_to_embeddings(
    model, params, table, words, batch_size=4
  )
  np.testing.assert_array_equal(repeat[1], embeddings)
  assert embeddings.shape == (10, 6)


def test_fit_head_learns_a_linear_map_and_keeps_the_best_epoch():
  rng = np.random.default_rng(0)
  inputs = rng.normal(size=(200, 4)).astype(np.float32)
  targets = (inputs @ rng.normal(size=(4, 2, 3)).reshape(4, 6)).reshape(
    200, 2, 3
  )
  section = ml_collections.ConfigDict(
    {
      "hidden_dim": 32,
      "max_epochs": 60,
      "patience": 5,
      "valid_share": 0.2,
      "batch_size": 32,
      "learning_rate": 1e-2,
      "weight_decay": 0.0,
    }
  )
  head = cold_start.fit_head(inputs, targets, section, (0,))
  baseline = float(np.mean((targets - targets.mean(0)) ** 2))
  assert head.valid_loss < 0.1 * baseline
  assert 1 <= head.best_epoch <= head.epochs <= 60
  assert head(inputs[:3]).shape == (3, 2, 3)
  again = cold_start.fit_head(inputs, targets, section, (0,))
  np.testing.assert_array_equal(again(inputs[:3]), head(inputs[:3]))


@pytest.fixture(scope="module")
def _compilation_cache(tmp_path_factory):
  with shared_compilation_cache(cache_folder(tmp_path_factory)):
    yield


def test_cold_start_job_trains_on_warm_data_and_scores_cold_entities(
  _compilation_cache, tmp_path_factory, tmp_path
):
  config = tiny_config(
    write_tiny_bert(tmp_path_factory.mktemp("tiny_bert")),
    cold_start__enabled=True,
    cold_start__item_share=0.3,
    cold_start__ks=(1, 5),
    cold_start__max_epochs=5,
  )
  dataset = text_dataset(num_users=30, num_items=30)
  warm, stages = train.cold_start_setup(config, dataset, tmp_path)
  assert [stage.name for stage in stages][-1] == train.COLD_START
  assert (warm.num_users, warm.num_items) == (24, 21)
  # The align stage adds nothing here that the cold_start stage needs:
  # without it the FACE model of the map stage is used.
  chosen = [s for s in stages if s.name in ("pretrain", "map", "cold_start")]
  results = train.run_stages(config, warm, tmp_path, chosen)
  cold = results["cold_start"]
  assert cold["after"] == "map"
  assert (cold["cold_users"], cold["cold_items"]) == (6, 9)
  assert cold["item"]["candidates"] == 9
  assert cold["user"]["candidates"] == 21
  for kind in ("user", "item"):
    assert set(cold[kind]) >= set(cold_start.METHODS)
    for metrics in cold[kind].values():
      if isinstance(metrics, dict):
        assert 0.0 <= metrics["recall@1"] <= metrics["recall@5"] <= 1.0
  lines = (tmp_path / "cold_start" / cold_start.DESCRIPTORS_FILE).read_text()
  records = [json.loads(line) for line in lines.splitlines()]
  assert len(records) == 6 + 9
  split = split_lib.load_split(tmp_path / split_lib.SPLIT_FILE)
  assert [r["id"] for r in records[:6]] == split.cold_users.tolist()
  assert records[-1]["text"] == dataset.item_text[split.cold_items[-1]]
  assert all(len(set(r["words"])) == config.face.num_words for r in records)
  # A rerun finds every stage done and returns the same results.
  rerun = train.run_stages(config, warm, tmp_path, chosen)
  assert rerun == json.loads((tmp_path / "metrics.json").read_text())
  assert rerun["cold_start"] == cold
  with pytest.raises(train.ConfigError, match=r"cold_start\.enabled=True"):
    off = tiny_config(config.llm.model)
    train.cold_start_setup(off, dataset, tmp_path)
