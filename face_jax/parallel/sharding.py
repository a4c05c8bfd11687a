"""Shardings for whole pytrees: born-sharded init, restore targets, inputs.

A pytree of arrays is described by a pytree of the same structure whose
leaves are logical axes (tuples of names, `()` for a scalar); such a tree
can also be derived from the arrays' key paths with `logical_axes_by_path`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from face_jax.parallel.mesh import ShardingError
from face_jax.parallel.rules import (
  LogicalAxes,
  Rules,
  check_rules,
  logical_to_spec,
)

PyTree = Any
# A pytree of logical axes, or a function from the abstract tree to one.
LogicalTree = PyTree | Callable[[PyTree], PyTree]


def is_logical_axes(x: Any) -> bool:
  """Whether `x` is a leaf of a logical-axes tree (a tuple of names)."""
  # Exactly a tuple: named tuples are tree nodes (optax's EmptyState is an
  # empty one).
  return x is None or (
    type(x) is tuple
    and all(isinstance(name, str) or name is None for name in x)
  )


def path_string(path: Sequence[Any]) -> str:
  """A key path as "params/encoder/kernel"."""
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      parts.append(key.name)
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    else:
      parts.append(str(key))
  return "/".join(parts)


AxesTable = Sequence[tuple[str, LogicalAxes | None]]


def _compile_table(table: AxesTable):
  return [
    (re.compile(pattern), None if axes is None else tuple(axes))
    for pattern, axes in table
  ]


def _lookup(compiled, name: str, shape: Sequence[int]) -> LogicalAxes | None:
  """The logical axes the first matching pattern gives the path `name`."""
  for pattern, axes in compiled:
    if pattern.fullmatch(name):
      if axes is not None and len(axes) != len(shape):
        raise ShardingError(
          f"{name!r} has shape {tuple(shape)} but pattern "
          f"{pattern.pattern!r} gives logical axes {axes}; give one name "
          "per dimension."
        )
      return axes
  raise ShardingError(
    f"No logical-axes pattern matches {name!r} (shape {tuple(shape)}); "
    "add one, or end the table with ('.*', None)."
  )


def logical_axes_by_path(tree: PyTree, table: AxesTable) -> PyTree:
  """Logical axes for each leaf of `tree`, looked up by its key path.

  Args:
    tree: arrays or `jax.ShapeDtypeStruct`s.
    table: (regular expression, logical axes) pairs; the first pattern
      that matches the whole path ("params/user", "layers_0/mlp_up/kernel")
      gives the leaf's axes (None: replicated). End with a (".*", None)
      entry to replicate everything not listed.

  Returns:
    A tree of the same structure with logical axes as leaves.

  Raises:
    ShardingError: for a leaf that no pattern matches, or axes whose
      count differs from the leaf's rank.
  """
  compiled = _compile_table(table)
  return jax.tree_util.tree_map_with_path(
    lambda path, leaf: _lookup(compiled, path_string(path), leaf.shape), tree
  )


def sharding_by_path(
  mesh: Mesh, rules: Rules, table: AxesTable
) -> Callable[[str, Sequence[int]], NamedSharding]:
  """A (path, shape) -> NamedSharding function from a path-pattern table.

  For loaders that place tensors one by one as they read them (the frozen
  LLM's safetensors), so that each device only ever receives its slice.

  Args:
    mesh: the device mesh.
    rules: logical-to-mesh rules.
    table: (regular expression, logical axes) pairs, as for
      `logical_axes_by_path`; paths are "/"-joined ("layers_0/mlp_up/kernel").

  Returns:
    The function; it raises ShardingError for a path no pattern matches.
  """
  check_rules(rules, mesh)
  compiled = _compile_table(table)

  def sharding(path: str, shape: Sequence[int]) -> NamedSharding:
    axes = _lookup(compiled, path, shape)
    if axes is None:
      return NamedSharding(mesh, PartitionSpec())
    return NamedSharding(mesh, logical_to_spec(axes, rules, mesh, shape))

  return sharding


def _resolve(logical: LogicalTree, shapes: PyTree) -> PyTree:
  return logical(shapes) if callable(logical) else logical


def tree_shardings(
  mesh: Mesh, rules: Rules, logical: LogicalTree, shapes: PyTree
) -> PyTree:
  """NamedShardings for every leaf of `shapes`.

  Args:
    mesh: the device mesh.
    rules: logical-to-mesh rules.
    logical: a tree of logical axes matching `shapes` (or a function from
      `shapes` to one). A leaf None means fully replicated.
    shapes: arrays or `jax.ShapeDtypeStruct`s.

  Returns:
    A tree like `shapes` with a NamedSharding at every leaf.
  """
  check_rules(rules, mesh)
  logical = _resolve(logical, shapes)
  logical_leaves, logical_def = jax.tree.flatten(
    logical, is_leaf=is_logical_axes
  )
  shape_leaves, shape_def = jax.tree.flatten(shapes)
  if logical_def != shape_def:
    raise ShardingError(
      f"The logical-axes tree {logical_def} does not match the array tree "
      f"{shape_def}; give one logical-axes tuple per array."
    )
  shardings = [
    NamedSharding(
      mesh,
      PartitionSpec()
      if axes is None
      else logical_to_spec(axes, rules, mesh, leaf.shape),
    )
    for axes, leaf in zip(logical_leaves, shape_leaves, strict=True)
  ]
  return shape_def.unflatten(shardings)


def abstract_target(
  shapes: PyTree, mesh: Mesh, rules: Rules, logical: LogicalTree
) -> PyTree:
  """`jax.ShapeDtypeStruct`s carrying the shardings of `mesh`.

  Pass the result to orbax (`ocp.args.StandardRestore(target)`) to restore
  a checkpoint onto this mesh, whatever the mesh it was written from; or to
  `jax.jit(...).lower` to compile a step without allocating its inputs.

  Args:
    shapes: arrays or ShapeDtypeStructs (for example `jax.eval_shape` of
      the init function); only shapes and dtypes are read.
    mesh: the mesh to place the restored arrays on.
    rules: logical-to-mesh rules.
    logical: logical axes for `shapes` (tree or function, see
      `tree_shardings`).

  Returns:
    A tree of ShapeDtypeStructs with `sharding` set.
  """
  shardings = tree_shardings(mesh, rules, logical, shapes)
  return jax.tree.map(
    lambda leaf, sharding: jax.ShapeDtypeStruct(
      leaf.shape, leaf.dtype, sharding=sharding
    ),
    shapes,
    shardings,
  )


def sharded_init(
  init_fn: Callable[[jax.Array], PyTree],
  rng: jax.Array,
  mesh: Mesh,
  rules: Rules,
  logical: LogicalTree,
) -> PyTree:
  """Runs `init_fn(rng)` so that every output is created already sharded.

  The shapes come from `jax.eval_shape` (nothing is allocated), the
  shardings from the rules, and the init runs under `jax.jit` with those
  out_shardings, so no device ever holds a whole sharded table. The values
  equal those of an unsharded `init_fn(rng)`: JAX's partitionable
  threefry draws the same random bits whatever the layout.

  Args:
    init_fn: rng -> pytree of arrays.
    rng: PRNG key.
    mesh: the device mesh.
    rules: logical-to-mesh rules.
    logical: logical axes of the outputs (tree, or function of the
      abstract output tree such as a `logical_axes_by_path` partial).

  Returns:
    The initialised pytree, sharded over `mesh`.
  """
  shapes = jax.eval_shape(init_fn, rng)
  shardings = tree_shardings(mesh, rules, logical, shapes)
  return jax.jit(init_fn, out_shardings=shardings)(rng)


def place_global(tree: PyTree, shardings: PyTree) -> PyTree:
  """Places host values (or arrays on one device) as global arrays.

  Works the same on one host and on several: each process passes the same
  global value (a frozen table read from the same file, a batch drawn from
  the same seed, a key from the same seed) and transfers only the slices
  its own devices hold (`jax.make_array_from_callback`). `jax.device_put`
  cannot do this: it refuses shardings over other processes' devices.

  Args:
    tree: numpy arrays, scalars, or JAX arrays (including PRNG keys, which
      go replicated).
    shardings: a tree of Shardings like `tree`, or one for all leaves.

  Returns:
    The same tree as global jax.Arrays; leaves already laid out as asked
    are returned as they are.
  """
  if isinstance(shardings, jax.sharding.Sharding):
    one = shardings
    shardings = jax.tree.map(lambda _: one, tree)

  def place(leaf, sharding):
    if isinstance(leaf, jax.Array):
      if leaf.sharding == sharding:
        return leaf
      if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        data = place(jax.random.key_data(leaf), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
      if not leaf.is_fully_addressable:
        # Already global: a collective reshard.
        return jax.device_put(leaf, sharding)
    host = np.asarray(leaf)
    return jax.make_array_from_callback(
      host.shape, sharding, lambda index: host[index]
    )

  return jax.tree.map(place, tree, shardings)


def shard_tree(
  tree: PyTree, mesh: Mesh, rules: Rules, logical: LogicalTree
) -> PyTree:
  """Places host values (or arrays on other layouts) by logical axes.

  Host values are assembled with `place_global`, so on several hosts each
  process transfers only the shards its devices own (every process must
  hold the same global value, e.g. a frozen LLM table read from the same
  file, or a batch drawn from the same seed).

  Args:
    tree: numpy or JAX arrays.
    mesh: the device mesh.
    rules: logical-to-mesh rules.
    logical: logical axes of `tree` (tree or function).

  Returns:
    The same tree as global jax.Arrays sharded over `mesh`.
  """
  return place_global(tree, tree_shardings(mesh, rules, logical, tree))


def to_host(tree: PyTree) -> PyTree:
  """Every leaf whole as a numpy array, on every process.

  A leaf whose shards all lie on this process's devices (every leaf in a
  one-process job), or that every device holds whole, is read directly.
  A leaf sharded across processes is all-gathered, so this is a collective
  on several hosts: every process must call it with the same tree, in the
  same order, or the job hangs.

  Args:
    tree: jax or numpy arrays (numpy leaves are returned as they are).

  Returns:
    The tree with numpy leaves of the same global shapes.
  """

  def fetch(leaf):
    if not isinstance(leaf, jax.Array):
      return np.asarray(leaf)
    if leaf.is_fully_addressable or leaf.is_fully_replicated:
      return np.asarray(leaf)
    return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))

  return jax.tree.map(fetch, tree)
