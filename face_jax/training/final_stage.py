"""The final evaluation: the backbone alone beside the backbone after FACE.

Every training stage scores its best epoch on the validation and test
splits when it finishes; this stage gathers those scores into one entry of
metrics.json, with the change from the pretrained backbone to the last FACE
stage, and logs them as a table.
"""

from __future__ import annotations

import pathlib
from typing import Any

import ml_collections
from absl import logging

from face_jax.data import Dataset
from face_jax.training import checkpoints, face_stages, pretrain
from face_jax.training.loop import describe_metrics
from face_jax.training.writer import MetricWriter

STAGE = "final"
SPLITS = ("valid", "test")


def run_final(
  config: ml_collections.ConfigDict,
  dataset: Dataset,
  stage_dir: pathlib.Path,
  writer: MetricWriter,
) -> dict[str, Any]:
  """Gathers the validation and test metrics of every finished stage.

  Args:
    config: the resolved experiment config.
    dataset: the dataset.
    stage_dir: `<workdir>/final`.
    writer: unused (the results go to metrics.json).

  Returns:
    {"after": the last FACE stage, "stages": {stage: {"valid", "test",
    "best_epoch"}}, "change": {split: {metric: last - pretrain}}}.

  Raises:
    FileNotFoundError: the pretrain or map stage has not finished.
  """
  del config, dataset, writer  # Everything comes from the stage results.
  workdir = stage_dir.parent
  names = [pretrain.STAGE, *face_stages.finished_face_stages(workdir)]
  if len(names) < 2:
    raise FileNotFoundError(
      f"No finished map stage in {workdir}; run the earlier stages first."
    )
  stages = {}
  for name in names:
    result = checkpoints.read_json(workdir / name / checkpoints.RESULT_FILE)
    if result is None:
      raise FileNotFoundError(
        f"No finished {name} stage in {workdir}; run it first."
      )
    stages[name] = {
      "valid": result["valid"],
      "test": result["test"],
      "best_epoch": result["best_epoch"],
    }
  after = names[-1]
  change = {
    split: {
      metric: value - stages[pretrain.STAGE][split][metric]
      for metric, value in stages[after][split].items()
    }
    for split in SPLITS
  }
  for split in SPLITS:
    for name in names:
      logging.info(
        "%-5s %-8s %s",
        split,
        name,
        describe_metrics(stages[name][split]),
      )
  return {"after": after, "stages": stages, "change": change}
