"""Collaborative-filtering backbones as pure functions over a params pytree.

Every backbone is a `Backbone`: an `init` that makes its parameters, a
training forward `losses` that returns its loss terms together with the final
embeddings of the batch (the FACE stages read those), and an inference
forward `embed` that returns the final embeddings of all users and items.
Scores are always dot products of final embeddings.

The graph (whatever a backbone propagates over) is an explicit argument, a
pytree of arrays, so a jitted step receives it as an input instead of baking
a large constant into the compiled program.

To shard the user and item tables by rows over a mesh axis that does not
divide their row counts, `build` pads them (`TableRows`): the padded rows
are zeros with no edges in the graph, receive no gradient, are never
sampled, and are sliced off before anything runs over all rows (`embed`,
the contrastive denominators), so every value a backbone computes for the
real rows is the same with or without padding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import struct

from face_jax import graph as graph_lib
from face_jax.data import Dataset
from face_jax.graph import svd as svd_lib
from face_jax.parallel import pad_rows_to, round_up

Params = dict[str, jax.Array]
# A training batch: "user", "pos", "neg", each [batch] int32.
Batch = dict[str, jax.Array]
# Final embeddings of a batch: (users, positives, negatives), each [batch, d].
BatchEmbeddings = tuple[jax.Array, jax.Array, jax.Array]


@dataclasses.dataclass(frozen=True)
class TableRows:
  """Real and padded row counts of the user and item tables.

  Attributes:
    num_users: real users.
    num_items: real items.
    user_multiple: the user table has a multiple of this many rows (the
      shard count of its rows); 1 for no padding.
    item_multiple: the same for the item table.
  """

  num_users: int
  num_items: int
  user_multiple: int = 1
  item_multiple: int = 1

  @property
  def padded_users(self) -> int:
    return round_up(self.num_users, self.user_multiple)

  @property
  def padded_items(self) -> int:
    return round_up(self.num_items, self.item_multiple)

  def pad(self, users: jax.Array, items: jax.Array) -> Params:
    """Zero rows appended to real tables [num_users, d], [num_items, d]."""
    return {
      "user": pad_rows_to(users, self.user_multiple),
      "item": pad_rows_to(items, self.item_multiple),
    }

  def real(
    self, users: jax.Array, items: jax.Array
  ) -> tuple[jax.Array, jax.Array]:
    """The real rows of padded (or unpadded) user and item tables."""
    if users.shape[0] != self.num_users:
      users = users[: self.num_users]
    if items.shape[0] != self.num_items:
      items = items[: self.num_items]
    return users, items


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
      the deterministic final embeddings used for scoring, real rows only.
    rows: real and padded table sizes; params hold the padded tables.
  """

  name: str
  init: Callable[[jax.Array], Params]
  losses: Callable[
    [Params, Any, Batch, jax.Array],
    tuple[dict[str, jax.Array], BatchEmbeddings],
  ]
  embed: Callable[[Params, Any], tuple[jax.Array, jax.Array]]
  rows: TableRows | None = None


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


def _init_tables(rows: TableRows, dim: int) -> Callable[[jax.Array], Params]:
  """Xavier tables of the real sizes (the fan depends on them), padded."""

  def init(rng):
    tables = xavier_tables(rng, rows.num_users, rows.num_items, dim)
    return rows.pad(tables["user"], tables["item"])

  return init


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
  config: ml_collections.ConfigDict, dataset: Dataset, rows: TableRows
) -> tuple[Backbone, Any]:
  """MF/GMF: the raw embedding tables, scored by dot product."""

  def embed(params, graph):
    del graph  # MF has no graph.
    return rows.real(params["user"], params["item"])

  def losses(params, graph, batch, rng):
    del graph, rng  # MF training is deterministic.
    embeddings = _gather_batch(params["user"], params["item"], batch)
    return {"bpr": bpr_loss(*embeddings)}, embeddings

  init = _init_tables(rows, config.embed_dim)
  return Backbone("mf", init, losses, embed, rows), None


def _build_graph(
  config: ml_collections.ConfigDict, dataset: Dataset, rows: TableRows
) -> graph_lib.Graph:
  """The normalised train graph over the padded tables (padding rows have
  no edges), with the kernel the config asks for."""
  if config.num_layers < 1:
    raise ValueError(
      f"config.model.num_layers is {config.num_layers}; graph backbones "
      "need at least 1 layer (use backbone 'mf' for none)."
    )
  path = graph_lib.resolve_path(config.propagation)
  return graph_lib.build_graph(
    dataset.train, rows.padded_users, rows.padded_items, path
  )


def _build_lightgcn(
  config: ml_collections.ConfigDict, dataset: Dataset, rows: TableRows
) -> tuple[Backbone, graph_lib.Graph]:
  """LightGCN: the sum of the layer-0..L embeddings of plain propagation.

  The authors sum the layers (they do not average). Training propagates
  over an edge-dropped matrix (each stored entry kept with probability
  `keep_rate`, kept values not rescaled); `embed` uses the full matrix.
  """
  if not 0.0 < config.keep_rate <= 1.0:
    raise ValueError(
      f"config.model.keep_rate is {config.keep_rate}; it must be in (0, 1]."
    )
  graph = _build_graph(config, dataset, rows)
  num_layers, keep_rate = config.num_layers, config.keep_rate

  def embed(params, graph):
    op = graph_lib.full_operator(graph)
    return rows.real(
      *graph_lib.layer_sum(op, params["user"], params["item"], num_layers)
    )

  def losses(params, graph, batch, rng):
    if keep_rate < 1.0:
      op = graph_lib.dropped_operator(graph, rng, keep_rate)
    else:
      op = graph_lib.full_operator(graph)
    embeddings = _layer_sum_batch(op, params, num_layers, batch)
    return {"bpr": bpr_loss(*embeddings)}, embeddings

  init = _init_tables(rows, config.embed_dim)
  return Backbone("lightgcn", init, losses, embed, rows), graph


def _layer_sum_batch(op, params, num_layers, batch) -> BatchEmbeddings:
  """LightGCN embeddings of the batch users, positives and negatives."""
  item_ids = jnp.concatenate([batch["pos"], batch["neg"]])
  users, items = graph_lib.layer_sum_rows(
    op, params["user"], params["item"], num_layers, batch["user"], item_ids
  )
  positives, negatives = jnp.split(items, 2)
  return users, positives, negatives


def sign_aligned_noise(
  rng: jax.Array, embeddings: jax.Array, eps: float
) -> jax.Array:
  """SimGCL's perturbation: uniform noise, rows scaled to norm `eps`.

  Each row is a uniform [0, 1) draw normalised to unit length, given the
  signs of `embeddings` and scaled by `eps`, so it never points away from
  the embedding's orthant. It is a constant for differentiation.

  Args:
    rng: key for the draw.
    embeddings: [n, d] rows to perturb.
    eps: norm of each noise row.

  Returns:
    [n, d] noise.
  """
  noise = jax.random.uniform(rng, embeddings.shape, embeddings.dtype)
  norms = jnp.linalg.norm(noise, axis=-1, keepdims=True)
  # torch.nn.functional.normalize's floor on the norm.
  noise = noise / jnp.maximum(norms, 1e-12)
  return jax.lax.stop_gradient(noise * jnp.sign(embeddings) * eps)


def infonce_loss(
  anchors: jax.Array,
  positives: jax.Array,
  candidates: jax.Array,
  temperature: float,
) -> jax.Array:
  """Mean over anchors of InfoNCE on cosine similarities.

  Row b's positive is `positives[b]`; its denominator runs over every row of
  `candidates` (which contains the positive). Rows are normalised with
  sqrt(1e-8 + |x|^2), as the authors do.

  Args:
    anchors: [batch, d].
    positives: [batch, d].
    candidates: [n, d].
    temperature: softmax temperature.

  Returns:
    Scalar loss.
  """

  def normalise(x):
    return x / jnp.sqrt(1e-8 + jnp.sum(jnp.square(x), -1, keepdims=True))

  anchors, positives = normalise(anchors), normalise(positives)
  candidates = normalise(candidates)
  matched = jnp.sum(anchors * positives, -1) / temperature
  logits = anchors @ candidates.T / temperature
  return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - matched)


def _build_simgcl(
  config: ml_collections.ConfigDict, dataset: Dataset, rows: TableRows
) -> tuple[Backbone, graph_lib.Graph]:
  """SimGCL: LightGCN without edge dropout plus a contrastive term.

  As in the authors' code: the BPR term uses the clean (unperturbed) layer
  sum. Each of two perturbed views propagates L layers, adding
  `sign_aligned_noise` of norm eps to every layer's output (the next layer
  propagates the perturbed rows) and sums layers 0..L (layer 0 is the
  clean table). The contrastive term is InfoNCE between the two views for
  the batch users against all users plus for the batch positive items
  against all items, each averaged over the batch (the authors sum over the
  batch and divide by its size), weighted by `simgcl_weight`.
  """
  graph = _build_graph(config, dataset, rows)
  num_layers, eps = config.num_layers, config.simgcl_eps
  temperature, weight = config.simgcl_temperature, config.simgcl_weight

  def embed(params, graph):
    op = graph_lib.full_operator(graph)
    return rows.real(
      *graph_lib.layer_sum(op, params["user"], params["item"], num_layers)
    )

  def perturbed_view(op, params, rng):
    # Padding rows stay zero (their noise has the sign of zero) and the
    # draws of the real rows do not depend on the padding: JAX draws each
    # element from its own position.
    users, items = params["user"], params["item"]
    user_sum, item_sum = users, items
    for layer_rng in jax.random.split(rng, num_layers):
      users, items = graph_lib.propagate(op, users, items)
      user_rng, item_rng = jax.random.split(layer_rng)
      users = users + sign_aligned_noise(user_rng, users, eps)
      items = items + sign_aligned_noise(item_rng, items, eps)
      user_sum, item_sum = user_sum + users, item_sum + items
    return rows.real(user_sum, item_sum)

  def losses(params, graph, batch, rng):
    op = graph_lib.full_operator(graph)
    embeddings = _layer_sum_batch(op, params, num_layers, batch)
    first_rng, second_rng = jax.random.split(rng)
    users_1, items_1 = perturbed_view(op, params, first_rng)
    users_2, items_2 = perturbed_view(op, params, second_rng)
    user_ids, item_ids = batch["user"], batch["pos"]
    contrastive = infonce_loss(
      users_1[user_ids], users_2[user_ids], users_2, temperature
    ) + infonce_loss(items_1[item_ids], items_2[item_ids], items_2, temperature)
    terms = {"bpr": bpr_loss(*embeddings), "cl": weight * contrastive}
    return terms, embeddings

  init = _init_tables(rows, config.embed_dim)
  return Backbone("simgcl", init, losses, embed, rows), graph


@struct.dataclass
class LightGCLGraph:
  """LightGCL's inputs: the normalised graph and its truncated SVD."""

  adjacency: graph_lib.Graph
  svd: svd_lib.SvdView


def _lightgcl_views(
  params, graph: LightGCLGraph, num_layers: int, rows: TableRows
):
  """The graph view E and the SVD view G of users and items.

  E_l = A E_(l-1) without residual, E = sum of layers 0..L. The SVD view
  replaces each layer's propagation of E_(l-1) by U S V^T (users) or
  V S U^T (items), G = E_0 + sum of those, as the authors compute it.

  Returns:
    (E users, E items, G users, G items), each [rows, d], real rows only.
  """
  op = graph_lib.full_operator(graph.adjacency)
  outputs = graph_lib.layers(op, params["user"], params["item"], num_layers)
  graph_users = sum(users for users, _ in outputs)
  graph_items = sum(items for _, items in outputs)
  # Layers 0..L-1 feed the L low-rank propagations.
  inner_users = sum(users for users, _ in outputs[:-1])
  inner_items = sum(items for _, items in outputs[:-1])
  svd_users = params["user"] + svd_lib.to_users(graph.svd, inner_items)
  svd_items = params["item"] + svd_lib.to_items(graph.svd, inner_users)
  return (
    *rows.real(graph_users, graph_items),
    *rows.real(svd_users, svd_items),
  )


def lightgcl_contrast(
  svd_rows: jax.Array,
  graph_table: jax.Array,
  ids: jax.Array,
  temperature: float,
) -> jax.Array:
  """LightGCL's contrastive term for one side (users or items).

  For each batch row b with id n: -clip(G_b . E_n / t, -5, 5) +
  log(sum over all rows j of exp(G_b . E_j / t) + 1e-8), averaged over the
  batch. Embeddings are not normalised, as in the authors' code.

  Args:
    svd_rows: [batch, d] SVD-view embeddings of the batch ids.
    graph_table: [n, d] graph-view embeddings of all users (or items).
    ids: [batch] ids of the batch rows.
    temperature: similarity temperature.

  Returns:
    Scalar loss.
  """
  logits = svd_rows @ graph_table.T / temperature
  # log(sum exp + 1e-8), without overflowing for large logits.
  negative = jnp.logaddexp(jax.nn.logsumexp(logits, axis=-1), jnp.log(1e-8))
  positive = jnp.clip(
    jnp.sum(svd_rows * graph_table[ids], -1) / temperature, -5.0, 5.0
  )
  return jnp.mean(negative) - jnp.mean(positive)


def _build_lightgcl(
  config: ml_collections.ConfigDict, dataset: Dataset, rows: TableRows
) -> tuple[Backbone, LightGCLGraph]:
  """LightGCL: graph view without residuals, a rank-q SVD view, contrast.

  The BPR term uses the graph view E. The contrastive term
  (`lightgcl_contrast`) pairs the SVD view of the batch users with the
  graph view of all users, plus the same for the batch positive items,
  weighted by `lightgcl_weight`. The authors' edge dropout is 0, so
  training is deterministic; their L2 weight (1e-9) is the optimiser's.
  """
  adjacency = _build_graph(config, dataset, rows)
  matrix = graph_lib.normalized_matrix(
    dataset.train, dataset.num_users, dataset.num_items
  )
  # The SVD of the real matrix; padding rows of U and V are zeros.
  view = svd_lib.svd_view(matrix, config.lightgcl_rank)
  view = view.replace(
    users=pad_rows_to(view.users, rows.user_multiple),
    items=pad_rows_to(view.items, rows.item_multiple),
  )
  graph = LightGCLGraph(adjacency, view)
  num_layers = config.num_layers
  temperature, weight = config.lightgcl_temperature, config.lightgcl_weight

  def embed(params, graph):
    op = graph_lib.full_operator(graph.adjacency)
    return rows.real(
      *graph_lib.layer_sum(op, params["user"], params["item"], num_layers)
    )

  def losses(params, graph, batch, rng):
    del rng  # No dropout.
    users, items, svd_users, svd_items = _lightgcl_views(
      params, graph, num_layers, rows
    )
    embeddings = _gather_batch(users, items, batch)
    user_ids, item_ids = batch["user"], batch["pos"]
    contrastive = lightgcl_contrast(
      svd_users[user_ids], users, user_ids, temperature
    ) + lightgcl_contrast(svd_items[item_ids], items, item_ids, temperature)
    terms = {"bpr": bpr_loss(*embeddings), "cl": weight * contrastive}
    return terms, embeddings

  init = _init_tables(rows, config.embed_dim)
  return Backbone("lightgcl", init, losses, embed, rows), graph


# Backbone name -> builder (model config, dataset, table rows) ->
# (backbone, graph).
_BUILDERS: dict[
  str,
  Callable[
    [ml_collections.ConfigDict, Dataset, TableRows], tuple[Backbone, Any]
  ],
] = {
  "mf": _build_mf,
  "lightgcn": _build_lightgcn,
  "simgcl": _build_simgcl,
  "lightgcl": _build_lightgcl,
}


def build(
  config: ml_collections.ConfigDict,
  dataset: Dataset,
  row_multiples: tuple[int, int] = (1, 1),
) -> tuple[Backbone, Any]:
  """Makes the backbone named by `config.backbone` and its graph.

  Args:
    config: the `model` section of the experiment config.
    dataset: the dataset; its train split defines the graph.
    row_multiples: (users, items): pad the tables (and the graph) to
      multiples of these row counts, the shard counts of their rows; see
      the module docstring.

  Returns:
    (backbone, graph): the graph is a pytree of arrays (or None) to pass to
    `backbone.losses` and `backbone.embed`. Graph backbones build it on the
    host once; its kernel follows `config.propagation`.

  Raises:
    ValueError: the backbone or propagation name is unknown, or a
      hyperparameter is out of range.
  """
  if config.backbone not in _BUILDERS:
    raise ValueError(
      f"Unknown backbone {config.backbone!r}; set config.model.backbone to "
      f"one of {sorted(_BUILDERS)}."
    )
  graph_lib.resolve_path(config.propagation)  # Refuse bad names, even MF.
  rows = TableRows(dataset.num_users, dataset.num_items, *row_multiples)
  return _BUILDERS[config.backbone](config, dataset, rows)
