"""Collaborative-filtering backbones as pure functions over a params pytree.

Every backbone is a `Backbone`: an `init` that makes its parameters, a
training forward `losses` that returns its loss terms together with the final
embeddings of the batch (the FACE stages read those), and an inference
forward `embed` that returns the final embeddings of all users and items.
Scores are always dot products of final embeddings.

The graph (whatever a backbone propagates over) is an explicit argument, a
pytree of arrays, so a jitted step receives it as an input instead of baking
a large constant into the compiled program.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from face_jax.data import Dataset

Params = dict[str, jax.Array]
# A training batch: "user", "pos", "neg", each [batch] int32.
Batch = dict[str, jax.Array]
# Final embeddings of a batch: (users, positives, negatives), each [batch, d].
BatchEmbeddings = tuple[jax.Array, jax.Array, jax.Array]


@dataclasses.dataclass(frozen=True)
class Backbone:
  """The functions that make up one CF backbone.

  Attributes:
    name: registry name, for logs.
    init: rng -> params; params hold at least "user" [num_users, d] and
      "item" [num_items, d].
    losses: (params, graph, batch, rng) -> (terms, embeddings). `terms` maps
      loss names to weighted scalars whose sum is the training loss ("bpr"
      always, plus the backbone's own extra terms); L2 is not among them
      because the optimiser applies it as coupled weight decay.
    embed: (params, graph) -> (users [num_users, d], items [num_items, d]),
      the deterministic final embeddings used for scoring.
  """

  name: str
  init: Callable[[jax.Array], Params]
  losses: Callable[
    [Params, Any, Batch, jax.Array],
    tuple[dict[str, jax.Array], BatchEmbeddings],
  ]
  embed: Callable[[Params, Any], tuple[jax.Array, jax.Array]]


def xavier_tables(
  rng: jax.Array, num_users: int, num_items: int, dim: int
) -> Params:
  """Xavier-uniform user and item tables, as the authors initialise them."""
  init = jax.nn.initializers.xavier_uniform()
  user_rng, item_rng = jax.random.split(rng)
  return {
    "user": init(user_rng, (num_users, dim), jnp.float32),
    "item": init(item_rng, (num_items, dim), jnp.float32),
  }


def bpr_loss(
  users: jax.Array, positives: jax.Array, negatives: jax.Array
) -> jax.Array:
  """Mean over the batch of softplus(score_neg - score_pos).

  Args:
    users: [batch, d] user embeddings.
    positives: [batch, d] embeddings of the users' positive items.
    negatives: [batch, d] embeddings of the sampled negative items.

  Returns:
    Scalar loss.
  """
  pos_scores = jnp.sum(users * positives, axis=-1)
  neg_scores = jnp.sum(users * negatives, axis=-1)
  return jnp.mean(jax.nn.softplus(neg_scores - pos_scores))


def _gather_batch(users, items, batch: Batch) -> BatchEmbeddings:
  return users[batch["user"]], items[batch["pos"]], items[batch["neg"]]


def _build_mf(
  config: ml_collections.ConfigDict, dataset: Dataset
) -> tuple[Backbone, Any]:
  """MF/GMF: the raw embedding tables, scored by dot product."""

  def init(rng):
    return xavier_tables(
      rng, dataset.num_users, dataset.num_items, config.embed_dim
    )

  def embed(params, graph):
    del graph  # MF has no graph.
    return params["user"], params["item"]

  def losses(params, graph, batch, rng):
    del rng  # MF training is deterministic.
    embeddings = _gather_batch(*embed(params, graph), batch)
    return {"bpr": bpr_loss(*embeddings)}, embeddings

  return Backbone("mf", init, losses, embed), None


# Backbone name -> builder (model config, dataset) -> (backbone, graph).
_BUILDERS: dict[
  str,
  Callable[[ml_collections.ConfigDict, Dataset], tuple[Backbone, Any]],
] = {
  "mf": _build_mf,
}


def build(
  config: ml_collections.ConfigDict, dataset: Dataset
) -> tuple[Backbone, Any]:
  """Makes the backbone named by `config.backbone` and its graph.

  Args:
    config: the `model` section of the experiment config.
    dataset: the dataset; its train split defines the graph.

  Returns:
    (backbone, graph): the graph is a pytree of arrays (or None) to pass to
    `backbone.losses` and `backbone.embed`.

  Raises:
    ValueError: the name is not a known backbone.
  """
  if config.backbone not in _BUILDERS:
    raise ValueError(
      f"Unknown backbone {config.backbone!r}; set config.model.backbone to "
      f"one of {sorted(_BUILDERS)}."
    )
  return _BUILDERS[config.backbone](config, dataset)
