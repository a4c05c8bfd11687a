"""The FACE module: CF embeddings to W distinct LLM tokens and back.

x [n, d] (the batch's users, positive items and negative items stacked)
goes through W separate affine maps to W "words", one post-norm Transformer
encoder layer mixes them into z_e [n, W, word_dim], and each entity's words
are quantised to distinct rows of the mapped codebook (the LLM's frozen
token embeddings of the filtered vocabulary, through a trainable affine
map). A second encoder layer and one affine map decode z_q back to d.

Initialisation follows the authors' PyTorch defaults so that training
starts where theirs does:
- projection weights: `torch.nn.init.orthogonal_` on the whole
  [W, d, word_dim] tensor, which flattens it to W rows of d * word_dim
  entries and makes those rows orthonormal (gain 1). Each map then has unit
  Frobenius norm (entries of about 1 / sqrt(d * word_dim)), so at the start
  the standard-normal bias dominates the projection. `projection_init=
  "per_map"` makes each d x word_dim map (semi-)orthogonal instead.
- Linear layers: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias
  (torch's `nn.Linear` default).
- Attention: query/key/value weights Xavier-uniform over the stacked
  [3 * word_dim, word_dim] in-projection, zero in-projection and
  out-projection biases (torch's `nn.MultiheadAttention`).
- The encoder and decoder layers start as identical copies of one layer
  (`init_params(..., decoder_from_encoder=True)`), as the authors'
  `TransformerEncoder` deep-copies the same layer twice.

The frozen token table is an input, never a parameter, so the optimiser
holds no state for it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from face_jax import parallel
from face_jax.models import quantizer

Initializer = Callable[..., jax.Array]


class FaceConfigError(ValueError):
  """A FACE module setting that cannot work."""


def uniform_init(bound: float) -> Initializer:
  """U(-bound, bound), the family of torch's default initialisers."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def torch_dense(
  features: int, fan_in: int, name: str | None = None
) -> nn.Dense:
  """A Dense layer initialised like torch's `nn.Linear(fan_in, features)`."""
  bound = 1.0 / math.sqrt(fan_in)
  return nn.Dense(
    features,
    kernel_init=uniform_init(bound),
    bias_init=uniform_init(bound),
    name=name,
  )


def orthogonal_flat(key, shape, dtype=jnp.float32) -> jax.Array:
  """torch `orthogonal_` on an N-d tensor: orthonormal flattened rows.

  Args:
    key: PRNG key.
    shape: (W, ...) the leading axis indexes the maps.
    dtype: parameter dtype.

  Returns:
    Array of `shape` whose W rows, each flattened, are orthonormal.
  """
  rows = shape[0]
  flat = jax.nn.initializers.orthogonal(column_axis=0)(
    key, (rows, math.prod(shape[1:])), dtype
  )
  return flat.reshape(shape)


def orthogonal_per_map(key, shape, dtype=jnp.float32) -> jax.Array:
  """Each [d, word_dim] map of a (W, d, word_dim) tensor (semi-)orthogonal."""
  keys = jax.random.split(key, shape[0])
  init = jax.nn.initializers.orthogonal()
  return jax.vmap(lambda k: init(k, shape[1:], dtype))(keys)


# Name -> initialiser of the projection weights [W, d, word_dim].
PROJECTION_INITS: dict[str, Initializer] = {
  "flat": orthogonal_flat,
  "per_map": orthogonal_per_map,
}


class DisentangledProjection(nn.Module):
  """W separate affine maps d -> word_dim.

  Attributes:
    num_words: W.
    word_dim: width of each word.
    init_name: a key of `PROJECTION_INITS`.
  """

  num_words: int
  word_dim: int
  init_name: str = "flat"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps x [n, d] to words [n, W, word_dim]."""
    if self.init_name not in PROJECTION_INITS:
      raise FaceConfigError(
        f"Unknown projection init {self.init_name!r}; use one of "
        f"{sorted(PROJECTION_INITS)}."
      )
    kernel = self.param(
      "kernel",
      PROJECTION_INITS[self.init_name],
      (self.num_words, x.shape[-1], self.word_dim),
    )
    bias = self.param(
      "bias", jax.nn.initializers.normal(1.0), (self.num_words, self.word_dim)
    )
    # One [n, d] x [d, W * word_dim] product: its gradients are plain
    # products too, where the einsum's needed a slow [W * word_dim, n]
    # transpose on CPU.
    n, d = x.shape
    flat = kernel.transpose(1, 0, 2).reshape(d, self.num_words * self.word_dim)
    return (x @ flat).reshape(n, self.num_words, self.word_dim) + bias


class EncoderLayer(nn.Module):
  """Post-norm Transformer encoder layer with ReLU feed-forward.

  The math of torch's `TransformerEncoderLayer(batch_first=True,
  norm_first=False)`: x = LN1(x + Drop(SelfAttn(x))), then
  x = LN2(x + Drop(W2 Drop(ReLU(W1 x)))), where the attention also drops
  its softmax weights. Dropout is active unless `deterministic`; it draws
  from the "dropout" rng stream.

  Attributes:
    num_heads: attention heads; must divide the width.
    ff_dim: hidden width of the feed-forward block.
    dropout_rate: rate of all four dropout sites.
    layer_norm_eps: epsilon of both layer norms.
  """

  num_heads: int = 1
  ff_dim: int = 2048
  dropout_rate: float = 0.1
  layer_norm_eps: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
    """Encodes x [n, length, width] to the same shape."""
    n, length, width = x.shape
    if width % self.num_heads:
      raise FaceConfigError(
        f"Width {width} is not divisible by num_heads={self.num_heads}; "
        "pick a head count that divides the word size."
      )
    drop = nn.Dropout(self.dropout_rate, deterministic=deterministic)
    # Every dense map runs on the [n * length, width] rows as one plain
    # matrix product: XLA:CPU differentiates the 3-d dot_generals that flax
    # emits for [n, length, width] inputs about a third slower.
    rows = x.reshape(n * length, width)
    attended = self._attention(rows, n, length, drop)
    rows = self._norm("norm1")(rows + drop(attended))
    hidden = drop(nn.relu(torch_dense(self.ff_dim, width, "ff1")(rows)))
    rows = self._norm("norm2")(
      rows + drop(torch_dense(width, self.ff_dim, "ff2")(hidden))
    )
    return rows.reshape(n, length, width)

  def _attention(
    self, rows: jax.Array, n: int, length: int, drop: nn.Dropout
  ) -> jax.Array:
    """Self-attention within each entity's words; rows [n * length, w]."""
    width = rows.shape[-1]
    heads = self.num_heads
    head_dim = width // heads
    # Xavier-uniform over the stacked [3 * width, width] in-projection.
    in_init = uniform_init(math.sqrt(6.0 / (4 * width)))

    def split_heads(name):
      projected = nn.Dense(width, kernel_init=in_init, name=name)(rows)
      # [n * heads, length, head_dim]: one batch of small matrix products.
      return (
        projected.reshape(n, length, heads, head_dim)
        .transpose(0, 2, 1, 3)
        .reshape(n * heads, length, head_dim)
      )

    query, key, value = map(split_heads, ("query", "key", "value"))
    scores = jnp.einsum("bqc,bkc->bqk", query, key) / math.sqrt(head_dim)
    weights = drop(jax.nn.softmax(scores, axis=-1))
    context = (
      jnp.einsum("bqk,bkc->bqc", weights, value)
      .reshape(n, heads, length, head_dim)
      .transpose(0, 2, 1, 3)
      .reshape(n * length, width)
    )
    out = nn.Dense(
      width, kernel_init=uniform_init(1.0 / math.sqrt(width)), name="out"
    )
    return out(context)

  def _norm(self, name: str) -> nn.LayerNorm:
    # Two-pass variance, as torch computes it.
    return nn.LayerNorm(
      epsilon=self.layer_norm_eps, use_fast_variance=False, name=name
    )


def reconstruction_loss(decoded: jax.Array, x: jax.Array) -> jax.Array:
  """MSE(decoded, sg(x)): the target CF embeddings get no gradient."""
  return jnp.mean((decoded - lax.stop_gradient(x)) ** 2)


class FACE(nn.Module):
  """Projection, encoder, distinct-token quantiser and decoder.

  Parameters (top-level names): "projection" {kernel [W, d, word_dim], bias
  [W, word_dim]}, "encoder" and "decoder" (`EncoderLayer`), "codebook_map"
  {kernel [token_dim, word_dim], bias [word_dim]} and "reconstruct"
  {kernel [W * word_dim, d], bias [d]}.

  Attributes:
    embed_dim: d, width of the CF embeddings.
    token_dim: hidden size of the LLM (width of its token table).
    num_words: W, tokens per entity.
    word_dim: width of a word and of the mapped codebook.
    num_heads: attention heads of the encoder and decoder layers.
    ff_dim: feed-forward width of those layers.
    dropout_rate: dropout of those layers while training.
    layer_norm_eps: epsilon of their layer norms.
    projection_init: "flat" (the authors') or "per_map"; see the module
      docstring.
    chunk_size: codebook rows compared per step of the token search.
    num_tokens: real rows of the token table; rows from this index on are
      padding (a table padded to a multiple of the vocabulary shard count
      with `face_jax.parallel.pad_rows_to`) and never chosen. None: all
      rows are real.

  Inside a `face_jax.parallel.use_mesh` block the mapped codebook is laid
  out by the logical axes ("vocab", "embed"), and when "vocab" is split
  over several devices the token search runs shard by shard.
  """

  embed_dim: int
  token_dim: int
  num_words: int = 16
  word_dim: int = 256
  num_heads: int = 1
  ff_dim: int = 2048
  dropout_rate: float = 0.1
  layer_norm_eps: float = 1e-5
  projection_init: str = "flat"
  chunk_size: int = 4096
  num_tokens: int | None = None

  def setup(self):
    layer = {
      "num_heads": self.num_heads,
      "ff_dim": self.ff_dim,
      "dropout_rate": self.dropout_rate,
      "layer_norm_eps": self.layer_norm_eps,
    }
    self.projection = DisentangledProjection(
      self.num_words, self.word_dim, self.projection_init
    )
    self.encoder = EncoderLayer(**layer)
    self.codebook_map = torch_dense(self.word_dim, self.token_dim)
    self.decoder = EncoderLayer(**layer)
    self.reconstruct = torch_dense(
      self.embed_dim, self.num_words * self.word_dim
    )

  def map_codebook(self, token_table: jax.Array) -> jax.Array:
    """Maps the frozen token rows [v, token_dim] to [v, word_dim]."""
    codebook = self.codebook_map(lax.stop_gradient(token_table))
    # Rows stay on the device that holds their token rows.
    return parallel.with_logical_constraint(codebook, ("vocab", "embed"))

  def encode(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
    """z_e [n, W, word_dim] of CF embeddings x [n, d]."""
    return self.encoder(self.projection(x), deterministic=deterministic)

  def describe(self, x: jax.Array, token_table: jax.Array) -> jax.Array:
    """The descriptors: [n, W] int32 rows of the filtered vocabulary.

    Deterministic (no dropout).
    """
    z_e = self.encode(x, deterministic=True)
    codebook = self.map_codebook(token_table)
    return quantizer.quantize(
      z_e, codebook, self.chunk_size, self.num_tokens
    ).token_index

  def decode(self, z_q: jax.Array, *, deterministic: bool) -> jax.Array:
    """CF embeddings [n, d] of quantised words z_q [n, W, word_dim]."""
    mixed = self.decoder(z_q, deterministic=deterministic)
    return self.reconstruct(mixed.reshape(z_q.shape[0], -1))

  def __call__(
    self, x: jax.Array, token_table: jax.Array, *, deterministic: bool
  ) -> dict[str, jax.Array]:
    """Runs FACE on a stacked batch of CF embeddings.

    Args:
      x: [n, d] CF embeddings (n = 3 * batch: users, positives, negatives).
      token_table: [v, token_dim] frozen token embeddings of the filtered
        vocabulary, v >= W.
      deterministic: disables dropout (evaluation); otherwise the call needs
        a "dropout" rng.

    Returns:
      dict with z_e [n, W, word_dim]; z_q [n, W, word_dim] (straight-
      through: the chosen rows' values, z_e's gradient); token_index
      [n, W] int32; decoded [n, d]; vq_loss and recon_loss scalars.
    """
    if x.shape[-1] != self.embed_dim:
      raise FaceConfigError(
        f"CF embeddings have width {x.shape[-1]} but embed_dim="
        f"{self.embed_dim}; set embed_dim to the backbone's size."
      )
    z_e = self.encode(x, deterministic=deterministic)
    codebook = self.map_codebook(token_table)
    quantized = quantizer.quantize(
      z_e, codebook, self.chunk_size, self.num_tokens
    )
    decoded = self.decode(quantized.z_q_st, deterministic=deterministic)
    return {
      "z_e": z_e,
      "z_q": quantized.z_q_st,
      "token_index": quantized.token_index,
      "decoded": decoded,
      "vq_loss": quantized.vq_loss,
      "recon_loss": reconstruction_loss(decoded, x),
    }


def init_params(
  model: FACE,
  rng: jax.Array,
  token_table: jax.Array,
  *,
  decoder_from_encoder: bool = True,
) -> dict:
  """Initialises the FACE parameters.

  Args:
    model: the module.
    rng: PRNG key.
    token_table: [v, token_dim] frozen token table; only its width and first
      W rows are used.
    decoder_from_encoder: start the decoder layer as an exact copy of the
      encoder layer (the authors' setup); they train apart afterwards. The
      copy holds its own buffers, so donating the parameters stays valid.

  Returns:
    The params collection, a dict with the names listed on `FACE`.
  """
  x = jnp.zeros((1, model.embed_dim), jnp.float32)
  # Only the first W token rows go in, all of them real.
  variables = model.clone(num_tokens=None).init(
    rng, x, token_table[: model.num_words], deterministic=True
  )
  params = dict(variables["params"])
  if decoder_from_encoder:
    params["decoder"] = jax.tree.map(jnp.copy, params["encoder"])
  return params
