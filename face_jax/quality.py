"""Command line: `python -m face_jax.quality --workdir=...`.

Measures the descriptors of a workdir whose FACE stages have finished:
codebook usage (distinct tokens, perplexity, most used words), stability
(share of words unchanged from map to align) and profile retrieval top-1
/ top-10 beside shuffled descriptors (see `face_jax.descriptors`). Prints
a summary, or with `--json` one JSON object. Flags only; the work is
`face_jax.descriptors.run_quality`.
"""

import json
import sys

from absl import app, flags

from face_jax import data, descriptors, runs
from face_jax.training import face_stages, writer

_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Workdir of a run of python -m face_jax.main."
)
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object.")
flags.mark_flag_as_required("workdir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  writer.quiet_checkpoint_logs()
  try:
    config = runs.read_config(_WORKDIR.value)
    workdir = runs.require_face_stage(_WORKDIR.value)
    dataset = data.load_dataset(config.data)
    quality = descriptors.run_quality(config, dataset, workdir)
  except (runs.RunError, data.DataError, face_stages.FaceStageError) as error:
    sys.exit(f"quality: {error}")
  if _JSON.value:
    print(json.dumps(quality, ensure_ascii=False))
  else:
    print(descriptors.format_quality(quality))


if __name__ == "__main__":
  app.run(main)
