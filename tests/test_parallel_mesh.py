"""Device mesh from the config, on the 8 fake CPU devices."""

import jax
import pytest

from configs import base
from face_jax import parallel


def _mesh_config(shape, axes=("data", "model")):
  config = base.get_base_config().mesh
  config.axes = axes
  config.shape = shape
  return config


@pytest.mark.parametrize("shape", [(8, 1), (4, 2), (2, 4), (1, 8)])
def test_mesh_shapes_use_every_device(shape):
  mesh = parallel.make_mesh(_mesh_config(shape))
  assert dict(mesh.shape) == {"data": shape[0], "model": shape[1]}
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize(
  ("shape", "devices", "expected"),
  [
    ((-1, 1), 8, (8, 1)),
    ((-1, 2), 8, (4, 2)),
    ((2, -1), 8, (2, 4)),
    ((1, -1), 8, (1, 8)),
    ((-1, 1), 4, (4, 1)),
    ((-1, 2), 4, (2, 2)),
    ((-1, 1), 1, (1, 1)),
  ],
)
def test_minus_one_takes_the_rest(shape, devices, expected):
  mesh = parallel.make_mesh(_mesh_config(shape), jax.devices()[:devices])
  assert tuple(mesh.shape.values()) == expected
  assert mesh.devices.size == devices


def test_base_config_mesh_is_data_parallel():
  mesh = parallel.make_mesh(base.get_base_config().mesh)
  assert dict(mesh.shape) == {"data": 8, "model": 1}


@pytest.mark.parametrize(
  ("shape", "axes", "message"),
  [
    ((3, -1), ("data", "model"), r"multiply to 3.*does not divide the 8"),
    ((-1, -1), ("data", "model"), r"2 sizes of -1"),
    ((4, 4), ("data", "model"), r"covers 16 devices but 8 are present"),
    ((2, 2), ("data", "model"), r"covers 4 devices but 8"),
    ((0, 8), ("data", "model"), r"size below 1"),
    ((8,), ("data", "model"), r"names 2 axes but .* gives 1 sizes"),
    ((4, 2), ("data", "data"), r"repeats a name"),
  ],
)
def test_bad_mesh_configs_raise(shape, axes, message):
  with pytest.raises(parallel.ShardingError, match=message):
    parallel.make_mesh(_mesh_config(shape, axes))


def test_mesh_axis_size():
  mesh = parallel.make_mesh(_mesh_config((2, 4)))
  assert parallel.mesh_axis_size(mesh, "model") == 4
  assert parallel.mesh_axis_size(mesh, ("data", "model")) == 8
  assert parallel.mesh_axis_size(mesh, None) == 1
