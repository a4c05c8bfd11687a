"""The whole job on a tiny config: every stage, a stop mid-stage, resume.

One uninterrupted run is compared with a run stopped after the first
align epoch and started again in the same workdir: the second start skips
pretrain and map, resumes align at its second epoch and ends with the same
results and descriptors.

The three runs compile the same programs, so the test lets them share JAX's
persistent compilation cache (in a temporary folder) with the other FACE
tests rather than compile everything again.
"""

import dataclasses
import json

import pytest
from _face_fixtures import (
  cache_folder,
  shared_compilation_cache,
  text_dataset,
  tiny_config,
  write_tiny_bert,
)

from face_jax import descriptors, train
from face_jax.training import face_stages
from face_jax.training.step import compile_train_step


class _StopError(Exception):
  """Raised from an epoch callback to stop a run as a crash would."""


def _stopping_after_first_epoch(stage: train.Stage) -> train.Stage:
  def on_epoch_end(loop):
    raise _StopError(f"{stage.name} epoch {loop.epoch}")

  def run(config, dataset, stage_dir, writer):
    return stage.run(config, dataset, stage_dir, writer, on_epoch_end)

  return dataclasses.replace(stage, run=run)


def _comparable(results):
  """Results without wall-clock times."""

  def strip(value):
    if isinstance(value, dict):
      return {
        key: strip(inner)
        for key, inner in value.items()
        if "seconds" not in key
      }
    return value

  return strip(results)


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
  with shared_compilation_cache(cache_folder(tmp_path_factory)):
    yield


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  return tiny_config(write_tiny_bert(tmp_path_factory.mktemp("tiny_bert")))


def test_job_runs_every_stage_and_resumes_after_a_stop(
  config, tmp_path, monkeypatch
):
  dataset = text_dataset()
  compiled = []

  def recording_compile_train_step(step, name, *args):
    compiled.append(name.split()[0])
    return compile_train_step(step, name, *args)

  monkeypatch.setattr(
    face_stages, "compile_train_step", recording_compile_train_step
  )
  reference = train.train_and_evaluate(config, tmp_path / "reference", dataset)
  # The map and align steps each compiled once, ahead of time, for all their
  # steps (a compiled program refuses inputs of another type or layout
  # instead of compiling again).
  assert compiled == ["map", "align"]
  trained = [
    record
    for record in map(
      json.loads,
      (tmp_path / "reference" / "metrics.jsonl").read_text().splitlines(),
    )
    if "train" in record
  ]
  terms = {record["stage"]: set(record["train"]) for record in trained}
  logged = {"loss", "bpr", "vq", "recon", "distinct_tokens", "grad_norm"}
  assert terms["map"] == logged
  assert terms["align"] == logged | {"align"}
  for record in trained:
    if record["stage"] in ("map", "align"):
      # An epoch's mean over batches of 3B entities with W words each.
      words = config.face.num_words
      batch = config[record["stage"]].batch_size
      assert words <= record["train"]["distinct_tokens"] <= 3 * batch * words
  assert list(reference) == list(train.STAGE_NAMES)
  assert reference["align"]["epochs"] == config.align.max_epochs
  final = reference["final"]
  assert final["after"] == "align"
  assert set(final["stages"]) == {"pretrain", "map", "align"}
  for split in ("valid", "test"):
    assert final["stages"]["map"][split] == reference["map"][split]
  retrieval = reference["descriptors"]["retrieval"]
  assert set(retrieval) == {"map", "align", "shuffled"}
  for scores in retrieval.values():
    assert scores["user"]["entities"] == dataset.num_users
    assert 0.0 <= scores["item"]["top1"] <= scores["item"]["top10"] <= 1.0

  workdir = tmp_path / "resumed"
  stages = [
    _stopping_after_first_epoch(stage) if stage.name == "align" else stage
    for stage in train.STAGES
  ]
  with pytest.raises(_StopError, match="align epoch 1"):
    train.run_stages(config, dataset, workdir, stages)
  assert not (workdir / "align" / "result.json").exists()
  map_checkpoints = sorted((workdir / "map" / "checkpoints").iterdir())

  resumed = train.train_and_evaluate(config, workdir, dataset)
  assert _comparable(resumed) == _comparable(reference)
  assert sorted((workdir / "map" / "checkpoints").iterdir()) == map_checkpoints
  epochs = [
    (record["stage"], record["epoch"])
    for record in map(
      json.loads, (workdir / "metrics.jsonl").read_text().splitlines()
    )
    if "train" in record
  ]
  # Every epoch trained once: the second start ran align's epoch 2 only.
  assert sorted(epochs) == sorted(set(epochs))
  assert epochs[-1] == ("align", 2)
  assert json.loads((workdir / "metrics.json").read_text()) == resumed
  for name in (descriptors.JSONL_FILE, descriptors.TSV_FILE):
    expected = tmp_path / "reference" / "descriptors" / name
    exported = workdir / "descriptors" / name
    assert exported.read_text() == expected.read_text()
  lines = (workdir / "descriptors" / descriptors.JSONL_FILE).read_text()
  records = [json.loads(line) for line in lines.splitlines()]
  assert len(records) == dataset.num_users + dataset.num_items
  assert records[0]["text"] == dataset.user_text[0]
  assert len(records[-1]["words"]) == config.face.num_words
  assert face_stages.last_face_stage(workdir) == "align"
