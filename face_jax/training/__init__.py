"""Training: negatives, optimisers, the train step, the epoch loop, stages."""

from face_jax.training.checkpoints import EpochCheckpoints
from face_jax.training.loop import (
  FitOptions,
  FitResult,
  LoopState,
  NonFiniteLossError,
  fit,
)
from face_jax.training.negatives import NegativeSampler, epoch_batches
from face_jax.training.optimizers import (
  ParamGroup,
  adam_coupled_l2,
  grouped_adam,
)
from face_jax.training.step import TrainState, make_train_step
from face_jax.training.writer import MetricWriter

__all__ = [
  "EpochCheckpoints",
  "FitOptions",
  "FitResult",
  "LoopState",
  "MetricWriter",
  "NegativeSampler",
  "NonFiniteLossError",
  "ParamGroup",
  "TrainState",
  "adam_coupled_l2",
  "epoch_batches",
  "fit",
  "grouped_adam",
  "make_train_step",
]
