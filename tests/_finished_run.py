"""One finished tiny run, shared by the tests that read a workdir back.

The tiny text dataset is written as an RLMRec folder and named in the
config (config.data.dir), so that the tools which load a run's dataset
from its config.json (explain, quality, the notebook) find it like they
would a real one. The run is made once per test session.
"""

import pathlib
import pickle

import numpy as np
import scipy.sparse
from _face_fixtures import (
  cache_folder,
  shared_compilation_cache,
  text_dataset,
  tiny_config,
  write_tiny_bert,
)

from face_jax import train
from face_jax.data import Dataset, rlmrec

_RUNS: dict[pathlib.Path, tuple[pathlib.Path, Dataset]] = {}


def write_rlmrec(dataset: Dataset, folder: pathlib.Path) -> None:
  """Writes `dataset` as trn/val/tst_mat.pkl and usr/itm_prf.pkl."""
  folder.mkdir(parents=True, exist_ok=True)
  shape = (dataset.num_users, dataset.num_items)
  for split, name in rlmrec.MATRIX_FILES.items():
    pairs = getattr(dataset, split)
    matrix = scipy.sparse.coo_matrix(
      (np.ones(len(pairs), np.float32), (pairs[:, 0], pairs[:, 1])), shape
    )
    with (folder / name).open("wb") as stream:
      pickle.dump(matrix, stream, protocol=4)
  for kind, texts in (("user", dataset.user_text), ("item", dataset.item_text)):
    profiles = {index: {"profile": text} for index, text in enumerate(texts)}
    with (folder / rlmrec.PROFILE_FILES[kind]).open("wb") as stream:
      pickle.dump(profiles, stream, protocol=4)


def finished_run(tmp_path_factory) -> tuple[pathlib.Path, Dataset]:
  """(workdir, dataset) of a tiny run of every stage, made once."""
  base = tmp_path_factory.getbasetemp()
  if base not in _RUNS:
    folder = tmp_path_factory.mktemp("finished_run")
    dataset = text_dataset()
    write_rlmrec(dataset, folder / "data")
    config = tiny_config(
      write_tiny_bert(folder / "tiny_bert"),
      data__dir=str(folder / "data"),
      log__tensorboard=True,
    )
    workdir = folder / "workdir"
    with shared_compilation_cache(cache_folder(tmp_path_factory)):
      train.train_and_evaluate(config, workdir)
    _RUNS[base] = workdir, dataset
  return _RUNS[base]
