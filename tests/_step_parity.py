"""One train step on several meshes against the same step on one device.

Any stage's step can be checked: `setup(mesh)` builds the stage for a mesh
(state created there, tables padded as that mesh needs, step compiled for
it) and returns a `StepCase`; the helper runs one step on a single-device
mesh and on each mesh shape and compares the loss terms and the whole new
state. Leaves larger on a mesh (rows padded to its shard count) are
compared on the reference's rows; their extra rows must be zeros.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from configs import base
from face_jax import parallel

# The mesh shapes (data, model) of the checks on 8 devices.
MESH_SHAPES = ((8, 1), (4, 2), (2, 4), (1, 8))


@dataclasses.dataclass(frozen=True)
class StepCase:
  """A stage's step and its arguments on one mesh.

  Attributes:
    step: (state, batch, graph, rng) -> (state, metrics), jitted or
      compiled for the mesh.
    state: the train state, laid out on the mesh.
    batch: one batch (host arrays).
    graph: the constants argument, placed on the mesh.
    rng: base rng of the step.
  """

  step: Callable
  state: Any
  batch: Any
  graph: Any
  rng: jax.Array


@dataclasses.dataclass(frozen=True)
class StepResult:
  """One step's outcome on one mesh.

  Attributes:
    case: what ran (its step can run again; its state was donated).
    state: the new state, as the step left it on the mesh.
    metrics: the step's loss terms.
  """

  case: StepCase
  state: Any
  metrics: dict[str, jax.Array]


def make_mesh(shape: Sequence[int]) -> Mesh:
  """A (data, model) mesh of the first prod(shape) devices."""
  config = base.get_base_config().mesh
  config.shape = tuple(shape)
  return parallel.make_mesh(config, jax.devices()[: int(np.prod(shape))])


def run_step(case: StepCase) -> StepResult:
  """Runs one step of `case`."""
  state, metrics = case.step(case.state, case.batch, case.graph, case.rng)
  return StepResult(case, state, metrics)


def crop_like(value: np.ndarray, reference: np.ndarray) -> np.ndarray:
  """`value` cut to `reference`'s shape; what is cut off must be zero."""
  value = np.asarray(value)
  if value.shape == reference.shape:
    return value
  assert value.ndim == reference.ndim, (value.shape, reference.shape)
  kept = tuple(slice(0, size) for size in reference.shape)
  extra = value.copy()
  extra[kept] = 0
  np.testing.assert_array_equal(extra, 0, err_msg="padding is not zero")
  return value[kept]


def assert_trees_close(
  tree, reference, rtol: float, atol: float, label: str = ""
) -> None:
  """Leaf-by-leaf allclose after cropping padded rows, path in messages."""
  leaves = jax.tree_util.tree_leaves_with_path(reference)
  values = jax.tree.leaves(tree)
  assert len(values) == len(leaves)
  for (path, want), value in zip(leaves, values, strict=True):
    want = np.asarray(want)
    np.testing.assert_allclose(
      crop_like(value, want),
      want,
      rtol=rtol,
      atol=atol,
      err_msg=f"{label} {jax.tree_util.keystr(path)}",
    )


def assert_step_matches_single_device(
  setup: Callable[[Mesh], StepCase],
  mesh_shapes: Sequence[Sequence[int]] = MESH_SHAPES,
  *,
  rtol: float = 1e-5,
  atol: float = 1e-6,
  noise_params: str | None = None,
) -> dict[tuple[int, ...], StepResult]:
  """One step on each mesh equals the single-device step.

  Args:
    setup: mesh -> the stage's StepCase on that mesh.
    mesh_shapes: (data, model) sizes to check.
    rtol: relative tolerance (summation order differs between layouts).
    atol: absolute tolerance.
    noise_params: a regular expression over the key paths of params
      (`jax.tree_util.keystr`, "['face']['encoder']['key']['bias']")
      whose gradient is zero in exact arithmetic (an attention key bias:
      softmax ignores a shift shared by all keys). Adam's first step moves
      a parameter by lr * g / (|g| + eps), so such a parameter moves by a
      rounding-dependent part of lr; its new value is not compared, its
      moments (0.1 * g, 0.001 * g**2) are, as every other leaf.

  Returns:
    mesh shape -> its StepResult, the reference under (1, 1).
  """
  reference = run_step(setup(make_mesh((1, 1))))
  results = {(1, 1): reference}
  for shape in mesh_shapes:
    result = run_step(setup(make_mesh(shape)))
    assert sorted(result.metrics) == sorted(reference.metrics)
    for name, value in reference.metrics.items():
      np.testing.assert_allclose(
        result.metrics[name],
        value,
        rtol=rtol,
        atol=atol,
        err_msg=f"{shape} {name}",
      )
    got, want = result.state, reference.state
    if noise_params is not None:
      got, want = (
        state.replace(params=_drop_matching(state.params, noise_params))
        for state in (got, want)
      )
    assert_trees_close(got, want, rtol, atol, str(shape))
    results[tuple(shape)] = result
  return results


def _drop_matching(tree, pattern: str):
  """`tree` with the leaves whose key path matches `pattern` set to 0."""
  compiled = re.compile(pattern)
  return jax.tree_util.tree_map_with_path(
    lambda path, leaf: (
      np.zeros(()) if compiled.search(jax.tree_util.keystr(path)) else leaf
    ),
    tree,
  )
