"""Runs an experiment: its stages in order, each resumable and skippable.

`train_and_evaluate(config, workdir)` resolves the config, writes it to
`<workdir>/config.json`, loads the dataset and runs every stage in
`STAGES`: pretrain (the CF backbone), map and align (the FACE stages),
final (the backbone alone beside the backbone after FACE) and descriptors
(every entity's words, exported and scored). With
`config.cold_start.enabled`, a seeded share of users and items is held out
first (`face_jax.data.cold_start`): every stage trains on the rest, and a
last stage, cold_start, ranks the held-out ones from their text alone (see
`face_jax.cold_start`). A stage works in
`<workdir>/<stage>/` and, when done, writes its results there atomically
(`result.json`); a rerun skips stages that have that file and resumes an
unfinished stage from its last checkpoint. All results are gathered in
`<workdir>/metrics.json`.

In a multi-process job every process runs every stage (checkpoints are
saved and restored collectively) and process 0 alone writes the other
files: the config, results, metrics, descriptors and cached embeddings.

The align stage needs user and item texts; without them it is skipped with
a message and the job ends after map (its final and descriptor stages
report on map). Final and descriptors are derived from the stages before
them, so a run in which any earlier stage ran (say align, once texts are
added) computes them again.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import pathlib
import re
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
from absl import logging

from face_jax import cold_start, data, descriptors, parallel
from face_jax.data import Dataset
from face_jax.data import cold_start as cold_split
from face_jax.training import checkpoints, face_stages, final_stage, pretrain
from face_jax.training.writer import MetricWriter


class ConfigError(ValueError):
  """The experiment config cannot be resolved."""


@dataclasses.dataclass(frozen=True)
class Stage:
  """One step of an experiment.

  Attributes:
    name: stage name; also its folder in the workdir.
    run: (config, dataset, stage_dir, writer) -> JSON-serialisable results.
    skip_reason: (config, dataset) -> None when the stage can run, else why
      not; a stage that cannot run is skipped with that message and
      leaves no result, so a later run with what it lacked runs it.
    derived: the stage only computes from earlier stages' results, so it
      is run again whenever an earlier stage ran in the same invocation.
  """

  name: str
  run: Callable[
    [ml_collections.ConfigDict, Dataset, pathlib.Path, MetricWriter],
    dict[str, Any],
  ]
  skip_reason: (
    Callable[[ml_collections.ConfigDict, Dataset], str | None] | None
  ) = None
  derived: bool = False


# The stages of an experiment, in order.
STAGES: tuple[Stage, ...] = (
  Stage(pretrain.STAGE, pretrain.run_pretrain),
  Stage(face_stages.MAP, face_stages.run_map),
  Stage(
    face_stages.ALIGN,
    face_stages.run_align,
    skip_reason=face_stages.align_skip_reason,
  ),
  Stage(final_stage.STAGE, final_stage.run_final, derived=True),
  Stage(descriptors.STAGE, descriptors.run_descriptors, derived=True),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)
# The stage after STAGES in a run with config.cold_start.enabled.
COLD_START = cold_start.STAGE


def stages_until(
  last: str | None, stages: Sequence[Stage] = STAGES
) -> tuple[Stage, ...]:
  """The stages of `stages` up to and including `last` (None: all).

  Raises:
    ConfigError: `last` is not a stage name.
  """
  stages = tuple(stages)
  names = [stage.name for stage in stages]
  if last is None:
    return stages
  if last not in names:
    raise ConfigError(
      f"Unknown stage {last!r}; choose one of {', '.join(names)}."
    )
  return stages[: names.index(last) + 1]


def cold_start_setup(
  config: ml_collections.ConfigDict, dataset: Dataset, workdir: pathlib.Path
) -> tuple[Dataset, tuple[Stage, ...]]:
  """The dataset the stages train on and the stages of a run.

  Without `config.cold_start.enabled`: `dataset` and `STAGES`. With it:
  the warm dataset of the run's cold-start split (drawn and stored in the
  workdir on the first run, read back on later ones) and `STAGES` followed
  by the cold_start stage.

  Raises:
    ConfigError: the workdir was trained with the other cold-start setting.
  """
  section = config.cold_start
  split_file = workdir / cold_split.SPLIT_FILE
  if not section.enabled:
    if split_file.exists():
      raise ConfigError(
        f"{workdir} was trained with cold-start users and items held out "
        f"({split_file}); add --config.cold_start.enabled=True or use a "
        "fresh workdir."
      )
    return dataset, STAGES
  if not split_file.exists() and any(
    (workdir / stage.name / checkpoints.RESULT_FILE).exists()
    for stage in STAGES
  ):
    raise ConfigError(
      f"{workdir} holds stages trained without a cold-start split; use a "
      "fresh workdir for --config.cold_start.enabled=True."
    )
  split = cold_split.split_for_run(
    dataset, section.item_share, section.user_share, section.seed, workdir
  )
  stage = Stage(
    cold_start.STAGE,
    functools.partial(
      cold_start.run_cold_start, full_dataset=dataset, split=split
    ),
    skip_reason=cold_start.skip_reason,
    derived=True,
  )
  return cold_split.warm_dataset(dataset, split), (*STAGES, stage)


def resolve_config(
  config: ml_collections.ConfigDict,
) -> ml_collections.ConfigDict:
  """Fills the fields left unset from `config.per_backbone`.

  Dataset configs leave backbone-dependent fields (layers, L2 weight, epoch
  cap) as None and list their values per backbone in `config.per_backbone`
  (see configs/backbone_defaults.py). This takes the entry of
  `config.model.backbone` and sets each field that is still None; values set
  explicitly, for example on the command line, are kept.

  Args:
    config: an experiment config; it is not modified.

  Returns:
    A resolved copy (locked when the input was).

  Raises:
    ConfigError: the backbone has no entry while fields are unset, or a
      field is still unset after resolution.
  """
  resolved = copy.deepcopy(config)
  table = resolved.get("per_backbone")
  if table is None:
    return resolved
  backbone = resolved.model.backbone
  named = {
    (section, field)
    for entry in table.values()
    for section, fields in entry.items()
    for field in fields
  }
  if backbone in table:
    for section, fields in table[backbone].items():
      for field, value in fields.items():
        if resolved[section][field] is None:
          resolved[section][field] = value
  unset = sorted(
    f"config.{section}.{field}"
    for section, field in named
    if resolved[section][field] is None
  )
  if unset:
    raise ConfigError(
      f"{', '.join(unset)} unset for backbone {backbone!r}; set them on the "
      f"command line or add config.per_backbone.{backbone} (known: "
      f"{sorted(table)})."
    )
  return resolved


def _write_json(path: pathlib.Path, payload: Any) -> None:
  """Process 0 writes `path`; every process waits until it is written."""
  if parallel.is_main_process():
    checkpoints.write_json_atomic(path, payload)
  parallel.sync_processes(f"wrote {path}")


def _write_config(config: ml_collections.ConfigDict, workdir: pathlib.Path):
  if not parallel.is_main_process():
    return
  path = workdir / "config.json"
  payload = json.loads(config.to_json_best_effort())
  previous = checkpoints.read_json(path)
  if previous is not None and previous != payload:
    logging.warning(
      "%s differs from the config of this run; continuing with the new "
      "config and overwriting it.",
      path,
    )
  checkpoints.write_json_atomic(path, payload)


def run_stages(
  config: ml_collections.ConfigDict,
  dataset: Dataset,
  workdir: pathlib.Path,
  stages: Sequence[Stage] = STAGES,
) -> dict[str, Any]:
  """Runs `stages` in order, skipping those already finished.

  Args:
    config: the resolved experiment config.
    dataset: the dataset.
    workdir: the experiment folder.
    stages: the stages to run.

  Returns:
    Stage name -> its results ({"skipped": reason} for a stage that could
    not run); also written to `<workdir>/metrics.json`.
  """
  writer = MetricWriter(workdir, tensorboard=config.log.tensorboard)
  results = {}
  skipped = []
  ran_earlier = False
  try:
    for stage in stages:
      stage_dir = workdir / stage.name
      marker = stage_dir / checkpoints.RESULT_FILE
      reason = stage.skip_reason(config, dataset) if stage.skip_reason else None
      done = checkpoints.read_json(marker)
      if reason is not None:
        logging.warning("%s: skipped. %s", stage.name, reason)
        skipped.append(f"{stage.name}: {reason}")
        results[stage.name] = {"skipped": reason}
        _write_json(workdir / "metrics.json", results)
        continue
      if done is not None and not (stage.derived and ran_earlier):
        logging.info("%s: finished earlier (%s), skipped.", stage.name, marker)
      else:
        if parallel.is_main_process():
          stage_dir.mkdir(parents=True, exist_ok=True)
        done = stage.run(config, dataset, stage_dir, writer)
        # Later stages read it (the best epoch), on every process.
        _write_json(marker, done)
        ran_earlier = True
        logging.info("%s: done, %s", stage.name, done)
      results[stage.name] = done
      _write_json(workdir / "metrics.json", results)
  finally:
    writer.close()
  for line in skipped:
    # Repeated last, so that the reason is the run's closing message.
    logging.warning("Not run: %s", line)
  return results


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str | pathlib.Path,
  dataset: Dataset | None = None,
  stop_after: str | None = None,
) -> dict[str, Any]:
  """Runs the experiment `config` in `workdir`.

  Args:
    config: the experiment config (`configs/*.py`), possibly unresolved.
    workdir: folder for the config, checkpoints, logs and metrics; reusing
      it resumes the experiment.
    dataset: the dataset to use instead of loading `config.data`.
    stop_after: run the stages up to this one only (None: all).

  Returns:
    Stage name -> results, for example {"pretrain": {"valid": {...},
    "test": {...}, "epochs": ...}}.
  """
  config = resolve_config(config)
  if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*://", str(workdir)):
    # pathlib would quietly turn gs://b/x into the local folder gs:/b/x.
    raise ConfigError(
      f"workdir {workdir} is a URL, but the workdir is written with local "
      "file operations; mount the bucket on every host (for example "
      "`gcsfuse BUCKET /mnt/BUCKET`, or launch/tpu_pod.sh mount) and pass "
      "the mounted folder."
    )
  workdir = pathlib.Path(workdir).expanduser().absolute()
  # Data first: a bad data folder must not leave an empty workdir behind.
  if dataset is None:
    dataset = data.load_dataset(config.data)
  if parallel.is_main_process():
    workdir.mkdir(parents=True, exist_ok=True)
  dataset, stages = cold_start_setup(config, dataset, workdir)
  stages = stages_until(stop_after, stages)
  _write_config(config, workdir)
  logging.info(
    "%s: %d users, %d items, %d/%d/%d train/valid/test pairs; workdir %s",
    dataset.name,
    dataset.num_users,
    dataset.num_items,
    len(dataset.train),
    len(dataset.valid),
    len(dataset.test),
    workdir,
  )
  return run_stages(config, dataset, workdir, stages)
