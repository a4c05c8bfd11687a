"""FACE module: layers against numpy, initialisation, losses and gradients."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from face_jax.models import face


def _np(tree):
  return jax.tree.map(lambda leaf: np.asarray(leaf, np.float64), tree)


def _np_dense(params, x):
  return x @ params["kernel"] + params["bias"]


def _np_layer_norm(params, x, eps=1e-5):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * params["scale"] + params["bias"]


def _np_encoder_layer(params, x, num_heads=1):
  """Post-norm self-attention + ReLU feed-forward, as in torch's layer."""
  n, length, width = x.shape
  head_dim = width // num_heads

  def heads(name):
    return _np_dense(params[name], x).reshape(n, length, num_heads, head_dim)

  scores = np.einsum("nqhc,nkhc->nhqk", heads("query"), heads("key"))
  scores /= math.sqrt(head_dim)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  context = np.einsum("nhqk,nkhc->nqhc", weights, heads("value"))
  attended = _np_dense(params["out"], context.reshape(n, length, width))
  x = _np_layer_norm(params["norm1"], x + attended)
  hidden = np.maximum(_np_dense(params["ff1"], x), 0.0)
  return _np_layer_norm(params["norm2"], x + _np_dense(params["ff2"], hidden))


def _init_layer(layer, rng, x):
  return jax.jit(functools.partial(layer.init, deterministic=True))(rng, x)


@pytest.mark.parametrize("num_heads", [1, 2])
def test_encoder_layer_matches_numpy(num_heads):
  layer = face.EncoderLayer(num_heads=num_heads, ff_dim=32)
  x = jax.random.normal(jax.random.key(0), (3, 5, 8))
  params = _init_layer(layer, jax.random.key(1), x)["params"]
  # Deterministic: no dropout, whatever dropout rng is passed.
  out = layer.apply(
    {"params": params},
    x,
    deterministic=True,
    rngs={"dropout": jax.random.key(2)},
  )
  expected = _np_encoder_layer(
    _np(params), np.asarray(x, np.float64), num_heads
  )
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_encoder_layer_dropout_only_in_training():
  layer = face.EncoderLayer(ff_dim=32)
  x = jax.random.normal(jax.random.key(0), (3, 5, 8))
  params = _init_layer(layer, jax.random.key(1), x)
  key_a, key_b = jax.random.key(2), jax.random.key(3)

  def run(deterministic, key, model=layer):
    return model.apply(
      params, x, deterministic=deterministic, rngs={"dropout": key}
    )

  reference = run(True, key_a)
  np.testing.assert_array_equal(reference, run(True, key_b))
  assert not np.allclose(run(False, key_a), reference, atol=1e-3)
  assert not np.allclose(run(False, key_a), run(False, key_b), atol=1e-3)
  np.testing.assert_array_equal(run(False, key_a), run(False, key_a))
  no_dropout = face.EncoderLayer(ff_dim=32, dropout_rate=0.0)
  np.testing.assert_allclose(
    run(False, key_a, no_dropout), reference, rtol=1e-6
  )


def test_dropout_sits_on_the_residual_branches():
  # With every dropout dropping everything, both branches vanish and only
  # the residual stream and the two post-norms remain: LN2(LN1(x)). Dropout
  # on the residual stream or after a norm would give something else.
  layer = face.EncoderLayer(ff_dim=32, dropout_rate=1.0)
  x = jax.random.normal(jax.random.key(0), (2, 4, 8))
  params = _init_layer(layer, jax.random.key(1), x)["params"]
  out = layer.apply(
    {"params": params},
    x,
    deterministic=False,
    rngs={"dropout": jax.random.key(0)},
  )
  host = _np(params)
  expected = _np_layer_norm(
    host["norm2"], _np_layer_norm(host["norm1"], np.asarray(x, np.float64))
  )
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_encoder_layer_init_follows_torch_defaults():
  width, ff_dim = 64, 256
  layer = face.EncoderLayer(ff_dim=ff_dim)
  x = jnp.zeros((1, 2, width))
  params = _np(_init_layer(layer, jax.random.key(0), x)["params"])

  def spans(values, bound):
    # Uniform on [-bound, bound]: inside it and reaching close to its ends.
    return np.abs(values).max() <= bound and np.abs(values).max() > 0.95 * bound

  in_bound = math.sqrt(6.0 / (4 * width))  # Xavier over [3 * width, width]
  for name in ("query", "key", "value"):
    assert spans(params[name]["kernel"], in_bound)
    np.testing.assert_array_equal(params[name]["bias"], 0.0)
  assert spans(params["out"]["kernel"], 1 / math.sqrt(width))
  np.testing.assert_array_equal(params["out"]["bias"], 0.0)
  for name, fan_in in (("ff1", width), ("ff2", ff_dim)):
    assert spans(params[name]["kernel"], 1 / math.sqrt(fan_in))
    assert spans(params[name]["bias"], 1 / math.sqrt(fan_in))
  for name in ("norm1", "norm2"):
    np.testing.assert_array_equal(params[name]["scale"], 1.0)
    np.testing.assert_array_equal(params[name]["bias"], 0.0)


def _projection(init_name, num_words, in_dim, word_dim):
  module = face.DisentangledProjection(num_words, word_dim, init_name)
  x = jax.random.normal(jax.random.key(5), (3, in_dim))
  params = jax.jit(module.init)(jax.random.key(4), x)["params"]
  return module, params, x


def test_projection_flat_init_is_the_authors():
  # torch orthogonal_ on (W, d, word_dim): W orthonormal rows of d*word_dim.
  module, params, x = _projection("flat", 4, 8, 6)
  kernel = np.asarray(params["kernel"], np.float64)
  assert kernel.shape == (4, 8, 6)
  rows = kernel.reshape(4, -1)
  np.testing.assert_allclose(rows @ rows.T, np.eye(4), atol=1e-5)
  out = module.apply({"params": params}, x)
  assert out.shape == (3, 4, 6)
  expected = np.einsum("nd,wdk->nwk", np.asarray(x), kernel) + np.asarray(
    params["bias"]
  )
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("in_dim", "word_dim"), [(8, 8), (8, 6), (6, 8)])
def test_projection_per_map_init_is_orthogonal_per_map(in_dim, word_dim):
  _, params, _ = _projection("per_map", 4, in_dim, word_dim)
  kernel = np.asarray(params["kernel"], np.float64)
  small = min(in_dim, word_dim)
  for weights in kernel:
    gram = weights.T @ weights if in_dim >= word_dim else weights @ weights.T
    np.testing.assert_allclose(gram, np.eye(small), atol=1e-5)
  assert not np.allclose(kernel[0], kernel[1])


def test_projection_bias_is_standard_normal():
  _, params, _ = _projection("flat", 16, 4, 256)
  bias = np.asarray(params["bias"])
  assert bias.shape == (16, 256)
  assert abs(bias.mean()) < 0.05 and abs(bias.std() - 1.0) < 0.05


def test_projection_rejects_unknown_init():
  with pytest.raises(face.FaceConfigError, match="per_map"):
    _projection("xavier", 2, 3, 4)


_MODEL = face.FACE(
  embed_dim=8, token_dim=6, num_words=4, word_dim=5, ff_dim=16, chunk_size=7
)


@functools.cache
def _inits():
  """Params with and without the decoder copy, from one compile."""
  table = jax.random.normal(jax.random.key(10), (30, 6))

  @jax.jit
  def init(rng, table):
    return {
      copy: face.init_params(_MODEL, rng, table, decoder_from_encoder=copy)
      for copy in (True, False)
    }

  return init(jax.random.key(12), table), table


def _setup(decoder_from_encoder=True):
  params, table = _inits()
  x = jax.random.normal(jax.random.key(11), (9, 8))
  return params[decoder_from_encoder], x, table


@functools.cache
def _results():
  """Every FACE output the tests read, from a single compile."""
  params, x, table = _setup()

  def apply(params, table, deterministic=True, seed=0):
    return _MODEL.apply(
      {"params": params},
      x,
      table,
      deterministic=deterministic,
      rngs={"dropout": jax.random.key(seed)},
    )

  def loss(params, table, name):
    return apply(params, table)[name]

  @jax.jit
  def compute(params, table):
    vq_params, vq_table = jax.grad(loss, argnums=(0, 1))(
      params, table, "vq_loss"
    )
    return {
      "evaluation": apply(params, table),
      "describe": _MODEL.apply(
        {"params": params}, x, table, method=face.FACE.describe
      ),
      "train": [apply(params, table, False, seed) for seed in (0, 1)],
      "vq_grad": vq_params,
      "vq_grad_table": vq_table,
      "recon_grad": jax.grad(loss)(params, table, "recon_loss"),
    }

  return compute(params, table)


def test_face_forward_matches_numpy():
  params, x, table = _setup()
  out = _results()["evaluation"]
  host = _np(params)
  x64 = np.asarray(x, np.float64)
  assert out["token_index"].shape == (9, 4)
  assert out["token_index"].dtype == jnp.int32

  words = np.einsum("nd,wdk->nwk", x64, host["projection"]["kernel"])
  z_e = _np_encoder_layer(host["encoder"], words + host["projection"]["bias"])
  np.testing.assert_allclose(out["z_e"], z_e, rtol=1e-4, atol=1e-5)

  codebook = _np_dense(host["codebook_map"], np.asarray(table, np.float64))
  index = np.asarray(out["token_index"])
  for row in index:
    assert len(set(row)) == 4
  z_q = codebook[index]
  np.testing.assert_allclose(out["z_q"], z_q, rtol=1e-4, atol=1e-5)
  vq = 0.75 * np.mean((z_q - z_e) ** 2) + 0.25 * np.mean((z_e - z_q) ** 2)
  np.testing.assert_allclose(out["vq_loss"], vq, rtol=1e-4)

  mixed = _np_encoder_layer(host["decoder"], z_q).reshape(9, -1)
  decoded = _np_dense(host["reconstruct"], mixed)
  np.testing.assert_allclose(out["decoded"], decoded, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(
    out["recon_loss"], np.mean((decoded - x64) ** 2), rtol=1e-4
  )
  np.testing.assert_array_equal(_results()["describe"], index)


def test_reconstruction_loss_hand_computed():
  decoded = jnp.array([[1.0, 2.0]])
  x = jnp.array([[0.0, 4.0]])
  # ((1 - 0)^2 + (2 - 4)^2) / 2 = 2.5; gradient 2 * (decoded - x) / 2.
  np.testing.assert_allclose(face.reconstruction_loss(decoded, x), 2.5)
  grad_decoded, grad_x = jax.grad(face.reconstruction_loss, argnums=(0, 1))(
    decoded, x
  )
  np.testing.assert_allclose(grad_decoded, [[1.0, -2.0]])
  np.testing.assert_array_equal(grad_x, 0.0)


def _norms(grads):
  """Gradient norm of each top-level parameter group."""
  return {
    name: float(sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(group)))
    for name, group in grads.items()
  }


def test_gradients_reach_the_right_parameters():
  results = _results()
  vq = _norms(results["vq_grad"])
  # The codebook term moves the map; the commitment term the encoder side.
  assert vq["codebook_map"] > 0 and vq["encoder"] > 0
  assert vq["projection"] > 0
  assert vq["decoder"] == 0 and vq["reconstruct"] == 0
  recon = _norms(results["recon_grad"])
  # Straight-through: the decoder's gradient passes to z_e, not the map.
  assert recon["codebook_map"] == 0
  assert min(recon["projection"], recon["encoder"], recon["decoder"]) > 0
  assert recon["reconstruct"] > 0
  # The token table is frozen.
  np.testing.assert_array_equal(results["vq_grad_table"], 0.0)


def test_decoder_starts_as_a_copy_of_the_encoder():
  params, _, _ = _setup(decoder_from_encoder=True)
  for enc, dec in zip(
    jax.tree.leaves(params["encoder"]),
    jax.tree.leaves(params["decoder"]),
    strict=True,
  ):
    np.testing.assert_array_equal(enc, dec)
    assert enc is not dec  # own buffers, so donation stays valid
  separate, _, _ = _setup(decoder_from_encoder=False)
  assert not np.allclose(
    separate["encoder"]["query"]["kernel"],
    separate["decoder"]["query"]["kernel"],
  )
  grads = _results()["recon_grad"]
  # Same start, different gradients: they train apart.
  assert not np.allclose(
    grads["encoder"]["ff1"]["kernel"], grads["decoder"]["ff1"]["kernel"]
  )


def test_training_mode_uses_dropout_rng():
  results = _results()
  first, other = results["train"]
  assert not np.allclose(first["z_e"], other["z_e"])
  assert not np.allclose(first["z_e"], results["evaluation"]["z_e"])
  # The straight-through z_q still holds codebook rows in training.
  params, _, table = _setup()
  host = _np(params)
  codebook = _np_dense(host["codebook_map"], np.asarray(table, np.float64))
  np.testing.assert_allclose(
    first["z_q"], codebook[np.asarray(first["token_index"])], atol=1e-5
  )


def test_face_rejects_wrong_embedding_width():
  params, _, table = _setup()
  with pytest.raises(face.FaceConfigError, match="embed_dim"):
    _MODEL.apply(
      {"params": params}, jnp.zeros((3, 7)), table, deterministic=True
    )
