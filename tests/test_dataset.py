"""The in-memory Dataset refuses inconsistent input."""

import numpy as np
import pytest

from face_jax.data import DataError, Dataset


def _pairs(*rows):
  return np.array(rows, dtype=np.int32).reshape(-1, 2)


def test_matrix_is_binary_user_by_item():
  data = Dataset("toy", 2, 3, _pairs((0, 1), (1, 2)), _pairs((0, 0)), _pairs())
  dense = data.matrix("train").toarray()
  np.testing.assert_array_equal(dense, [[0, 1, 0], [0, 0, 1]])


def test_out_of_range_item_is_refused():
  with pytest.raises(DataError, match="outside 2 users x 3 items"):
    Dataset("toy", 2, 3, _pairs((0, 3)), _pairs(), _pairs())


def test_profile_count_must_match():
  with pytest.raises(DataError, match="1 user profiles for 2 users"):
    Dataset("toy", 2, 3, _pairs((0, 1)), _pairs(), _pairs(), user_text=("a",))
