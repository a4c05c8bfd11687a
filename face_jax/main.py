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

from absl import app, flags, logging
from ml_collections import config_flags

import configs
from face_jax import parallel, train
from face_jax.training import writer

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
  results = train.train_and_evaluate(
    config, workdir, stop_after=_STOP_AFTER.value
  )
  logging.info("Results: %s", results)


if __name__ == "__main__":
  app.run(main)
