"""A process other than 0 writes nothing but its share of the checkpoints.

The whole job runs as if it were process 1 of a multi-process job
(`parallel.is_main_process` patched to False). Orbax does not ask that
function (checkpoints are collective), so the checkpoints are still
written; every other file is process 0's. The stage results that later
stages read are written by the test after each stage, as process 0 would.
"""

import dataclasses

import pytest
from _face_fixtures import (
  cache_folder,
  shared_compilation_cache,
  text_dataset,
  tiny_config,
  write_tiny_bert,
)

from face_jax import parallel, train
from face_jax.training import checkpoints


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
  with shared_compilation_cache(cache_folder(tmp_path_factory)):
    yield


def _with_result_from_process_0(stage, written):
  def run(config, dataset, stage_dir, writer):
    result = stage.run(config, dataset, stage_dir, writer)
    marker = stage_dir / checkpoints.RESULT_FILE
    checkpoints.write_json_atomic(marker, result)
    written.add(marker)
    return result

  return dataclasses.replace(stage, run=run)


def test_other_processes_write_only_checkpoints(tmp_path, monkeypatch):
  config = tiny_config(
    write_tiny_bert(tmp_path / "tiny_bert"),
    log__tensorboard=True,
    pretrain__max_epochs=1,
    map__max_epochs=1,
    align__max_epochs=1,
  )
  workdir = tmp_path / "workdir"
  written = set()
  monkeypatch.setattr(
    train,
    "STAGES",
    tuple(_with_result_from_process_0(s, written) for s in train.STAGES),
  )
  monkeypatch.setattr(parallel, "is_main_process", lambda: False)
  results = train.train_and_evaluate(config, workdir, text_dataset())

  assert list(results) == list(train.STAGE_NAMES)
  assert results["descriptors"]["retrieval"]["align"]["user"]["entities"]
  files = {path for path in workdir.rglob("*") if path.is_file()}
  by_test = {path for path in files if path in written}
  assert len(by_test) == len(train.STAGE_NAMES)
  others = files - by_test
  for stage in ("pretrain", "map", "align"):
    saved = workdir / stage / "checkpoints"
    assert any(path.is_relative_to(saved) for path in others), stage
  # No config.json, metrics.json(l), tensorboard events, cached profile
  # embeddings or descriptor files: only checkpoint files.
  assert [
    path
    for path in others
    if path.relative_to(workdir).parts[1:2] != ("checkpoints",)
  ] == []
