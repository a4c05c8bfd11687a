"""The pretrain stage: a CF backbone trained with BPR to early stopping."""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from face_jax.data import Dataset
from face_jax.evaluation import RankingTask, prepare_ranking, rank_metrics
from face_jax.models import backbones
from face_jax.training import checkpoints
from face_jax.training.loop import FitOptions, LoopState, fit
from face_jax.training.negatives import NegativeSampler, epoch_batches
from face_jax.training.optimizers import adam_coupled_l2
from face_jax.training.step import TrainState, make_train_step
from face_jax.training.writer import MetricWriter

STAGE = "pretrain"


def fit_options(
  config: ml_collections.ConfigDict, section: ml_collections.ConfigDict
) -> FitOptions:
  """Loop options of a stage from its config section and the shared ones."""
  return FitOptions(
    max_epochs=section.max_epochs,
    patience=section.patience,
    monitor=section.monitor,
    log_every=section.log_every,
    progress_bar=config.log.progress_bar,
    async_save=config.checkpoint.async_save,
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


def _initial_state(config, dataset):
  """Backbone, graph, optimiser and the step-0 train state."""
  backbone, graph = backbones.build(config.model, dataset)
  # Graph arrays go to the device once, not with every step.
  graph = jax.device_put(graph)
  init_rng = jax.random.fold_in(jax.random.key(config.seed), 0)
  optimizer = adam_coupled_l2(
    config.pretrain.learning_rate, 2.0 * config.model.reg_weight
  )
  state = TrainState.create(backbone.init(init_rng), optimizer)
  return backbone, graph, optimizer, state


@dataclasses.dataclass(frozen=True)
class Pretraining:
  """Everything `fit` needs to pretrain a backbone.

  Attributes:
    backbone: the backbone.
    graph: its graph, on the device.
    state: the step-0 train state.
    train_step: the jitted BPR (+ extra terms) step.
    make_batches: epoch -> that epoch's batches.
    score: (params, task) -> full-ranking metrics.
    rng: base rng of the train steps.
  """

  backbone: backbones.Backbone
  graph: Any
  state: TrainState
  train_step: Callable
  make_batches: Callable[[int], dict[str, np.ndarray]]
  score: Callable[[Any, RankingTask], dict[str, float]]
  rng: jax.Array


def setup_pretraining(
  config: ml_collections.ConfigDict, dataset: Dataset
) -> Pretraining:
  """Builds the backbone, optimiser, train step and epoch batches."""
  backbone, graph, optimizer, state = _initial_state(config, dataset)

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

  return Pretraining(
    backbone=backbone,
    graph=graph,
    state=state,
    train_step=make_train_step(loss_terms, optimizer),
    make_batches=make_batches,
    score=make_scorer(backbone, graph, tuple(config.eval.ks)),
    rng=jax.random.fold_in(jax.random.key(config.seed), 1),
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
) -> tuple[backbones.Backbone, Any, Any]:
  """The backbone, its graph and the best pretrained params of a stage.

  Args:
    config: the resolved experiment config used for pretraining.
    dataset: the same dataset.
    stage_dir: the finished pretrain stage's folder.

  Returns:
    (backbone, graph, params).

  Raises:
    FileNotFoundError: the pretrain stage has not finished in stage_dir.
  """
  result = checkpoints.read_json(stage_dir / checkpoints.RESULT_FILE)
  if result is None:
    raise FileNotFoundError(
      f"No finished pretrain stage in {stage_dir}; run the pretrain stage "
      "first (python -m face_jax.main with the same workdir)."
    )
  backbone, graph, _, state = _initial_state(config, dataset)
  saved = checkpoints.EpochCheckpoints(stage_dir / "checkpoints")
  try:
    state, _ = saved.restore(result["best_epoch"], state)
  finally:
    saved.close()
  return backbone, graph, state.params
