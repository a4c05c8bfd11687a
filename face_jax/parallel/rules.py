"""Logical axis names, mapped onto mesh axes by the rules of the config.

Arrays are described by logical axes, one name (or None) per dimension:
`("users", "embed")` for the user table, `("batch",)` for batch indices,
`("vocab", "embed")` for the codebook. The rules, `config.mesh.rules`, map
each name to a mesh axis, a tuple of mesh axes, or None (replicated):

    rules = (("batch", "data"), ("users", "model"), ("embed", None), ...)

A name may have several rules; they are tried in order and the first one
that fits wins. A rule does not fit when its mesh axes are already used by
an earlier dimension of the same array, or when their size does not divide
the dimension. When no rule fits, the dimension is replicated (logged once
as a warning): sharding is a memory layout, so every configuration still
computes the same values, and the memory analysis shows what it costs.

Tables whose row count a mesh axis does not divide (11,000 users over 8
devices) are padded with `pad_rows_to` where they are created, so that they
can be sharded. Padded rows must never reach a computation over all rows
(full ranking, contrastive denominators): slice `[:num_rows]` first.

Inside jitted code, `with_logical_constraint(x, ("batch", "embed"))` pins an
intermediate's layout using the mesh and rules of the enclosing `use_mesh`
block, and does nothing outside one, so model code runs unchanged on one
device. (flax.linen's own logical-rules machinery maps names without looking
at shapes, so it cannot fall back for an indivisible dimension, and applies
constraints only under a global JAX mesh; this module carries both itself.)
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
from absl import logging
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from face_jax.parallel.mesh import ShardingError, mesh_axis_size

# One rule: (logical axis name, mesh axis | tuple of mesh axes | None).
Rule = tuple[str, str | tuple[str, ...] | None]
Rules = Sequence[Rule]
# One logical name (or None for "not sharded") per array dimension.
LogicalAxes = tuple[str | None, ...]

# (name, size, mesh axes) already reported as replicated; warn once each.
_WARNED: set[tuple[str, int, tuple[str, ...]]] = set()


def _target_axes(target) -> tuple[str, ...]:
  """A rule's target as a tuple of mesh axis names; () for None."""
  if target is None:
    return ()
  if isinstance(target, str):
    return (target,)
  return tuple(target)


def check_rules(rules: Rules, mesh: Mesh | None = None) -> None:
  """Raises ShardingError for a malformed rule or an unknown mesh axis."""
  for rule in rules:
    if (
      not isinstance(rule, tuple | list)
      or len(rule) != 2
      or not isinstance(rule[0], str)
    ):
      raise ShardingError(
        f"mesh.rules entry {rule!r} is not a (logical name, mesh axis) "
        "pair; write it as ('users', 'model') or ('embed', None)."
      )
    target = rule[1]
    is_axes = isinstance(target, tuple | list) and all(
      isinstance(axis, str) for axis in target
    )
    if not (target is None or isinstance(target, str) or is_axes):
      raise ShardingError(
        f"mesh.rules entry {tuple(rule)!r} maps to {target!r}; use a mesh "
        "axis name, a tuple of them, or None."
      )
    axes = _target_axes(target)
    if mesh is not None:
      unknown = [axis for axis in axes if axis not in mesh.axis_names]
      if unknown:
        raise ShardingError(
          f"mesh.rules entry {tuple(rule)!r} names mesh axes {unknown} "
          f"that the mesh {tuple(mesh.axis_names)} lacks; use its axis "
          "names or None."
        )


def logical_to_spec(
  logical_axes: LogicalAxes,
  rules: Rules,
  mesh: Mesh | None = None,
  shape: Sequence[int] | None = None,
) -> PartitionSpec:
  """The PartitionSpec that the rules give an array's logical axes.

  Args:
    logical_axes: one logical name or None per dimension.
    rules: (logical name, mesh axes) pairs, tried in order per name.
    mesh: when given with `shape`, rules whose mesh axes do not divide the
      dimension are skipped (replicated if none fits).
    shape: the array's shape, same length as `logical_axes`.

  Returns:
    A PartitionSpec with one entry per dimension.

  Raises:
    ShardingError: for a name without any rule, or a shape whose rank
      differs from the number of logical axes.
  """
  logical_axes = tuple(logical_axes)
  if shape is not None and len(shape) != len(logical_axes):
    raise ShardingError(
      f"Logical axes {logical_axes} name {len(logical_axes)} dimensions "
      f"but the array has shape {tuple(shape)}; give one name (or None) "
      "per dimension."
    )
  table: dict[str, list[tuple[str, ...]]] = {}
  for name, target in rules:
    table.setdefault(name, []).append(_target_axes(target))
  used: set[str] = set()
  spec = []
  for dim, name in enumerate(logical_axes):
    if name is None:
      spec.append(None)
      continue
    if name not in table:
      raise ShardingError(
        f"Logical axis {name!r} has no rule in mesh.rules (names with "
        f"rules: {sorted(table)}); add ({name!r}, <mesh axis or None>)."
      )
    chosen = _choose(name, table[name], used, dim, mesh, shape)
    used.update(chosen)
    spec.append(_spec_entry(chosen))
  return PartitionSpec(*spec)


def _choose(name, targets, used, dim, mesh, shape) -> tuple[str, ...]:
  """The first target of `name` that is free and divides the dimension."""
  checks_size = mesh is not None and shape is not None
  indivisible = []
  for axes in targets:
    if not axes:
      break
    if used.intersection(axes):
      continue
    if checks_size and shape[dim] % mesh_axis_size(mesh, axes):
      indivisible.append(axes)
      continue
    return axes
  if indivisible:
    _warn_replicated(name, shape[dim], indivisible[0], mesh)
  return ()


def _warn_replicated(name, size, axes, mesh) -> None:
  """Says once per (name, size, axes) that a dimension stays whole."""
  key = (name, size, axes)
  if key in _WARNED:
    return
  _WARNED.add(key)
  count = mesh_axis_size(mesh, axes)
  logging.warning(
    "Logical axis %r of size %d is not divisible by mesh axes %s (%d "
    "shards), so it is replicated; pad it with "
    "face_jax.parallel.pad_rows_to(x, %d) to shard it.",
    name,
    size,
    axes,
    count,
    count,
  )


def _spec_entry(axes: tuple[str, ...]):
  if not axes:
    return None
  return axes[0] if len(axes) == 1 else axes


def named_sharding(
  mesh: Mesh,
  rules: Rules,
  logical_axes: LogicalAxes,
  shape: Sequence[int] | None = None,
) -> NamedSharding:
  """NamedSharding on `mesh` for an array with these logical axes.

  With `shape`, mesh axes that do not divide a dimension are dropped for
  it (see `logical_to_spec`).
  """
  check_rules(rules, mesh)
  return NamedSharding(
    mesh, logical_to_spec(logical_axes, rules, mesh=mesh, shape=shape)
  )


def shard_count(mesh: Mesh, rules: Rules, name: str) -> int:
  """How many shards the first rule of `name` splits a dimension into.

  A table padded to a multiple of this (`pad_rows_to`) is sharded by that
  rule.
  """
  for rule_name, target in rules:
    if rule_name == name:
      return mesh_axis_size(mesh, _target_axes(target) or None)
  raise ShardingError(
    f"Logical axis {name!r} has no rule in mesh.rules; add "
    f"({name!r}, <mesh axis or None>)."
  )


def round_up(n: int, multiple: int) -> int:
  """The smallest multiple of `multiple` that is at least `n`."""
  if multiple < 1:
    raise ShardingError(f"Cannot round up to a multiple of {multiple}.")
  return -(-n // multiple) * multiple


def pad_rows_to(x: jax.Array, multiple: int, value: float = 0) -> jax.Array:
  """Pads axis 0 of `x` with `value` up to a multiple of `multiple`.

  Apply it where a table is created (inside the init function, after the
  initialiser has drawn the real rows, so their values do not depend on
  the padding) and keep the real row count next to the table: padded rows
  must be sliced off before any computation over all rows.

  Args:
    x: [rows, ...] array.
    multiple: the row count becomes a multiple of this.
    value: fill of the new rows.

  Returns:
    [round_up(rows, multiple), ...] array; `x` itself when no row is added.
  """
  rows = x.shape[0]
  extra = round_up(rows, multiple) - rows
  if not extra:
    return x
  widths = [(0, extra)] + [(0, 0)] * (x.ndim - 1)
  return jnp.pad(x, widths, constant_values=value)


@dataclasses.dataclass(frozen=True)
class MeshContext:
  """The mesh and rules that `with_logical_constraint` uses."""

  mesh: Mesh
  rules: tuple[Rule, ...]


_CONTEXT: contextvars.ContextVar[MeshContext | None] = contextvars.ContextVar(
  "face_jax_mesh_context", default=None
)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules) -> Iterator[MeshContext]:
  """Makes `mesh` and `rules` the ones model code shards by.

  Wrap the tracing of a step (the first call of a jitted function, or its
  `.lower`) in this block; `with_logical_constraint` inside it then pins
  layouts on `mesh`. The block is read when JAX traces, and JAX's trace
  cache does not know about it: a function already traced with the same
  arguments and jit options outside the block is reused unconstrained.
  Jit each step for its mesh (with that mesh's in/out shardings, which are
  part of the cache key) or compile it ahead of time inside the block.
  """
  check_rules(rules, mesh)
  context = MeshContext(mesh, tuple(tuple(rule) for rule in rules))
  token = _CONTEXT.set(context)
  try:
    yield context
  finally:
    _CONTEXT.reset(token)


def current_context() -> MeshContext | None:
  """The innermost active `use_mesh` context, or None."""
  return _CONTEXT.get()


def with_logical_constraint(
  x: jax.Array, logical_axes: LogicalAxes
) -> jax.Array:
  """Constrains the layout of `x` by logical axis names.

  Args:
    x: an array inside jitted code.
    logical_axes: one logical name or None per dimension of `x`.

  Returns:
    `x` with a sharding constraint from the active `use_mesh` block, or
    `x` unchanged when no block is active.
  """
  context = _CONTEXT.get()
  if context is None:
    return x
  spec = logical_to_spec(
    logical_axes, context.rules, mesh=context.mesh, shape=x.shape
  )
  return lax.with_sharding_constraint(x, NamedSharding(context.mesh, spec))
