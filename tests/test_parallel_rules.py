"""Logical axis names mapped onto mesh axes by the config's rules."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import base
from face_jax import parallel


def _mesh(shape):
  config = base.get_base_config().mesh
  config.shape = shape
  return parallel.make_mesh(config)


RULES = base.get_base_config().mesh.rules


def test_base_rules_map_names_to_mesh_axes():
  assert parallel.logical_to_spec(("batch", "embed"), RULES) == P("data", None)
  assert parallel.logical_to_spec(("users", "embed"), RULES) == P("model", None)
  assert parallel.logical_to_spec(("items", None), RULES) == P("model", None)
  assert parallel.logical_to_spec(("vocab", "embed"), RULES) == P("model", None)
  assert parallel.logical_to_spec(("embed", "heads", "kv"), RULES) == P(
    None, "model", None
  )
  assert parallel.logical_to_spec((), RULES) == P()


def test_tuple_targets_and_used_axes():
  rules = (
    ("batch", "data"),
    ("users", ("data", "model")),
    ("users", "model"),
    ("embed", None),
  )
  assert parallel.logical_to_spec(("users", "embed"), rules) == P(
    ("data", "model"), None
  )
  # "data" is taken by the batch, so users fall to their second rule.
  assert parallel.logical_to_spec(("batch", "users"), rules) == P(
    "data", "model"
  )
  # A mesh axis is used once per array; a repeated name is replicated.
  assert parallel.logical_to_spec(("users", "users"), rules) == P(
    ("data", "model"), None
  )


def test_indivisible_dimension_falls_back_in_rule_order(caplog):
  mesh = _mesh((4, 2))
  rules = (("users", ("data", "model")), ("users", "model"), ("embed", None))
  spec = parallel.logical_to_spec(("users", "embed"), rules, mesh, (16, 3))
  assert spec == P(("data", "model"), None)
  with caplog.at_level(logging.WARNING):
    # 6 rows: not a multiple of 8, but of 2; the second rule is no loss.
    spec = parallel.logical_to_spec(("users", "embed"), rules, mesh, (6, 3))
    assert spec == P("model", None)
    assert not caplog.text
    # 11 rows: no rule fits, replicated, with a warning saying what to do.
    spec = parallel.logical_to_spec(("users", "embed"), rules, mesh, (11, 3))
  assert spec == P(None, None)
  assert "pad_rows_to" in caplog.text
  assert "size 11" in caplog.text


def test_named_sharding_places_rows():
  mesh = _mesh((2, 4))
  sharding = parallel.named_sharding(mesh, RULES, ("users", "embed"), (12, 5))
  table = jax.device_put(np.arange(60.0).reshape(12, 5), sharding)
  assert {s.data.shape for s in table.addressable_shards} == {(3, 5)}


@pytest.mark.parametrize(
  ("logical", "shape", "message"),
  [
    (("userz", "embed"), None, r"'userz' has no rule .* add \('userz'"),
    (("users",), (4, 2), r"name 1 dimensions but the array has shape"),
  ],
)
def test_bad_logical_axes_raise(logical, shape, message):
  with pytest.raises(parallel.ShardingError, match=message):
    parallel.logical_to_spec(logical, RULES, _mesh((8, 1)), shape)


@pytest.mark.parametrize(
  ("rules", "message"),
  [
    ((("users",),), r"not a \(logical name, mesh axis\) pair"),
    ((("users", 3),), r"maps to 3"),
    ((("users", "tensor"),), r"\['tensor'\] that the mesh .* lacks"),
  ],
)
def test_bad_rules_raise(rules, message):
  with pytest.raises(parallel.ShardingError, match=message):
    parallel.check_rules(rules, _mesh((8, 1)))


def test_padding_helpers():
  mesh = _mesh((2, 4))
  assert parallel.shard_count(mesh, RULES, "users") == 4
  assert parallel.shard_count(mesh, RULES, "batch") == 2
  assert parallel.shard_count(mesh, RULES, "embed") == 1
  assert parallel.round_up(11, 4) == 12
  assert parallel.round_up(12, 4) == 12
  table = jnp.arange(22.0).reshape(11, 2)
  padded = parallel.pad_rows_to(table, 4)
  assert padded.shape == (12, 2)
  np.testing.assert_array_equal(padded[:11], table)
  np.testing.assert_array_equal(padded[11:], 0.0)
  assert parallel.pad_rows_to(table, 1) is table
  with pytest.raises(parallel.ShardingError, match="multiple of 0"):
    parallel.round_up(3, 0)


def test_with_logical_constraint_uses_the_active_mesh():
  mesh = _mesh((2, 4))

  def scale(x):
    return parallel.with_logical_constraint(2 * x, ("users", "embed"))

  x = jnp.ones((8, 6))
  # Outside use_mesh it is the identity, so model code runs on one device.
  assert parallel.with_logical_constraint(x, ("users", "embed")) is x
  assert parallel.current_context() is None
  with parallel.use_mesh(mesh, RULES) as context:
    assert parallel.current_context() is context
    out = jax.jit(scale)(x)
  assert parallel.current_context() is None
  assert out.sharding.is_equivalent_to(NamedSharding(mesh, P("model")), 2)
  np.testing.assert_array_equal(out, 2.0)


def test_use_mesh_checks_rules_against_the_mesh():
  with (
    pytest.raises(parallel.ShardingError, match="lacks"),
    parallel.use_mesh(_mesh((8, 1)), (("users", "tensor"),)),
  ):
    pass
