"""The cold-start split: users and items held out of training entirely.

A seeded share of the items and, drawn separately, a share of the users are
"cold". Every interaction that touches a cold entity leaves the training
data, whichever of train, validation or test it was in, so the backbone,
its graph and the FACE stages never see a cold entity. They train on the
"warm" dataset: the warm users and items renumbered 0..n-1 in their
original order, with only the pairs between them and their texts.

The held-out interactions are the test set of the cold-start evaluation:

- cold items: every (warm user, cold item) pair of the original data;
- cold users: every (cold user, warm item) pair.

Pairs of a cold user with a cold item have nothing warm to be scored
against and are counted but not evaluated.

The split is written to `<workdir>/cold_start_split.json` when a run
starts and read back when it resumes, so every stage of a run, and every
rerun, uses the same cold entities.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import numpy as np

from face_jax.data.dataset import SPLITS, DataError, Dataset

SPLIT_FILE = "cold_start_split.json"

# Seed streams of the two draws, so the cold users do not depend on the
# item share and the other way round.
_ITEM_STREAM = 0
_USER_STREAM = 1


class ColdStartError(ValueError):
  """A cold-start setting or stored split that cannot be used."""


@dataclasses.dataclass(frozen=True)
class ColdStartSplit:
  """Which users and items are cold, by their ids in the full dataset.

  Attributes:
    num_users: users of the full dataset.
    num_items: items of the full dataset.
    cold_users: [cu] int32 sorted ids of the cold users.
    cold_items: [ci] int32 sorted ids of the cold items.
    user_share: the share of users asked for.
    item_share: the share of items asked for.
    seed: seed of the draw.
  """

  num_users: int
  num_items: int
  cold_users: np.ndarray
  cold_items: np.ndarray
  user_share: float
  item_share: float
  seed: int

  @property
  def warm_users(self) -> np.ndarray:
    """[num_users - cu] int32 sorted ids of the warm users."""
    return np.setdiff1d(np.arange(self.num_users), self.cold_users).astype(
      np.int32
    )

  @property
  def warm_items(self) -> np.ndarray:
    """[num_items - ci] int32 sorted ids of the warm items."""
    return np.setdiff1d(np.arange(self.num_items), self.cold_items).astype(
      np.int32
    )

  def to_json(self) -> dict:
    return {
      "num_users": self.num_users,
      "num_items": self.num_items,
      "user_share": self.user_share,
      "item_share": self.item_share,
      "seed": self.seed,
      "cold_users": self.cold_users.tolist(),
      "cold_items": self.cold_items.tolist(),
    }

  @classmethod
  def from_json(cls, payload: dict) -> ColdStartSplit:
    return cls(
      num_users=int(payload["num_users"]),
      num_items=int(payload["num_items"]),
      cold_users=np.asarray(payload["cold_users"], np.int32),
      cold_items=np.asarray(payload["cold_items"], np.int32),
      user_share=float(payload["user_share"]),
      item_share=float(payload["item_share"]),
      seed=int(payload["seed"]),
    )


def _draw(count: int, share: float, seed: int, stream: int) -> np.ndarray:
  """round(share * count) sorted distinct ids of 0..count-1, seeded."""
  size = round(share * count)
  rng = np.random.default_rng([seed, stream])
  return np.sort(rng.choice(count, size, replace=False)).astype(np.int32)


def make_split(
  dataset: Dataset, item_share: float, user_share: float, seed: int
) -> ColdStartSplit:
  """Draws round(share * count) cold items and, apart, cold users.

  Args:
    dataset: the full dataset.
    item_share: share of the items to hold out, in [0, 1).
    user_share: share of the users to hold out, in [0, 1).
    seed: seed of the draw.

  Returns:
    The split.

  Raises:
    ColdStartError: a share is outside [0, 1) or leaves no warm entity.
  """
  for name, share, count in (
    ("item_share", item_share, dataset.num_items),
    ("user_share", user_share, dataset.num_users),
  ):
    if not 0.0 <= share < 1.0 or round(share * count) >= count:
      raise ColdStartError(
        f"config.cold_start.{name}={share} must lie in [0, 1) and leave "
        f"some of the {count} entities warm; use a share such as 0.2."
      )
  return ColdStartSplit(
    num_users=dataset.num_users,
    num_items=dataset.num_items,
    cold_users=_draw(dataset.num_users, user_share, seed, _USER_STREAM),
    cold_items=_draw(dataset.num_items, item_share, seed, _ITEM_STREAM),
    user_share=float(user_share),
    item_share=float(item_share),
    seed=int(seed),
  )


def save_split(split: ColdStartSplit, path: pathlib.Path) -> None:
  """Writes the split as JSON, atomically."""
  temporary = path.with_name(f".{path.name}.tmp")
  temporary.write_text(json.dumps(split.to_json()))
  temporary.replace(path)


def load_split(path: pathlib.Path) -> ColdStartSplit | None:
  """The split stored at path, or None when there is none."""
  if not path.exists():
    return None
  return ColdStartSplit.from_json(json.loads(path.read_text()))


def split_for_run(
  dataset: Dataset,
  item_share: float,
  user_share: float,
  seed: int,
  workdir: pathlib.Path,
) -> ColdStartSplit:
  """The run's split: read from the workdir, else drawn and stored there.

  Raises:
    ColdStartError: the stored split was drawn with other settings or for
      another dataset.
  """
  path = workdir / SPLIT_FILE
  stored = load_split(path)
  if stored is None:
    split = make_split(dataset, item_share, user_share, seed)
    # Every process draws the same seeded split; one of them stores it.
    if jax.process_index() == 0:
      save_split(split, path)
    return split
  asked = (dataset.num_users, dataset.num_items, user_share, item_share, seed)
  held = (
    stored.num_users,
    stored.num_items,
    stored.user_share,
    stored.item_share,
    stored.seed,
  )
  if asked != held:
    raise ColdStartError(
      f"{path} holds a split of (users, items, user_share, item_share, "
      f"seed) = {held}, but this run asks for {asked}; rerun with the "
      "stored settings or use a fresh workdir."
    )
  return stored


def _positions(ids: np.ndarray, chosen: np.ndarray) -> np.ndarray:
  """Index of each id in the sorted array `chosen` (ids must be in it)."""
  return np.searchsorted(chosen, ids).astype(np.int32)


def _is_in(ids: np.ndarray, chosen: np.ndarray) -> np.ndarray:
  return np.isin(ids, chosen)


def warm_dataset(dataset: Dataset, split: ColdStartSplit) -> Dataset:
  """The dataset without the cold entities, renumbered.

  Warm user u becomes `searchsorted(split.warm_users, u)`, likewise for
  items; pairs touching a cold user or item are dropped from every split.

  Raises:
    DataError: the split was drawn for a dataset of another size.
  """
  if (split.num_users, split.num_items) != (
    dataset.num_users,
    dataset.num_items,
  ):
    raise DataError(
      f"{dataset.name}: the cold-start split is for {split.num_users} users "
      f"x {split.num_items} items, the dataset has {dataset.num_users} x "
      f"{dataset.num_items}; use a fresh workdir."
    )
  users, items = split.warm_users, split.warm_items

  def keep(pairs: np.ndarray) -> np.ndarray:
    mask = _is_in(pairs[:, 0], users) & _is_in(pairs[:, 1], items)
    kept = pairs[mask]
    # Renumbering keeps the order, so pairs stay sorted by user, item.
    return np.stack(
      [_positions(kept[:, 0], users), _positions(kept[:, 1], items)], axis=1
    ).reshape(-1, 2)

  def texts(text, kept):
    return None if text is None else tuple(text[i] for i in kept)

  return Dataset(
    dataset.name,
    len(users),
    len(items),
    *(keep(getattr(dataset, name)) for name in SPLITS),
    texts(dataset.user_text, users),
    texts(dataset.item_text, items),
  )


def _all_pairs(dataset: Dataset) -> np.ndarray:
  pairs = np.concatenate([getattr(dataset, name) for name in SPLITS])
  return np.unique(pairs.reshape(-1, 2), axis=0).astype(np.int32)


def cold_item_pairs(dataset: Dataset, split: ColdStartSplit) -> np.ndarray:
  """Test pairs of the cold items: every (warm user, cold item) pair.

  Returns:
    [n, 2] int32 (warm user index, cold item index) pairs, numbered as
    `warm_dataset` numbers users and as positions in `split.cold_items`,
    sorted by user, then item.
  """
  pairs = _all_pairs(dataset)
  warm = split.warm_users
  mask = _is_in(pairs[:, 0], warm) & _is_in(pairs[:, 1], split.cold_items)
  kept = pairs[mask]
  return np.stack(
    [_positions(kept[:, 0], warm), _positions(kept[:, 1], split.cold_items)],
    axis=1,
  ).reshape(-1, 2)


def cold_user_pairs(dataset: Dataset, split: ColdStartSplit) -> np.ndarray:
  """Test pairs of the cold users: every (cold user, warm item) pair.

  Returns:
    [n, 2] int32 (cold user index, warm item index) pairs: positions in
    `split.cold_users` and warm items numbered as `warm_dataset` does,
    sorted by user, then item.
  """
  pairs = _all_pairs(dataset)
  warm = split.warm_items
  mask = _is_in(pairs[:, 0], split.cold_users) & _is_in(pairs[:, 1], warm)
  kept = pairs[mask]
  return np.stack(
    [_positions(kept[:, 0], split.cold_users), _positions(kept[:, 1], warm)],
    axis=1,
  ).reshape(-1, 2)


def cold_cold_count(dataset: Dataset, split: ColdStartSplit) -> int:
  """Interactions between a cold user and a cold item (not evaluated)."""
  pairs = _all_pairs(dataset)
  return int(
    np.sum(
      _is_in(pairs[:, 0], split.cold_users)
      & _is_in(pairs[:, 1], split.cold_items)
    )
  )
