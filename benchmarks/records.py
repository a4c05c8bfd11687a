"""What every benchmark row records beside its measures, and the writing.

The benchmark scripts run as `python benchmarks/<script>.py`, so they
import this as `records`.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import shlex
import sys
from collections.abc import Iterable

import jax
from absl import logging


def machine() -> str:
  """The CPU, core count, jax version and the device kind it runs on."""
  device = jax.devices()[0]
  return (
    f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
    f"jax {jax.__version__} on {device.platform} ({device.device_kind})"
  )


def command() -> str:
  """This process's command line, shell-quoted."""
  return shlex.join([sys.executable, *sys.argv])


def utc_now() -> str:
  """The current UTC time to the second, ISO 8601."""
  return datetime.datetime.now(datetime.timezone.utc).isoformat(
    timespec="seconds"
  )


def peak_rss_mb() -> float:
  """This process's peak resident memory so far, in MB."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def append(path: str, rows: Iterable[dict]) -> None:
  """Appends `rows` to the JSONL file `path`, one line each."""
  with open(path, "a", encoding="utf-8") as stream:
    for row in rows:
      stream.write(json.dumps(row) + "\n")
      logging.info("Appended to %s: %s", path, row)
