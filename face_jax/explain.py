"""Command line: `python -m face_jax.explain --workdir=... --user=ID`.

Prints a user's descriptor words, profile text and top-K recommended items
(with their words, the words shared with the user and whether each is a
held-out test item), or with `--item=ID` an item's words and profile, for
the workdir of a finished `python -m face_jax.main` run. `--json` prints
the same as one JSON object. Ids are the 0-based ids of
descriptors/descriptors.jsonl. Flags only; the work is
`face_jax.explaining`.
"""

import json
import sys

from absl import app, flags

from face_jax import data, explaining, runs
from face_jax.training import writer

_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Workdir of a finished run of python -m face_jax.main."
)
_USER = flags.DEFINE_integer("user", None, "User id to explain.")
_ITEM = flags.DEFINE_integer("item", None, "Item id to explain.")
_TOP_K = flags.DEFINE_integer(
  "top_k", 10, "Recommended items to show for a user.", lower_bound=1
)
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object.")
flags.mark_flag_as_required("workdir")
flags.mark_flags_as_mutual_exclusive(["user", "item"], required=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  writer.quiet_checkpoint_logs()
  try:
    run = runs.open_run(_WORKDIR.value)
    # Checked before the dataset and the model are loaded.
    if _USER.value is not None:
      run.record("user", _USER.value)
    else:
      run.record("item", _ITEM.value)
    explainer = explaining.Explainer(run)
    if _USER.value is not None:
      explanation = explainer.user(_USER.value, _TOP_K.value)
    else:
      explanation = explainer.item(_ITEM.value)
  except (runs.RunError, data.DataError) as error:
    sys.exit(f"explain: {error}")
  if _JSON.value:
    print(json.dumps(explanation, ensure_ascii=False))
  else:
    print(explaining.format_explanation(explanation))


if __name__ == "__main__":
  app.run(main)
