"""The device mesh, built from the `mesh` section of the config.

The mesh has named axes, by default `("data", "model")`: the batch is split
over "data", large tables (users, items, vocabulary) and the frozen LLM's
weights over "model". Model code never names these axes; it names logical
axes that `face_jax.parallel.rules` maps onto them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import ml_collections
from jax.sharding import AxisType, Mesh


class ShardingError(ValueError):
  """A mesh, rule or sharded shape that cannot work as configured."""


def resolve_mesh_shape(
  shape: Sequence[int], num_devices: int
) -> tuple[int, ...]:
  """Replaces the one -1 in `shape` by the devices left over.

  Args:
    shape: mesh axis sizes; positive, except at most one -1 ("the rest").
    num_devices: devices the mesh must use, all of them.

  Returns:
    The axis sizes, whose product is `num_devices`.

  Raises:
    ShardingError: for a size below 1 other than -1, more than one -1, or
      sizes whose product does not fit `num_devices`.
  """
  shape = tuple(int(size) for size in shape)
  if not shape:
    raise ShardingError("mesh.shape is empty; give one size per mesh axis.")
  if any(size < 1 and size != -1 for size in shape):
    raise ShardingError(
      f"mesh.shape={shape} has a size below 1; use positive sizes and at "
      "most one -1 for 'the rest of the devices'."
    )
  rest = shape.count(-1)
  if rest > 1:
    raise ShardingError(
      f"mesh.shape={shape} has {rest} sizes of -1; at most one axis can "
      "take 'the rest of the devices'."
    )
  known = math.prod(size for size in shape if size != -1)
  if rest == 1:
    if num_devices % known:
      raise ShardingError(
        f"mesh.shape={shape}: the fixed sizes multiply to {known}, which "
        f"does not divide the {num_devices} devices; choose sizes whose "
        f"product divides {num_devices}."
      )
    return tuple(num_devices // known if size == -1 else size for size in shape)
  if known != num_devices:
    raise ShardingError(
      f"mesh.shape={shape} covers {known} devices but {num_devices} are "
      f"present; make the sizes multiply to {num_devices} or set one of "
      "them to -1."
    )
  return shape


def make_mesh(
  mesh_config: ml_collections.ConfigDict,
  devices: Sequence[jax.Device] | None = None,
) -> Mesh:
  """The mesh described by `config.mesh`, laid out for the hardware.

  Device order comes from `jax.make_mesh`, which follows the TPU torus
  and the GPU/host order, so the last axis ("model" by default) stays within
  a host where it fits. The axes are `AxisType.Auto`: jit propagates the
  shardings given at its boundary and by `with_logical_constraint`, which is
  what the steps of face_jax are written for (explicit-typed axes would
  make every operation check the shardings of its operands).

  Args:
    mesh_config: the `mesh` section: `axes` (names) and `shape` (sizes,
      one of them may be -1).
    devices: devices to use; all of `jax.devices()` when None. Every one
      of them is used.

  Returns:
    A `jax.sharding.Mesh`.

  Raises:
    ShardingError: when names and sizes differ in number, names repeat, or
      the sizes do not fit the devices.
  """
  axes = tuple(mesh_config.axes)
  if devices is None:
    devices = jax.devices()
  devices = list(devices)
  if len(axes) != len(mesh_config.shape):
    raise ShardingError(
      f"mesh.axes={axes} names {len(axes)} axes but mesh.shape="
      f"{tuple(mesh_config.shape)} gives {len(mesh_config.shape)} sizes; "
      "give one size per axis."
    )
  if len(set(axes)) != len(axes):
    raise ShardingError(f"mesh.axes={axes} repeats a name; names must differ.")
  shape = resolve_mesh_shape(mesh_config.shape, len(devices))
  auto = (AxisType.Auto,) * len(axes)
  return jax.make_mesh(shape, axes, axis_types=auto, devices=devices)


def mesh_axis_size(mesh: Mesh, axes: str | Sequence[str] | None) -> int:
  """Number of shards along one mesh axis or a tuple of them (1 for None)."""
  if axes is None:
    return 1
  if isinstance(axes, str):
    axes = (axes,)
  return math.prod(mesh.shape[axis] for axis in axes)
