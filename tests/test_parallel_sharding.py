"""Born-sharded init, placement by logical axes and resharding restores."""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

from configs import base
from face_jax import parallel
from face_jax.data import Dataset
from face_jax.llm import layout, load_llm
from face_jax.models import backbones

RULES = base.get_base_config().mesh.rules
MESH_SHAPES = [(8, 1), (4, 2), (2, 4), (1, 8)]

# Logical axes of the toy parameters below, by key path.
AXES_TABLE = (
  ("user", ("users", "embed")),
  ("item", ("items", "embed")),
  ("face/kernel", ("words", "embed", "embed")),
  ("face/bias", ("embed",)),
  ("step", ()),
)


def _mesh(shape, devices=None):
  config = base.get_base_config().mesh
  config.shape = shape
  return parallel.make_mesh(config, devices)


def _init(rng):
  user_rng, item_rng, face_rng = jax.random.split(rng, 3)
  xavier = jax.nn.initializers.xavier_uniform()
  return {
    "user": xavier(user_rng, (16, 8)),
    "item": xavier(item_rng, (24, 8)),
    "face": {
      "kernel": jax.random.normal(face_rng, (4, 8, 6)),
      "bias": jnp.arange(6.0),
    },
    "step": jnp.zeros((), jnp.int32),
  }


LOGICAL = functools.partial(parallel.logical_axes_by_path, table=AXES_TABLE)


@functools.cache
def _unsharded_init():
  return jax.jit(_init)(jax.random.key(3))


@pytest.mark.parametrize("shape", MESH_SHAPES)
def test_sharded_init_equals_unsharded(shape):
  mesh = _mesh(shape)
  params = parallel.sharded_init(_init, jax.random.key(3), mesh, RULES, LOGICAL)
  expected = _unsharded_init()
  jax.tree.map(np.testing.assert_array_equal, params, expected)
  assert params["user"].sharding.spec == P("model", None)
  assert params["face"]["kernel"].sharding.spec == P(None, None, None)
  rows = 16 // shape[1]
  assert {s.data.shape for s in params["user"].addressable_shards} == {
    (rows, 8)
  }


def test_logical_axes_by_path_errors():
  shapes = jax.eval_shape(_init, jax.random.key(0))
  with pytest.raises(parallel.ShardingError, match="No logical-axes pattern"):
    parallel.logical_axes_by_path(shapes, AXES_TABLE[:2])
  bad = (("user", ("users",)), (".*", None))
  with pytest.raises(parallel.ShardingError, match=r"'user' has shape"):
    parallel.logical_axes_by_path(shapes, bad)


def test_tree_shardings_rejects_a_mismatched_tree():
  shapes = {"user": jax.ShapeDtypeStruct((16, 8), jnp.float32)}
  with pytest.raises(parallel.ShardingError, match="does not match"):
    parallel.tree_shardings(_mesh((8, 1)), RULES, {"item": ("items",)}, shapes)


def test_shard_tree_places_host_arrays():
  mesh = _mesh((2, 4))
  tree = {"user": np.arange(32.0).reshape(8, 4), "index": np.arange(6)}
  logical = {"user": ("users", "embed"), "index": ("batch",)}
  placed = parallel.shard_tree(tree, mesh, RULES, logical)
  np.testing.assert_array_equal(placed["user"], tree["user"])
  np.testing.assert_array_equal(placed["index"], tree["index"])
  assert placed["user"].sharding.spec == P("model", None)
  assert placed["index"].sharding.spec == P("data")
  # Arrays already on devices move to the new layout.
  moved = parallel.shard_tree(
    placed, mesh, RULES, {"user": ("batch", None), "index": None}
  )
  np.testing.assert_array_equal(moved["user"], tree["user"])
  assert moved["user"].sharding.spec == P("data", None)
  assert moved["index"].sharding.spec == P()


def test_checkpoint_from_8_devices_restores_on_4_and_1(tmp_path):
  mesh8 = _mesh((2, 4))
  params = parallel.sharded_init(
    _init, jax.random.key(5), mesh8, RULES, LOGICAL
  )
  manager = ocp.CheckpointManager(
    tmp_path, options=ocp.CheckpointManagerOptions(max_to_keep=1)
  )
  manager.save(
    7,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(params),
      loop=ocp.args.JsonSave({"epoch": 2}),
    ),
  )
  manager.wait_until_finished()
  shapes = jax.eval_shape(_init, jax.random.key(0))
  for mesh in (
    _mesh((2, 2), jax.devices()[:4]),
    _mesh((1, 1), [jax.devices()[5]]),
  ):
    target = parallel.abstract_target(shapes, mesh, RULES, LOGICAL)
    restored = manager.restore(
      manager.latest_step(),
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target),
        loop=ocp.args.JsonRestore(),
      ),
    )
    jax.tree.map(np.testing.assert_array_equal, restored.state, params)
    assert restored.loop == {"epoch": 2}
    user = restored.state["user"]
    assert user.sharding.mesh.devices.size == mesh.devices.size
    assert user.sharding.spec == P("model", None)
    assert {s.device for s in user.addressable_shards} == set(mesh.devices.flat)
  manager.close()


def _toy_dataset():
  rng = np.random.default_rng(0)
  train = np.stack([rng.integers(0, 16, 64), rng.integers(0, 24, 64)], 1)
  empty = np.zeros((0, 2), np.int32)
  return Dataset("toy", 16, 24, train.astype(np.int32), empty, empty)


def _mf_step(backbone, optimizer):
  def step(params, opt_state, batch):
    def loss_fn(params):
      terms, _ = backbone.losses(params, None, batch, jax.random.key(0))
      return sum(terms.values())

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


@functools.cache
def _mf_problem():
  """MF, Adam, one batch, and the step's result on one device."""
  config = base.get_base_config().model
  config.backbone = "mf"
  config.embed_dim = 8
  backbone, _ = backbones.build(config, _toy_dataset())
  optimizer = optax.adam(1e-2)
  rng = np.random.default_rng(1)
  batch = {
    name: rng.integers(0, size, 16).astype(np.int32)
    for name, size in (("user", 16), ("pos", 24), ("neg", 24))
  }
  step = _mf_step(backbone, optimizer)
  device = jax.devices()[0]
  params = jax.device_put(backbone.init(jax.random.key(2)), device)
  want = jax.jit(step)(params, optimizer.init(params), batch)
  return backbone, optimizer, batch, step, want


@pytest.mark.parametrize("shape", MESH_SHAPES)
def test_sharded_mf_step_equals_single_device(shape):
  backbone, optimizer, batch, step, want = _mf_problem()
  want_params, _, want_loss = want
  mesh = _mesh(shape)
  table = (("user", ("users", "embed")), ("item", ("items", "embed")))
  param_logical = functools.partial(parallel.logical_axes_by_path, table=table)
  params = parallel.sharded_init(
    backbone.init, jax.random.key(2), mesh, RULES, param_logical
  )
  opt_state = jax.jit(optimizer.init)(params)
  batch_logical = {name: ("batch",) for name in batch}
  batch = parallel.shard_tree(batch, mesh, RULES, batch_logical)
  param_shardings = parallel.tree_shardings(mesh, RULES, param_logical, params)
  sharded_step = jax.jit(step, out_shardings=(param_shardings, None, None))
  got_params, _, got_loss = sharded_step(params, opt_state, batch)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  jax.tree.map(
    functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7),
    got_params,
    want_params,
  )
  assert got_params["user"].sharding.spec == P("model", None)


# Logical axes of frozen-LLM weights by flax parameter path (BERT and
# decoder names), as the loader places tensors one by one.
LLM_AXES = layout.WEIGHT_AXES
_FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "llm"


@pytest.mark.parametrize(
  ("path", "shape", "spec"),
  [
    ("embed_tokens/embedding", (64, 16), P("model", None)),
    ("layers_3/attention/query/kernel", (16, 32), P(None, "model")),
    ("layers_3/attention/key/bias", (8,), P("model")),
    ("layers_3/attention/out/kernel", (32, 16), P("model", None)),
    ("layers_0/mlp_gate/kernel", (16, 48), P(None, "model")),
    ("layers_0/mlp_down/kernel", (48, 16), P("model", None)),
    ("final_norm/scale", (16,), P()),
    # 6 key features do not split 4 ways: replicated.
    ("layers_0/attention/key/kernel", (16, 6), P(None, None)),
  ],
)
def test_sharding_by_path_for_llm_weights(path, shape, spec):
  sharding = parallel.sharding_by_path(_mesh((2, 4)), RULES, LLM_AXES)
  assert sharding(path, shape).spec == spec


def test_tiny_qwen2_loads_sharded_and_encodes_alike():
  # Every tensor placed by WEIGHT_AXES as it is read, on a (2, 4) mesh.
  mesh = _mesh((2, 4))
  config = base.get_base_config().llm
  config.model = str(_FIXTURES / "tiny_qwen2")
  sharded = load_llm(
    config, shardings=parallel.sharding_by_path(mesh, RULES, LLM_AXES)
  )
  params = sharded.params
  assert params["embed_tokens"]["embedding"].sharding.spec == P("model", None)
  layer = params["layers_1"]
  assert layer["attention"]["query"]["kernel"].sharding.spec == P(None, "model")
  assert layer["attention"]["key"]["bias"].sharding.spec == P("model")
  assert layer["mlp_down"]["kernel"].sharding.spec == P("model", None)
  assert layer["input_norm"]["scale"].sharding.spec == P()
  reference = np.load(_FIXTURES / "tiny_qwen2.npz")
  pooled = jax.jit(sharded.encode_ids)(
    params, reference["input_ids"], reference["mask"]
  )
  np.testing.assert_allclose(pooled, reference["pooled"], atol=1e-5)


def test_sharding_by_path_without_a_match_raises():
  sharding = parallel.sharding_by_path(_mesh((2, 4)), RULES, LLM_AXES[:-1])
  with pytest.raises(parallel.ShardingError, match="final_norm/scale"):
    sharding("final_norm/scale", (16,))


def test_padded_table_is_born_sharded():
  # 11 users do not split over 4 model shards: draw the 11 real rows, pad
  # to 12 inside the init, and the table is created already split.
  mesh = _mesh((2, 4))
  multiple = parallel.shard_count(mesh, RULES, "users")

  def init(rng):
    real = jax.nn.initializers.xavier_uniform()(rng, (11, 8))
    return {"user": parallel.pad_rows_to(real, multiple)}

  params = parallel.sharded_init(
    init, jax.random.key(0), mesh, RULES, {"user": ("users", "embed")}
  )
  real = jax.jit(jax.nn.initializers.xavier_uniform(), static_argnums=1)(
    jax.random.key(0), (11, 8)
  )
  assert params["user"].shape == (12, 8)
  assert params["user"].sharding.spec == P("model", None)
  np.testing.assert_array_equal(params["user"][:11], real)
  np.testing.assert_array_equal(params["user"][11:], 0.0)
