"""The epoch loop: train, validate, early-stop, checkpoint, resume.

`fit` is shared by every stage: a stage supplies its jitted train step, how
to make an epoch of batches and how to validate parameters. Each epoch is
checkpointed with the loop's bookkeeping, so a stopped run resumes at the
next epoch with the same best metric and patience count; batches and rngs
depend only on (seed, epoch, step), so the resumed run is the run that
would have happened without the stop.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import tqdm
from absl import logging

from face_jax.training.checkpoints import EpochCheckpoints
from face_jax.training.step import TrainState, TrainStep
from face_jax.training.writer import MetricWriter


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite."""


@dataclasses.dataclass(frozen=True)
class FitOptions:
  """How long to train and what to report.

  Attributes:
    max_epochs: upper bound on epochs.
    patience: stop after this many epochs without a better `monitor`.
    monitor: validation metric to maximise, for example "recall@20".
    log_every: steps between progress-bar loss updates and NaN checks
      (each check waits for the device).
    progress_bar: show a progress bar with loss and ETA per epoch.
    async_save: write checkpoints in the background.
    learning_rates: parameter group -> learning rate, logged every epoch.
  """

  max_epochs: int
  patience: int
  monitor: str = "recall@20"
  log_every: int = 50
  progress_bar: bool = True
  async_save: bool = True
  learning_rates: Mapping[str, float] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.max_epochs < 1 or self.patience < 1 or self.log_every < 1:
      raise ValueError(
        f"max_epochs {self.max_epochs}, patience {self.patience} and "
        f"log_every {self.log_every} must all be at least 1; fix the "
        "stage's config."
      )


@dataclasses.dataclass
class LoopState:
  """The loop's bookkeeping, saved with every epoch's checkpoint.

  Attributes:
    epoch: epochs completed.
    best_epoch: the epoch with the best `monitor` so far (0: none yet).
    best_metrics: validation metrics of the best epoch.
    bad_epochs: epochs since the best one.
    epoch_seconds: training time of each epoch (validation excluded).
  """

  epoch: int = 0
  best_epoch: int = 0
  best_metrics: dict[str, float] = dataclasses.field(default_factory=dict)
  bad_epochs: int = 0
  epoch_seconds: list[float] = dataclasses.field(default_factory=list)

  def finished(self, options: FitOptions) -> bool:
    return self.epoch >= options.max_epochs or (
      self.bad_epochs >= options.patience
    )


@dataclasses.dataclass(frozen=True)
class FitResult:
  """The outcome of `fit`.

  Attributes:
    state: the train state of the best epoch.
    loop: the bookkeeping at the end (epochs run, best epoch and metrics).
  """

  state: TrainState
  loop: LoopState


def _mean_metrics(history: list[Mapping[str, float]]) -> dict[str, float]:
  return {
    name: float(np.mean([entry[name] for entry in history]))
    for name in history[0]
  }


def _check_finite(
  losses: list[dict[str, float]], first_step: int, epoch: int, stage: str
) -> None:
  for offset, metrics in enumerate(losses):
    if not math.isfinite(metrics["loss"]):
      raise NonFiniteLossError(
        f"{stage}: the loss is {metrics['loss']} at step "
        f"{first_step + offset} (epoch {epoch}), terms {metrics}; lower "
        "the learning rate or check the input data."
      )


def _train_epoch(
  state: TrainState,
  train_step: TrainStep,
  batches: Mapping[str, np.ndarray],
  graph: Any,
  rng: jax.Array,
  epoch: int,
  stage: str,
  options: FitOptions,
) -> tuple[TrainState, dict[str, float]]:
  """Runs one epoch of steps; returns the state and mean step metrics."""
  num_steps = len(next(iter(batches.values())))
  if num_steps == 0:
    raise ValueError(
      f"{stage}: epoch {epoch} has no batches; the stage needs training "
      "data (check the dataset's train split)."
    )
  first_step = int(state.step)
  history: list[dict[str, float]] = []
  pending: list[dict[str, jax.Array]] = []
  bar = tqdm.tqdm(
    total=num_steps,
    desc=f"{stage} epoch {epoch}",
    unit="step",
    leave=False,
    disable=not options.progress_bar,
  )
  with bar:
    for index in range(num_steps):
      batch = {name: values[index] for name, values in batches.items()}
      state, metrics = train_step(state, batch, graph, rng)
      pending.append(metrics)
      if len(pending) == options.log_every or index == num_steps - 1:
        # One device sync per window keeps the host ahead of the device.
        fetched = jax.device_get(pending)
        window = [
          {name: float(value) for name, value in entry.items()}
          for entry in fetched
        ]
        _check_finite(window, first_step + len(history), epoch, stage)
        history.extend(window)
        bar.update(len(window))
        bar.set_postfix(loss=f"{window[-1]['loss']:.4f}")
        pending = []
  return state, _mean_metrics(history)


def describe_metrics(metrics: Mapping[str, float]) -> str:
  """ "name=value ..." with 4 decimals: how every log line shows metrics."""
  return " ".join(f"{name}={value:.4f}" for name, value in metrics.items())


def _improved(
  metrics: Mapping[str, float], loop: LoopState, options: FitOptions
) -> bool:
  """Whether `metrics` beat the best epoch so far (ties do not)."""
  if options.monitor not in metrics:
    raise ValueError(
      f"Validation reports {sorted(metrics)}, not the monitored "
      f"{options.monitor!r}; set the stage's monitor to one of them."
    )
  if loop.best_epoch == 0:
    return True
  return metrics[options.monitor] > loop.best_metrics[options.monitor]


@dataclasses.dataclass(frozen=True)
class _EpochRunner:
  """Runs, validates, checkpoints and reports one epoch of a stage."""

  stage: str
  train_step: TrainStep
  make_batches: Callable[[int], Mapping[str, np.ndarray]]
  evaluate: Callable[[Any], dict[str, float]]
  graph: Any
  rng: jax.Array
  checkpoints: EpochCheckpoints
  writer: MetricWriter
  options: FitOptions

  def __call__(self, epoch: int, state: TrainState, loop: LoopState):
    """Runs `epoch`, updating `loop` in place; returns the new state."""
    batches = self.make_batches(epoch)
    steps, batch_size = next(iter(batches.values())).shape[:2]
    start = time.perf_counter()
    state, train_metrics = _train_epoch(
      state,
      self.train_step,
      batches,
      self.graph,
      self.rng,
      epoch,
      self.stage,
      self.options,
    )
    seconds = time.perf_counter() - start
    # The first epoch's rate includes compiling the step.
    throughput = {
      "steps_per_second": steps / seconds,
      "examples_per_second": steps * batch_size / seconds,
    }
    start = time.perf_counter()
    valid_metrics = self.evaluate(state.params)
    eval_seconds = time.perf_counter() - start
    improved = _improved(valid_metrics, loop, self.options)
    loop.epoch = epoch
    loop.epoch_seconds.append(seconds)
    if improved:
      loop.best_epoch, loop.best_metrics = epoch, valid_metrics
      loop.bad_epochs = 0
    else:
      loop.bad_epochs += 1
    self.checkpoints.save(epoch, state, dataclasses.asdict(loop), improved)
    self.writer.write(
      self.stage,
      epoch,
      {
        "train": train_metrics,
        "valid": valid_metrics,
        "lr": self.options.learning_rates,
        "throughput": throughput,
      },
      seconds=seconds,
      eval_seconds=eval_seconds,
      improved=improved,
    )
    logging.info(
      "%s epoch %d (%.1f s train, %.1f s valid): %s | valid %s%s",
      self.stage,
      epoch,
      seconds,
      eval_seconds,
      describe_metrics(train_metrics),
      describe_metrics(valid_metrics),
      " (best)" if improved else "",
    )
    return state


def fit(
  *,
  stage: str,
  state: TrainState,
  train_step: TrainStep,
  make_batches: Callable[[int], Mapping[str, np.ndarray]],
  evaluate: Callable[[Any], dict[str, float]],
  graph: Any,
  rng: jax.Array,
  checkpoint_dir: str | pathlib.Path,
  writer: MetricWriter,
  options: FitOptions,
  on_epoch_end: Callable[[LoopState], None] | None = None,
) -> FitResult:
  """Trains until early stopping, resuming from `checkpoint_dir` if saved.

  Args:
    stage: stage name for logs, progress and metric records.
    state: the initial state; also the restore target (structure, dtypes,
      placement) of the checkpoints.
    train_step: jitted (state, batch, graph, rng) -> (state, metrics).
    make_batches: 1-based epoch -> {name: [steps, batch, ...]} arrays; it
      must depend on the epoch only, so that resumed epochs match.
    evaluate: params -> validation metrics, including `options.monitor`.
    graph: passed to every train step.
    rng: base rng; each step folds in its step number.
    checkpoint_dir: folder of this stage's checkpoints.
    writer: receives one record per epoch.
    options: epochs, patience, monitor and reporting.
    on_epoch_end: called with the bookkeeping after each epoch is saved.

  Returns:
    The best epoch's state, restored from its checkpoint, and the
    bookkeeping.

  Raises:
    NonFiniteLossError: a step's loss was NaN or infinite.
    ValueError: an epoch had no batches, or `evaluate` did not report
      `options.monitor`.
  """
  checkpoints = EpochCheckpoints(checkpoint_dir, options.async_save)
  run_epoch = _EpochRunner(
    stage,
    train_step,
    make_batches,
    evaluate,
    graph,
    rng,
    checkpoints,
    writer,
    options,
  )
  try:
    loop = LoopState()
    latest = checkpoints.latest_epoch()
    if latest is not None:
      state, saved = checkpoints.restore(latest, state)
      loop = LoopState(**saved)
      logging.info(
        "%s: resuming after epoch %d (best epoch %d, %d without progress)",
        stage,
        loop.epoch,
        loop.best_epoch,
        loop.bad_epochs,
      )
    while not loop.finished(options):
      state = run_epoch(loop.epoch + 1, state, loop)
      if on_epoch_end is not None:
        on_epoch_end(loop)
    checkpoints.wait()
    best_state, _ = checkpoints.restore(loop.best_epoch, state)
  finally:
    checkpoints.close()
  logging.info(
    "%s: best epoch %d of %d, %s",
    stage,
    loop.best_epoch,
    loop.epoch,
    loop.best_metrics,
  )
  return FitResult(state=best_state, loop=loop)
