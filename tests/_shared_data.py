"""Locates the real datasets (shared/data) for tests that read them.

The folder sits beside or above the repository checkout; tests that need it
skip with the reason when it is absent (a plain clone has no copy).
"""

import pathlib

import pytest

_REPO = pathlib.Path(__file__).resolve().parents[1]


def shared_data_dir() -> pathlib.Path | None:
  """The nearest shared/data folder in or above the repository, if any."""
  for folder in (_REPO, *_REPO.parents):
    candidate = folder / "shared" / "data"
    if candidate.is_dir():
      return candidate
  return None


def require(*parts: str) -> pathlib.Path:
  """Path of shared/data/<parts>; skips the test when it does not exist."""
  root = shared_data_dir()
  path = root.joinpath(*parts) if root else None
  if path is None or not path.exists():
    pytest.skip(
      f"real data shared/data/{'/'.join(parts)} not found in or above {_REPO}"
    )
  return path
