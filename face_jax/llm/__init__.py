"""Frozen LLM text encoders (BERT, Llama, Qwen2) and the descriptor
vocabulary.

`load_llm(config.llm)` gives an `LLM` (module, params, tokenizer, facts);
`descriptor_vocabulary(llm.tokenizer, config.vocab)` the codebook tokens;
`profile_embeddings(llm, texts, ...)` the cached profile-text targets.
"""

from face_jax.llm.model import (
  LLM,
  LLMConfigError,
  LLMInfo,
  l2_normalize,
  last_token_pool,
  load_llm,
  mean_pool,
)
from face_jax.llm.profiles import encode_texts, profile_embeddings
from face_jax.llm.resolve import ModelNotFoundError, resolve_model_folder
from face_jax.llm.safetensors_io import CheckpointError
from face_jax.llm.specs import UnsupportedModelError
from face_jax.llm.vocab import (
  Vocabulary,
  VocabularyError,
  descriptor_vocabulary,
)

__all__ = [
  "LLM",
  "CheckpointError",
  "LLMConfigError",
  "LLMInfo",
  "ModelNotFoundError",
  "UnsupportedModelError",
  "Vocabulary",
  "VocabularyError",
  "descriptor_vocabulary",
  "encode_texts",
  "l2_normalize",
  "last_token_pool",
  "load_llm",
  "mean_pool",
  "profile_embeddings",
  "resolve_model_folder",
]
