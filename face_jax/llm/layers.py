"""Pieces shared by the encoder and decoder modules."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from face_jax.llm.specs import UnsupportedModelError

# 1 / sqrt(2), the scale inside exact GELU's erf.
_SQRT_HALF = 0.7071067811865476


def gelu_erf(x: jax.Array) -> jax.Array:
  """Exact GELU as PyTorch computes it: x / 2 * (1 + erf(x / sqrt(2))).

  jax.nn.gelu(approximate=False) goes through erfc, which XLA evaluates
  with an exponential and branches; erf is one polynomial, which makes the
  activation (forward, rematerialised forward and backward) about twice as
  fast on CPU. In float32 the two differ by at most 1e-6, in the negative
  tail where GELU is near 0.
  """
  return x * 0.5 * (1.0 + jax.lax.erf(x * _SQRT_HALF))


# Hugging Face `hidden_act` names -> activation functions. "gelu" is the
# exact (erf) form, as in PyTorch.
_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
  "gelu": gelu_erf,
  "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
  "relu": jax.nn.relu,
  "silu": jax.nn.silu,
  "swish": jax.nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in _ACTIVATIONS:
    raise UnsupportedModelError(
      f"hidden_act {name!r} is not implemented; supported are "
      f"{sorted(_ACTIVATIONS)}."
    )
  return _ACTIVATIONS[name]


# Name of the dropout masks in the jaxpr: a rematerialising caller keeps
# them (jax.checkpoint_policies.save_only_these_names) instead of drawing
# them again in the backward pass.
DROPOUT_MASK = "dropout_mask"


class Dropout(nn.Module):
  """Inverted dropout with its mask named `DROPOUT_MASK`.

  Draws the same mask from the same key as flax's nn.Dropout and scales the
  kept elements by 1 / (1 - rate); only the name is added.

  Attributes:
    rate: drop probability.
  """

  rate: float

  @nn.compact
  def __call__(self, inputs: jax.Array, deterministic: bool) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return inputs
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, inputs.shape)
    mask = checkpoint_name(mask, DROPOUT_MASK)
    return jax.lax.select(mask, inputs / keep, jnp.zeros_like(inputs))


def attention_bias(mask: jax.Array, causal: bool) -> jax.Array:
  """Additive attention bias from a key mask.

  Args:
    mask: [batch, keys] with 1 for real tokens and 0 for padding.
    causal: also hide keys after each query.

  Returns:
    [batch, 1, queries, keys] float32: 0 where attention is allowed, the
    most negative float32 elsewhere (finite, so a row with nothing visible
    gives a uniform softmax rather than NaN).
  """
  allowed = mask.astype(bool)[:, None, None, :]
  if causal:
    length = mask.shape[-1]
    allowed = allowed & jnp.tril(jnp.ones((length, length), bool))
  return jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)


def softmax_attention(
  query: jax.Array,
  key: jax.Array,
  value: jax.Array,
  bias: jax.Array,
  dropout: Callable[[jax.Array], jax.Array] = lambda weights: weights,
) -> jax.Array:
  """Softmax attention that lets several query heads share a key head.

  Args:
    query: [batch, queries, heads, head_dim].
    key: [batch, keys, kv_heads, head_dim]; heads is a multiple of kv_heads
      and query head h reads key head h // (heads // kv_heads), as in
      grouped-query attention.
    value: [batch, keys, kv_heads, head_dim].
    bias: additive [batch, 1, queries, keys] (see `attention_bias`).
    dropout: applied to the attention weights.

  Returns:
    [batch, queries, heads, head_dim] in the query dtype.
  """
  batch, queries, heads, head_dim = query.shape
  kv_heads = key.shape[2]
  group = heads // kv_heads
  # Heads before positions, so both products are plain batched matrix
  # products (faster on CPU than contracting across the head axis); query
  # head h = kv * group + g sits in row block g of key head kv.
  query = query.transpose(0, 2, 1, 3).reshape(batch, kv_heads, -1, head_dim)
  key = key.transpose(0, 2, 1, 3)
  value = value.transpose(0, 2, 1, 3)
  scores = jnp.einsum(
    "bkqd,bksd->bkqs", query, key, preferred_element_type=jnp.float32
  )
  scores = scores.reshape(batch, heads, queries, -1) / jnp.sqrt(head_dim)
  # Softmax in float32 whatever the weights' dtype.
  weights = jax.nn.softmax(scores + bias, axis=-1).astype(value.dtype)
  weights = dropout(weights).reshape(batch, kv_heads, group * queries, -1)
  out = jnp.einsum("bkqs,bksd->bkqd", weights, value)
  return out.reshape(batch, heads, queries, head_dim).transpose(0, 2, 1, 3)
