"""What a compiled step needs per device, logged before training starts.

XLA knows, once a step is compiled for its shardings, how many bytes each
device holds for the step's arguments, outputs and temporaries. Logging it
before the first step shows whether a configuration fits the accelerator,
without running it (arguments can be `jax.ShapeDtypeStruct`s):

    step = jax.jit(train_step, in_shardings=..., out_shardings=...,
                   donate_argnums=0)
    compiled = compile_and_log(step, "map step", state, batch, rng)
    state, metrics = compiled(state, batch, rng)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from absl import logging

_MIB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class MemoryReport:
  """Per-device memory of one compiled program, in MiB.

  Attributes:
    argument_mib: inputs held on the device.
    output_mib: outputs written by the program.
    alias_mib: outputs that reuse donated input buffers (counted once).
    temp_mib: XLA's one allocation for all temporaries (buffers whose
      lifetimes do not overlap share space).
    code_mib: the compiled program itself.
    peak_mib: what a call holds on the device: arguments, outputs not
      aliased to donated inputs and the temporaries' allocation (or XLA's
      own peak estimate where it is larger; the CPU backend's estimate
      leaves the temporaries out).
    limit_mib: memory of one device, None where the backend does not say
      (CPU).
    gflops: floating-point work per device per call, None if unknown.
  """

  argument_mib: float
  output_mib: float
  alias_mib: float
  temp_mib: float
  code_mib: float
  peak_mib: float
  limit_mib: float | None
  gflops: float | None

  @property
  def fits(self) -> bool | None:
    """Whether the peak stays within one device's memory (None: unknown)."""
    if self.limit_mib is None:
      return None
    return self.peak_mib <= self.limit_mib


def _device_limit_mib() -> float | None:
  stats = jax.local_devices()[0].memory_stats()
  if not stats or "bytes_limit" not in stats:
    return None
  return stats["bytes_limit"] / _MIB


def _gflops(compiled: Any) -> float | None:
  costs = compiled.cost_analysis()
  # Older backends return one dict per program in a list.
  if isinstance(costs, list | tuple):
    costs = costs[0] if costs else None
  if not costs or "flops" not in costs:
    return None
  return float(costs["flops"]) / 1e9


def memory_report(compiled: Any) -> MemoryReport | None:
  """The per-device memory of `compiled`, or None if the backend has none.

  Args:
    compiled: a `jax.stages.Compiled` (`jax.jit(f).lower(...).compile()`).

  Returns:
    A MemoryReport, or None when `memory_analysis()` gives nothing.
  """
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  argument = stats.argument_size_in_bytes
  output = stats.output_size_in_bytes
  alias = stats.alias_size_in_bytes
  temp = stats.temp_size_in_bytes
  code = stats.generated_code_size_in_bytes
  peak = max(
    argument + output - alias + temp,
    getattr(stats, "peak_memory_in_bytes", 0),
  )
  return MemoryReport(
    argument_mib=argument / _MIB,
    output_mib=output / _MIB,
    alias_mib=alias / _MIB,
    temp_mib=temp / _MIB,
    code_mib=code / _MIB,
    peak_mib=peak / _MIB,
    limit_mib=_device_limit_mib(),
    gflops=_gflops(compiled),
  )


def log_memory_analysis(compiled: Any, name: str) -> MemoryReport | None:
  """Logs the per-device memory (and flops) of a compiled step.

  Args:
    compiled: a `jax.stages.Compiled`.
    name: what the program is, for the log line ("map step").

  Returns:
    The MemoryReport that was logged, or None when the backend has none.
  """
  report = memory_report(compiled)
  if report is None:
    logging.info("%s: the backend reports no memory analysis.", name)
    return None
  if report.limit_mib is None:
    verdict = "device memory unknown"
  else:
    verdict = "fits" if report.fits else "DOES NOT FIT"
    verdict = f"of {report.limit_mib:.1f} MiB per device, {verdict}"
  flops = "" if report.gflops is None else f"; {report.gflops:.4g} GFLOP"
  logging.info(
    "%s, per device: arguments %.1f MiB, outputs %.1f MiB (%.1f MiB "
    "aliased to donated inputs), temporaries %.1f MiB, code %.1f MiB; "
    "peak %.1f MiB (%s)%s.",
    name,
    report.argument_mib,
    report.output_mib,
    report.alias_mib,
    report.temp_mib,
    report.code_mib,
    report.peak_mib,
    verdict,
    flops,
  )
  return report


def compile_and_log(jitted: Any, name: str, *args: Any, **kwargs: Any) -> Any:
  """Compiles `jitted` for these arguments and logs its memory.

  Args:
    jitted: a `jax.jit`-wrapped function.
    name: what the program is, for the log line.
    *args: its arguments, arrays or `jax.ShapeDtypeStruct`s with shardings.
    **kwargs: its keyword arguments.

  Returns:
    The `jax.stages.Compiled` program; call it like the jitted function
    (with arrays whose shapes, dtypes and shardings match).
  """
  compiled = jitted.lower(*args, **kwargs).compile()
  log_memory_analysis(compiled, name)
  return compiled
