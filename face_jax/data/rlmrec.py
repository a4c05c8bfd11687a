"""Loader of the RLMRec folder layout (trn/val/tst_mat.pkl, profiles).

A folder holds pickled scipy sparse user x item matrices `trn_mat.pkl`,
`val_mat.pkl` and `tst_mat.pkl`, and optionally `usr_prf.pkl` and
`itm_prf.pkl` (dict: id -> {'profile': str, ...}, or id -> str). The train
shape fixes the user and item counts. Values are binarised (any stored
nonzero is one interaction) and duplicates collapse.

Validation or test pairs that are also train pairs can never be hit, since
evaluation removes train items from the ranking; they are dropped from the
evaluation split with a warning naming the count. The real Amazon-book and
Yelp splits have none. Pairs shared by validation and test are kept in both
(the two are scored separately) and logged.
"""

from __future__ import annotations

import os

import numpy as np
import scipy.sparse
from absl import logging

from face_jax.data import safe_pickle
from face_jax.data.dataset import DataError, Dataset
from face_jax.data.split import unique_pairs

MATRIX_FILES = {
  "train": "trn_mat.pkl",
  "valid": "val_mat.pkl",
  "test": "tst_mat.pkl",
}
PROFILE_FILES = {"user": "usr_prf.pkl", "item": "itm_prf.pkl"}


def matrix_pairs(matrix: scipy.sparse.spmatrix) -> np.ndarray:
  """Returns the [n, 2] int32 sorted unique (row, col) of stored nonzeros."""
  coo = scipy.sparse.coo_matrix(matrix)
  nonzero = coo.data != 0
  return unique_pairs(coo.row[nonzero], coo.col[nonzero])


def load_rlmrec(directory: str | os.PathLike, name: str) -> Dataset:
  """Reads an RLMRec-layout folder into a `Dataset`.

  Args:
    directory: folder with trn_mat.pkl, val_mat.pkl, tst_mat.pkl and
      optionally usr_prf.pkl and itm_prf.pkl.
    name: dataset name for logs and errors.

  Returns:
    The dataset; its texts are None unless both profile pickles exist.

  Raises:
    DataError: a file is missing or unsafe, shapes disagree, ids fall outside
      the train shape, or the profiles do not cover every id exactly once.
  """
  directory = os.path.expanduser(os.fspath(directory))
  expected = ", ".join(MATRIX_FILES.values())
  if not directory:
    raise DataError(
      f"{name}: no dataset folder given; set config.data.dir to a folder "
      f"with {expected}."
    )
  if not os.path.isdir(directory):
    raise DataError(
      f"{name}: dataset folder {directory} does not exist; it should hold "
      f"{expected} (and optionally usr_prf.pkl, itm_prf.pkl)."
    )
  for file_name in MATRIX_FILES.values():
    path = os.path.join(directory, file_name)
    if not os.path.isfile(path):
      raise DataError(
        f"{name}: {path} is missing; an RLMRec folder holds {expected}."
      )

  matrices = {
    split: safe_pickle.load_sparse_matrix(os.path.join(directory, file_name))
    for split, file_name in MATRIX_FILES.items()
  }
  num_users, num_items = matrices["train"].shape
  for split in ("valid", "test"):
    if matrices[split].shape != (num_users, num_items):
      raise DataError(
        f"{name}: {os.path.join(directory, MATRIX_FILES[split])} has shape "
        f"{matrices[split].shape} but the train matrix has "
        f"{(num_users, num_items)}; all splits must share the train shape."
      )
  pairs = {split: matrix_pairs(m) for split, m in matrices.items()}
  for split in ("valid", "test"):
    pairs[split] = _drop_train_pairs(
      name, split, pairs[split], pairs["train"], num_items
    )
  shared = _count_shared(pairs["valid"], pairs["test"], num_items)
  if shared:
    logging.info(
      "%s: %d pairs are in both validation and test; kept in both.",
      name,
      shared,
    )

  texts = _load_texts(directory, name, num_users, num_items)
  logging.info(
    "%s: %d users x %d items; train %d, valid %d, test %d pairs; text %s.",
    name,
    num_users,
    num_items,
    len(pairs["train"]),
    len(pairs["valid"]),
    len(pairs["test"]),
    "yes" if texts else "no",
  )
  user_text, item_text = texts if texts else (None, None)
  return Dataset(
    name=name,
    num_users=int(num_users),
    num_items=int(num_items),
    train=pairs["train"],
    valid=pairs["valid"],
    test=pairs["test"],
    user_text=user_text,
    item_text=item_text,
  )


def _pair_codes(pairs: np.ndarray, num_items: int) -> np.ndarray:
  return pairs[:, 0].astype(np.int64) * num_items + pairs[:, 1]


def _count_shared(a: np.ndarray, b: np.ndarray, num_items: int) -> int:
  return int(
    np.isin(_pair_codes(a, num_items), _pair_codes(b, num_items)).sum()
  )


def _drop_train_pairs(
  name: str, split: str, pairs: np.ndarray, train: np.ndarray, num_items: int
) -> np.ndarray:
  in_train = np.isin(
    _pair_codes(pairs, num_items), _pair_codes(train, num_items)
  )
  if in_train.any():
    logging.warning(
      "%s: dropped %d %s pairs that are also train pairs (train items are "
      "excluded from ranking, so they could never be hit).",
      name,
      int(in_train.sum()),
      split,
    )
  return pairs[~in_train]


def _load_texts(
  directory: str, name: str, num_users: int, num_items: int
) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
  paths = {
    kind: os.path.join(directory, file_name)
    for kind, file_name in PROFILE_FILES.items()
  }
  present = {kind: os.path.isfile(path) for kind, path in paths.items()}
  if not any(present.values()):
    return None
  if not all(present.values()):
    missing = next(path for kind, path in paths.items() if not present[kind])
    raise DataError(
      f"{name}: {missing} is missing while the other profile file exists; "
      "give both usr_prf.pkl and itm_prf.pkl, or neither."
    )
  return (
    profile_texts(paths["user"], num_users, "user"),
    profile_texts(paths["item"], num_items, "item"),
  )


def profile_texts(
  path: str | os.PathLike, count: int, kind: str
) -> tuple[str, ...]:
  """Reads a profile pickle into one string per id 0..count-1.

  Args:
    path: pickle of a dict id -> {'profile': str, ...} or id -> str.
    count: number of ids the matrices define.
    kind: "user" or "item", for messages.

  Returns:
    The profiles ordered by id.

  Raises:
    DataError: the dict has a different size, lacks an id, or holds a value
      that is not a profile string.
  """
  path = os.fspath(path)
  profiles = safe_pickle.load_profile_dict(path)
  if len(profiles) != count:
    raise DataError(
      f"{path}: {len(profiles)} {kind} profiles but the matrices have "
      f"{count} {kind}s; give one profile per {kind} id 0..{count - 1}."
    )
  by_id = {}
  for key, value in profiles.items():
    if isinstance(key, (bool, np.bool_)) or not isinstance(
      key, (int, np.integer)
    ):
      raise DataError(
        f"{path}: key {key!r} is not an integer {kind} id; profile keys are "
        f"the ids 0..{count - 1}."
      )
    if isinstance(value, dict):
      value = value.get("profile")
    if not isinstance(value, str):
      raise DataError(
        f"{path}: the profile of {kind} {key} is a {type(value).__name__}, "
        "expected a string or a dict with a 'profile' string."
      )
    by_id[int(key)] = value
  missing = [i for i in range(count) if i not in by_id]
  if missing:
    shown = ", ".join(str(i) for i in missing[:5])
    raise DataError(
      f"{path}: no profile for {len(missing)} {kind} ids (first: {shown}); "
      f"keys must be exactly 0..{count - 1}."
    )
  return tuple(by_id[i] for i in range(count))
