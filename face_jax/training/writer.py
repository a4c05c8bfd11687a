"""Per-epoch metrics to a JSONL file and TensorBoard event files.

In a multi-process job only process 0 writes; on the others a MetricWriter
creates no file and drops every record.
"""

from __future__ import annotations

import json
import logging
import pathlib
import re
from collections.abc import Mapping

import tensorboardX
from absl import logging as absl_logging

from face_jax import parallel

# Nested metrics of one epoch: {"train": {"loss": ...}, "valid": {...}}.
Record = Mapping[str, Mapping[str, float]]


class MetricWriter:
  """Appends one JSON line per epoch and mirrors scalars to TensorBoard.

  A resumed run appends again: when a run stopped between logging an epoch
  and checkpointing it, that epoch appears twice and the later line wins.

  Args:
    workdir: the experiment folder; writes `metrics.jsonl` and
      `tensorboard/` in it (process 0 only).
    tensorboard: also write TensorBoard event files.
  """

  def __init__(self, workdir: str | pathlib.Path, tensorboard: bool = True):
    workdir = pathlib.Path(workdir)
    self.path = workdir / "metrics.jsonl"
    # Every process runs the same loop; one copy of the metrics is enough.
    self.enabled = parallel.is_main_process()
    if self.enabled:
      workdir.mkdir(parents=True, exist_ok=True)
    self._summary = (
      tensorboardX.SummaryWriter(str(workdir / "tensorboard"))
      if tensorboard and self.enabled
      else None
    )

  def write(self, stage: str, epoch: int, record: Record, **extra) -> None:
    """Logs the metrics of `epoch` of `stage`.

    Args:
      stage: stage name, for example "pretrain".
      epoch: 1-based epoch number (the x axis in TensorBoard).
      record: group -> metric name -> value.
      **extra: further JSON fields (for example seconds, improved).
    """
    if not self.enabled:
      return
    line = {"stage": stage, "epoch": epoch, **extra}
    line.update({group: dict(values) for group, values in record.items()})
    with self.path.open("a", encoding="utf-8") as stream:
      stream.write(json.dumps(line) + "\n")
    if self._summary is not None:
      for group, values in record.items():
        for name, value in values.items():
          # TensorBoard tags allow [A-Za-z0-9_./-]: recall@20 -> recall_20.
          tag = re.sub(r"[^\w./-]", "_", f"{stage}/{group}/{name}")
          self._summary.add_scalar(tag, value, epoch)

  def close(self) -> None:
    if self._summary is not None:
      self._summary.close()


def _not_orbax_info(record: logging.LogRecord) -> bool:
  return record.levelno > logging.INFO or "orbax" not in record.pathname


def quiet_checkpoint_logs() -> None:
  """Drops orbax's INFO lines (a dozen per save) from the absl log."""
  absl_logging.get_absl_handler().addFilter(_not_orbax_info)
