"""Decoder-only LLMs of the Llama family (Llama, Qwen2) in Flax.

Pre-norm blocks with RMSNorm, rotary positions and grouped-query attention;
Qwen2 differs only by biases on the query, key and value projections, which
the spec carries. The module returns final hidden states; no language-model
head is computed, since FACE only pools hidden states.

Positions count from 0 at the first column, so sequences must be right
padded (real tokens first), which is how face_jax batches them.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from face_jax.llm import layers
from face_jax.llm.specs import DecoderSpec

# Path of the input-token table inside the params.
TOKEN_TABLE = ("embed_tokens", "embedding")


class RMSNorm(nn.Module):
  """x / rms(x) * scale, computed in float32."""

  epsilon: float
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.initializers.ones, x.shape[-1:], self.dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(
      jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon
    )
    # Cast before scaling, as the reference implementations do.
    return scale * x32.astype(self.dtype)


def rotary_tables(
  inv_frequencies: tuple[float, ...], length: int
) -> tuple[jax.Array, jax.Array]:
  """cos and sin tables [length, head_dim] for positions 0..length-1."""
  positions = np.arange(length, dtype=np.float32)[:, None]
  angles = positions * np.asarray(inv_frequencies, np.float32)[None, :]
  angles = np.concatenate([angles, angles], axis=-1)
  return jnp.asarray(np.cos(angles)), jnp.asarray(np.sin(angles))


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates [batch, length, heads, head_dim] by position.

  Pairs dimension i with i + head_dim / 2 (the "rotate half" layout that
  Hugging Face checkpoints use).
  """
  first, second = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-second, first], axis=-1)
  cos = cos[None, :, None, :].astype(x.dtype)
  sin = sin[None, :, None, :].astype(x.dtype)
  return x * cos + rotated * sin


class DecoderAttention(nn.Module):
  """Grouped-query self-attention with rotary positions."""

  spec: DecoderSpec
  dtype: jnp.dtype

  @nn.compact
  def __call__(
    self,
    hidden: jax.Array,
    bias: jax.Array,
    rotary: tuple[jax.Array, jax.Array],
    deterministic: bool,
  ) -> jax.Array:
    spec = self.spec
    batch, length, _ = hidden.shape

    def project(heads, name):
      dense = _dense(heads * spec.head_dim, spec.qkv_bias, self.dtype, name)
      return dense(hidden).reshape(batch, length, heads, spec.head_dim)

    query = apply_rotary(project(spec.num_heads, "query"), *rotary)
    key = apply_rotary(project(spec.num_kv_heads, "key"), *rotary)
    value = project(spec.num_kv_heads, "value")
    dropout = layers.Dropout(spec.attention_dropout)
    context = layers.softmax_attention(
      query,
      key,
      value,
      bias,
      lambda weights: dropout(weights, deterministic=deterministic),
    )
    context = context.reshape(batch, length, spec.num_heads * spec.head_dim)
    return _dense(spec.hidden_size, spec.out_bias, self.dtype, "out")(context)


class DecoderLayer(nn.Module):
  """Pre-norm attention and gated feed-forward block."""

  spec: DecoderSpec
  dtype: jnp.dtype

  @nn.compact
  def __call__(
    self,
    hidden: jax.Array,
    bias: jax.Array,
    rotary: tuple[jax.Array, jax.Array],
    deterministic: bool,
  ) -> jax.Array:
    spec = self.spec
    normed = RMSNorm(spec.rms_norm_eps, self.dtype, name="input_norm")(hidden)
    hidden = hidden + DecoderAttention(spec, self.dtype, name="attention")(
      normed, bias, rotary, deterministic
    )
    normed = RMSNorm(spec.rms_norm_eps, self.dtype, name="mlp_norm")(hidden)
    act = layers.activation(spec.hidden_act)

    def mlp_dense(features, name):
      return _dense(features, spec.mlp_bias, self.dtype, f"mlp_{name}")

    gate = act(mlp_dense(spec.intermediate_size, "gate")(normed))
    up = mlp_dense(spec.intermediate_size, "up")(normed)
    return hidden + mlp_dense(spec.hidden_size, "down")(gate * up)


def _dense(features: int, bias: bool, dtype: jnp.dtype, name: str) -> nn.Dense:
  return nn.Dense(
    features, use_bias=bias, dtype=dtype, param_dtype=dtype, name=name
  )


class Decoder(nn.Module):
  """Decoder-only transformer: token embeddings in, final hidden states out.

  Attributes:
    spec: the architecture.
    dtype: dtype of the weights and matrix products; norms, rotary tables and
      the attention softmax run in float32.
    causal: False lets every position see every real token (some embedding
      models are trained so); True is the base LLM's causal attention.
  """

  spec: DecoderSpec
  dtype: jnp.dtype = jnp.float32
  causal: bool = True

  def setup(self):
    spec = self.spec
    self.embed_tokens = nn.Embed(
      spec.vocab_size,
      spec.hidden_size,
      dtype=self.dtype,
      param_dtype=self.dtype,
      name="embed_tokens",
    )
    self.layers = [
      DecoderLayer(spec, self.dtype, name=f"layers_{i}")
      for i in range(spec.num_layers)
    ]
    self.final_norm = RMSNorm(spec.rms_norm_eps, self.dtype, name="final_norm")

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """Looks up input-token embeddings: [batch, length] -> [..., hidden]."""
    return self.embed_tokens(input_ids)

  def from_ids(
    self, input_ids: jax.Array, mask: jax.Array, deterministic: bool = True
  ) -> jax.Array:
    """Encodes token ids; also the method that creates every parameter."""
    return self(self.embed(input_ids), mask, deterministic)

  def __call__(
    self,
    inputs_embeds: jax.Array,
    mask: jax.Array,
    deterministic: bool = True,
  ) -> jax.Array:
    """Runs the decoder stack over right-padded token embeddings.

    Args:
      inputs_embeds: [batch, length, hidden] input-token embeddings.
      mask: [batch, length], 1 for real tokens and 0 for padding.
      deterministic: False turns on attention dropout when the config has
        any (needs a "dropout" rng).

    Returns:
      [batch, length, hidden] final hidden states (after the last norm).
    """
    rotary = rotary_tables(self.spec.inv_frequencies, inputs_embeds.shape[1])
    bias = layers.attention_bias(mask, causal=self.causal)
    hidden = inputs_embeds.astype(self.dtype)
    for layer in self.layers:
      hidden = layer(hidden, bias, rotary, deterministic)
    return self.final_norm(hidden)
