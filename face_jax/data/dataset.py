"""The one in-memory form every dataset source reaches."""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.sparse

SPLITS = ("train", "valid", "test")


class DataError(ValueError):
  """Input data is malformed; the message names the file and the fix."""


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Implicit feedback split three ways, with optional text per entity.

  Attributes:
    name: short dataset name used in logs, results and prompts
      (for example "movielens", "amazon", "steam-vt").
    num_users: number of users; ids are 0..num_users-1.
    num_items: number of items; ids are 0..num_items-1.
    train: [n_train, 2] int32 (user, item) pairs, unique, sorted by user
      then item.
    valid: [n_valid, 2] int32 pairs, same form.
    test: [n_test, 2] int32 pairs, same form.
    user_text: one profile string per user, or None when there is no text.
    item_text: one profile string per item, or None when there is no text.
  """

  name: str
  num_users: int
  num_items: int
  train: np.ndarray
  valid: np.ndarray
  test: np.ndarray
  user_text: tuple[str, ...] | None = None
  item_text: tuple[str, ...] | None = None

  def __post_init__(self):
    for split in SPLITS:
      pairs = getattr(self, split)
      if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise DataError(
          f"{self.name}: {split} pairs have shape {pairs.shape}, expected "
          "[n, 2] (user, item)."
        )
      if pairs.size and (
        pairs[:, 0].min() < 0
        or pairs[:, 0].max() >= self.num_users
        or pairs[:, 1].min() < 0
        or pairs[:, 1].max() >= self.num_items
      ):
        raise DataError(
          f"{self.name}: {split} has ids outside {self.num_users} users x "
          f"{self.num_items} items."
        )
    for kind, text, count in (
      ("user", self.user_text, self.num_users),
      ("item", self.item_text, self.num_items),
    ):
      if text is not None and len(text) != count:
        raise DataError(
          f"{self.name}: {len(text)} {kind} profiles for {count} {kind}s; "
          "give exactly one profile per id."
        )

  @property
  def has_text(self) -> bool:
    return self.user_text is not None and self.item_text is not None

  def matrix(self, split: str) -> scipy.sparse.csr_matrix:
    """Returns the split as a binary [num_users, num_items] CSR matrix."""
    pairs = getattr(self, split)
    values = np.ones(len(pairs), dtype=np.float32)
    return scipy.sparse.csr_matrix(
      (values, (pairs[:, 0], pairs[:, 1])),
      shape=(self.num_users, self.num_items),
    )
