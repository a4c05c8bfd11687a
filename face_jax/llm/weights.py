"""Hugging Face checkpoint tensors -> face_jax parameter trees.

Each parameter of our modules has a path such as
`layers_0/attention/query/kernel`; `hf_names` gives the checkpoint tensor it
comes from and whether it is transposed (PyTorch stores linear weights as
[out, in], Flax as [in, out]). Loading walks the parameters one at a time: a
tensor is read from the memory-mapped file, converted, and placed on its
devices before the next is read, so the host never holds a second full copy
of the model.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from absl import logging
from flax import traverse_util

from face_jax.llm.safetensors_io import Checkpoint, CheckpointError
from face_jax.llm.specs import BertSpec, DecoderSpec, Spec

# (param path, shape) -> where that parameter lives.
ShardingFn = Callable[[str, tuple[int, ...]], jax.sharding.Sharding]

# Checkpoint tensors that the encoders never use: BERT's pooler and
# masked-LM head, BERT's stored position ids, decoders' language-model head.
_UNUSED_PREFIXES = ("pooler.", "cls.", "lm_head.")
_UNUSED_SUFFIXES = ("position_ids", "rotary_emb.inv_freq")


def _add_dense(names, ours, theirs, bias=True):
  names[f"{ours}/kernel"] = (f"{theirs}.weight", True)
  if bias:
    names[f"{ours}/bias"] = (f"{theirs}.bias", False)


def _add_layer_norm(names, ours, theirs):
  names[f"{ours}/scale"] = (f"{theirs}.weight", False)
  names[f"{ours}/bias"] = (f"{theirs}.bias", False)


def _bert_names(spec: BertSpec) -> dict[str, tuple[str, bool]]:
  names = {
    "word_embeddings/embedding": ("embeddings.word_embeddings.weight", False),
    "position_embeddings/embedding": (
      "embeddings.position_embeddings.weight",
      False,
    ),
    "token_type_embeddings/embedding": (
      "embeddings.token_type_embeddings.weight",
      False,
    ),
  }
  _add_layer_norm(names, "embeddings_norm", "embeddings.LayerNorm")
  for i in range(spec.num_layers):
    ours, theirs = f"layers_{i}", f"encoder.layer.{i}"
    for part in ("query", "key", "value"):
      _add_dense(
        names, f"{ours}/attention/{part}", f"{theirs}.attention.self.{part}"
      )
    _add_dense(
      names, f"{ours}/attention/out", f"{theirs}.attention.output.dense"
    )
    _add_layer_norm(
      names, f"{ours}/attention_norm", f"{theirs}.attention.output.LayerNorm"
    )
    _add_dense(names, f"{ours}/mlp_in", f"{theirs}.intermediate.dense")
    _add_dense(names, f"{ours}/mlp_out", f"{theirs}.output.dense")
    _add_layer_norm(names, f"{ours}/mlp_norm", f"{theirs}.output.LayerNorm")
  return names


def _decoder_names(spec: DecoderSpec) -> dict[str, tuple[str, bool]]:
  names = {
    "embed_tokens/embedding": ("embed_tokens.weight", False),
    "final_norm/scale": ("norm.weight", False),
  }
  for i in range(spec.num_layers):
    ours, theirs = f"layers_{i}", f"layers.{i}"
    names[f"{ours}/input_norm/scale"] = (
      f"{theirs}.input_layernorm.weight",
      False,
    )
    names[f"{ours}/mlp_norm/scale"] = (
      f"{theirs}.post_attention_layernorm.weight",
      False,
    )
    for part, proj in (("query", "q"), ("key", "k"), ("value", "v")):
      _add_dense(
        names,
        f"{ours}/attention/{part}",
        f"{theirs}.self_attn.{proj}_proj",
        spec.qkv_bias,
      )
    _add_dense(
      names,
      f"{ours}/attention/out",
      f"{theirs}.self_attn.o_proj",
      spec.out_bias,
    )
    for part in ("gate", "up", "down"):
      _add_dense(
        names, f"{ours}/mlp_{part}", f"{theirs}.mlp.{part}_proj", spec.mlp_bias
      )
  return names


def hf_names(spec: Spec) -> dict[str, tuple[str, bool]]:
  """Our param path -> (checkpoint name without model prefix, transpose)."""
  if isinstance(spec, BertSpec):
    return _bert_names(spec)
  return _decoder_names(spec)


def _model_prefix(checkpoint: Checkpoint, names) -> str:
  """The prefix ("", "bert.", "model.") the checkpoint puts on every name.

  Base-model checkpoints store `embeddings.word_embeddings.weight`, task
  checkpoints `bert.embeddings...` or `model.embed_tokens...`.
  """
  expected = [name for name, _ in names.values()]
  matches = {
    prefix: sum(prefix + name in checkpoint for name in expected)
    for prefix in ("", "bert.", "model.")
  }
  best = max(matches, key=matches.get)
  if matches[best] == 0:
    raise CheckpointError(
      f"The checkpoint at {checkpoint.folder} has none of the expected "
      f"tensors (e.g. {expected[0]}, also with a 'bert.' or 'model.' "
      f"prefix); its first tensors are {checkpoint.names()[:5]}. Is "
      "config.json's model_type right?"
    )
  return best


def _legacy_name(name: str) -> str:
  # Old BERT checkpoints call the layer-norm parameters gamma and beta.
  return name.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
    "LayerNorm.bias", "LayerNorm.beta"
  )


def _source_name(checkpoint, prefix, name, spec) -> str:
  for candidate in (prefix + name, prefix + _legacy_name(name)):
    if candidate in checkpoint:
      return candidate
  if (
    isinstance(spec, DecoderSpec)
    and spec.tie_word_embeddings
    and name == "embed_tokens.weight"
    and "lm_head.weight" in checkpoint
  ):
    return "lm_head.weight"
  raise CheckpointError(
    f"The checkpoint at {checkpoint.folder} lacks {prefix + name}; it does "
    "not match config.json."
  )


def place(
  host: np.ndarray, path: str, shardings: ShardingFn | None
) -> jax.Array:
  """Puts one host array on device(s) without copying it whole per device.

  With a sharding, each device receives only its own slice of `host`.
  """
  if shardings is None:
    return jax.device_put(host)
  sharding = shardings(path, host.shape)
  return jax.make_array_from_callback(
    host.shape, sharding, lambda index: host[index]
  )


def load_params(
  checkpoint: Checkpoint,
  spec: Spec,
  abstract: dict,
  dtype: np.dtype,
  shardings: ShardingFn | None = None,
) -> dict:
  """Reads every parameter of `abstract` from the checkpoint.

  Args:
    checkpoint: the model's tensors.
    spec: the architecture, which decides the name mapping.
    abstract: the params tree of shapes (`jax.eval_shape` of the module's
      init), whose paths and shapes the loaded tree must match.
    dtype: dtype of the loaded params.
    shardings: optional (path, shape) -> Sharding; each tensor is placed
      there directly. None puts every tensor on the default device.

  Returns:
    The params tree (nested dicts of jax.Array), same structure as
    `abstract`.

  Raises:
    CheckpointError: a tensor is missing or has the wrong shape.
  """
  names = hf_names(spec)
  prefix = _model_prefix(checkpoint, names)
  flat_abstract = traverse_util.flatten_dict(abstract, sep="/")
  if set(flat_abstract) != set(names):
    raise AssertionError(
      "Module parameters and the name map disagree: "
      f"{sorted(set(flat_abstract) ^ set(names))[:5]}"
    )
  used = set()
  flat = {}
  for path, target in flat_abstract.items():
    name, transpose = names[path]
    source = _source_name(checkpoint, prefix, name, spec)
    used.add(source)
    tensor = checkpoint.get(source)
    if transpose:
      tensor = tensor.T
    if tensor.shape != target.shape:
      flip = (lambda shape: shape[::-1]) if transpose else tuple
      raise CheckpointError(
        f"{source} in {checkpoint.folder} has shape {flip(tensor.shape)} "
        f"where config.json implies {flip(target.shape)} (for {path}); the "
        "checkpoint does not match config.json."
      )
    host = np.ascontiguousarray(tensor, dtype=dtype)
    flat[path] = place(host, path, shardings)
    del host, tensor
  unused = [
    n
    for n in checkpoint.names()
    if n not in used
    and not n.removeprefix(prefix).startswith(_UNUSED_PREFIXES)
    and not n.endswith(_UNUSED_SUFFIXES)
  ]
  if unused:
    logging.warning(
      "%d checkpoint tensors were not used, e.g. %s", len(unused), unused[:5]
    )
  return traverse_util.unflatten_dict(flat, sep="/")
