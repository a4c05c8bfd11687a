"""Graph normalisation and propagation against scipy, on tiny graphs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse

from face_jax import graph as graph_lib

NUM_USERS, NUM_ITEMS, DIM = 9, 7, 4


def _pairs(seed=0):
  """Random sorted unique pairs; user 8 and item 6 are left isolated."""
  rng = np.random.default_rng(seed)
  dense = rng.random((NUM_USERS, NUM_ITEMS)) < 0.4
  dense[0, :3] = True  # Degrees above one, so weights differ.
  dense[NUM_USERS - 1, :] = False
  dense[:, NUM_ITEMS - 1] = False
  users, items = np.nonzero(dense)
  return np.stack([users, items], axis=1).astype(np.int32)


def _reference_blocks(pairs):
  """The two blocks of D^-1/2 A D^-1/2, computed the plain scipy way."""
  binary = scipy.sparse.coo_matrix(
    (np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])),
    shape=(NUM_USERS, NUM_ITEMS),
  )
  adjacency = scipy.sparse.bmat([[None, binary], [binary.T, None]]).tocsr()
  degree = np.asarray(adjacency.sum(axis=1)).ravel()
  with np.errstate(divide="ignore"):
    inv_sqrt = np.where(degree > 0, degree**-0.5, 0.0)
  scale = scipy.sparse.diags(inv_sqrt)
  full = (scale @ adjacency @ scale).tocsr()
  return full[:NUM_USERS, NUM_USERS:].tocsr(), full[NUM_USERS:, :NUM_USERS]


def _reference_matrix(pairs, keep_user=None, keep_item=None):
  """The dense (U+I) x (U+I) operator with entries dropped by the masks.

  keep_user follows the (u, i) entries sorted by user then item, keep_item
  the (i, u) entries sorted by item then user: scipy's CSR orders.
  """
  user_block, item_block = _reference_blocks(pairs)
  user_block = user_block.tocsr().copy()
  item_block = item_block.tocsr().copy()
  user_block.sort_indices()
  item_block.sort_indices()
  if keep_user is not None:
    user_block.data = user_block.data * keep_user
    item_block.data = item_block.data * keep_item
  return scipy.sparse.bmat([[None, user_block], [item_block, None]]).toarray()


def _graph(path, seed=0):
  return graph_lib.build_graph(_pairs(seed), NUM_USERS, NUM_ITEMS, path)


def _masks(num_edges, seed=1):
  rng = np.random.default_rng(seed)
  keep_user = rng.random(num_edges) < 0.6
  keep_item = rng.random(num_edges) < 0.6
  return keep_user, keep_item


def _tables(seed=2):
  rng = np.random.default_rng(seed)
  users = rng.normal(size=(NUM_USERS, DIM)).astype(np.float32)
  items = rng.normal(size=(NUM_ITEMS, DIM)).astype(np.float32)
  return users, items


def _stack(users, items):
  return np.concatenate([np.asarray(users), np.asarray(items)])


def test_normalisation_is_symmetric_without_self_loops_or_nans():
  graph = _graph("segment_sum")
  op = graph_lib.full_operator(graph)
  users = np.eye(NUM_USERS + NUM_ITEMS, dtype=np.float32)
  dense = _stack(*graph_lib.propagate(op, users[:NUM_USERS], users[NUM_USERS:]))
  expected = _reference_matrix(_pairs())
  assert np.all(np.isfinite(dense))
  np.testing.assert_allclose(dense, expected, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(dense, dense.T, rtol=1e-6)
  np.testing.assert_array_equal(np.diag(dense), 0.0)
  # The isolated user and item neither send nor receive anything.
  for node in (NUM_USERS - 1, NUM_USERS + NUM_ITEMS - 1):
    np.testing.assert_array_equal(dense[node], 0.0)
    np.testing.assert_array_equal(dense[:, node], 0.0)


def test_normalized_matrix_matches_reference_block():
  pairs = _pairs()
  ours = graph_lib.normalized_matrix(pairs, NUM_USERS, NUM_ITEMS)
  np.testing.assert_allclose(
    ours.toarray(), _reference_blocks(pairs)[0].toarray(), rtol=1e-6
  )


@pytest.mark.parametrize("path", graph_lib.PATHS)
@pytest.mark.parametrize("dropped", [False, True])
def test_propagate_matches_scipy_in_value_and_gradient(path, dropped):
  graph = _graph(path)
  if dropped:
    keep_user, keep_item = _masks(graph.num_edges)
    op = graph_lib.masked_operator(graph, keep_user, keep_item)
    matrix = _reference_matrix(_pairs(), keep_user, keep_item)
    assert not np.allclose(matrix, matrix.T)  # The mask is not symmetric.
  else:
    op = graph_lib.full_operator(graph)
    matrix = _reference_matrix(_pairs())
  users, items = _tables()
  weights = np.random.default_rng(3).normal(size=(NUM_USERS + NUM_ITEMS, DIM))

  def functional(users, items):
    return jnp.sum(_jnp_stack(*graph_lib.propagate(op, users, items)) * weights)

  value = _stack(*jax.jit(graph_lib.propagate)(op, users, items))
  np.testing.assert_allclose(
    value, matrix @ _stack(users, items), rtol=1e-5, atol=1e-6
  )
  gradient = _stack(*jax.grad(functional, argnums=(0, 1))(users, items))
  np.testing.assert_allclose(gradient, matrix.T @ weights, rtol=1e-5, atol=1e-6)


def _jnp_stack(users, items):
  return jnp.concatenate([users, items])


def test_paths_agree_in_value_and_gradient_after_dropout():
  keep_user, keep_item = _masks(_graph("csr").num_edges, seed=7)
  users, items = _tables()
  weights = np.random.default_rng(4).normal(size=(NUM_USERS + NUM_ITEMS, DIM))
  results = []
  for path in graph_lib.PATHS:
    op = graph_lib.masked_operator(_graph(path), keep_user, keep_item)

    def functional(users, items, op=op):
      out = graph_lib.layer_sum(op, users, items, num_layers=3)
      return jnp.sum(_jnp_stack(*out) * weights)

    value, grads = jax.value_and_grad(functional, argnums=(0, 1))(users, items)
    results.append((value, _stack(*grads)))
  (value_seg, grad_seg), (value_csr, grad_csr) = results
  np.testing.assert_allclose(value_seg, value_csr, rtol=1e-5)
  np.testing.assert_allclose(grad_seg, grad_csr, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", graph_lib.PATHS)
def test_layer_sum_rows_matches_full_layer_sum(path):
  graph = _graph(path)
  op = graph_lib.masked_operator(graph, *_masks(graph.num_edges, seed=5))
  users, items = _tables()
  user_ids = jnp.array([0, 3, 0, 8])  # Repeats and the isolated user.
  item_ids = jnp.array([1, 1, 6, 2, 5])
  rng = np.random.default_rng(6)
  user_weights = rng.normal(size=(4, DIM))
  item_weights = rng.normal(size=(5, DIM))

  def via_rows(users, items):
    out_users, out_items = graph_lib.layer_sum_rows(
      op, users, items, 3, user_ids, item_ids
    )
    return jnp.sum(out_users * user_weights) + jnp.sum(out_items * item_weights)

  def via_full(users, items):
    out_users, out_items = graph_lib.layer_sum(op, users, items, 3)
    return jnp.sum(out_users[user_ids] * user_weights) + jnp.sum(
      out_items[item_ids] * item_weights
    )

  value_rows, grads_rows = jax.jit(
    jax.value_and_grad(via_rows, argnums=(0, 1))
  )(users, items)
  value_full, grads_full = jax.value_and_grad(via_full, argnums=(0, 1))(
    users, items
  )
  np.testing.assert_allclose(value_rows, value_full, rtol=1e-5)
  for ours, expected in zip(grads_rows, grads_full, strict=True):
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", graph_lib.PATHS)
def test_spmm_rows_selects_rows_of_the_product(path):
  graph = _graph(path)
  op = graph_lib.masked_operator(graph, *_masks(graph.num_edges, seed=8))
  matrix = _reference_matrix(_pairs(), *_masks(graph.num_edges, seed=8))
  _, items = _tables()
  # Repeats, the isolated user 8 (an empty row) and unsorted order.
  user_ids = jnp.array([5, 8, 0, 5, 2])
  rows = jax.jit(graph_lib.spmm_rows, static_argnums=3)(
    op.user_rows, user_ids, items, path
  )
  expected = matrix[:NUM_USERS, NUM_USERS:] @ items
  np.testing.assert_allclose(
    rows, expected[np.asarray(user_ids)], rtol=1e-5, atol=1e-6
  )


def test_dropped_operator_drops_both_directions_independently():
  graph = _graph("segment_sum", seed=3)
  rng = jax.random.key(0)
  op = graph_lib.dropped_operator(graph, rng, keep_rate=0.5)
  again = graph_lib.dropped_operator(graph, rng, keep_rate=0.5)
  np.testing.assert_array_equal(op.user_rows.values, again.user_rows.values)
  kept_user = np.asarray(op.user_rows.values) != 0
  kept_item = np.asarray(op.item_rows.values) != 0
  # Kept values are the normalised ones, not rescaled by 1 / keep_rate.
  np.testing.assert_array_equal(
    np.asarray(op.user_rows.values)[kept_user],
    np.asarray(graph.user_rows.values)[kept_user],
  )
  # (u, i) and (i, u) are drawn separately: the masks disagree somewhere.
  item_mask_in_user_order = kept_item[np.asarray(graph.user_from_item)]
  assert np.any(kept_user != item_mask_in_user_order)
  # The transpose blocks carry the other direction's mask.
  np.testing.assert_array_equal(
    np.asarray(op.user_rows_t.values) != 0, item_mask_in_user_order
  )


def test_dropped_csr_equals_dropped_segment_sum():
  users, items = _tables()
  rng = jax.random.key(3)
  outputs = []
  for path in graph_lib.PATHS:
    op = graph_lib.dropped_operator(_graph(path), rng, keep_rate=0.7)
    outputs.append(_stack(*graph_lib.propagate(op, users, items)))
    outputs.append(_stack(*graph_lib.propagate(op.transpose(), users, items)))
  np.testing.assert_allclose(outputs[0], outputs[2], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(outputs[1], outputs[3], rtol=1e-5, atol=1e-6)


def test_resolve_path():
  assert graph_lib.resolve_path("auto", backend="cpu") == "csr"
  assert graph_lib.resolve_path("auto", backend="gpu") == "csr"
  assert graph_lib.resolve_path("auto", backend="tpu") == "segment_sum"
  assert graph_lib.resolve_path("segment_sum") == "segment_sum"
  with pytest.raises(ValueError, match=r"'auto', 'segment_sum', 'csr'"):
    graph_lib.resolve_path("dense")


def test_build_graph_refuses_unknown_path():
  with pytest.raises(ValueError, match=r"'segment_sum', 'csr'"):
    graph_lib.build_graph(_pairs(), NUM_USERS, NUM_ITEMS, "auto")
