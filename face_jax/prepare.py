r"""Makes an RLMRec-layout dataset folder from your own interactions.

Example:

  python -m face_jax.prepare --interactions=plays.csv \
    --item_meta=games.jsonl --meta_id_key=id --item_noun=game \
    --output=~/data/my-games

Then train on it with `--config.data.source=rlmrec
--config.data.dir=~/data/my-games`. See `face_jax.data.prepare_lib` for what
the folder holds and how the split and the texts are made.
"""

from __future__ import annotations

import sys

from absl import app, flags

from face_jax.data import prepare_lib
from face_jax.data.dataset import DataError

_INTERACTIONS = flags.DEFINE_string(
  "interactions",
  None,
  "Interactions: CSV/TSV with a header, or JSON Lines; may end in .gz.",
)
_OUTPUT = flags.DEFINE_string(
  "output", None, "Folder to create (RLMRec layout)."
)
_ITEM_META = flags.DEFINE_string(
  "item_meta", "", "Optional item metadata, JSON Lines with an id key."
)
_FORMAT = flags.DEFINE_enum(
  "format",
  "auto",
  list(prepare_lib.FORMATS),
  "Interactions format; 'auto' goes by the file extension.",
)
_USER_KEY = flags.DEFINE_string("user_key", "user", "Column/key of user ids.")
_ITEM_KEY = flags.DEFINE_string("item_key", "item", "Column/key of item ids.")
_TIME_KEY = flags.DEFINE_string(
  "time_key",
  "timestamp",
  "Column/key of timestamps (numbers or ISO dates), used if present.",
)
_META_ID_KEY = flags.DEFINE_string(
  "meta_id_key", "", "Id key in the metadata; default: --item_key."
)
_TEXT_FIELDS = flags.DEFINE_list(
  "text_fields",
  [],
  "Metadata fields for item texts, in order; default: every string or "
  "list-of-strings field except the id, links and bare numbers.",
)
_USER_FIELDS = flags.DEFINE_list(
  "user_fields",
  [],
  "Fields whose most common values (over a user's train items) go into "
  "user texts; default: list fields plus developer, publisher, brand...",
)
_ITEM_NOUN = flags.DEFINE_string(
  "item_noun", "item", "What an item is, in the texts (game, book...)."
)
_SPLIT = flags.DEFINE_enum(
  "split",
  "random",
  list(prepare_lib.SPLITS),
  "Per-user 3:1:1 split: seeded random, or by time (needs --time_key).",
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the split.")
_REQUIRE_META = flags.DEFINE_bool(
  "require_meta",
  False,
  "Fail when an interacted item has no metadata (default: warn and use a "
  "generic text).",
)
_OVERWRITE = flags.DEFINE_bool(
  "overwrite", False, "Replace an existing non-empty output folder."
)
_NAME = flags.DEFINE_string(
  "name", "", "Dataset name for meta.json; default: the output folder name."
)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  options = prepare_lib.PrepareOptions(
    interactions=_INTERACTIONS.value,
    output=_OUTPUT.value,
    item_meta=_ITEM_META.value,
    input_format=_FORMAT.value,
    user_key=_USER_KEY.value,
    item_key=_ITEM_KEY.value,
    time_key=_TIME_KEY.value,
    meta_id_key=_META_ID_KEY.value,
    text_fields=tuple(_TEXT_FIELDS.value),
    user_fields=tuple(_USER_FIELDS.value),
    item_noun=_ITEM_NOUN.value,
    split=_SPLIT.value,
    seed=_SEED.value,
    require_meta=_REQUIRE_META.value,
    overwrite=_OVERWRITE.value,
    name=_NAME.value,
    command=("python", "-m", "face_jax.prepare", *sys.argv[1:]),
  )
  try:
    result = prepare_lib.prepare(options)
  except DataError as error:
    # One line, no traceback: the message names the input and the fix.
    sys.exit(f"prepare: {error}")
  print(
    f"Wrote {result.output}: {result.num_users} users x {result.num_items} "
    f"items, split {result.counts}."
  )


if __name__ == "__main__":
  flags.mark_flags_as_required(["interactions", "output"])
  app.run(main)
