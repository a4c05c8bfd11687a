"""Command line: `python -m face_jax.main --config=configs/amazon.py`.

With no flags it runs the whole job (pretrain, map, align, final,
descriptors) on MovieLens-100K with all-MiniLM-L6-v2 in
workdirs/movielens. Flags only; the work is
`face_jax.train.train_and_evaluate`. Any config field
can be overridden, for example `--config.data.dir=/data/amazon` or
`--config.model.backbone=simgcl` (which also switches the backbone's own
defaults, see configs/backbone_defaults.py).
"""

import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

import configs
from face_jax import cold_start, data, parallel, train
from face_jax.data import cold_start as cold_start_split
from face_jax.llm import safetensors_io
from face_jax.llm.model import LLMConfigError
from face_jax.llm.resolve import ModelNotFoundError
from face_jax.llm.specs import UnsupportedModelError
from face_jax.llm.vocab import VocabularyError
from face_jax.models.alignment import AlignmentError
from face_jax.models.face import FaceConfigError
from face_jax.models.quantizer import QuantizerError
from face_jax.training import (
  NonFiniteLossError,
  checkpoints,
  face_stages,
  writer,
)

# The default config ships inside the installed `configs` package, so the
# default works from any working directory.
_DEFAULT_CONFIG = pathlib.Path(configs.__file__).parent / "movielens.py"

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  str(_DEFAULT_CONFIG),
  "Experiment config file (configs/<dataset>.py).",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
  "workdir",
  None,
  "Folder for the config, checkpoints, logs and metrics; rerunning with the "
  "same folder resumes. Default: workdirs/<data.name>.",
)

# Errors about the user's input (config, data, model, workdir), each with a
# one-line message, and training that diverged.
INPUT_ERRORS = (
  train.ConfigError,
  data.DataError,
  cold_start_split.ColdStartError,
  checkpoints.CheckpointError,
  safetensors_io.CheckpointError,
  face_stages.FaceStageError,
  cold_start.ColdStartStageError,
  parallel.ShardingError,
  NonFiniteLossError,
  ModelNotFoundError,
  UnsupportedModelError,
  LLMConfigError,
  VocabularyError,
  FaceConfigError,
  QuantizerError,
  AlignmentError,
)

_STOP_AFTER = flags.DEFINE_enum(
  "stop_after",
  None,
  [*train.STAGE_NAMES, train.COLD_START],
  "Run the stages up to and including this one; a later run with the same "
  "workdir continues from there. Default: all stages.",
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  # Joins the other hosts' processes before anything touches a device.
  parallel.maybe_initialize(config.mesh)
  parallel.quiet_other_processes()
  writer.quiet_checkpoint_logs()
  workdir = _WORKDIR.value or str(pathlib.Path("workdirs", config.data.name))
  try:
    results = train.train_and_evaluate(
      config, workdir, stop_after=_STOP_AFTER.value
    )
  except INPUT_ERRORS as error:
    # Our own errors name the bad value and the fix in one line; a
    # traceback would only bury it. Anything else keeps its traceback.
    sys.exit(f"face_jax: {type(error).__name__}: {error}")
  logging.info("Results: %s", results)


if __name__ == "__main__":
  app.run(main)
