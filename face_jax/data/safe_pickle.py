"""Restricted unpickling of RLMRec matrices and profile dictionaries.

Dataset pickles come from strangers on the internet, and `pickle.load` runs
whatever callable a pickle names. The unpicklers here resolve only the few
globals a scipy sparse matrix (or a dict of profile strings) is made of; any
other global is refused before it is imported, so nothing in a hostile file
runs.

Matrices written by numpy 1.x name `numpy.core.multiarray._reconstruct`;
numpy 2 moved it to `numpy._core`, so legacy names are mapped onto the
current objects rather than imported through the deprecated alias.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import scipy.sparse

from face_jax.data.dataset import DataError

try:  # numpy >= 2 (and the forward-compatible stubs of numpy 1.26)
  from numpy._core import multiarray as _multiarray
  from numpy._core import numeric as _numeric
except ImportError:  # older numpy 1.x
  from numpy.core import multiarray as _multiarray
  from numpy.core import numeric as _numeric

# Globals a numpy array or scalar needs, under numpy 1.x and numpy 2 names.
_NUMPY_GLOBALS = {
  ("numpy", "ndarray"): np.ndarray,
  ("numpy", "dtype"): np.dtype,
  ("numpy.core.multiarray", "_reconstruct"): _multiarray._reconstruct,
  ("numpy._core.multiarray", "_reconstruct"): _multiarray._reconstruct,
  ("numpy.core.multiarray", "scalar"): _multiarray.scalar,
  ("numpy._core.multiarray", "scalar"): _multiarray.scalar,
  # Pickle protocol 5 rebuilds contiguous arrays from a buffer.
  ("numpy.core.numeric", "_frombuffer"): _numeric._frombuffer,
  ("numpy._core.numeric", "_frombuffer"): _numeric._frombuffer,
}

# Sparse classes under their current module names and the public and older
# ones (scipy < 1.8 pickled `scipy.sparse.coo`, and so on).
_SPARSE_CLASSES = {
  "coo_matrix": scipy.sparse.coo_matrix,
  "csr_matrix": scipy.sparse.csr_matrix,
  "csc_matrix": scipy.sparse.csc_matrix,
  "coo_array": scipy.sparse.coo_array,
  "csr_array": scipy.sparse.csr_array,
  "csc_array": scipy.sparse.csc_array,
}
_SPARSE_MODULES = {
  "coo": ("scipy.sparse", "scipy.sparse._coo", "scipy.sparse.coo"),
  "csr": ("scipy.sparse", "scipy.sparse._csr", "scipy.sparse.csr"),
  "csc": ("scipy.sparse", "scipy.sparse._csc", "scipy.sparse.csc"),
}
_SPARSE_GLOBALS = {
  (module, name): cls
  for name, cls in _SPARSE_CLASSES.items()
  for module in _SPARSE_MODULES[name[:3]]
}

# Harmless builtin containers that protocols 0-2 name as globals.
_CONTAINER_GLOBALS = {
  (module, name): builtin
  for module in ("builtins", "__builtin__")
  for name, builtin in (
    ("dict", dict),
    ("list", list),
    ("tuple", tuple),
    ("set", set),
    ("frozenset", frozenset),
    ("str", str),
    ("unicode", str),
    ("int", int),
    ("float", float),
  )
}


def _latin1_bytes(text, encoding):
  """Protocol 2 stores bytes as `_codecs.encode(text, 'latin1')`."""
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise pickle.UnpicklingError(
      f"_codecs.encode with {type(text).__name__} and {encoding!r}"
    )
  return text.encode("latin-1")


MATRIX_GLOBALS = {
  **_NUMPY_GLOBALS,
  **_SPARSE_GLOBALS,
  ("_codecs", "encode"): _latin1_bytes,
}
# Profile keys are sometimes numpy integers, so their scalar form is allowed.
PROFILE_GLOBALS = {
  **_CONTAINER_GLOBALS,
  ("numpy", "dtype"): np.dtype,
  ("numpy.core.multiarray", "scalar"): _multiarray.scalar,
  ("numpy._core.multiarray", "scalar"): _multiarray.scalar,
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only the globals in `allowed`; refuses every other one."""

  def __init__(self, file, path: str, allowed: dict, what: str):
    super().__init__(file)
    self._path = path
    self._allowed = allowed
    self._what = what

  def find_class(self, module, name):
    found = self._allowed.get((module, name))
    if found is None:
      raise DataError(
        f"{self._path}: refused global {module}.{name}; the file is not a "
        f"plain {self._what}, so it was not unpickled."
      )
    return found

  def persistent_load(self, pid):
    raise DataError(
      f"{self._path}: refused persistent id {pid!r}; the file is not a plain "
      f"{self._what}."
    )


def _load(path: str | os.PathLike, allowed: dict, what: str):
  path = os.fspath(path)
  try:
    with open(path, "rb") as file:
      return _RestrictedUnpickler(file, path, allowed, what).load()
  except DataError:
    raise
  except FileNotFoundError as error:
    raise DataError(f"{path}: no such file.") from error
  except (
    pickle.UnpicklingError,
    EOFError,
    TypeError,
    ValueError,
    KeyError,
    AttributeError,
    IndexError,
  ) as error:
    # Truncated or corrupt files surface as one of these.
    raise DataError(
      f"{path}: cannot unpickle ({type(error).__name__}: {error}); the file is "
      f"not a readable {what}."
    ) from error


def load_sparse_matrix(path: str | os.PathLike) -> scipy.sparse.coo_matrix:
  """Loads a pickled scipy sparse matrix without running foreign code.

  Args:
    path: a pickle of a scipy `coo`, `csr` or `csc` matrix or array,
      written by any numpy 1.x/2.x and scipy >= 1.0.

  Returns:
    The matrix as a `coo_matrix` whose structure was checked.

  Raises:
    DataError: the file is missing, refers to any other global, or does not
      hold a consistent 2-D sparse matrix.
  """
  matrix = _load(path, MATRIX_GLOBALS, "scipy sparse matrix")
  path = os.fspath(path)
  if not scipy.sparse.issparse(matrix):
    raise DataError(
      f"{path}: holds a {type(matrix).__name__}, expected a scipy sparse "
      "matrix (users x items)."
    )
  try:
    # The state of a pickle is set without checks; `check_format` (CSR/CSC)
    # and the COO checks below catch inconsistent arrays.
    if matrix.format in ("csr", "csc"):
      matrix.check_format(full_check=True)
    elif matrix.format == "coo":
      _check_coo(matrix)
    else:
      raise ValueError(f"unsupported format {matrix.format}")
    coo = scipy.sparse.coo_matrix(matrix)
  except (ValueError, TypeError, AttributeError, IndexError) as error:
    raise DataError(
      f"{path}: the sparse matrix is inconsistent ({error}); the file is "
      "corrupt."
    ) from error
  return coo


def _check_coo(coo: scipy.sparse.coo_matrix) -> None:
  if len(coo.coords) != 2 or len(coo.shape) != 2:
    raise ValueError(f"{coo.ndim} dimensions instead of 2")
  rows, cols = coo.row, coo.col
  if not (
    np.issubdtype(rows.dtype, np.integer)
    and np.issubdtype(cols.dtype, np.integer)
  ):
    raise ValueError(f"index dtypes {rows.dtype}, {cols.dtype}")
  if not np.issubdtype(coo.data.dtype, np.number) and coo.data.dtype != bool:
    raise ValueError(f"value dtype {coo.data.dtype}")
  if not len(rows) == len(cols) == len(coo.data):
    raise ValueError(
      f"{len(rows)} rows, {len(cols)} columns and {len(coo.data)} values"
    )
  if rows.ndim != 1 or cols.ndim != 1:
    raise ValueError("index arrays are not 1-D")
  num_rows, num_cols = coo.shape
  if len(rows) and (
    rows.min() < 0
    or rows.max() >= num_rows
    or cols.min() < 0
    or cols.max() >= num_cols
  ):
    raise ValueError(f"row or column ids outside the shape {coo.shape}")


def load_profile_dict(path: str | os.PathLike) -> dict:
  """Loads a pickled profile dictionary without running foreign code.

  Args:
    path: a pickle of builtin containers only (dict, list, str, int, ...),
      as RLMRec writes `usr_prf.pkl` and `itm_prf.pkl`.

  Returns:
    The unpickled dictionary, unchecked beyond being a dict.

  Raises:
    DataError: the file is missing, refers to any non-container global, or
      does not hold a dict.
  """
  profiles = _load(path, PROFILE_GLOBALS, "profile dict")
  if not isinstance(profiles, dict):
    raise DataError(
      f"{os.fspath(path)}: holds a {type(profiles).__name__}, expected a dict "
      "of id -> {'profile': str}."
    )
  return profiles
