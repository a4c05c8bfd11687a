r"""Builds the steam-vt dataset: RLMRec Steam val+test, re-split 3:1:1.

The RLMRec Steam train split is lost; its validation and test splits
(209,732 interactions of 23,310 users x 5,237 games) and the game metadata
survive. This script exports those interactions to a CSV (user = RLMRec uid,
item = RLMRec iid, which is also the `iid` of steam_item_meta.jsonl) and runs
`face_jax.prepare` on it, so the result is a real dataset with item texts
from the metadata and user texts from each user's train games. Its numbers
are not comparable to published Steam results.

  python benchmarks/make_steam_vt.py --output=~/.cache/face_jax/steam-vt

Then: --config.data.source=rlmrec --config.data.dir=<output>.
"""

from __future__ import annotations

import csv
import os
import pathlib
import tempfile

import numpy as np
from absl import app, flags, logging

from face_jax.data import prepare_lib, safe_pickle
from face_jax.data.rlmrec import matrix_pairs

_STEAM_DIR = flags.DEFINE_string(
  "steam_dir",
  "",
  "Folder with val_mat.pkl, tst_mat.pkl and steam_item_meta.jsonl; default: "
  "shared/data/steam in the repository or the nearest folder above it.",
)
_OUTPUT = flags.DEFINE_string(
  "output", "~/.cache/face_jax/steam-vt", "Dataset folder to create."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the 3:1:1 split.")
_MAX_USERS = flags.DEFINE_integer(
  "max_users", 0, "Keep only users with uid below this (0: all), for tests."
)
_OVERWRITE = flags.DEFINE_bool(
  "overwrite", False, "Replace an existing output folder."
)

# The metadata fields that describe a game; the rest are prices, ids, links.
TEXT_FIELDS = (
  "title",
  "genres",
  "tags",
  "specs",
  "developer",
  "publisher",
  "release_date",
  "sentiment",
)


def default_steam_dir() -> str:
  """shared/data/steam inside or above the repository holding this file."""
  repo = pathlib.Path(__file__).resolve().parents[1]
  for folder in (repo, *repo.parents):
    candidate = folder / "shared" / "data" / "steam"
    if candidate.is_dir():
      return str(candidate)
  raise FileNotFoundError(
    f"No shared/data/steam in or above {repo}; pass --steam_dir."
  )


def steam_pairs(steam_dir: str, max_users: int = 0) -> np.ndarray:
  """The union of the Steam val and test pairs, [n, 2] int32 (uid, iid)."""
  pairs = np.concatenate(
    [
      matrix_pairs(
        safe_pickle.load_sparse_matrix(os.path.join(steam_dir, name))
      )
      for name in ("val_mat.pkl", "tst_mat.pkl")
    ]
  )
  pairs = np.unique(pairs, axis=0)
  if max_users:
    pairs = pairs[pairs[:, 0] < max_users]
  return pairs


def export_csv(pairs: np.ndarray, path: str) -> None:
  with open(path, "w", encoding="utf-8", newline="") as file:
    writer = csv.writer(file)
    writer.writerow(["user", "item"])
    writer.writerows(pairs.tolist())


def make_steam_vt(
  steam_dir: str,
  output: str,
  seed: int = 0,
  max_users: int = 0,
  overwrite: bool = False,
) -> prepare_lib.Prepared:
  """Exports the Steam val+test interactions and prepares a dataset."""
  pairs = steam_pairs(steam_dir, max_users)
  logging.info(
    "steam-vt: %d interactions of %d users x %d items",
    len(pairs),
    len(np.unique(pairs[:, 0])),
    len(np.unique(pairs[:, 1])),
  )
  with tempfile.TemporaryDirectory() as scratch:
    interactions = os.path.join(scratch, "steam_vt_interactions.csv")
    export_csv(pairs, interactions)
    options = prepare_lib.PrepareOptions(
      interactions=interactions,
      output=output,
      item_meta=os.path.join(steam_dir, "steam_item_meta.jsonl"),
      meta_id_key="iid",
      text_fields=TEXT_FIELDS,
      item_noun="game",
      seed=seed,
      require_meta=True,
      overwrite=overwrite,
      name="steam-vt",
      command=(
        "python",
        "benchmarks/make_steam_vt.py",
        f"--steam_dir={steam_dir}",
        f"--output={output}",
        f"--seed={seed}",
        f"--max_users={max_users}",
      ),
    )
    return prepare_lib.prepare(options)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  result = make_steam_vt(
    _STEAM_DIR.value or default_steam_dir(),
    _OUTPUT.value,
    _SEED.value,
    _MAX_USERS.value,
    _OVERWRITE.value,
  )
  print(
    f"steam-vt: {result.num_users} users x {result.num_items} items, "
    f"split {result.counts}, {result.train_only_users} train-only users, "
    f"written to {result.output}"
  )


if __name__ == "__main__":
  app.run(main)
