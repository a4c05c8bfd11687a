"""Per-device memory analysis of compiled steps."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import base
from face_jax import parallel

_MIB = 1024 * 1024


def _mesh(shape):
  config = base.get_base_config().mesh
  config.shape = shape
  return parallel.make_mesh(config)


@pytest.mark.parametrize("model", [1, 2, 8])
def test_arguments_are_counted_per_device(model, caplog):
  mesh = _mesh((8 // model, model))
  table = jax.ShapeDtypeStruct(
    (4096, 64), jnp.float32, sharding=NamedSharding(mesh, P("model"))
  )
  step = jax.jit(lambda table: jnp.sum(table * 2.0, axis=0))
  with caplog.at_level(logging.INFO):
    compiled = parallel.compile_and_log(step, "table step", table)
  report = parallel.memory_report(compiled)
  assert report.argument_mib == pytest.approx(4096 * 64 * 4 / model / _MIB)
  assert report.output_mib == pytest.approx(64 * 4 / _MIB)
  assert report.peak_mib >= report.argument_mib
  assert report.gflops is not None and report.gflops > 0
  # The CPU backend does not say how much memory a device has.
  assert report.limit_mib is None and report.fits is None
  assert "table step, per device: arguments" in caplog.text
  values = (np.arange(4096 * 64) % 7).astype(np.float32).reshape(4096, 64)
  out = compiled(jax.device_put(values, table.sharding))
  np.testing.assert_allclose(out, values.sum(0) * 2.0, rtol=1e-6)


def test_peak_counts_the_temporaries():
  # Two [1000, 1000] float32 temporaries (8 MB) from a 4 KB argument: the
  # CPU backend's own peak estimate leaves them out.
  def step(x):
    outer = jnp.outer(x, x)
    return jnp.sum(jnp.sin(outer) @ outer)

  compiled = jax.jit(step).lower(jnp.ones(1000)).compile()
  report = parallel.memory_report(compiled)
  assert report.temp_mib >= 2 * 1000 * 1000 * 4 / _MIB
  assert report.peak_mib == pytest.approx(
    report.argument_mib + report.output_mib + report.temp_mib
  )


def test_fits_compares_the_peak_with_the_device():
  report = parallel.MemoryReport(1.0, 1.0, 0.0, 2.0, 0.0, 4.0, 3.0, None)
  assert report.fits is False
  report = parallel.MemoryReport(1.0, 1.0, 0.0, 2.0, 0.0, 4.0, 16.0, None)
  assert report.fits is True


class _NoAnalysis:
  """A compiled program on a backend without memory analysis."""

  def memory_analysis(self):
    return None


def test_backend_without_analysis_logs_and_returns_none(caplog):
  with caplog.at_level(logging.INFO):
    assert parallel.log_memory_analysis(_NoAnalysis(), "odd step") is None
  assert "odd step: the backend reports no memory analysis" in caplog.text
