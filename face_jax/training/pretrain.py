"""The pretrain stage: a CF backbone trained with BPR to early stopping.

The stage runs on the mesh of `config.mesh` (by default every device on
"data", plain data parallelism): the batch is split over the mesh axes of
the logical axis "batch", the user and item tables (and their Adam
moments) by rows over those of "users" and "items". Tables are padded to
a multiple of their shard count (see `face_jax.models.backbones`), so
any dataset shards; checkpoints restore onto another mesh shape.

The CSR propagation kernel is a custom call that XLA cannot split: with
tables sharded over more than one device, propagation "auto" resolves to
"segment_sum" (which XLA partitions), and an explicit "csr" makes XLA
gather both tables on every device around each product (a warning says
so).
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from face_jax import parallel
from face_jax.data import Dataset
from face_jax.evaluation import RankingTask, prepare_ranking, rank_metrics
from face_jax.models import backbones
from face_jax.training import checkpoints
from face_jax.training.loop import FitOptions, LoopState, fit
from face_jax.training.negatives import NegativeSampler, epoch_batches
from face_jax.training.optimizers import adam_coupled_l2
from face_jax.training.step import (
  StepLayout,
  TrainState,
  compile_train_step,
  make_train_step,
  resolve_rng_impl,
  sharded_train_state,
  state_logical_axes,
  step_layout,
)
from face_jax.training.writer import MetricWriter

STAGE = "pretrain"

# Logical axes of the backbone parameters, by key path.
BACKBONE_AXES_TABLE = (
  ("user", ("users", "embed")),
  ("item", ("items", "embed")),
  (".*", None),
)
BACKBONE_AXES = functools.partial(
  parallel.logical_axes_by_path, table=BACKBONE_AXES_TABLE
)
# Logical axes of a BPR batch.
BATCH_AXES = {"user": ("batch",), "pos": ("batch",), "neg": ("batch",)}


def fit_options(
  config: ml_collections.ConfigDict, section: ml_collections.ConfigDict
) -> FitOptions:
  """Loop options of a stage from its config section and the shared ones."""
  if "learning_rate" in section:
    # Pretraining: one Adam over the backbone.
    learning_rates = {"backbone": section.learning_rate}
  else:
    # FACE stages: one Adam per parameter group (see face_optimizer).
    learning_rates = {
      "face": config.face.learning_rate,
      "backbone": config.face.backbone_learning_rate,
    }
  return FitOptions(
    max_epochs=section.max_epochs,
    patience=section.patience,
    monitor=section.monitor,
    log_every=section.log_every,
    progress_bar=config.log.progress_bar,
    async_save=config.checkpoint.async_save,
    learning_rates=learning_rates,
  )


def make_scorer(
  backbone: backbones.Backbone,
  graph: Any,
  ks: tuple[int, ...],
):
  """Returns (params, task) -> full-ranking metrics of the backbone."""
  embed = jax.jit(backbone.embed)

  def score(params, task: RankingTask) -> dict[str, float]:
    users, items = embed(params, graph)
    return rank_metrics(users, items, task, ks)

  return score


def row_multiples(mesh: Mesh, rules: parallel.Rules) -> tuple[int, int]:
  """Shard counts of the user and item rows: the tables' padding."""
  return (
    parallel.shard_count(mesh, rules, "users"),
    parallel.shard_count(mesh, rules, "items"),
  )


def propagation_for(name: str, multiples: tuple[int, int]) -> str:
  """config.model.propagation for tables split into `multiples` shards.

  Args:
    name: "auto", "segment_sum" or "csr".
    multiples: shard counts of the user and item rows.

  Returns:
    `name`, except "auto" becomes "segment_sum" when a table is split:
    XLA partitions segment sums, not the CSR custom call.
  """
  if max(multiples) == 1:
    return name
  if name == "auto":
    return "segment_sum"
  if name == "csr":
    logging.warning(
      "config.model.propagation='csr' with the user and item rows split "
      "over %d and %d devices: XLA cannot split the CSR kernel and gathers "
      "both tables on every device around each product; use 'auto' or "
      "'segment_sum'.",
      *multiples,
    )
  return name


def build_backbone(
  config: ml_collections.ConfigDict, dataset: Dataset, mesh: Mesh
) -> tuple[backbones.Backbone, Any]:
  """The backbone of `config.model` laid out for `mesh`, and its graph.

  Its tables are padded to the shard counts of the user and item rows and
  its propagation is one that XLA can split (see `propagation_for`); the
  graph is not placed on the mesh yet.
  """
  multiples = row_multiples(mesh, config.mesh.rules)
  model_config = config.model.copy_and_resolve_references()
  model_config.propagation = propagation_for(
    config.model.propagation, multiples
  )
  return backbones.build(model_config, dataset, multiples)


def _build(config, dataset, mesh):
  """Backbone (tables padded for `mesh`), its graph and the optimiser."""
  backbone, graph = build_backbone(config, dataset, mesh)
  optimizer = adam_coupled_l2(
    config.pretrain.learning_rate, 2.0 * config.model.reg_weight
  )
  return backbone, graph, optimizer


def _init_rng(config) -> jax.Array:
  return jax.random.fold_in(jax.random.key(config.seed), 0)


def batch_spec(batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes of one BPR batch, for compiling the step ahead of time."""
  return {
    name: jax.ShapeDtypeStruct((batch_size,), jnp.int32) for name in BATCH_AXES
  }


@dataclasses.dataclass(frozen=True)
class Pretraining:
  """Everything `fit` needs to pretrain a backbone.

  Attributes:
    backbone: the backbone.
    graph: its graph, replicated on the mesh.
    state: the step-0 train state, sharded on the mesh.
    train_step: the compiled BPR (+ extra terms) step.
    make_batches: epoch -> that epoch's batches.
    score: (params, task) -> full-ranking metrics.
    rng: base rng of the train steps.
    layout: where the step's arguments live.
  """

  backbone: backbones.Backbone
  graph: Any
  state: TrainState
  train_step: Callable
  make_batches: Callable[[int], dict[str, np.ndarray]]
  score: Callable[[Any, RankingTask], dict[str, float]]
  rng: jax.Array
  layout: StepLayout


def setup_pretraining(
  config: ml_collections.ConfigDict,
  dataset: Dataset,
  mesh: Mesh | None = None,
) -> Pretraining:
  """Builds the backbone, optimiser, train step and epoch batches.

  The state is created sharded and the step compiled for the mesh; its
  memory per device is logged before any step runs.

  Args:
    config: the resolved experiment config.
    dataset: the dataset.
    mesh: the device mesh; `make_mesh(config.mesh)` when None.

  Returns:
    The Pretraining.
  """
  mesh = parallel.make_mesh(config.mesh) if mesh is None else mesh
  rules = config.mesh.rules
  backbone, graph, optimizer = _build(config, dataset, mesh)
  state = sharded_train_state(
    backbone.init, optimizer, _init_rng(config), mesh, rules, BACKBONE_AXES
  )
  batch = batch_spec(config.pretrain.batch_size)
  layout = step_layout(
    mesh, rules, state, optimizer, BACKBONE_AXES, batch, BATCH_AXES
  )
  # Graph arrays go to the devices once, not with every step.
  graph = layout.place(graph)
  impl = resolve_rng_impl(config.face.rng_impl, jax.device_count())
  rng = parallel.place_global(
    jax.random.fold_in(jax.random.key(config.seed, impl=impl), 1),
    layout.replicated,
  )

  def loss_terms(params, graph, batch, rng):
    terms, _ = backbone.losses(params, graph, batch, rng)
    return terms

  sampler = NegativeSampler(dataset.train, dataset.num_users, dataset.num_items)

  def make_batches(epoch: int) -> dict[str, np.ndarray]:
    # Seeded by epoch alone, so a resumed run draws the same epochs.
    epoch_rng = np.random.default_rng([config.seed, epoch])
    return epoch_batches(
      dataset.train, sampler, config.pretrain.batch_size, epoch_rng
    )

  train_step = compile_train_step(
    make_train_step(loss_terms, optimizer, layout),
    f"{STAGE} step ({backbone.name}, mesh {dict(mesh.shape)})",
    layout,
    state,
    batch,
    graph,
    rng,
  )
  return Pretraining(
    backbone=backbone,
    graph=graph,
    state=state,
    train_step=train_step,
    make_batches=make_batches,
    score=make_scorer(backbone, graph, tuple(config.eval.ks)),
    rng=rng,
    layout=layout,
  )


def run_pretrain(
  config: ml_collections.ConfigDict,
  dataset: Dataset,
  stage_dir: pathlib.Path,
  writer: MetricWriter,
  on_epoch_end: Callable[[LoopState], None] | None = None,
) -> dict[str, Any]:
  """Trains the backbone, then scores its best epoch on the test split.

  Args:
    config: the resolved experiment config.
    dataset: the dataset.
    stage_dir: this stage's folder; checkpoints go to its `checkpoints/`.
    writer: receives one record per epoch.
    on_epoch_end: called with the loop's bookkeeping after every epoch.

  Returns:
    {"valid": best validation metrics, "test": test metrics of the best
    epoch, "epochs": epochs run, "best_epoch": ..., "seconds_per_epoch":
    median training time of an epoch}.
  """
  setup = setup_pretraining(config, dataset)
  valid = prepare_ranking(dataset, "valid", config.eval.batch_size)
  result = fit(
    stage=STAGE,
    state=setup.state,
    train_step=setup.train_step,
    make_batches=setup.make_batches,
    evaluate=lambda params: setup.score(params, valid),
    graph=setup.graph,
    rng=setup.rng,
    checkpoint_dir=stage_dir / "checkpoints",
    writer=writer,
    options=fit_options(config, config.pretrain),
    on_epoch_end=on_epoch_end,
  )
  test = prepare_ranking(dataset, "test", config.eval.batch_size)
  test_metrics = setup.score(result.state.params, test)
  writer.write(STAGE, result.loop.best_epoch, {"test": test_metrics})
  return {
    "valid": result.loop.best_metrics,
    "test": test_metrics,
    "epochs": result.loop.epoch,
    "best_epoch": result.loop.best_epoch,
    "seconds_per_epoch": float(np.median(result.loop.epoch_seconds)),
  }


def restore_pretrained(
  config: ml_collections.ConfigDict,
  dataset: Dataset,
  stage_dir: pathlib.Path,
  mesh: Mesh | None = None,
) -> tuple[backbones.Backbone, Any, Any]:
  """The backbone, its graph and the best pretrained params of a stage.

  The params are read straight into the layout of `mesh` (tables sharded
  by rows, padded for its shard counts, whatever mesh wrote them); nothing
  is initialised first.

  Args:
    config: the resolved experiment config used for pretraining.
    dataset: the same dataset.
    stage_dir: the finished pretrain stage's folder.
    mesh: the device mesh; `make_mesh(config.mesh)` when None.

  Returns:
    (backbone, graph, params): the graph replicated on `mesh`, the params
    laid out by `BACKBONE_AXES` (padded tables: `backbone.rows`).

  Raises:
    FileNotFoundError: the pretrain stage has not finished in stage_dir.
  """
  result = checkpoints.read_json(stage_dir / checkpoints.RESULT_FILE)
  if result is None:
    raise FileNotFoundError(
      f"No finished pretrain stage in {stage_dir}; run the pretrain stage "
      "first (python -m face_jax.main with the same workdir)."
    )
  mesh = parallel.make_mesh(config.mesh) if mesh is None else mesh
  backbone, graph, target = _state_target(config, dataset, mesh)
  saved = checkpoints.EpochCheckpoints(stage_dir / "checkpoints")
  try:
    state, _ = saved.restore(result["best_epoch"], target)
  finally:
    saved.close()
  graph = parallel.place_global(graph, parallel.named_sharding(mesh, (), ()))
  return backbone, graph, state.params


def state_target(
  config: ml_collections.ConfigDict, dataset: Dataset, mesh: Mesh
) -> TrainState:
  """The pretrain state's shapes and shardings on `mesh`, nothing allocated.

  Restoring a checkpoint into it places every array on `mesh`, whatever
  mesh wrote it.

  Args:
    config: the resolved experiment config.
    dataset: the dataset.
    mesh: the device mesh.

  Returns:
    A TrainState of `jax.ShapeDtypeStruct`s with shardings.
  """
  return _state_target(config, dataset, mesh)[2]


def _state_target(config, dataset, mesh):
  backbone, graph, optimizer = _build(config, dataset, mesh)
  shapes = jax.eval_shape(
    lambda rng: TrainState.create(backbone.init(rng), optimizer),
    _init_rng(config),
  )
  logical = state_logical_axes(shapes, optimizer, BACKBONE_AXES)
  target = parallel.abstract_target(shapes, mesh, config.mesh.rules, logical)
  return backbone, graph, target
