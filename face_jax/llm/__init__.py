"""Frozen LLM text encoders (BERT, Llama, Qwen2) and the descriptor
vocabulary."""

from face_jax.llm.model import (
  LLM,
  LLMConfigError,
  LLMInfo,
  l2_normalize,
  last_token_pool,
  load_llm,
  mean_pool,
)
from face_jax.llm.resolve import ModelNotFoundError, resolve_model_folder
from face_jax.llm.safetensors_io import CheckpointError
from face_jax.llm.specs import UnsupportedModelError

__all__ = [
  "LLM",
  "CheckpointError",
  "LLMConfigError",
  "LLMInfo",
  "ModelNotFoundError",
  "UnsupportedModelError",
  "l2_normalize",
  "last_token_pool",
  "load_llm",
  "mean_pool",
  "resolve_model_folder",
]
