"""BERT encoder in Flax, fed token embeddings directly.

The module adds its own position and token-type embeddings to whatever token
embeddings it receives, so sentences built from embeddings (FACE's
descriptor words) go through exactly the path that token ids take.
Parameter paths (`word_embeddings/embedding`, `layers_3/attention/query/
kernel`, ...) are stable names that loading and sharding rules refer to.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from face_jax.llm import layers
from face_jax.llm.specs import BertSpec

# Path of the input-token table inside the params.
TOKEN_TABLE = ("word_embeddings", "embedding")


def _dense(features: int, dtype: jnp.dtype, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, param_dtype=dtype, name=name)


def _layer_norm(spec: BertSpec, dtype: jnp.dtype, name: str) -> nn.LayerNorm:
  # Statistics in float32 and two-pass, as PyTorch computes them; the result
  # goes back to the weights' dtype.
  return nn.LayerNorm(
    epsilon=spec.layer_norm_eps,
    use_fast_variance=False,
    dtype=dtype,
    param_dtype=dtype,
    name=name,
  )


class BertAttention(nn.Module):
  """Multi-head self-attention with its output projection."""

  spec: BertSpec
  dtype: jnp.dtype

  @nn.compact
  def __call__(
    self, hidden: jax.Array, bias: jax.Array, deterministic: bool
  ) -> jax.Array:
    spec = self.spec
    batch, length, _ = hidden.shape
    head_dim = spec.hidden_size // spec.num_heads

    def project(name):
      projected = _dense(spec.hidden_size, self.dtype, name)(hidden)
      return projected.reshape(batch, length, spec.num_heads, head_dim)

    dropout = layers.Dropout(spec.attention_dropout)
    context = layers.softmax_attention(
      project("query"),
      project("key"),
      project("value"),
      bias,
      lambda weights: dropout(weights, deterministic=deterministic),
    )
    context = context.reshape(batch, length, spec.hidden_size)
    return _dense(spec.hidden_size, self.dtype, "out")(context)


class BertLayer(nn.Module):
  """Post-norm self-attention and feed-forward block."""

  spec: BertSpec
  dtype: jnp.dtype

  @nn.compact
  def __call__(
    self, hidden: jax.Array, bias: jax.Array, deterministic: bool
  ) -> jax.Array:
    spec = self.spec
    dropout = layers.Dropout(spec.hidden_dropout)

    attended = BertAttention(spec, self.dtype, name="attention")(
      hidden, bias, deterministic
    )
    attended = dropout(attended, deterministic=deterministic)
    hidden = _layer_norm(spec, self.dtype, "attention_norm")(attended + hidden)

    act = layers.activation(spec.hidden_act)
    expanded = act(_dense(spec.intermediate_size, self.dtype, "mlp_in")(hidden))
    out = _dense(spec.hidden_size, self.dtype, "mlp_out")(expanded)
    out = dropout(out, deterministic=deterministic)
    return _layer_norm(spec, self.dtype, "mlp_norm")(out + hidden)


class Bert(nn.Module):
  """BERT encoder: token embeddings in, final hidden states out.

  Attributes:
    spec: the architecture.
    dtype: dtype of the weights and of the matrix products; layer norms and
      attention softmax run in float32.
  """

  spec: BertSpec
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    spec = self.spec

    def embed(count, name):
      return nn.Embed(
        count,
        spec.hidden_size,
        dtype=self.dtype,
        param_dtype=self.dtype,
        name=name,
      )

    self.word_embeddings = embed(spec.vocab_size, "word_embeddings")
    self.position_embeddings = embed(spec.max_positions, "position_embeddings")
    self.token_type_embeddings = embed(
      spec.type_vocab_size, "token_type_embeddings"
    )
    self.embeddings_norm = _layer_norm(spec, self.dtype, "embeddings_norm")
    self.embeddings_dropout = layers.Dropout(spec.hidden_dropout)
    self.layers = [
      BertLayer(spec, self.dtype, name=f"layers_{i}")
      for i in range(spec.num_layers)
    ]

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """Looks up input-token embeddings: [batch, length] -> [..., hidden]."""
    return self.word_embeddings(input_ids)

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
    """Encodes token embeddings.

    Args:
      inputs_embeds: [batch, length, hidden] input-token embeddings (no
        position or token-type part; the model adds those).
      mask: [batch, length], 1 for real tokens and 0 for padding.
      deterministic: False turns on the model's dropout (needs a "dropout"
        rng).

    Returns:
      [batch, length, hidden] final hidden states in `dtype`.
    """
    length = inputs_embeds.shape[1]
    positions = jnp.arange(length)[None, :]
    # Every position has token type 0, as for a single sentence.
    hidden = (
      inputs_embeds.astype(self.dtype)
      + self.position_embeddings(positions)
      + self.token_type_embeddings(jnp.zeros_like(positions))
    )
    hidden = self.embeddings_norm(hidden)
    hidden = self.embeddings_dropout(hidden, deterministic=deterministic)
    bias = layers.attention_bias(mask, causal=False)
    for layer in self.layers:
      hidden = layer(hidden, bias, deterministic)
    return hidden
