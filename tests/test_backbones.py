"""Backbones: shapes and losses on tiny inputs, against numpy and scipy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse

from configs import base
from face_jax import graph as graph_lib
from face_jax.data import Dataset
from face_jax.graph import svd as svd_lib
from face_jax.models import backbones

NUM_USERS, NUM_ITEMS, DIM = 8, 6, 5
BATCH = {
  "user": np.array([0, 2, 2, 5], np.int32),
  "pos": np.array([1, 0, 3, 3], np.int32),
  "neg": np.array([4, 5, 1, 2], np.int32),
}


def _toy_dataset():
  train = np.array([[0, 0], [0, 1], [1, 2], [2, 1]], dtype=np.int32)
  empty = np.zeros((0, 2), dtype=np.int32)
  return Dataset("toy", 3, 4, train, empty, empty)


def _random_dataset():
  rng = np.random.default_rng(0)
  dense = rng.random((NUM_USERS, NUM_ITEMS)) < 0.45
  dense[:, 0] = True  # Every user has an item; item degrees differ.
  users, items = np.nonzero(dense)
  train = np.stack([users, items], 1).astype(np.int32)
  empty = np.zeros((0, 2), np.int32)
  return Dataset("random", NUM_USERS, NUM_ITEMS, train, empty, empty)


def _config(backbone, **overrides):
  config = base.get_base_config().model
  config.backbone = backbone
  config.embed_dim = DIM
  for name, value in overrides.items():
    setattr(config, name, value)
  return config


def _reference_adjacency(dataset):
  """D^-1/2 A D^-1/2 of the bipartite train graph, dense, from scipy."""
  binary = dataset.matrix("train")
  adjacency = scipy.sparse.bmat([[None, binary], [binary.T, None]]).toarray()
  degree = adjacency.sum(1)
  inv_sqrt = np.where(degree > 0, 1 / np.sqrt(np.maximum(degree, 1)), 0)
  return inv_sqrt[:, None] * adjacency * inv_sqrt[None, :]


def _reference_layer_sum(params, matrix, num_layers):
  layer = np.concatenate([params["user"], params["item"]]).astype(np.float64)
  total = layer.copy()
  for _ in range(num_layers):
    layer = matrix @ layer
    total += layer
  return total[:NUM_USERS], total[NUM_USERS:]


def _bpr(users, pos, neg):
  diff = np.sum(users * neg, -1) - np.sum(users * pos, -1)
  return np.mean(np.log1p(np.exp(diff)))


def _numpy_params(params):
  return {name: np.asarray(table) for name, table in params.items()}


def test_mf_bpr_matches_numpy():
  config = base.get_base_config().model
  config.backbone = "mf"
  config.embed_dim = 8
  backbone, graph = backbones.build(config, _toy_dataset())
  params = backbone.init(jax.random.key(0))
  batch = {
    "user": np.array([0, 1]),
    "pos": np.array([1, 2]),
    "neg": np.array([3, 0]),
  }
  terms, (users, pos, neg) = backbone.losses(
    params, graph, batch, jax.random.key(1)
  )
  user_table = np.asarray(params["user"])
  item_table = np.asarray(params["item"])
  diff = np.sum(user_table[[0, 1]] * item_table[[3, 0]], -1) - np.sum(
    user_table[[0, 1]] * item_table[[1, 2]], -1
  )
  expected = np.mean(np.log1p(np.exp(diff)))
  np.testing.assert_allclose(terms["bpr"], expected, rtol=1e-5)
  assert users.shape == pos.shape == neg.shape == (2, 8)


@pytest.mark.parametrize("propagation", ["segment_sum", "csr"])
def test_lightgcn_embed_is_the_sum_of_layers(propagation):
  dataset = _random_dataset()
  backbone, graph = backbones.build(
    _config("lightgcn", propagation=propagation), dataset
  )
  params = backbone.init(jax.random.key(0))
  users, items = jax.jit(backbone.embed)(params, graph)
  expected_users, expected_items = _reference_layer_sum(
    _numpy_params(params), _reference_adjacency(dataset), 3
  )
  np.testing.assert_allclose(users, expected_users, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(items, expected_items, rtol=1e-5, atol=1e-6)


def test_lightgcn_losses_use_the_dropped_graph():
  dataset = _random_dataset()
  backbone, graph = backbones.build(_config("lightgcn"), dataset)
  params = backbone.init(jax.random.key(0))
  rng = jax.random.key(4)
  terms, (users, pos, neg) = jax.jit(backbone.losses)(params, graph, BATCH, rng)
  op = graph_lib.dropped_operator(graph, rng, keep_rate=0.8)
  all_users, all_items = graph_lib.layer_sum(
    op, params["user"], params["item"], 3
  )
  expected = (
    all_users[BATCH["user"]],
    all_items[BATCH["pos"]],
    all_items[BATCH["neg"]],
  )
  for ours, reference in zip((users, pos, neg), expected, strict=True):
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(terms["bpr"], _bpr(*expected), rtol=1e-5)
  clean_users, _ = backbone.embed(params, graph)
  assert not np.allclose(users, clean_users[BATCH["user"]])


def test_lightgcn_without_dropout_matches_embed():
  dataset = _random_dataset()
  backbone, graph = backbones.build(_config("lightgcn", keep_rate=1.0), dataset)
  params = backbone.init(jax.random.key(0))
  _, (users, pos, _) = backbone.losses(params, graph, BATCH, jax.random.key(1))
  all_users, all_items = backbone.embed(params, graph)
  np.testing.assert_allclose(users, all_users[BATCH["user"]], rtol=1e-5)
  np.testing.assert_allclose(pos, all_items[BATCH["pos"]], rtol=1e-5)


def test_sign_aligned_noise_has_norm_eps_and_matching_signs():
  embeddings = jax.random.normal(jax.random.key(0), (50, 16))
  noise = backbones.sign_aligned_noise(jax.random.key(1), embeddings, 0.9)
  np.testing.assert_allclose(jnp.linalg.norm(noise, axis=-1), 0.9, rtol=1e-5)
  assert np.all(np.sign(noise) == np.sign(embeddings))
  again = backbones.sign_aligned_noise(jax.random.key(1), embeddings, 0.9)
  np.testing.assert_array_equal(noise, again)


def _numpy_infonce(anchors, positives, candidates, temperature):
  """The authors' cal_infonce_loss, divided by the batch size."""

  def normalise(x):
    return x / np.sqrt(1e-8 + np.sum(x**2, -1, keepdims=True))

  anchors, positives = normalise(anchors), normalise(positives)
  candidates = normalise(candidates)
  numerator = -np.sum(anchors * positives, -1) / temperature
  denominator = np.log(np.sum(np.exp(anchors @ candidates.T / temperature), -1))
  return np.sum(numerator + denominator) / len(anchors)


def test_simgcl_without_noise_contrasts_the_clean_views():
  dataset = _random_dataset()
  backbone, graph = backbones.build(_config("simgcl", simgcl_eps=0.0), dataset)
  params = backbone.init(jax.random.key(0))
  terms, (users, pos, neg) = backbone.losses(
    params, graph, BATCH, jax.random.key(2)
  )
  all_users, all_items = _reference_layer_sum(
    _numpy_params(params), _reference_adjacency(dataset), 3
  )
  batch_users = all_users[BATCH["user"]]
  batch_items = all_items[BATCH["pos"]]
  np.testing.assert_allclose(users, batch_users, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(pos, batch_items, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(neg, all_items[BATCH["neg"]], rtol=1e-5, atol=1e-6)
  expected_cl = _numpy_infonce(
    batch_users, batch_users, all_users, 0.2
  ) + _numpy_infonce(batch_items, batch_items, all_items, 0.2)
  np.testing.assert_allclose(terms["cl"], 0.1 * expected_cl, rtol=1e-4)
  np.testing.assert_allclose(
    terms["bpr"],
    _bpr(batch_users, batch_items, all_items[BATCH["neg"]]),
    rtol=1e-5,
  )


def test_simgcl_views_differ_with_noise():
  dataset = _random_dataset()
  backbone, graph = backbones.build(_config("simgcl"), dataset)
  params = backbone.init(jax.random.key(0))
  clean, _ = backbones.build(_config("simgcl", simgcl_eps=0.0), dataset)
  rng = jax.random.key(2)
  noisy_terms, _ = backbone.losses(params, graph, BATCH, rng)
  clean_terms, _ = clean.losses(params, graph, BATCH, rng)
  np.testing.assert_allclose(noisy_terms["bpr"], clean_terms["bpr"])
  assert noisy_terms["cl"] > clean_terms["cl"]


def _dense_truncated_svd(matrix, rank):
  left, values, right_t = np.linalg.svd(matrix)
  return left[:, :rank], values[:rank], right_t[:rank].T


def test_svd_view_equals_dense_reconstruction():
  dataset = _random_dataset()
  matrix = graph_lib.normalized_matrix(dataset.train, NUM_USERS, NUM_ITEMS)
  view = svd_lib.svd_view(matrix, rank=3)
  left, values, right = _dense_truncated_svd(matrix.toarray(), 3)
  np.testing.assert_allclose(view.values, values, rtol=1e-5)
  items = np.random.default_rng(0).normal(size=(NUM_ITEMS, DIM))
  users = np.random.default_rng(1).normal(size=(NUM_USERS, DIM))
  np.testing.assert_allclose(
    svd_lib.to_users(view, jnp.asarray(items, jnp.float32)),
    left * values @ right.T @ items,
    rtol=1e-4,
    atol=1e-5,
  )
  np.testing.assert_allclose(
    svd_lib.to_items(view, jnp.asarray(users, jnp.float32)),
    right * values @ left.T @ users,
    rtol=1e-4,
    atol=1e-5,
  )


def test_svd_view_refuses_rank_too_large():
  matrix = graph_lib.normalized_matrix(
    _random_dataset().train, NUM_USERS, NUM_ITEMS
  )
  with pytest.raises(ValueError, match="lightgcl_rank"):
    svd_lib.svd_view(matrix, rank=NUM_ITEMS)


def test_lightgcl_losses_match_numpy():
  dataset = _random_dataset()
  config = _config("lightgcl", num_layers=2, lightgcl_rank=3)
  backbone, graph = backbones.build(config, dataset)
  params = _numpy_params(backbone.init(jax.random.key(0)))
  terms, (users, pos, _) = jax.jit(backbone.losses)(
    params, graph, BATCH, jax.random.key(1)
  )

  # Graph view: layers without residual, summed; SVD view from numpy.
  adjacency = _reference_adjacency(dataset)
  graph_users, graph_items = _reference_layer_sum(params, adjacency, 2)
  layer_users, layer_items = _reference_layer_sum(params, adjacency, 1)
  left, values, right = _dense_truncated_svd(
    adjacency[:NUM_USERS, NUM_USERS:], 3
  )
  svd_users = params["user"] + left * values @ right.T @ layer_items
  svd_items = params["item"] + right * values @ left.T @ layer_users

  def contrast(svd_rows, table, ids):
    scores = svd_rows @ table.T / 0.1
    negative = np.log(np.exp(scores).sum(1) + 1e-8).mean()
    positive = np.clip((svd_rows * table[ids]).sum(1) / 0.1, -5, 5).mean()
    return negative - positive

  expected_cl = contrast(
    svd_users[BATCH["user"]], graph_users, BATCH["user"]
  ) + contrast(svd_items[BATCH["pos"]], graph_items, BATCH["pos"])
  np.testing.assert_allclose(users, graph_users[BATCH["user"]], rtol=1e-5)
  np.testing.assert_allclose(pos, graph_items[BATCH["pos"]], rtol=1e-5)
  np.testing.assert_allclose(terms["cl"], 0.1 * expected_cl, rtol=1e-4)
  expected_bpr = _bpr(
    graph_users[BATCH["user"]],
    graph_items[BATCH["pos"]],
    graph_items[BATCH["neg"]],
  )
  np.testing.assert_allclose(terms["bpr"], expected_bpr, rtol=1e-5)


@pytest.mark.parametrize("name", ["mf", "lightgcn", "simgcl", "lightgcl"])
def test_losses_are_finite_and_differentiable(name):
  backbone, graph = backbones.build(
    _config(name, lightgcl_rank=3), _random_dataset()
  )
  params = backbone.init(jax.random.key(0))

  def total(params, rng):
    terms, _ = backbone.losses(params, graph, BATCH, rng)
    return sum(terms.values())

  value, grads = jax.jit(jax.value_and_grad(total))(params, jax.random.key(1))
  assert np.isfinite(value)
  for table in grads.values():
    assert np.all(np.isfinite(table))
    assert np.any(table != 0)
  again = jax.jit(total)(params, jax.random.key(1))
  np.testing.assert_allclose(value, again, rtol=1e-6)


def test_build_refuses_unknown_names():
  with pytest.raises(ValueError, match=r"'lightgcl', 'lightgcn', 'mf'"):
    backbones.build(_config("ngcf"), _random_dataset())
  with pytest.raises(ValueError, match=r"'auto', 'segment_sum', 'csr'"):
    backbones.build(_config("lightgcn", propagation="dense"), _random_dataset())
  with pytest.raises(ValueError, match="keep_rate"):
    backbones.build(_config("lightgcn", keep_rate=0.0), _random_dataset())
