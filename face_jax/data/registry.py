"""`load_dataset`: the one entry from a `data` config to a `Dataset`."""

from __future__ import annotations

from collections.abc import Callable

import ml_collections

from face_jax.data import movielens, rlmrec
from face_jax.data.dataset import Dataset


def _load_movielens(config: ml_collections.ConfigDict) -> Dataset:
  dataset, _ = movielens.load_movielens(config)
  return dataset


def _load_rlmrec(config: ml_collections.ConfigDict) -> Dataset:
  return rlmrec.load_rlmrec(config.dir, config.name)


# Every supported `config.data.source`, by name.
SOURCES: dict[str, Callable[[ml_collections.ConfigDict], Dataset]] = {
  "movielens": _load_movielens,
  "rlmrec": _load_rlmrec,
}


def load_dataset(config: ml_collections.ConfigDict) -> Dataset:
  """Loads the dataset a `data` config section describes.

  Args:
    config: the `data` section: name, source, dir, cache_dir, item_noun,
      min_rating, split_seed (see configs/base.py).

  Returns:
    The split dataset, with texts when the source has or builds them.

  Raises:
    ValueError: `config.source` is not a registered source.
    DataError: the source's files are missing or malformed.
  """
  loader = SOURCES.get(config.source)
  if loader is None:
    raise ValueError(
      f"Unknown data source {config.source!r}; set config.data.source to "
      f"one of: {', '.join(sorted(SOURCES))}."
    )
  return loader(config)
