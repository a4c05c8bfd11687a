"""Activations (against float64 references) and dropout of the LLM blocks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

from face_jax.llm import layers


def _grid():
  # Dense around 0, where GELU bends, out to where it is x or 0.
  return np.linspace(-10.0, 10.0, 20001, dtype=np.float32)


def test_gelu_is_exact_gelu_to_float32_rounding():
  x = _grid()
  x64 = x.astype(np.float64)
  expected = 0.5 * x64 * (1.0 + special.erf(x64 / np.sqrt(2.0)))

  got = np.asarray(jax.jit(layers.activation("gelu"))(x), np.float64)

  assert got.dtype == np.float64 and got.shape == x.shape
  np.testing.assert_allclose(got, expected, rtol=2e-6, atol=2e-6)
  # Float32 rounding of the exact values, not an approximation: tanh
  # GELU is off by up to 5e-4 on the same grid.
  tanh_form = np.asarray(jax.nn.gelu(x, approximate=True), np.float64)
  assert np.max(np.abs(tanh_form - expected)) > 1e-4


def test_gelu_gradient_is_exact():
  x = _grid()
  x64 = x.astype(np.float64)
  # d/dx x Phi(x) = Phi(x) + x phi(x).
  expected = 0.5 * (1.0 + special.erf(x64 / np.sqrt(2.0))) + x64 * np.exp(
    -0.5 * x64**2
  ) / np.sqrt(2.0 * np.pi)

  got = jax.jit(jax.vmap(jax.grad(layers.activation("gelu"))))(x)

  np.testing.assert_allclose(
    np.asarray(got, np.float64), expected, rtol=2e-6, atol=2e-6
  )


def test_gelu_keeps_bfloat16():
  x = jnp.asarray([-3.0, -0.5, 0.0, 0.5, 3.0], jnp.bfloat16)

  got = layers.activation("gelu")(x)

  assert got.dtype == jnp.bfloat16
  x64 = np.asarray(x, np.float64)
  expected = 0.5 * x64 * (1.0 + special.erf(x64 / np.sqrt(2.0)))
  np.testing.assert_allclose(np.asarray(got, np.float64), expected, atol=2e-2)


def _apply(module, inputs, deterministic, key=None):
  rngs = {} if key is None else {"dropout": key}
  return module.apply({}, inputs, deterministic=deterministic, rngs=rngs)


def test_dropout_draws_flax_masks_and_names_them():
  inputs = jax.random.normal(jax.random.key(1), (3, 5, 64))
  key = jax.random.key(7)

  got = _apply(layers.Dropout(0.1), inputs, False, key)

  expected = _apply(nn.Dropout(0.1), inputs, False, key)
  np.testing.assert_array_equal(got, expected)
  jaxpr = jax.make_jaxpr(lambda x: _apply(layers.Dropout(0.1), x, False, key))(
    inputs
  )
  assert f"name={layers.DROPOUT_MASK}" in str(jaxpr)


def test_dropout_keeps_nine_tenths_scaled_up():
  inputs = jnp.full((1000, 1000), 2.0)

  got = np.asarray(
    _apply(layers.Dropout(0.1), inputs, False, jax.random.key(3))
  )

  kept = got != 0
  # Binomial(1e6, 0.9): standard deviation 3e-4 of the fraction.
  assert abs(kept.mean() - 0.9) < 1.5e-3
  np.testing.assert_allclose(got[kept], np.float32(2.0) / np.float32(0.9))
  # Every row and column keeps its share (each has standard deviation
  # 1e-2), so the mask is not drawn in blocks.
  for axis in (0, 1):
    assert np.all(np.abs(kept.mean(axis=axis) - 0.9) < 0.05)


def test_dropout_is_identity_when_deterministic_or_rate_zero():
  inputs = jax.random.normal(jax.random.key(2), (4, 6))

  np.testing.assert_array_equal(
    _apply(layers.Dropout(0.1), inputs, True), inputs
  )
  np.testing.assert_array_equal(
    _apply(layers.Dropout(0.0), inputs, False), inputs
  )
