"""Safe unpickling admits sparse matrices and profile dicts, nothing else."""

import builtins
import os
import pickle

import numpy as np
import pytest
import scipy.sparse
from _shared_data import require

from face_jax.data import DataError
from face_jax.data.safe_pickle import load_profile_dict, load_sparse_matrix


class _RunsCommand:
  """Unpickling this calls os.system, as a hostile file would."""

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return (os.system, (self.command,))


class _CallsEval:
  def __init__(self, code):
    self.code = code

  def __reduce__(self):
    return (builtins.eval, (self.code,))


def _dump(path, value, protocol=4):
  with open(path, "wb") as file:
    pickle.dump(value, file, protocol=protocol)
  return path


def _toy_matrix():
  return scipy.sparse.coo_matrix(
    (np.ones(3), (np.array([0, 1, 2]), np.array([2, 0, 1]))), shape=(3, 4)
  )


@pytest.mark.parametrize("loader", [load_sparse_matrix, load_profile_dict])
def test_os_system_pickle_is_refused_and_not_run(tmp_path, loader):
  marker = tmp_path / "pwned"
  path = _dump(tmp_path / "evil.pkl", _RunsCommand(f"touch {marker}"))
  with pytest.raises(DataError, match=r"refused global (posix|os)\.system"):
    loader(path)
  assert not marker.exists()


def test_eval_pickle_is_refused_and_not_run(tmp_path):
  marker = tmp_path / "evaluated"
  code = f"open({str(marker)!r}, 'w').close()"
  path = _dump(tmp_path / "evil.pkl", _CallsEval(code))
  with pytest.raises(DataError) as caught:
    load_sparse_matrix(path)
  message = str(caught.value)
  assert "builtins.eval" in message
  assert str(path) in message
  assert "not a plain scipy sparse matrix" in message
  assert "\n" not in message
  assert not marker.exists()


def test_hostile_object_hidden_inside_a_matrix_is_refused(tmp_path):
  matrix = _toy_matrix()
  matrix.maxprint = _RunsCommand(f"touch {tmp_path / 'pwned'}")
  path = _dump(tmp_path / "trn_mat.pkl", matrix)
  with pytest.raises(DataError, match="refused global"):
    load_sparse_matrix(path)
  assert not (tmp_path / "pwned").exists()


def test_profile_pickle_may_not_hold_arrays(tmp_path):
  path = _dump(tmp_path / "usr_prf.pkl", {0: np.arange(3)})
  with pytest.raises(DataError, match=r"refused global.*not a plain profile"):
    load_profile_dict(path)


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("fmt", ["coo", "csr", "csc"])
def test_current_matrices_round_trip(tmp_path, protocol, fmt):
  matrix = _toy_matrix().asformat(fmt)
  path = _dump(tmp_path / "m.pkl", matrix, protocol)
  loaded = load_sparse_matrix(path)
  assert isinstance(loaded, scipy.sparse.coo_matrix)
  np.testing.assert_array_equal(loaded.toarray(), matrix.toarray())


def test_numpy1_pickle_with_row_col_state_loads(tmp_path):
  """Mimics the RLMRec files: numpy.core names and `row`/`col` state."""
  matrix = _toy_matrix()
  legacy = scipy.sparse.coo_matrix.__new__(scipy.sparse.coo_matrix)
  state = dict(matrix.__dict__)
  row, col = state.pop("coords")
  legacy.__dict__.update(state, row=row, col=col)
  # Protocol 2 writes globals as text lines, so the module can be renamed.
  data = pickle.dumps(legacy, protocol=2)
  data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
  assert b"numpy.core.multiarray\n_reconstruct" in data
  assert b"coords" not in data
  path = tmp_path / "legacy.pkl"
  path.write_bytes(data)
  loaded = load_sparse_matrix(path)
  np.testing.assert_array_equal(loaded.toarray(), matrix.toarray())


def test_inconsistent_matrix_is_refused(tmp_path):
  matrix = _toy_matrix()
  matrix.coords = (np.array([0, 1, 7], np.int32), matrix.col)
  path = _dump(tmp_path / "trn_mat.pkl", matrix)
  with pytest.raises(DataError, match=r"ids outside the shape \(3, 4\)"):
    load_sparse_matrix(path)


def test_non_matrix_and_corrupt_files_are_refused(tmp_path):
  with pytest.raises(DataError, match="holds a dict, expected a scipy"):
    load_sparse_matrix(_dump(tmp_path / "d.pkl", {"a": 1}))
  truncated = tmp_path / "cut.pkl"
  truncated.write_bytes(pickle.dumps(_toy_matrix(), protocol=4)[:60])
  with pytest.raises(DataError, match="cannot unpickle"):
    load_sparse_matrix(truncated)
  with pytest.raises(DataError, match="no such file"):
    load_sparse_matrix(tmp_path / "absent.pkl")


def test_real_amazon_train_matrix_loads_with_exact_counts():
  matrix = load_sparse_matrix(require("amazon", "trn_mat.pkl"))
  assert matrix.shape == (11_000, 9_332)
  assert matrix.nnz == 120_464
  assert matrix.row.dtype == np.int32
  np.testing.assert_array_equal(matrix.data, 1.0)
  csr = matrix.tocsr()
  csr.sum_duplicates()
  assert csr.nnz == 120_464  # no duplicated entries
  assert (np.diff(csr.indptr) > 0).all()  # every user has a train item


@pytest.mark.parametrize(
  ("name", "shape", "counts"),
  [
    ("amazon", (11_000, 9_332), (120_464, 40_290, 40_106)),
    ("yelp", (11_091, 11_010), (166_620, 55_479, 55_436)),
  ],
)
def test_real_splits_load_with_published_counts(name, shape, counts):
  for file_name, count in zip(
    ("trn_mat.pkl", "val_mat.pkl", "tst_mat.pkl"), counts, strict=True
  ):
    matrix = load_sparse_matrix(require(name, file_name))
    assert matrix.shape == shape
    assert matrix.nnz == count
