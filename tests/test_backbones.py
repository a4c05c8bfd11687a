"""Backbones: shapes and losses on tiny inputs."""

import jax
import numpy as np

from configs import base
from face_jax.data import Dataset
from face_jax.models import backbones


def _toy_dataset():
  train = np.array([[0, 0], [0, 1], [1, 2], [2, 1]], dtype=np.int32)
  empty = np.zeros((0, 2), dtype=np.int32)
  return Dataset("toy", 3, 4, train, empty, empty)


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
