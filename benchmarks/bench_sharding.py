"""Per-device memory of vocabulary-sharded steps on 8 fake CPU devices.

Two measures, each appended to benchmarks/results.jsonl (stage "sharding"):

  quantizer: the codebook map (LLM hidden -> 256) of a frozen token table
    and the quantiser's forward and backward on z_e [768 * 16, 256] (a batch
    of 256 triples, 16 words each), with the table and codebook split over
    the vocabulary axis ("model") of a (data, model) mesh. For each
    vocabulary size and vocabulary shard count: the compiled step's memory
    per device (arguments, temporaries, outputs, peak) and, for
    vocabularies up to --time_max_vocab, the median time of a step.
  align_7b: memory analysis only (nothing 7B-sized is allocated; inputs
    are ShapeDtypeStructs) of an align step at Qwen2-7B size on 8 devices:
    FACE on a 152,064 x 3,584 token table sharded over the vocabulary, the
    back-mapping into the LLM's input space, the frozen Qwen2-7B decoder
    (all 28 layers) in bfloat16 with its weights sharded by
    `face_jax.llm.layout.WEIGHT_AXES`, last-token pooling and InfoNCE,
    differentiated for the FACE parameters (so the backward pass runs
    through every LLM layer to its inputs), for each mesh of --align_meshes.

The 8 devices are fake: they share this machine's cores, so step times do
not shrink with more shards; they show what a step costs here.

From the repository root:
  python -m benchmarks.bench_sharding [--measures=quantizer,align_7b]
"""

from __future__ import annotations

import os

# 8 fake devices, set before jax is imported.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import datetime
import functools
import json
import pathlib
import shlex
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import base
from face_jax import parallel
from face_jax.llm import decoder, layout
from face_jax.llm.specs import DecoderSpec, inverse_frequencies
from face_jax.models import alignment, face, quantizer

RESULTS = pathlib.Path(__file__).resolve().parent / "results.jsonl"
MACHINE = "8 fake CPU devices on 2 cores"
MEASURES = ("quantizer", "align_7b")

_MEASURES = flags.DEFINE_list("measures", list(MEASURES), "What to measure.")
_VOCAB_SIZES = flags.DEFINE_list(
  "vocab_sizes", ["20000", "150000", "600000"], "Token table rows."
)
_SHARDS = flags.DEFINE_list(
  "vocab_shards", ["1", "2", "4", "8"], "Sizes of the vocabulary axis."
)
_HIDDEN = flags.DEFINE_integer("hidden", 4096, "LLM hidden size.")
_TIME_MAX_VOCAB = flags.DEFINE_integer(
  "time_max_vocab",
  20000,
  "Run and time the quantiser step for vocabularies up to this size; "
  "larger ones are compiled for their memory analysis only.",
)
_RUNS = flags.DEFINE_integer("runs", 2, "Timed steps (after one untimed).")
_LAYERS = flags.DEFINE_integer(
  "layers", 28, "Decoder layers of the 7B step (Qwen2-7B has 28)."
)
_ALIGN_MESHES = flags.DEFINE_list(
  "align_meshes", ["1x8", "2x4"], "(data)x(model) meshes of the 7B step."
)
_SENTENCES = flags.DEFINE_integer(
  "sentences", 96, "Sentences of the 7B align step (3 x 32 triples)."
)
_LENGTH = flags.DEFINE_integer("length", 48, "Tokens per sentence.")
_RESULTS = flags.DEFINE_string(
  "results", str(RESULTS), "JSON-lines file the rows are appended to."
)

RULES = base.get_base_config().mesh.rules
# FACE's sizes: 256 triples -> 768 entities, 16 words of width 256.
ENTITIES, WORDS, WORD_DIM = 768, 16, 256
CHUNK = 4096
_MIB = 1024 * 1024

# Qwen2-7B (config.json of Qwen/Qwen2-7B).
QWEN2_7B = {
  "vocab_size": 152064,
  "hidden_size": 3584,
  "num_layers": 28,
  "num_heads": 28,
  "num_kv_heads": 4,
  "intermediate_size": 18944,
  "rope_theta": 1_000_000.0,
}


def _mesh(shape) -> jax.sharding.Mesh:
  config = base.get_base_config().mesh
  config.shape = tuple(shape)
  return parallel.make_mesh(config)


def _sharding(mesh, axes, shape) -> NamedSharding:
  return parallel.named_sharding(mesh, RULES, axes, shape)


def _abstract(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _report_fields(report: parallel.MemoryReport) -> dict:
  return {
    "per_device_peak_mb": round(report.peak_mib, 1),
    "argument_mb": round(report.argument_mib, 1),
    "temp_mb": round(report.temp_mib, 1),
    "output_mb": round(report.output_mib, 1),
    "alias_mb": round(report.alias_mib, 1),
  }


def quantizer_step(params, token_table, z_e):
  """Loss and gradients of the codebook map and z_e through the quantiser."""

  def loss_fn(params, z_e):
    codebook = token_table @ params["kernel"] + params["bias"]
    codebook = parallel.with_logical_constraint(codebook, ("vocab", "embed"))
    out = quantizer.quantize(z_e, codebook, CHUNK)
    # The straight-through words feed the decoder in FACE; a quadratic
    # stands in for it.
    return out.vq_loss + jnp.mean(out.z_q_st**2)

  return jax.value_and_grad(loss_fn, argnums=(0, 1))(params, z_e)


def _quantizer_case(vocab, hidden, shards):
  """Compiled quantiser step and its abstract inputs on a mesh."""
  mesh = _mesh((8 // shards, shards))
  replicated = NamedSharding(mesh, P())
  table = _abstract(
    (vocab, hidden),
    jnp.float32,
    _sharding(mesh, ("vocab", "embed"), (vocab, hidden)),
  )
  params = {
    "kernel": _abstract((hidden, WORD_DIM), jnp.float32, replicated),
    "bias": _abstract((WORD_DIM,), jnp.float32, replicated),
  }
  z_shape = (ENTITIES, WORDS, WORD_DIM)
  z_e = _abstract(
    z_shape, jnp.float32, _sharding(mesh, ("batch", None, "embed"), z_shape)
  )
  with parallel.use_mesh(mesh, RULES):
    jitted = jax.jit(
      quantizer_step,
      in_shardings=(replicated, table.sharding, z_e.sharding),
      out_shardings=(replicated, (replicated, z_e.sharding)),
    )
    start = time.perf_counter()
    compiled = jitted.lower(params, table, z_e).compile()
  return compiled, (params, table, z_e), time.perf_counter() - start


def _materialise(abstract, seed):
  """Random arrays of the abstract inputs, created on their devices."""
  leaves, treedef = jax.tree.flatten(abstract)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  arrays = [
    jax.jit(
      functools.partial(jax.random.normal, shape=leaf.shape, dtype=leaf.dtype),
      out_shardings=leaf.sharding,
    )(key)
    for key, leaf in zip(keys, leaves, strict=True)
  ]
  return treedef.unflatten(arrays)


def _time(compiled, args, runs) -> float:
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def measure_quantizer(vocab, hidden, shards) -> dict:
  compiled, abstract, compile_seconds = _quantizer_case(vocab, hidden, shards)
  report = parallel.memory_report(compiled)
  row = {
    "measure": "quantizer",
    "vocab_size": vocab,
    "hidden": hidden,
    "mesh": f"data {8 // shards} x vocab {shards}",
    "vocab_shards": shards,
    "queries": ENTITIES * WORDS,
    "word_dim": WORD_DIM,
    "chunk": CHUNK,
    **_report_fields(report),
    "compile_seconds": round(compile_seconds, 1),
    "step_seconds": None,
  }
  if vocab <= _TIME_MAX_VOCAB.value:
    args = _materialise(abstract, seed=vocab + shards)
    row["step_seconds"] = round(_time(compiled, args, _RUNS.value), 3)
    row["runs"] = _RUNS.value
    del args
  return row


def qwen2_7b_spec(num_layers: int) -> DecoderSpec:
  """Qwen2-7B's architecture with `num_layers` layers."""
  head_dim = QWEN2_7B["hidden_size"] // QWEN2_7B["num_heads"]
  return DecoderSpec(
    family="qwen2",
    vocab_size=QWEN2_7B["vocab_size"],
    hidden_size=QWEN2_7B["hidden_size"],
    num_layers=num_layers,
    num_heads=QWEN2_7B["num_heads"],
    num_kv_heads=QWEN2_7B["num_kv_heads"],
    head_dim=head_dim,
    intermediate_size=QWEN2_7B["intermediate_size"],
    max_positions=32768,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    attention_dropout=0.0,
    qkv_bias=True,
    out_bias=False,
    mlp_bias=False,
    tie_word_embeddings=False,
    inv_frequencies=tuple(
      float(value)
      for value in inverse_frequencies(head_dim, QWEN2_7B["rope_theta"], None)
    ),
  )


def _align_case(mesh_shape, num_layers, sentences, length):
  """The compiled align-like step at Qwen2-7B size, abstract inputs."""
  mesh = _mesh(mesh_shape)
  replicated = NamedSharding(mesh, P())
  hidden = QWEN2_7B["hidden_size"]
  llm = decoder.Decoder(qwen2_7b_spec(num_layers), jnp.bfloat16, causal=True)
  llm_shapes = jax.eval_shape(
    lambda: llm.init(
      jax.random.key(0),
      jnp.zeros((1, 4), jnp.int32),
      jnp.ones((1, 4), jnp.int32),
      method="from_ids",
    )["params"]
  )
  weight_sharding = parallel.sharding_by_path(mesh, RULES, layout.WEIGHT_AXES)
  llm_params = jax.tree_util.tree_map_with_path(
    lambda path, leaf: _abstract(
      leaf.shape,
      leaf.dtype,
      weight_sharding(parallel.sharding.path_string(path), leaf.shape),
    ),
    llm_shapes,
  )
  model = face.FACE(
    embed_dim=256, token_dim=hidden, num_words=WORDS, word_dim=WORD_DIM
  )
  face_shapes = jax.eval_shape(
    functools.partial(face.init_params, model),
    jax.random.key(0),
    jax.ShapeDtypeStruct((WORDS, hidden), jnp.float32),
  )
  face_params = jax.tree.map(
    lambda leaf: _abstract(leaf.shape, leaf.dtype, replicated), face_shapes
  )
  batch = {
    "x": _abstract(
      (sentences, 256),
      jnp.float32,
      _sharding(mesh, ("batch", "embed"), (sentences, 256)),
    ),
    "targets": _abstract((sentences, hidden), jnp.float32, replicated),
  }
  prompt = length - 2 * WORDS - 1
  if prompt < 1:
    raise ValueError(f"--length={length} leaves no room for the prompt.")

  def step(face_params, llm_params, batch, rng):
    # The frozen token table is the LLM's own, in the model dtype.
    table = jax.lax.stop_gradient(llm_params["embed_tokens"]["embedding"])

    def loss_fn(face_params):
      out = model.apply(
        {"params": face_params},
        batch["x"],
        table,
        deterministic=False,
        rngs={"dropout": rng},
      )
      words = alignment.back_to_token_space(
        out["z_q"],
        face_params["codebook_map"]["kernel"],
        face_params["codebook_map"]["bias"],
      ).astype(jnp.bfloat16)
      # Prompt tokens, then each word followed by a comma, then EOS: rows
      # of the frozen table at fixed ids.
      fixed = jnp.take(table, jnp.arange(prompt + 2), axis=0)
      n = words.shape[0]
      commas = jnp.broadcast_to(fixed[prompt], words.shape)
      content = jnp.stack([words, commas], axis=2).reshape(n, 2 * WORDS, -1)
      sentence = jnp.concatenate(
        [
          jnp.broadcast_to(fixed[:prompt], (n, prompt, hidden)),
          content,
          jnp.broadcast_to(fixed[prompt + 1 :], (n, 1, hidden)),
        ],
        axis=1,
      )
      mask = jnp.ones(sentence.shape[:2], jnp.int32)
      states = llm.apply(
        {"params": jax.lax.stop_gradient(llm_params)}, sentence, mask
      )
      pooled = states[:, -1].astype(jnp.float32)
      pooled = pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True)
      targets = batch["targets"]
      targets = targets / jnp.linalg.norm(targets, axis=-1, keepdims=True)
      logits = pooled @ targets.T / alignment.ALIGN_TEMPERATURE
      info_nce = jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.diagonal(logits))
      return info_nce + out["vq_loss"] + out["recon_loss"]

    return jax.value_and_grad(loss_fn)(face_params)

  shardings = jax.tree.map(lambda leaf: leaf.sharding, llm_params)
  rng = _abstract((), jax.random.key(0).dtype, replicated)
  with parallel.use_mesh(mesh, RULES):
    jitted = jax.jit(
      step,
      in_shardings=(
        replicated,
        shardings,
        jax.tree.map(lambda leaf: leaf.sharding, batch),
        replicated,
      ),
      out_shardings=(replicated, replicated),
    )
    start = time.perf_counter()
    compiled = jitted.lower(face_params, llm_params, batch, rng).compile()
  params_bytes = sum(
    int(np.prod(leaf.shape)) * leaf.dtype.itemsize
    for leaf in jax.tree.leaves(llm_shapes)
  )
  return compiled, time.perf_counter() - start, params_bytes


def measure_align_7b(mesh_shape, layers, sentences, length) -> dict:
  """Memory per device of the 7B align step on one mesh."""
  compiled, seconds, params_bytes = _align_case(
    mesh_shape, layers, sentences, length
  )
  report = parallel.memory_report(compiled)
  return {
    "measure": "align_7b",
    "layers": layers,
    "vocab_size": QWEN2_7B["vocab_size"],
    "hidden": QWEN2_7B["hidden_size"],
    "mesh": f"data {mesh_shape[0]} x model {mesh_shape[1]}",
    "sentences": sentences,
    "length": length,
    "llm_dtype": "bfloat16",
    "llm_params_gb": round(params_bytes / 1e9, 2),
    **_report_fields(report),
    "gflops_per_device": round(report.gflops or 0.0, 1),
    "compile_seconds": round(seconds, 1),
    "step_seconds": None,
  }


def _append(rows: list[dict], path: pathlib.Path, load: tuple) -> None:
  common = {
    "stage": "sharding",
    "machine": MACHINE,
    "command": shlex.join(
      ["python", "-m", "benchmarks.bench_sharding", *sys.argv[1:]]
    ),
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    # The machine's load when the rows' measures started.
    "load_average": [round(value, 2) for value in load],
    "jax": jax.__version__,
  }
  with path.open("a", encoding="utf-8") as stream:
    for row in rows:
      stream.write(json.dumps({**common, **row}) + "\n")


def main(argv):
  del argv
  unknown = sorted(set(_MEASURES.value) - set(MEASURES))
  if unknown:
    raise app.UsageError(f"Unknown measures {unknown}; use {list(MEASURES)}.")
  if jax.device_count() != 8:
    raise app.UsageError(
      f"Found {jax.device_count()} devices; run on CPU with 8 fake devices "
      "(unset JAX_PLATFORMS and XLA_FLAGS)."
    )
  path = pathlib.Path(_RESULTS.value)
  if "quantizer" in _MEASURES.value:
    for vocab in (int(size) for size in _VOCAB_SIZES.value):
      load, rows = os.getloadavg(), []
      for shards in (int(count) for count in _SHARDS.value):
        row = measure_quantizer(vocab, _HIDDEN.value, shards)
        logging.info("%s", row)
        rows.append(row)
      _append(rows, path, load)
  if "align_7b" in _MEASURES.value:
    load, rows = os.getloadavg(), []
    for mesh in _ALIGN_MESHES.value:
      shape = tuple(int(size) for size in mesh.split("x"))
      rows.append(
        measure_align_7b(shape, _LAYERS.value, _SENTENCES.value, _LENGTH.value)
      )
      logging.info("%s", rows[-1])
    _append(rows, path, load)


if __name__ == "__main__":
  app.run(main)
