"""The FACE stages: map (CF embeddings to LLM tokens) and align (to text).

Both stages train the backbone and the FACE module together. Map starts
from the pretrained backbone's best epoch and freshly initialised FACE
parameters; align starts from the map stage's best epoch with a fresh
optimiser, as the authors run each stage as its own training job. The loss
of a step is the backbone's own terms on the batch (BPR plus its extras),
plus vq_weight * VQ and recon_weight * reconstruction of the batch's final
embeddings x = [users; positives; negatives] (3B rows); align adds
align_weight * InfoNCE between the frozen LLM's encoding of each entity's
word sentence and the LLM's embedding of its profile text.

Frozen inputs are one constants pytree passed to the jitted step as its
`graph` argument, never closed over and never in the optimiser state:
{"graph": the backbone's graph, "codebook": [v, token_dim] token rows of
the descriptor vocabulary} for map, plus {"llm": the LLM's params (its
full token table included), "layout": the sentence layout, "user_profiles"
[num_users, h], "item_profiles" [num_items, h]} for align.

Like pretraining, each stage validates the backbone every epoch and stops
early on validation Recall@20, keeping the best epoch (the authors'
trainer does the same in every stage).

Both stages run on the mesh of `config.mesh`, as pretraining does: the
batch split over the mesh axes of "batch", the user and item tables (and
their moments) by rows, the codebook and the LLM's token table by
vocabulary rows (the token search runs shard by shard, see
`face_jax.parallel.vocab_top_w`), the other LLM weights as
`face_jax.llm.layout.WEIGHT_AXES` says and the profile embeddings by
entity rows. The FACE parameters are small and replicated. The state is
created (or restored) already laid out, and the compiled step's memory per
device is logged before the first step.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from face_jax import parallel
from face_jax.data import Dataset
from face_jax.evaluation import prepare_ranking
from face_jax.llm import LLM, Vocabulary, descriptor_vocabulary, load_llm
from face_jax.llm import layout as llm_layout
from face_jax.llm import profile_embeddings as llm_profile_embeddings
from face_jax.llm.layers import DROPOUT_MASK
from face_jax.models import alignment, backbones
from face_jax.models import face as face_lib
from face_jax.training import checkpoints, pretrain
from face_jax.training.loop import LoopState, fit
from face_jax.training.negatives import NegativeSampler, epoch_batches
from face_jax.training.optimizers import ParamGroup, grouped_adam
from face_jax.training.step import (
  StepLayout,
  TrainState,
  compile_train_step,
  make_train_step,
  resolve_rng_impl,
  sharded_train_state,
  state_logical_axes,
  step_layout,
)
from face_jax.training.writer import MetricWriter

MAP = "map"
ALIGN = "align"

# Streams folded into the seed, so that every stage draws its own numbers.
_FACE_INIT_STREAM = 10
_STAGE_STREAMS = {MAP: 11, ALIGN: 12}

# Parameter groups of the FACE stages (top-level keys of the params).
BACKBONE = "backbone"
FACE = "face"


# Logical axes of the params {"backbone": ..., "face": ...}: the backbone's
# tables as in pretraining, the FACE module replicated.
FACE_AXES_TABLE = (
  *(
    (f"{BACKBONE}/{pattern}", axes)
    for pattern, axes in pretrain.BACKBONE_AXES_TABLE
  ),
  (".*", None),
)
FACE_AXES = functools.partial(
  parallel.logical_axes_by_path, table=FACE_AXES_TABLE
)


class FaceStageError(ValueError):
  """A FACE stage cannot run with this config or dataset."""


@dataclasses.dataclass(frozen=True)
class FaceParts:
  """What every FACE stage builds before training or describing.

  Attributes:
    backbone: the CF backbone, its tables padded for `mesh`.
    graph: its graph, replicated on `mesh`.
    llm: the frozen LLM, its weights laid out on `mesh`.
    vocabulary: the descriptor vocabulary (codebook tokens).
    model: the FACE module.
    codebook: [v', token_dim] float32 frozen token rows of the vocabulary,
      split by rows on `mesh`; v' is len(vocabulary) padded with zero rows
      to the vocabulary shard count (`model.num_tokens` excludes them).
    mesh: the device mesh of the stage.
  """

  backbone: backbones.Backbone
  graph: Any
  llm: LLM
  vocabulary: Vocabulary
  model: face_lib.FACE
  codebook: jax.Array
  mesh: Mesh


def build_face_model(
  config: ml_collections.ConfigDict,
  token_dim: int,
  num_tokens: int | None = None,
) -> face_lib.FACE:
  """The FACE module of an experiment config for an LLM of `token_dim`.

  `num_tokens` is the real row count of a padded codebook (None: no
  padding).
  """
  face = config.face
  return face_lib.FACE(
    embed_dim=config.model.embed_dim,
    token_dim=token_dim,
    num_words=face.num_words,
    word_dim=face.word_dim,
    num_heads=face.num_heads,
    ff_dim=face.ff_dim,
    dropout_rate=face.dropout_rate,
    layer_norm_eps=face.layer_norm_eps,
    projection_init=face.projection_init,
    chunk_size=face.chunk_size,
    num_tokens=num_tokens,
  )


def vocabulary_codebook(
  llm: LLM, vocabulary: Vocabulary, mesh: Mesh, rules: parallel.Rules
) -> jax.Array:
  """The vocabulary's token rows, gathered shard by shard onto `mesh`.

  Args:
    llm: the frozen LLM (its token table may be split over `mesh`).
    vocabulary: the descriptor vocabulary.
    mesh: the device mesh.
    rules: logical-to-mesh rules.

  Returns:
    [v', hidden] float32, laid out by ("vocab", "embed"): v' is
    len(vocabulary) rounded up to the shard count of "vocab", the extra
    rows zero.
  """
  multiple = parallel.shard_count(mesh, rules, "vocab")
  rows = parallel.round_up(len(vocabulary), multiple)
  sharding = parallel.named_sharding(
    mesh, rules, ("vocab", "embed"), (rows, llm.info.hidden_size)
  )
  ids = parallel.place_global(
    np.asarray(vocabulary.token_ids, np.int32),
    parallel.named_sharding(mesh, rules, ()),
  )

  @functools.partial(jax.jit, out_shardings=sharding)
  def gather(table, ids):
    return parallel.pad_rows_to(table[ids].astype(jnp.float32), multiple)

  return gather(llm.token_table(llm.params), ids)


def load_face_parts(
  config: ml_collections.ConfigDict,
  dataset: Dataset,
  backbone: backbones.Backbone | None = None,
  graph: Any = None,
  mesh: Mesh | None = None,
) -> FaceParts:
  """Builds the backbone (unless given), loads the LLM and the codebook.

  The LLM's weights are placed on the mesh as they are read (each device
  receives only its slice), then the codebook is gathered from its token
  table shard by shard.

  Args:
    config: the resolved experiment config.
    dataset: the dataset.
    backbone: an already built backbone (padded for `mesh`), with its
      `graph`.
    graph: its graph, replicated on `mesh`.
    mesh: the device mesh; `make_mesh(config.mesh)` when None.

  Returns:
    The `FaceParts`.

  Raises:
    FaceStageError: the vocabulary has fewer tokens than words per entity.
  """
  mesh = parallel.make_mesh(config.mesh) if mesh is None else mesh
  rules = config.mesh.rules
  if backbone is None:
    backbone, graph = pretrain.build_backbone(config, dataset, mesh)
    graph = parallel.place_global(
      graph, parallel.named_sharding(mesh, rules, ())
    )
  llm = load_llm(
    config.llm,
    shardings=parallel.sharding_by_path(mesh, rules, llm_layout.WEIGHT_AXES),
  )
  vocabulary = descriptor_vocabulary(llm.tokenizer, config.vocab)
  if len(vocabulary) < config.face.num_words:
    raise FaceStageError(
      f"The descriptor vocabulary has {len(vocabulary)} tokens but every "
      f"entity needs config.face.num_words={config.face.num_words} distinct "
      "ones; raise config.vocab.size or lower num_words."
    )
  codebook = vocabulary_codebook(llm, vocabulary, mesh, rules)
  logging.info(
    "FACE codebook: %d tokens of %s (%d whole-word tokens before the list)",
    len(vocabulary),
    llm.info.name,
    vocabulary.whole_word_tokens,
  )
  padded = codebook.shape[0] > len(vocabulary)
  return FaceParts(
    backbone=backbone,
    graph=graph,
    llm=llm,
    vocabulary=vocabulary,
    model=build_face_model(
      config, llm.info.hidden_size, len(vocabulary) if padded else None
    ),
    codebook=codebook,
    mesh=mesh,
  )


def param_labels(params: dict) -> dict:
  """The group name of every leaf of {"backbone": ..., "face": ...}."""
  return {
    group: jax.tree.map(lambda _, group=group: group, params[group])
    for group in (BACKBONE, FACE)
  }


def face_optimizer(
  config: ml_collections.ConfigDict, params: Any = None
) -> optax.GradientTransformation:
  """Adam per group: FACE at face.learning_rate without L2; the backbone at
  face.backbone_learning_rate with coupled L2 2 * model.reg_weight.

  Given `params` (arrays or shapes), the groups are labelled once for
  their structure: the same optimiser, which `optax.tree_map_params` can
  also map onto the params' layout (it refuses label functions).
  """
  return grouped_adam(
    {
      FACE: ParamGroup(config.face.learning_rate),
      BACKBONE: ParamGroup(
        config.face.backbone_learning_rate, 2.0 * config.model.reg_weight
      ),
    },
    param_labels if params is None else param_labels(params),
  )


def _face_init_rng(config: ml_collections.ConfigDict) -> jax.Array:
  return jax.random.fold_in(jax.random.key(config.seed), _FACE_INIT_STREAM)


def _map_params_init(parts: FaceParts) -> Callable:
  """(rng, backbone_params, codebook) -> {"backbone", "face"} params."""

  def init(rng, backbone_params, codebook):
    face_params = face_lib.init_params(parts.model, rng, codebook)
    return {BACKBONE: backbone_params, FACE: face_params}

  return init


def initial_map_state(
  config: ml_collections.ConfigDict, parts: FaceParts, backbone_params: Any
) -> TrainState:
  """Step-0 state of the map stage: given backbone, fresh FACE params.

  Created on `parts.mesh` as `FACE_AXES` lays it out, in one compiled
  program (no device holds a whole sharded table or moment).
  """
  init = _map_params_init(parts)
  rng = _face_init_rng(config)
  shapes = jax.eval_shape(init, rng, backbone_params, parts.codebook)
  return sharded_train_state(
    init,
    face_optimizer(config, shapes),
    rng,
    parts.mesh,
    config.mesh.rules,
    FACE_AXES,
    backbone_params,
    parts.codebook,
  )


def fresh_state(
  config: ml_collections.ConfigDict, parts: FaceParts, params: dict
) -> TrainState:
  """A step-0 state of `params` with a fresh optimiser state.

  Laid out on `parts.mesh` by `FACE_AXES`, whatever the params' layout;
  the params themselves go in as arguments, not constants.
  """
  return sharded_train_state(
    lambda rng, params: params,
    face_optimizer(config, params),
    _face_init_rng(config),
    parts.mesh,
    config.mesh.rules,
    FACE_AXES,
    params,
  )


def face_state_target(
  config: ml_collections.ConfigDict, parts: FaceParts
) -> TrainState:
  """Shapes and shardings of a FACE stage's state on `parts.mesh`.

  Nothing is allocated; restoring a checkpoint into it places every array
  on the mesh, whatever mesh wrote it (padded table rows are cropped or
  zero-filled, see `face_jax.training.checkpoints`).
  """
  init = _map_params_init(parts)

  def params(rng, codebook):
    return init(rng, parts.backbone.init(rng), codebook)

  rng = _face_init_rng(config)
  optimizer = face_optimizer(
    config, jax.eval_shape(params, rng, parts.codebook)
  )
  shapes = jax.eval_shape(
    lambda rng, codebook: TrainState.create(params(rng, codebook), optimizer),
    rng,
    parts.codebook,
  )
  logical = state_logical_axes(shapes, optimizer, FACE_AXES)
  return parallel.abstract_target(
    shapes, parts.mesh, config.mesh.rules, logical
  )


def sentence_layout(
  llm: LLM, item_noun: str, num_words: int
) -> alignment.SentenceLayout:
  """Prompt, comma and frame tokens of the descriptor sentences.

  The frame (leading and trailing special tokens, any instruction) is the
  one the LLM puts around every text, so descriptor sentences and profile
  texts are framed alike.
  """
  ids = alignment.sentence_token_ids(llm.tokenizer, item_noun)
  ids = dataclasses.replace(
    ids,
    prefix_ids=tuple(llm.info.prefix_ids),
    suffix_ids=tuple(llm.info.suffix_ids),
    comma_id=llm.info.comma_id,
    pad_id=llm.info.pad_id,
  )
  return ids.layout(num_words)


def encode_sentences(
  llm: LLM,
  llm_params: Any,
  sentences: jax.Array,
  mask: jax.Array,
  rng: jax.Array,
  *,
  llm_dropout: bool,
  chunk: int = 0,
) -> jax.Array:
  """The frozen LLM's pooled embeddings of sentences, differentiable.

  With 0 < chunk < n the sentences go through the LLM `chunk` at a time
  under `jax.checkpoint`: the backward pass recomputes one chunk's
  activations at a time instead of keeping all of them, which bounds the
  memory of the align step (all activations of 3B sentences otherwise) for
  one more forward pass of the LLM. Each chunk draws its own dropout; the
  masks are kept (a byte per masked element, 0.3 GB for 768 MiniLM
  sentences of 46 tokens) so the backward pass does not draw them again.

  Args:
    llm: the frozen LLM.
    llm_params: its params.
    sentences: [n, T, h] input embeddings.
    mask: [n, T] attention mask.
    rng: key of the LLM's dropout.
    llm_dropout: keep the LLM's own dropout on.
    chunk: sentences per LLM call; 0 for all at once.

  Returns:
    [n, h] L2-normalised embeddings.
  """
  count = sentences.shape[0]
  deterministic = not llm_dropout
  if not 0 < chunk < count:
    return llm.encode(
      llm_params, sentences, mask, deterministic=deterministic, rng=rng
    )
  steps = -(-count // chunk)
  padding = steps * chunk - count
  # Padding rows have an empty mask; their (zero) outputs are dropped.
  sentences = jnp.pad(sentences, ((0, padding), (0, 0), (0, 0)))
  mask = jnp.pad(mask, ((0, padding), (0, 0)))

  @functools.partial(
    jax.checkpoint,
    policy=jax.checkpoint_policies.save_only_these_names(DROPOUT_MASK),
  )
  def encode_chunk(params, chunk_sentences, chunk_mask, chunk_rng):
    return llm.encode(
      params,
      chunk_sentences,
      chunk_mask,
      deterministic=deterministic,
      rng=chunk_rng,
    )

  encoded = jax.lax.map(
    lambda xs: encode_chunk(llm_params, *xs),
    (
      sentences.reshape(steps, chunk, *sentences.shape[1:]),
      mask.reshape(steps, chunk, mask.shape[1]),
      jax.random.split(rng, steps),
    ),
  )
  return encoded.reshape(steps * chunk, -1)[:count]


def alignment_loss(
  llm: LLM,
  face_params: dict,
  z_q: jax.Array,
  batch: dict[str, jax.Array],
  constants: dict[str, Any],
  rng: jax.Array,
  *,
  llm_dropout: bool,
  temperature: float,
  chunk: int = 0,
) -> jax.Array:
  """InfoNCE of the batch's word sentences against their profiles.

  Args:
    llm: the frozen LLM (its params come from `constants["llm"]`).
    face_params: the FACE params (for the codebook map to undo).
    z_q: [3B, W, word_dim] straight-through quantised words of the stacked
      (users, positives, negatives) batch.
    batch: "user", "pos", "neg" ids, each [B].
    constants: "llm", "layout", "user_profiles", "item_profiles".
    rng: key of the LLM's dropout.
    llm_dropout: keep the LLM's own dropout on.
    temperature: InfoNCE temperature.
    chunk: sentences per LLM call (see `encode_sentences`).

  Returns:
    Scalar loss.
  """
  codebook_map = face_params["codebook_map"]
  words = alignment.back_to_token_space(
    z_q, codebook_map["kernel"], codebook_map["bias"]
  )
  entity_type = alignment.stacked_entity_types(batch["user"].shape[0])
  llm_params = constants["llm"]
  sentences, mask = alignment.build_sentences(
    words, entity_type, constants["layout"], llm.token_table(llm_params)
  )
  collab = encode_sentences(
    llm,
    llm_params,
    sentences,
    mask,
    rng,
    llm_dropout=llm_dropout,
    chunk=chunk,
  )
  profile = jnp.concatenate(
    [
      constants["user_profiles"][batch["user"]],
      constants["item_profiles"][batch["pos"]],
      constants["item_profiles"][batch["neg"]],
    ]
  )
  return alignment.info_nce(collab, profile, temperature)


def make_face_loss(
  config: ml_collections.ConfigDict, parts: FaceParts, *, align: bool
) -> Callable:
  """(params, constants, batch, rng) -> (loss terms, stats) of a stage.

  Terms (weighted): the backbone's ("bpr", ...), "vq", "recon", and with
  `align` also "align". Stats: "distinct_tokens", how many different
  tokens the batch's descriptors use (see `distinct_count`).
  """
  face = config.face
  llm_dropout = bool(config.llm.train_dropout)
  if align and config.align.llm_chunk < 0:
    raise FaceStageError(
      f"config.align.llm_chunk={config.align.llm_chunk}; use 0 to encode "
      "all sentences at once or a positive number of sentences per call."
    )

  def loss_terms(params, constants, batch, rng):
    backbone_rng, face_rng, llm_rng = jax.random.split(rng, 3)
    terms, embeddings = parts.backbone.losses(
      params[BACKBONE], constants["graph"], batch, backbone_rng
    )
    outputs = parts.model.apply(
      {"params": params[FACE]},
      jnp.concatenate(embeddings),
      constants["codebook"],
      deterministic=False,
      rngs={"dropout": face_rng},
    )
    terms = dict(terms)
    terms["vq"] = face.vq_weight * outputs["vq_loss"]
    terms["recon"] = face.recon_weight * outputs["recon_loss"]
    if align:
      terms["align"] = face.align_weight * alignment_loss(
        parts.llm,
        params[FACE],
        outputs["z_q"],
        batch,
        constants,
        llm_rng,
        llm_dropout=llm_dropout,
        temperature=face.temperature,
        chunk=config.align.llm_chunk,
      )
    return terms, {"distinct_tokens": distinct_count(outputs["token_index"])}

  return loss_terms


def distinct_count(token_index: jax.Array) -> jax.Array:
  """How many different values `token_index` holds, as a float32 scalar.

  In a batch of 3B entities with W words each this ranges from W (every
  entity has the same descriptors: collapse) to min(3B * W, vocabulary);
  it is logged every epoch so a collapsing run shows in the logs long
  before the descriptors are exported.

  Args:
    token_index: [n, W] int token indices.

  Returns:
    float32 scalar.
  """
  ordered = jnp.sort(token_index.reshape(-1))
  changes = jnp.sum(ordered[1:] != ordered[:-1])
  return (changes + 1).astype(jnp.float32)


def make_stage_batches(
  config: ml_collections.ConfigDict,
  section: ml_collections.ConfigDict,
  dataset: Dataset,
  stage: str,
) -> Callable[[int], dict[str, np.ndarray]]:
  """epoch -> that epoch's batches of a FACE stage.

  With `section.steps_per_epoch` > 0 an epoch is the first that many
  batches of a fresh shuffle.
  """
  if section.steps_per_epoch < 0:
    raise FaceStageError(
      f"config.{stage}.steps_per_epoch={section.steps_per_epoch}; use 0 "
      "for whole epochs or a positive number of steps."
    )
  sampler = NegativeSampler(dataset.train, dataset.num_users, dataset.num_items)
  stream = _STAGE_STREAMS[stage]

  def make_batches(epoch: int) -> dict[str, np.ndarray]:
    # Seeded by epoch alone, so a resumed run draws the same epochs.
    rng = np.random.default_rng([config.seed, stream, epoch])
    batches = epoch_batches(dataset.train, sampler, section.batch_size, rng)
    if section.steps_per_epoch:
      batches = {
        name: values[: section.steps_per_epoch]
        for name, values in batches.items()
      }
    return batches

  return make_batches


def stage_rng(config: ml_collections.ConfigDict, stage: str) -> jax.Array:
  """Base key of a FACE stage's steps, of the config's PRNG implementation.

  Raises:
    FaceStageError: config.face.rng_impl is not a JAX PRNG implementation.
  """
  impl = resolve_rng_impl(config.face.rng_impl, jax.device_count())
  try:
    key = jax.random.key(config.seed, impl=impl)
  except ValueError as error:
    raise FaceStageError(
      f"config.face.rng_impl={config.face.rng_impl!r}: {error}; use "
      '"auto", "philox4x32" or "threefry2x32".'
    ) from error
  return jax.random.fold_in(key, _STAGE_STREAMS[stage])


def constants_shardings(mesh: Mesh, constants: Any) -> Any:
  """Where each leaf of a stage's constants goes on `mesh`.

  An array already laid out on `mesh` (the LLM's weights, the codebook,
  the profile rows, the graph) keeps its layout; anything else (host
  arrays, arrays on one device) is replicated.

  Returns:
    A tree of NamedShardings like `constants`.
  """
  replicated = NamedSharding(mesh, PartitionSpec())

  def sharding(leaf):
    if isinstance(leaf, jax.Array):
      placed = leaf.sharding
      if isinstance(placed, NamedSharding) and placed.mesh == mesh:
        return placed
    return replicated

  return jax.tree.map(sharding, constants)


@dataclasses.dataclass(frozen=True)
class FaceStep:
  """A FACE stage's step, compiled for its mesh, and its arguments.

  Attributes:
    train_step: the compiled step (state, batch, constants, rng) ->
      (state, metrics); host batches are split as `layout.batch` says.
    constants: the constants argument, placed on the mesh.
    rng: base rng of the steps, replicated.
    layout: where the step's arguments live.
  """

  train_step: Callable
  constants: Any
  rng: jax.Array
  layout: StepLayout


def setup_face_step(
  stage: str,
  config: ml_collections.ConfigDict,
  parts: FaceParts,
  state: TrainState,
  constants: dict[str, Any],
) -> FaceStep:
  """Lays out and compiles the train step of a FACE stage on `parts.mesh`.

  The batch is split over "batch", the state keeps its `FACE_AXES` layout
  (as `initial_map_state` and `fresh_state` create it) and the constants
  theirs (`constants_shardings`). The compiled step's memory per device is
  logged before it returns.

  Args:
    stage: MAP or ALIGN.
    config: the resolved experiment config.
    parts: the stage's parts.
    state: the step-0 state (arrays or ShapeDtypeStructs with shardings).
    constants: the constants pytree (see the module docstring).

  Returns:
    The FaceStep.
  """
  mesh, rules = parts.mesh, config.mesh.rules
  optimizer = face_optimizer(config, state.params)
  batch = pretrain.batch_spec(config[stage].batch_size)
  layout = step_layout(
    mesh,
    rules,
    state,
    optimizer,
    FACE_AXES,
    batch,
    pretrain.BATCH_AXES,
    constants_shardings(mesh, constants),
  )
  constants = layout.place(constants)
  rng = parallel.place_global(stage_rng(config, stage), layout.replicated)
  train_step = compile_train_step(
    make_train_step(
      make_face_loss(config, parts, align=stage == ALIGN), optimizer, layout
    ),
    f"{stage} step ({parts.backbone.name}, mesh {dict(mesh.shape)})",
    layout,
    state,
    batch,
    constants,
    rng,
  )
  return FaceStep(train_step, constants, rng, layout)


def run_face_stage(
  *,
  stage: str,
  config: ml_collections.ConfigDict,
  dataset: Dataset,
  parts: FaceParts,
  state: TrainState,
  constants: dict[str, Any],
  stage_dir: pathlib.Path,
  writer: MetricWriter,
  on_epoch_end: Callable[[LoopState], None] | None,
) -> dict[str, Any]:
  """Trains a FACE stage to early stopping and scores its best epoch.

  Returns:
    {"valid", "test": metrics of the backbone at the best epoch, "epochs",
    "best_epoch", "seconds_per_epoch", "steps_per_epoch",
    "seconds_per_step", "vocabulary_size"}.
  """
  section = config[stage]
  make_batches = make_stage_batches(config, section, dataset, stage)
  score = pretrain.make_scorer(
    parts.backbone, parts.graph, tuple(config.eval.ks)
  )
  valid = prepare_ranking(dataset, "valid", config.eval.batch_size)
  step = setup_face_step(stage, config, parts, state, constants)
  result = fit(
    stage=stage,
    state=state,
    train_step=step.train_step,
    make_batches=make_batches,
    evaluate=lambda params: score(params[BACKBONE], valid),
    graph=step.constants,
    rng=step.rng,
    checkpoint_dir=stage_dir / "checkpoints",
    writer=writer,
    options=pretrain.fit_options(config, section),
    on_epoch_end=on_epoch_end,
  )
  test = prepare_ranking(dataset, "test", config.eval.batch_size)
  test_metrics = score(result.state.params[BACKBONE], test)
  writer.write(stage, result.loop.best_epoch, {"test": test_metrics})
  steps = len(next(iter(make_batches(1).values())))
  seconds = float(np.median(result.loop.epoch_seconds))
  return {
    "valid": result.loop.best_metrics,
    "test": test_metrics,
    "epochs": result.loop.epoch,
    "best_epoch": result.loop.best_epoch,
    "seconds_per_epoch": seconds,
    "steps_per_epoch": steps,
    "seconds_per_step": seconds / steps,
    "vocabulary_size": len(parts.vocabulary),
  }


def restore_face_params(
  config: ml_collections.ConfigDict,
  parts: FaceParts,
  stage_dir: pathlib.Path,
) -> dict:
  """The best params {"backbone", "face"} of a finished FACE stage.

  They are read straight into their layout on `parts.mesh`, whatever mesh
  wrote them.

  Raises:
    FileNotFoundError: the stage has not finished in stage_dir.
  """
  result = checkpoints.read_json(stage_dir / checkpoints.RESULT_FILE)
  if result is None:
    raise FileNotFoundError(
      f"No finished {stage_dir.name} stage in {stage_dir}; run the earlier "
      "stages first (python -m face_jax.main with the same workdir)."
    )
  target = face_state_target(config, parts)
  saved = checkpoints.EpochCheckpoints(stage_dir / "checkpoints")
  try:
    state, _ = saved.restore(result["best_epoch"], target)
  finally:
    saved.close()
  return state.params


def finished_face_stages(workdir: pathlib.Path) -> list[str]:
  """The FACE stages finished in workdir, in order ("map", "align")."""
  return [
    stage
    for stage in (MAP, ALIGN)
    if (workdir / stage / checkpoints.RESULT_FILE).exists()
  ]


def last_face_stage(workdir: pathlib.Path) -> str | None:
  """The latest finished FACE stage in workdir ("align", "map" or None)."""
  finished = finished_face_stages(workdir)
  return finished[-1] if finished else None


def profile_targets(
  config: ml_collections.ConfigDict,
  llm: LLM,
  dataset: Dataset,
  workdir: pathlib.Path,
) -> tuple[np.ndarray, np.ndarray]:
  """Cached LLM embeddings of every user and item profile.

  Returns:
    (users [num_users, h], items [num_items, h]), L2-normalised rows.
  """
  if not dataset.has_text:
    raise FaceStageError(no_text_reason(dataset))
  return (
    config_profile_embeddings(config, llm, dataset.user_text, "user", workdir),
    config_profile_embeddings(config, llm, dataset.item_text, "item", workdir),
  )


def config_profile_embeddings(
  config: ml_collections.ConfigDict,
  llm: LLM,
  texts: Sequence[str],
  name: str,
  workdir: pathlib.Path,
) -> np.ndarray:
  """LLM embeddings of texts, batched and cached as the `llm` config says.

  Returns:
    [len(texts), h] L2-normalised rows, cached in the workdir under `name`.
  """
  return llm_profile_embeddings(
    llm,
    texts,
    workdir=workdir,
    name=name,
    batch_size=config.llm.batch_size,
    max_length=config.llm.max_length,
    progress=config.log.progress_bar,
  )


def no_text_reason(dataset: Dataset) -> str:
  """Why the align stage cannot run on a dataset without profiles."""
  return (
    f"{dataset.name} has no user and item profiles, so the align stage "
    "cannot run and the job stops after map; give the dataset texts "
    "(usr_prf.pkl and itm_prf.pkl in its RLMRec folder, or prepare it with "
    "metadata: python -m face_jax.prepare) and rerun with the same workdir."
  )


def align_skip_reason(
  config: ml_collections.ConfigDict, dataset: Dataset
) -> str | None:
  """None when the align stage can run, else why not."""
  del config  # Only the dataset decides.
  return None if dataset.has_text else no_text_reason(dataset)


def run_map(
  config: ml_collections.ConfigDict,
  dataset: Dataset,
  stage_dir: pathlib.Path,
  writer: MetricWriter,
  on_epoch_end: Callable[[LoopState], None] | None = None,
) -> dict[str, Any]:
  """The map stage: pretrained backbone + FACE, BPR + VQ + reconstruction.

  Args:
    config: the resolved experiment config.
    dataset: the dataset.
    stage_dir: `<workdir>/map`; the pretrain stage is `<workdir>/pretrain`.
    writer: receives one record per epoch.
    on_epoch_end: called with the loop's bookkeeping after every epoch.

  Returns:
    See `run_face_stage`.
  """
  mesh = parallel.make_mesh(config.mesh)
  backbone, graph, backbone_params = pretrain.restore_pretrained(
    config, dataset, stage_dir.parent / pretrain.STAGE, mesh
  )
  parts = load_face_parts(config, dataset, backbone, graph, mesh)
  return run_face_stage(
    stage=MAP,
    config=config,
    dataset=dataset,
    parts=parts,
    state=initial_map_state(config, parts, backbone_params),
    constants={"graph": parts.graph, "codebook": parts.codebook},
    stage_dir=stage_dir,
    writer=writer,
    on_epoch_end=on_epoch_end,
  )


def align_constants(
  config: ml_collections.ConfigDict,
  parts: FaceParts,
  dataset: Dataset,
  workdir: pathlib.Path,
) -> dict[str, Any]:
  """The constants pytree of the align step (see the module docstring).

  The profile embeddings are split by entity rows on `parts.mesh` (padded
  with zero rows to the shard counts of "users" and "items"; the step
  only gathers the rows of real ids).
  """
  users, items = profile_targets(config, parts.llm, dataset, workdir)
  users, items = (
    _rows_on_mesh(profiles, name, parts.mesh, config.mesh.rules)
    for profiles, name in ((users, "users"), (items, "items"))
  )
  return {
    "graph": parts.graph,
    "codebook": parts.codebook,
    "llm": parts.llm.params,
    "layout": sentence_layout(
      parts.llm, config.data.item_noun, config.face.num_words
    ),
    "user_profiles": users,
    "item_profiles": items,
  }


def _rows_on_mesh(
  table: np.ndarray, name: str, mesh: Mesh, rules: parallel.Rules
) -> jax.Array:
  """[rows, h] host table padded and split by rows of logical axis `name`."""
  multiple = parallel.shard_count(mesh, rules, name)
  padded = np.pad(table, ((0, -len(table) % multiple), (0, 0)))
  return parallel.place_global(
    padded, parallel.named_sharding(mesh, rules, (name, "embed"), padded.shape)
  )


def run_align(
  config: ml_collections.ConfigDict,
  dataset: Dataset,
  stage_dir: pathlib.Path,
  writer: MetricWriter,
  on_epoch_end: Callable[[LoopState], None] | None = None,
) -> dict[str, Any]:
  """The align stage: the map stage's best state + the alignment InfoNCE.

  Args:
    config: the resolved experiment config.
    dataset: the dataset, with user and item texts.
    stage_dir: `<workdir>/align`; the map stage is `<workdir>/map`.
    writer: receives one record per epoch.
    on_epoch_end: called with the loop's bookkeeping after every epoch.

  Returns:
    See `run_face_stage`.

  Raises:
    FaceStageError: the dataset has no texts.
  """
  workdir = stage_dir.parent
  parts = load_face_parts(config, dataset)
  constants = align_constants(config, parts, dataset, workdir)
  params = restore_face_params(config, parts, workdir / MAP)
  return run_face_stage(
    stage=ALIGN,
    config=config,
    dataset=dataset,
    parts=parts,
    state=fresh_state(config, parts, params),
    constants=constants,
    stage_dir=stage_dir,
    writer=writer,
    on_epoch_end=on_epoch_end,
  )
