"""A finished experiment folder read back: config, results, descriptors.

`python -m face_jax.main` leaves in its workdir the resolved config
(config.json), every stage's results (metrics.json), the per-epoch log
(metrics.jsonl) and the exported descriptors (descriptors/). `open_run`
reads them for the tools that look at a run afterwards (explain, quality,
the notebook); a workdir whose job has not finished is refused with a
message that says how to finish it.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import ml_collections

from face_jax import descriptors
from face_jax.training import checkpoints, face_stages

CONFIG_FILE = "config.json"
RESULTS_FILE = "metrics.json"
LOG_FILE = "metrics.jsonl"


class RunError(ValueError):
  """A workdir holds no finished run, or the run lacks what was asked."""


def _tuples(value: Any) -> Any:
  """JSON lists back to the tuples the config was written with."""
  if isinstance(value, dict):
    return {key: _tuples(inner) for key, inner in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(inner) for inner in value)
  return value


def read_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
  """The resolved config a run wrote to `<workdir>/config.json`, locked.

  Raises:
    RunError: the workdir has no config.json.
  """
  path = pathlib.Path(workdir) / CONFIG_FILE
  payload = checkpoints.read_json(path)
  if payload is None:
    raise RunError(
      f"{path} is missing: {workdir} is not the workdir of a run; pass the "
      "--workdir given to python -m face_jax.main."
    )
  config = ml_collections.ConfigDict(_tuples(payload))
  config.lock()
  return config


def read_log(workdir: str | pathlib.Path) -> list[dict[str, Any]]:
  """Every record of `<workdir>/metrics.jsonl`, in the order written.

  A resumed run may log an epoch twice; keep the last record of each
  (stage, epoch) when that matters.
  """
  path = pathlib.Path(workdir) / LOG_FILE
  if not path.exists():
    return []
  lines = path.read_text(encoding="utf-8").splitlines()
  return [json.loads(line) for line in lines if line.strip()]


def read_descriptors(path: pathlib.Path) -> dict[str, list[dict[str, Any]]]:
  """descriptors.jsonl as {"user": [record by id], "item": [...]}."""
  found = {kind: [] for kind in descriptors.ENTITY_TYPES}
  with path.open(encoding="utf-8") as stream:
    for line in stream:
      record = json.loads(line)
      found[record["type"]].append(record)
  for kind, records in found.items():
    records.sort(key=lambda record: record["id"])
    if [record["id"] for record in records] != list(range(len(records))):
      raise RunError(
        f"{path} does not list every {kind} once; rerun the descriptors "
        "stage (delete descriptors/result.json and run the job again)."
      )
  return found


@dataclasses.dataclass(frozen=True)
class FinishedRun:
  """What a finished run left in its workdir.

  Attributes:
    workdir: the experiment folder (absolute).
    config: its resolved config.
    results: metrics.json: stage name -> results.
    descriptors: {"user": records by id, "item": records by id}; a record
      is {"type", "id", "words": [W strings], "text": profile or None}.
  """

  workdir: pathlib.Path
  config: ml_collections.ConfigDict
  results: dict[str, Any]
  descriptors: dict[str, list[dict[str, Any]]]

  @property
  def stage(self) -> str:
    """The FACE stage the descriptors come from ("align" or "map")."""
    return self.results[descriptors.STAGE]["after"]

  def record(self, kind: str, entity: int) -> dict[str, Any]:
    """The descriptor record of user or item `entity`.

    Raises:
      RunError: no such entity in the run.
    """
    records = self.descriptors[kind]
    if not 0 <= entity < len(records):
      raise RunError(
        f"{kind.capitalize()} {entity} is not in this run: {kind} ids go "
        f"from 0 to {len(records) - 1}."
      )
    return records[entity]


def open_run(workdir: str | pathlib.Path) -> FinishedRun:
  """Reads a workdir whose job ran to the end (descriptors exported).

  Args:
    workdir: the --workdir of `python -m face_jax.main`.

  Returns:
    The FinishedRun.

  Raises:
    RunError: the folder is missing or its job has not finished.
  """
  workdir = pathlib.Path(workdir).expanduser().absolute()
  if not workdir.is_dir():
    raise RunError(
      f"Workdir {workdir} does not exist; pass the --workdir of a run of "
      "python -m face_jax.main."
    )
  config = read_config(workdir)
  marker = workdir / descriptors.STAGE / checkpoints.RESULT_FILE
  results = checkpoints.read_json(workdir / RESULTS_FILE)
  if not marker.exists() or not results or descriptors.STAGE not in results:
    raise RunError(
      f"{workdir} holds no finished run (no {descriptors.STAGE} results "
      "yet); finish it with python -m face_jax.main "
      f"--workdir={workdir} and the same --config."
    )
  path = workdir / descriptors.STAGE / descriptors.JSONL_FILE
  return FinishedRun(workdir, config, results, read_descriptors(path))


def require_face_stage(workdir: str | pathlib.Path) -> pathlib.Path:
  """The absolute workdir, checked to hold a finished FACE stage.

  Raises:
    RunError: the folder is missing or no FACE stage has finished.
  """
  workdir = pathlib.Path(workdir).expanduser().absolute()
  read_config(workdir)
  if not face_stages.finished_face_stages(workdir):
    raise RunError(
      f"{workdir} has no finished map stage yet; run python -m "
      f"face_jax.main --workdir={workdir} and the same --config."
    )
  return workdir
