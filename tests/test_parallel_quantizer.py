"""The quantiser and FACE over a vocabulary-sharded codebook."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import base
from face_jax import parallel
from face_jax.models import face, quantizer
from face_jax.parallel import search

RULES = base.get_base_config().mesh.rules
# (data, model): the vocabulary rule puts the codebook rows on "model".
VOCAB_MESHES = [(4, 2), (2, 4), (1, 8)]


def _mesh(shape):
  config = base.get_base_config().mesh
  config.shape = shape
  return parallel.make_mesh(config)


def _naive_greedy(z, codebook):
  """Word-by-word argmin over the untaken rows, float64, lowest index."""
  dist = ((z[:, :, None, :] - codebook[None, None]) ** 2).sum(-1)
  chosen = np.zeros(z.shape[:2], np.int64)
  for entity in range(z.shape[0]):
    taken = set()
    for word in range(z.shape[1]):
      row = dist[entity, word].copy()
      row[list(taken)] = np.inf
      chosen[entity, word] = np.argmin(row)
      taken.add(chosen[entity, word])
  return chosen


@pytest.fixture
def sharded_calls(monkeypatch):
  """Counts the traces that took the shard-by-shard search."""
  calls = []
  original = search.sharded_top_w

  def counting(*args, **kwargs):
    calls.append(kwargs["vocab_axis"])
    return original(*args, **kwargs)

  monkeypatch.setattr(search, "sharded_top_w", counting)
  return calls


@pytest.mark.parametrize("shape", VOCAB_MESHES)
def test_quantize_on_a_sharded_codebook_equals_greedy(shape, sharded_calls):
  # Small integers: exact distances with many ties. 61 real rows padded to
  # 64; the padding rows sit on the first queries, so an unmasked search
  # would pick them first.
  rng = np.random.default_rng(5)
  z = rng.integers(-2, 3, (6, 4, 3)).astype(np.float32)
  real = rng.integers(-2, 3, (61, 3)).astype(np.float32)
  codebook = np.concatenate([real, z[0, :3]])
  mesh = _mesh(shape)
  rows = parallel.named_sharding(mesh, RULES, ("vocab", "embed"), (64, 3))
  assert rows.spec == P("model", None)

  def run(z, codebook):
    out = quantizer.quantize(z, codebook, chunk=5, num_valid=61)
    return out.token_index, out.z_q

  with parallel.use_mesh(mesh, RULES):
    index, z_q = jax.jit(run, in_shardings=(None, rows))(z, codebook)
  assert sharded_calls == [("model",)]
  want = _naive_greedy(np.float64(z), np.float64(real))
  np.testing.assert_array_equal(index, want)
  np.testing.assert_array_equal(z_q, real[want])
  # The same call outside a mesh block searches locally.
  np.testing.assert_array_equal(jax.jit(run)(z, codebook)[0], want)
  assert len(sharded_calls) == 1


def test_indivisible_codebook_is_searched_locally(sharded_calls):
  # 63 rows over 4 shards: the rules keep "vocab" whole (replicated), and
  # the search follows the layout.
  rng = np.random.default_rng(6)
  z = rng.integers(-2, 3, (4, 4, 3)).astype(np.float32)
  codebook = rng.integers(-2, 3, (63, 3)).astype(np.float32)
  with parallel.use_mesh(_mesh((2, 4)), RULES):
    index = jax.jit(lambda z, c: quantizer.quantize(z, c, 8).token_index)(
      z, codebook
    )
  assert sharded_calls == []
  np.testing.assert_array_equal(
    index, _naive_greedy(np.float64(z), np.float64(codebook))
  )


def test_num_valid_out_of_range_raises():
  with pytest.raises(quantizer.QuantizerError, match="num_valid=9"):
    quantizer.quantize(jnp.zeros((2, 4, 3)), jnp.zeros((8, 3)), 4, 9)


_MODEL = face.FACE(
  embed_dim=8, token_dim=6, num_words=4, word_dim=5, ff_dim=16, chunk_size=5
)
_ENTITIES, _VOCAB = 12, 64


@functools.cache
def _inputs():
  # Parameters of FACE's shapes drawn on the host (compiling the init
  # would double the cost of this file); their values need not be FACE's.
  rng = np.random.default_rng(20)
  table = rng.normal(size=(_VOCAB, 6)).astype(np.float32)
  x = rng.normal(size=(_ENTITIES, 8)).astype(np.float32)
  shapes = jax.eval_shape(
    functools.partial(face.init_params, _MODEL), jax.random.key(0), table
  )
  params = jax.tree.map(
    lambda leaf: rng.normal(0.0, 0.5, leaf.shape).astype(np.float32), shapes
  )
  return params, x, table


def _forward_and_grads(mesh=None):
  """FACE's outputs and the gradient of vq + recon, on `mesh` or one
  device (no mesh block)."""
  params, x, table = _inputs()

  def loss(params, x, table):
    out = _MODEL.apply({"params": params}, x, table, deterministic=True)
    return out["vq_loss"] + out["recon_loss"], out

  step = jax.value_and_grad(loss, has_aux=True)
  if mesh is None:
    return jax.jit(step)(params, x, table)
  replicated = NamedSharding(mesh, P())
  shardings = (
    replicated,
    parallel.named_sharding(mesh, RULES, ("batch", "embed"), x.shape),
    parallel.named_sharding(mesh, RULES, ("vocab", "embed"), table.shape),
  )
  with parallel.use_mesh(mesh, RULES):
    return jax.jit(step, in_shardings=shardings)(params, x, table)


@functools.cache
def _unsharded():
  return _forward_and_grads()


def test_unsharded_choices_are_well_separated():
  # The parity test below compares discrete choices; it is only robust if
  # no chosen token is within rounding of the next best one.
  params, _, table = _inputs()
  (_, out), _ = _unsharded()
  host = jax.tree.map(lambda leaf: np.asarray(leaf, np.float64), params)
  codebook = (
    np.asarray(table, np.float64) @ host["codebook_map"]["kernel"]
    + host["codebook_map"]["bias"]
  )
  z_e = np.asarray(out["z_e"], np.float64)
  index = np.asarray(out["token_index"])
  np.testing.assert_array_equal(index, _naive_greedy(z_e, codebook))
  dist = ((z_e[:, :, None] - codebook[None, None]) ** 2).sum(-1)
  for entity in range(_ENTITIES):
    for word in range(4):
      row = dist[entity, word].copy()
      row[index[entity, :word]] = np.inf
      chosen = row[index[entity, word]]
      row[index[entity, word]] = np.inf
      assert row.min() - chosen > 1e-3


@pytest.mark.parametrize("shape", VOCAB_MESHES)
def test_face_with_sharded_vocabulary_equals_unsharded(shape, sharded_calls):
  (loss, out), grads = _forward_and_grads(_mesh(shape))
  assert sharded_calls == [("model",)]
  (want_loss, want_out), want_grads = _unsharded()
  np.testing.assert_array_equal(out["token_index"], want_out["token_index"])
  for name in ("z_e", "z_q", "decoded", "vq_loss", "recon_loss"):
    np.testing.assert_allclose(
      out[name], want_out[name], rtol=1e-5, atol=1e-6, err_msg=name
    )
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  jax.tree.map(
    functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6),
    grads,
    want_grads,
  )
  # The codebook map really receives a gradient through the sharded rows.
  assert float(jnp.abs(grads["codebook_map"]["kernel"]).max()) > 0
