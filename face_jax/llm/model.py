"""The frozen LLM: loading, pooling and the pure encode functions.

`load_llm` turns the `llm` config section into an `LLM`: the Flax module,
its params (read from the model's safetensors, optionally sharded as they
are read), the tokenizer and the facts that the FACE stages need (hidden
size, pooling, special-token ids, the comma id).

The encode methods are pure functions of `params`: a jitted step passes
`llm.params` as an argument rather than closing over it, and gradients reach
only `inputs_embeds` because the params enter through `stop_gradient`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import transformers

from face_jax.llm import bert, decoder, specs, weights
from face_jax.llm.resolve import resolve_model_folder
from face_jax.llm.safetensors_io import Checkpoint

Params = dict[str, Any]

# config.llm.dtype -> dtype of the weights and matrix products.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
POOLINGS = ("mean", "last")
ATTENTIONS = ("auto", "causal", "bidirectional")


class LLMConfigError(ValueError):
  """A value in config.llm cannot be used with the chosen model."""


def mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean over real tokens: [batch, length, h], [batch, length] -> [batch, h].

  A row without real tokens gives zeros.
  """
  weights_ = mask.astype(jnp.float32)[..., None]
  total = jnp.sum(hidden.astype(jnp.float32) * weights_, axis=1)
  return total / jnp.maximum(jnp.sum(weights_, axis=1), 1e-9)


def last_token_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
  """Hidden state at each row's last real token: -> [batch, h] float32.

  Works for left and right padding alike.
  """
  length = mask.shape[1]
  last = length - 1 - jnp.argmax(mask[:, ::-1].astype(jnp.int32), axis=1)
  picked = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
  return picked.astype(jnp.float32)


def l2_normalize(x: jax.Array) -> jax.Array:
  """x / max(|x|, 1e-12) along the last axis (zeros stay zeros)."""
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.maximum(norm, 1e-12)


_POOL_FNS = {"mean": mean_pool, "last": last_token_pool}


@dataclasses.dataclass(frozen=True)
class LLMInfo:
  """Facts about a loaded LLM.

  Attributes:
    name: config.llm.model as given.
    folder: the model folder the weights came from.
    family: model_type of the checkpoint: "bert", "llama" or "qwen2".
    hidden_size: width of token embeddings and of the pooled output.
    vocab_size: rows of the input-token table (may exceed the tokenizer's
      vocabulary, e.g. Qwen2 pads its table).
    pooling: "mean" over real tokens or the "last" real token.
    causal: whether attention is causal (decoders) or bidirectional.
    dtype: "float32" or "bfloat16".
    max_positions: longest sequence the model's positions allow (BERT's
      learned table; the trained context for rotary models).
    prefix_ids: token ids that open every sentence ([CLS] for BERT, BOS for
      Llama, plus the instruction's tokens when one is configured).
    suffix_ids: token ids that close every sentence ([SEP] for BERT, EOS
      when append_eos is set).
    append_eos: whether every text and sentence ends with the EOS token.
    comma_id: id of the "," token.
    pad_id: id used for padding (0 when the tokenizer has no pad token).
    cls_id, sep_id, bos_id, eos_id: the tokenizer's special ids, or None.
    fingerprint: hex digest of everything that changes an embedding (config,
      weight file headers, tokenizer, dtype, pooling, attention, prefix and
      suffix), for caches.
  """

  name: str
  folder: pathlib.Path
  family: str
  hidden_size: int
  vocab_size: int
  pooling: str
  causal: bool
  dtype: str
  max_positions: int
  prefix_ids: tuple[int, ...]
  suffix_ids: tuple[int, ...]
  append_eos: bool
  comma_id: int
  pad_id: int
  cls_id: int | None
  sep_id: int | None
  bos_id: int | None
  eos_id: int | None
  fingerprint: str


@dataclasses.dataclass(frozen=True, eq=False)
class LLM:
  """A loaded, frozen LLM.

  Attributes:
    module: the Flax module (`bert.Bert` or `decoder.Decoder`).
    params: its params; pass them to the methods below explicitly.
    tokenizer: the Hugging Face tokenizer of the model.
    info: facts about the model (`LLMInfo`).
  """

  module: nn.Module
  params: Params
  tokenizer: Any
  info: LLMInfo

  def _apply(self, params, *args, rng, deterministic, **kwargs):
    if not deterministic and rng is None:
      raise ValueError("deterministic=False needs an rng for dropout.")
    rngs = {} if deterministic else {"dropout": rng}
    return self.module.apply(
      {"params": jax.lax.stop_gradient(params)},
      *args,
      deterministic=deterministic,
      rngs=rngs,
      **kwargs,
    )

  def hidden_states(
    self,
    params: Params,
    inputs_embeds: jax.Array,
    mask: jax.Array,
    *,
    deterministic: bool = True,
    rng: jax.Array | None = None,
  ) -> jax.Array:
    """Final hidden states [batch, length, hidden] in the model dtype.

    Args:
      params: `self.params` (or a copy with other shardings).
      inputs_embeds: [batch, length, hidden] input-token embeddings, such as
        rows of `token_table`; the model adds its own position (and for BERT
        token-type) embeddings.
      mask: [batch, length], 1 for real tokens, 0 for right padding.
      deterministic: False turns on the model's own dropout.
      rng: key for that dropout.
    """
    return self._apply(
      params, inputs_embeds, mask, rng=rng, deterministic=deterministic
    )

  def encode(
    self,
    params: Params,
    inputs_embeds: jax.Array,
    mask: jax.Array,
    *,
    deterministic: bool = True,
    rng: jax.Array | None = None,
  ) -> jax.Array:
    """Pooled, L2-normalised sentence embeddings [batch, hidden] float32.

    Same arguments as `hidden_states`; pooling follows `info.pooling`.
    """
    hidden = self.hidden_states(
      params, inputs_embeds, mask, deterministic=deterministic, rng=rng
    )
    return l2_normalize(_POOL_FNS[self.info.pooling](hidden, mask))

  def embed_ids(self, params: Params, input_ids: jax.Array) -> jax.Array:
    """Input-token embeddings of ids: [...] -> [..., hidden]."""
    return jnp.take(self.token_table(params), input_ids, axis=0)

  def encode_ids(
    self,
    params: Params,
    input_ids: jax.Array,
    mask: jax.Array,
    *,
    deterministic: bool = True,
    rng: jax.Array | None = None,
  ) -> jax.Array:
    """`encode` of token ids [batch, length] -> [batch, hidden] float32."""
    return self.encode(
      params,
      self.embed_ids(params, input_ids),
      mask,
      deterministic=deterministic,
      rng=rng,
    )

  def frame(self, params: Params, content: jax.Array) -> jax.Array:
    """Wraps unpadded content embeddings in the model's sentence frame.

    Args:
      params: the LLM params.
      content: [batch, length, hidden] input-token embeddings of a
        sentence's content (for FACE: prompt, words and commas).

    Returns:
      [batch, len(prefix_ids) + length + len(suffix_ids), hidden]: the
      prefix tokens' embeddings ([CLS]; BOS and any instruction), the
      content, then the suffix tokens' embeddings ([SEP]; EOS).
    """
    table = self.token_table(params)
    batch = content.shape[0]

    def rows(ids):
      picked = table[jnp.asarray(ids, jnp.int32)].astype(content.dtype)
      return jnp.broadcast_to(picked, (batch, *picked.shape))

    return jnp.concatenate(
      [rows(self.info.prefix_ids), content, rows(self.info.suffix_ids)],
      axis=1,
    )

  def token_table(self, params: Params) -> jax.Array:
    """The frozen input-token embedding table [vocab_size, hidden]."""
    table_path = _FAMILIES[self.info.family].token_table
    return jax.lax.stop_gradient(params[table_path[0]][table_path[1]])

  def tokenize(
    self, texts: Sequence[str], max_length: int
  ) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and mask of texts, right padded to the longest.

    The model's special tokens are added as its tokenizer adds them; with
    append_eos the EOS token ends each text (after truncation).

    Returns:
      (ids, mask), both [len(texts), longest] int32.
    """
    if self.info.family == "bert" and max_length > self.info.max_positions:
      raise LLMConfigError(
        f"max_length {max_length} exceeds the {self.info.max_positions} "
        f"positions of {self.info.name}; lower config.llm.max_length."
      )
    append_eos = self.info.append_eos
    budget = max_length - 1 if append_eos else max_length
    rows = self.tokenizer(
      list(texts), truncation=True, max_length=budget, padding=False
    )["input_ids"]
    if append_eos:
      eos = self.info.eos_id
      rows = [row if row and row[-1] == eos else [*row, eos] for row in rows]
    longest = max((len(row) for row in rows), default=0)
    ids = np.full((len(rows), longest), self.info.pad_id, np.int32)
    mask = np.zeros((len(rows), longest), np.int32)
    for i, row in enumerate(rows):
      ids[i, : len(row)] = row
      mask[i, : len(row)] = 1
    return ids, mask


@dataclasses.dataclass(frozen=True)
class _Family:
  """How to build one model family."""

  make_module: Callable[[specs.Spec, Any, bool], nn.Module]
  token_table: tuple[str, str]
  default_pooling: str


def _make_bert(spec, dtype, causal):
  if causal:
    raise LLMConfigError(
      "config.llm.attention='causal' does not apply to BERT, which is "
      "bidirectional; use 'auto'."
    )
  return bert.Bert(spec, dtype)


def _make_decoder(spec, dtype, causal):
  return decoder.Decoder(spec, dtype, causal)


# model_type -> how to build it.
_FAMILIES = {
  "bert": _Family(_make_bert, bert.TOKEN_TABLE, "mean"),
  "llama": _Family(_make_decoder, decoder.TOKEN_TABLE, "last"),
  "qwen2": _Family(_make_decoder, decoder.TOKEN_TABLE, "last"),
}


def _choose(name: str, value: str, allowed: Sequence[str]) -> str:
  if value not in allowed:
    raise LLMConfigError(
      f"config.llm.{name}={value!r}; choose one of {sorted(allowed)}."
    )
  return value


def _pooling(config, folder: pathlib.Path, family: str) -> str:
  """Explicit config.llm.pooling, else sentence-transformers' 1_Pooling
  settings, else the family default."""
  if config.pooling != "auto":
    return _choose("pooling", config.pooling, POOLINGS)
  pooling_file = folder / "1_Pooling" / "config.json"
  if pooling_file.is_file():
    settings = json.loads(pooling_file.read_text())
    for key, pooling in (
      ("pooling_mode_mean_tokens", "mean"),
      ("pooling_mode_lasttoken", "last"),
    ):
      if settings.get(key):
        return pooling
    raise LLMConfigError(
      f"{pooling_file} asks for a pooling face_jax lacks ({settings}); set "
      f"config.llm.pooling to one of {list(POOLINGS)}."
    )
  return _FAMILIES[family].default_pooling


def _causal(config, folder: pathlib.Path, family: str) -> bool:
  attention = _choose("attention", config.attention, ATTENTIONS)
  if attention != "auto":
    return attention == "causal"
  if family == "bert":
    return False
  # Some embedding checkpoints record bidirectional attention here.
  return bool(specs.read_config(folder).get("is_causal", True))


def _sentence_frame(tokenizer, family, instruction, append_eos):
  """(prefix_ids, suffix_ids) that the model puts around a sentence."""
  bare = tokenizer("a", add_special_tokens=False)["input_ids"]
  framed = tokenizer("a", add_special_tokens=True)["input_ids"]
  start = next(
    (
      i
      for i in range(len(framed) - len(bare) + 1)
      if framed[i : i + len(bare)] == bare
    ),
    None,
  )
  if start is None:
    raise LLMConfigError(
      f"Cannot tell the tokenizer's special tokens apart: 'a' gives {bare} "
      f"alone and {framed} framed."
    )
  prefix = list(framed[:start])
  suffix = list(framed[start + len(bare) :])
  if instruction:
    prefix += tokenizer(instruction, add_special_tokens=False)["input_ids"]
  if append_eos:
    if family == "bert":
      raise LLMConfigError(
        "config.llm.append_eos applies to decoder LLMs; BERT already ends "
        "each sentence with [SEP]. Set it to False."
      )
    if tokenizer.eos_token_id is None:
      raise LLMConfigError(
        "config.llm.append_eos is set but the tokenizer has no EOS token."
      )
    if not suffix or suffix[-1] != tokenizer.eos_token_id:
      suffix.append(tokenizer.eos_token_id)
  return tuple(prefix), tuple(suffix)


def _comma_id(tokenizer) -> int:
  comma = tokenizer.convert_tokens_to_ids(",")
  if comma is None or comma == tokenizer.unk_token_id:
    raise LLMConfigError("The tokenizer has no ',' token to separate words.")
  return int(comma)


def _fingerprint(folder: pathlib.Path, extras: dict) -> str:
  """Digest of the model files' identity and the settings in `extras`."""
  digest = hashlib.sha256()
  for name in ("config.json", "tokenizer.json", "vocab.txt", "tokenizer.model"):
    if (folder / name).is_file():
      digest.update(name.encode() + (folder / name).read_bytes())
  for shard in Checkpoint(folder).files:
    # Names, dtypes, shapes and offsets of every tensor, plus the file size.
    digest.update(shard.path.name.encode())
    digest.update(str(shard.path.stat().st_size).encode())
    digest.update(json.dumps(shard.entries, sort_keys=True).encode())
  digest.update(json.dumps(extras, sort_keys=True).encode())
  return digest.hexdigest()


def load_llm(
  config: ml_collections.ConfigDict,
  *,
  shardings: weights.ShardingFn | None = None,
  cache_dir: str | None = None,
) -> LLM:
  """Loads the frozen LLM named by the `llm` config section.

  Args:
    config: the `llm` section (model, dtype, pooling, attention, instruction,
      append_eos).
    shardings: optional (param path, shape) -> Sharding; every tensor is
      placed there as it is read. None puts params on the default device.
    cache_dir: Hugging Face hub cache; None for the standard one.

  Returns:
    The `LLM`.

  Raises:
    ModelNotFoundError: the model folder cannot be found.
    UnsupportedModelError: the architecture is not implemented.
    LLMConfigError: a config value does not fit the model.
  """
  dtype_name = _choose("dtype", config.dtype, tuple(DTYPES))
  folder = resolve_model_folder(config.model, cache_dir)
  spec = specs.read_spec(folder)
  family = spec.family
  causal = _causal(config, folder, family)
  module = _FAMILIES[family].make_module(spec, DTYPES[dtype_name], causal)

  # Shapes only: nothing is initialised or allocated.
  ones = jnp.ones((1, 1), jnp.int32)
  abstract = jax.eval_shape(
    lambda: module.init(jax.random.key(0), ones, ones, method="from_ids")
  )["params"]
  params = weights.load_params(
    Checkpoint(folder), spec, abstract, np.dtype(DTYPES[dtype_name]), shardings
  )

  tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
  prefix, suffix = _sentence_frame(
    tokenizer, family, config.instruction, config.append_eos
  )
  pooling = _pooling(config, folder, family)
  extras = {
    "dtype": dtype_name,
    "pooling": pooling,
    "causal": causal,
    "prefix": prefix,
    "suffix": suffix,
  }
  info = LLMInfo(
    name=config.model,
    folder=folder,
    family=family,
    hidden_size=spec.hidden_size,
    vocab_size=spec.vocab_size,
    pooling=pooling,
    causal=causal,
    dtype=dtype_name,
    max_positions=spec.max_positions,
    prefix_ids=prefix,
    suffix_ids=suffix,
    append_eos=bool(config.append_eos),
    comma_id=_comma_id(tokenizer),
    pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
    cls_id=tokenizer.cls_token_id,
    sep_id=tokenizer.sep_token_id,
    bos_id=tokenizer.bos_token_id,
    eos_id=tokenizer.eos_token_id,
    fingerprint=_fingerprint(folder, extras),
  )
  return LLM(module=module, params=params, tokenizer=tokenizer, info=info)
