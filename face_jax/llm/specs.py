"""Architecture facts read from a Hugging Face `config.json`.

The JSON is read directly rather than through `transformers.AutoConfig`,
whose attribute names have changed across releases (rope settings moved from
`rope_theta`/`rope_scaling` to `rope_parameters`); both spellings are
accepted here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any

import numpy as np


class UnsupportedModelError(ValueError):
  """The model's architecture or one of its settings is not implemented."""


@dataclasses.dataclass(frozen=True)
class BertSpec:
  """A BERT encoder (all-MiniLM-L6-v2 and its kin)."""

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_positions: int
  type_vocab_size: int
  layer_norm_eps: float
  hidden_dropout: float
  attention_dropout: float
  hidden_act: str
  family: str = "bert"


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
  """A decoder-only LLM of the Llama family (Llama, Qwen2).

  Attributes:
    inv_frequencies: rotary inverse frequencies [head_dim // 2], after any
      rope scaling; a tuple so that the spec stays hashable.
  """

  family: str
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  max_positions: int
  rms_norm_eps: float
  hidden_act: str
  attention_dropout: float
  qkv_bias: bool
  out_bias: bool
  mlp_bias: bool
  tie_word_embeddings: bool
  inv_frequencies: tuple[float, ...]


Spec = BertSpec | DecoderSpec


def read_config(folder: pathlib.Path) -> dict[str, Any]:
  path = folder / "config.json"
  if not path.is_file():
    raise UnsupportedModelError(
      f"{folder} has no config.json; point config.llm.model at a Hugging "
      "Face model folder."
    )
  return json.loads(path.read_text())


def _bert_spec(config: dict[str, Any]) -> BertSpec:
  position_kind = config.get("position_embedding_type", "absolute")
  if position_kind != "absolute":
    raise UnsupportedModelError(
      f"BERT position_embedding_type {position_kind!r} is not implemented; "
      "only 'absolute' is."
    )
  return BertSpec(
    vocab_size=config["vocab_size"],
    hidden_size=config["hidden_size"],
    num_layers=config["num_hidden_layers"],
    num_heads=config["num_attention_heads"],
    intermediate_size=config["intermediate_size"],
    max_positions=config["max_position_embeddings"],
    type_vocab_size=config.get("type_vocab_size", 2),
    layer_norm_eps=config.get("layer_norm_eps", 1e-12),
    hidden_dropout=config.get("hidden_dropout_prob", 0.1),
    attention_dropout=config.get("attention_probs_dropout_prob", 0.1),
    hidden_act=config.get("hidden_act", "gelu"),
  )


def _rope_settings(config: dict[str, Any]) -> tuple[float, dict | None]:
  """Returns (theta, scaling) from either config spelling."""
  params = config.get("rope_parameters")
  if params:
    scaling = dict(params)
    theta = scaling.pop("rope_theta", config.get("rope_theta", 10000.0))
  else:
    theta = config.get("rope_theta", 10000.0)
    scaling = dict(config["rope_scaling"]) if config.get("rope_scaling") else {}
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  return float(theta), (None if kind == "default" else scaling)


def _llama3_scaling(inv_freq: np.ndarray, scaling: dict) -> np.ndarray:
  """Llama 3.1 rope: long wavelengths slowed by `factor`, short ones kept,
  the band between blended smoothly."""
  factor = scaling["factor"]
  low = scaling.get("low_freq_factor", 1.0)
  high = scaling.get("high_freq_factor", 4.0)
  context = scaling["original_max_position_embeddings"]
  wavelength = 2 * math.pi / inv_freq
  blend = (context / wavelength - low) / (high - low)
  blended = (1 - blend) * inv_freq / factor + blend * inv_freq
  return np.where(
    wavelength > context / low,
    inv_freq / factor,
    np.where(wavelength < context / high, inv_freq, blended),
  )


# rope_type -> inv_freq rescaling; "default" means no scaling.
_ROPE_SCALINGS = {
  "linear": lambda inv_freq, scaling: inv_freq / scaling["factor"],
  "llama3": _llama3_scaling,
}


def inverse_frequencies(
  head_dim: int, theta: float, scaling: dict | None
) -> np.ndarray:
  """Rotary inverse frequencies [head_dim // 2] in float64."""
  exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
  inv_freq = 1.0 / theta**exponents
  if scaling is None:
    return inv_freq
  kind = scaling.get("rope_type", scaling.get("type"))
  if kind not in _ROPE_SCALINGS:
    raise UnsupportedModelError(
      f"rope scaling type {kind!r} is not implemented; supported are "
      f"'default' (none), {sorted(_ROPE_SCALINGS)}."
    )
  return _ROPE_SCALINGS[kind](inv_freq, scaling)


def _decoder_spec(config: dict[str, Any]) -> DecoderSpec:
  family = config["model_type"]
  if config.get("use_sliding_window", False):
    raise UnsupportedModelError(
      f"{family} with use_sliding_window=true is not implemented; only "
      "full attention is."
    )
  hidden = config["hidden_size"]
  heads = config["num_attention_heads"]
  head_dim = config.get("head_dim") or hidden // heads
  theta, scaling = _rope_settings(config)
  # Qwen2 always has q/k/v biases and none on the output projection; Llama
  # puts `attention_bias` on all four.
  qwen = family == "qwen2"
  attention_bias = config.get("attention_bias", False)
  return DecoderSpec(
    family=family,
    vocab_size=config["vocab_size"],
    hidden_size=hidden,
    num_layers=config["num_hidden_layers"],
    num_heads=heads,
    num_kv_heads=config.get("num_key_value_heads") or heads,
    head_dim=head_dim,
    intermediate_size=config["intermediate_size"],
    max_positions=config.get("max_position_embeddings", 4096),
    rms_norm_eps=config.get("rms_norm_eps", 1e-6),
    hidden_act=config.get("hidden_act", "silu"),
    attention_dropout=config.get("attention_dropout", 0.0),
    qkv_bias=qwen or attention_bias,
    out_bias=(not qwen) and attention_bias,
    mlp_bias=config.get("mlp_bias", False),
    tie_word_embeddings=config.get("tie_word_embeddings", False),
    inv_frequencies=tuple(
      float(f) for f in inverse_frequencies(head_dim, theta, scaling)
    ),
  )


# config.json model_type -> spec reader.
_READERS = {
  "bert": _bert_spec,
  "llama": _decoder_spec,
  "qwen2": _decoder_spec,
}


def read_spec(folder: pathlib.Path) -> Spec:
  """Reads the architecture of the model in `folder`.

  Raises:
    UnsupportedModelError: no config.json, an unknown model_type, or a
      setting this implementation does not cover.
  """
  config = read_config(folder)
  model_type = config.get("model_type")
  if model_type not in _READERS:
    raise UnsupportedModelError(
      f"{folder / 'config.json'} has model_type {model_type!r}; supported "
      f"model types are {sorted(_READERS)}."
    )
  return _READERS[model_type](config)
