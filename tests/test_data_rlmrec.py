"""RLMRec folders load into `Dataset`; bad folders fail in one line."""

import logging
import pickle

import ml_collections
import numpy as np
import pytest
import scipy.sparse
from _shared_data import require

from face_jax.data import SOURCES, DataError, load_dataset
from face_jax.data.rlmrec import load_rlmrec


def _matrix(entries, shape=(3, 4), values=None):
  rows, cols = zip(*entries, strict=True) if entries else ((), ())
  data = np.ones(len(rows)) if values is None else np.asarray(values, float)
  return scipy.sparse.coo_matrix(
    (data, (np.array(rows, int), np.array(cols, int))), shape=shape
  )


def _write(folder, **objects):
  folder.mkdir(exist_ok=True)
  for name, value in objects.items():
    with open(folder / f"{name}.pkl", "wb") as file:
      pickle.dump(value, file, protocol=4)
  return folder


def _folder(tmp_path, **overrides):
  objects = {
    "trn_mat": _matrix([(0, 0), (0, 1), (1, 2), (2, 3)]),
    "val_mat": _matrix([(0, 2), (1, 1)]),
    "tst_mat": _matrix([(2, 0)]),
  }
  objects.update(overrides)
  return _write(tmp_path / "ds", **objects)


def _config(**fields):
  config = ml_collections.ConfigDict(
    {
      "name": "toy",
      "source": "rlmrec",
      "dir": "",
      "cache_dir": "",
      "item_noun": "item",
      "min_rating": 4.0,
      "split_seed": 0,
    }
  )
  config.update(fields)
  return config


def _one_line_error(match, function, *args):
  with pytest.raises(DataError, match=match) as caught:
    function(*args)
  assert "\n" not in str(caught.value)
  return str(caught.value)


def test_folder_loads_as_sorted_binary_pairs(tmp_path):
  folder = _folder(
    tmp_path,
    # Duplicates, counts, a negative value and an explicit zero.
    trn_mat=_matrix(
      [(1, 2), (0, 1), (0, 0), (2, 3), (0, 1), (2, 1)],
      values=[5.0, 2.0, 1.0, -1.0, 3.0, 0.0],
    ),
  )
  data = load_dataset(_config(dir=str(folder)))
  assert (data.name, data.num_users, data.num_items) == ("toy", 3, 4)
  np.testing.assert_array_equal(data.train, [[0, 0], [0, 1], [1, 2], [2, 3]])
  np.testing.assert_array_equal(data.valid, [[0, 2], [1, 1]])
  np.testing.assert_array_equal(data.test, [[2, 0]])
  assert data.train.dtype == np.int32
  assert data.user_text is None and data.item_text is None


def test_profiles_in_both_forms_are_read_by_id(tmp_path):
  folder = _folder(tmp_path)
  users = {2: {"profile": "c", "reasoning": "x"}, 0: {"profile": "a"}}
  users[1] = {"profile": "b"}
  items = {np.int64(i): f"item {i}" for i in (3, 1, 0, 2)}
  _write(folder, usr_prf=users, itm_prf=items)
  data = load_rlmrec(folder, "toy")
  assert data.user_text == ("a", "b", "c")
  assert data.item_text == ("item 0", "item 1", "item 2", "item 3")


def test_evaluation_pairs_seen_in_train_are_dropped_with_a_warning(
  tmp_path, caplog
):
  folder = _folder(tmp_path, val_mat=_matrix([(0, 0), (0, 2), (2, 3)]))
  with caplog.at_level(logging.WARNING):
    data = load_rlmrec(folder, "toy")
  np.testing.assert_array_equal(data.valid, [[0, 2]])
  assert "dropped 2 valid pairs that are also train pairs" in caplog.text


def test_missing_folder_and_files_are_named(tmp_path):
  message = _one_line_error(
    "does not exist", load_rlmrec, tmp_path / "nope", "toy"
  )
  assert "trn_mat.pkl, val_mat.pkl, tst_mat.pkl" in message
  folder = _folder(tmp_path)
  (folder / "tst_mat.pkl").unlink()
  _one_line_error(r"tst_mat.pkl is missing", load_rlmrec, folder, "toy")
  _one_line_error("no dataset folder given", load_rlmrec, "", "toy")


def test_split_shape_must_match_train(tmp_path):
  folder = _folder(tmp_path, val_mat=_matrix([(0, 1)], shape=(3, 5)))
  _one_line_error(
    r"val_mat.pkl has shape \(3, 5\) but the train matrix has \(3, 4\)",
    load_rlmrec,
    folder,
    "toy",
  )


def test_ids_outside_the_shape_are_refused(tmp_path):
  bad = _matrix([(0, 1), (1, 1)])
  bad.coords = (bad.row, np.array([1, 9], np.int32))
  folder = _folder(tmp_path, tst_mat=bad)
  _one_line_error(
    r"tst_mat.pkl: .*ids outside the shape", load_rlmrec, folder, "toy"
  )


def test_profile_count_and_ids_must_match(tmp_path):
  folder = _folder(tmp_path)
  items = {i: f"item {i}" for i in range(4)}
  _write(folder, usr_prf={0: "a", 1: "b"}, itm_prf=items)
  _one_line_error(
    "2 user profiles but the matrices have 3 users", load_rlmrec, folder, "t"
  )
  _write(folder, usr_prf={1: "a", 2: "b", 3: "c"})
  _one_line_error(
    r"no profile for 1 user ids \(first: 0\)", load_rlmrec, folder, "t"
  )
  _write(folder, usr_prf={0: "a", 1: "b", 2: {"text": "c"}})
  _one_line_error("profile of user 2 is a NoneType", load_rlmrec, folder, "t")
  (folder / "itm_prf.pkl").unlink()
  _one_line_error("itm_prf.pkl is missing", load_rlmrec, folder, "t")


def test_unknown_source_lists_the_registered_ones():
  assert set(SOURCES) == {"movielens", "rlmrec"}
  with pytest.raises(ValueError, match="one of: movielens, rlmrec"):
    load_dataset(_config(source="parquet"))


@pytest.mark.parametrize(
  ("name", "expected"),
  [
    ("amazon", (11_000, 9_332, 120_464, 40_290, 40_106)),
    ("yelp", (11_091, 11_010, 166_620, 55_479, 55_436)),
  ],
)
def test_real_rlmrec_folders_load(name, expected):
  data = load_dataset(_config(name=name, dir=str(require(name))))
  counts = (
    data.num_users,
    data.num_items,
    len(data.train),
    len(data.valid),
    len(data.test),
  )
  assert counts == expected
  assert not data.has_text
