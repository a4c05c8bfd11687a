"""Activations of the LLM blocks against float64 references."""

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
