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
from face_jax.training.step import (
  CompiledStep,
  StepLayout,
  TrainState,
  compile_train_step,
  make_train_step,
  sharded_train_state,
  state_logical_axes,
  step_layout,
)
from face_jax.training.writer import MetricWriter

__all__ = [
  "CompiledStep",
  "EpochCheckpoints",
  "FitOptions",
  "FitResult",
  "LoopState",
  "MetricWriter",
  "NegativeSampler",
  "NonFiniteLossError",
  "ParamGroup",
  "StepLayout",
  "TrainState",
  "adam_coupled_l2",
  "compile_train_step",
  "epoch_batches",
  "fit",
  "grouped_adam",
  "make_train_step",
  "sharded_train_state",
  "state_logical_axes",
  "step_layout",
]
