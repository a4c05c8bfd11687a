"""The map and align stages on device meshes: one step, layouts, restores.

Each stage's first step on meshes 8x1, 4x2, 2x4 and 1x8 equals the step on
one device. The tiny dataset (24 users, 30 items) and the 300-token codebook
are padded wherever the model axis does not divide them (items and codebook
on 8 shards, items on 4), so the padding's neutrality is part of the check.
"""

import functools

import _step_parity
import jax
import numpy as np
import pytest
from _face_fixtures import (
  cache_folder,
  shared_compilation_cache,
  text_dataset,
  tiny_config,
  write_tiny_bert,
)
from jax.sharding import PartitionSpec as P

from face_jax.training import checkpoints, face_stages

DATASET = text_dataset()


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
  with shared_compilation_cache(cache_folder(tmp_path_factory)):
    yield


class _Stages:
  """The FACE parts per mesh and the parity results per stage, built once.

  Attributes:
    config: the tiny config.
    workdir: folder of the cached profile embeddings.
  """

  def __init__(self, config, workdir):
    self.config = config
    self.workdir = workdir
    self._parts = {}
    self._results = {}

  def parts(self, shape):
    if shape not in self._parts:
      self._parts[shape] = face_stages.load_face_parts(
        self.config, DATASET, mesh=_step_parity.make_mesh(shape)
      )
    return self._parts[shape]

  def step_case(self, stage, mesh):
    """The stage's first step on `mesh`, with layout checks."""
    config = self.config
    parts = self.parts(tuple(mesh.shape.values()))
    backbone_params = parts.backbone.init(jax.random.key(3))
    state = face_stages.initial_map_state(config, parts, backbone_params)
    if stage == face_stages.MAP:
      constants = {"graph": parts.graph, "codebook": parts.codebook}
    else:
      state = face_stages.fresh_state(config, parts, state.params)
      constants = face_stages.align_constants(
        config, parts, DATASET, self.workdir
      )
    step = face_stages.setup_face_step(stage, config, parts, state, constants)
    _check_layout(parts, state, step)
    batches = face_stages.make_stage_batches(
      config, config[stage], DATASET, stage
    )(1)
    batch = {name: values[0] for name, values in batches.items()}
    return _step_parity.StepCase(
      step.train_step, state, batch, step.constants, step.rng
    )

  def parity(self, stage):
    if stage not in self._results:
      self._results[stage] = _step_parity.assert_step_matches_single_device(
        functools.partial(self.step_case, stage),
        rtol=1e-4,
        atol=1e-6,
        noise_params=r"\['key'\]\['bias'\]",
      )
    return self._results[stage]


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("parallel_face")
  config = tiny_config(write_tiny_bert(workdir / "tiny_bert"))
  return _Stages(config, workdir)


def _check_layout(parts, state, step):
  """The state and constants lie on the mesh as the rules say."""
  model = parts.mesh.shape["model"]
  backbone = state.params["backbone"]
  moments = jax.tree.leaves(state.opt_state)
  for name, rows in (("user", DATASET.num_users), ("item", DATASET.num_items)):
    table = backbone[name]
    # Rows padded to the shard count and split over "model", both Adam
    # moments alike.
    assert table.shape[0] == -(-rows // model) * model
    assert table.sharding.spec == P("model", None)
    alike = [leaf for leaf in moments if leaf.shape == table.shape]
    assert len(alike) == 2
    assert all(leaf.sharding == table.sharding for leaf in alike)
  assert step.layout.batch["user"].spec == P("data")
  codebook = step.constants["codebook"]
  vocabulary = len(parts.vocabulary)
  assert codebook.shape[0] == -(-vocabulary // model) * model
  assert codebook.sharding.spec == P("model", None)
  assert parts.model.num_tokens == (
    vocabulary if codebook.shape[0] > vocabulary else None
  )
  # The FACE module is small: replicated.
  kernel = state.params["face"]["codebook_map"]["kernel"]
  assert kernel.sharding.spec == P()
  if "llm" in step.constants:
    # The LLM's feed-forward layers by hidden units, the profiles by rows.
    up = step.constants["llm"]["layers_0"]["mlp_in"]["kernel"]
    assert up.sharding.spec == P(None, "model")
    profiles = step.constants["item_profiles"]
    assert profiles.shape[0] == -(-DATASET.num_items // model) * model
    assert profiles.sharding.spec == P("model", None)


@pytest.mark.parametrize("stage", [face_stages.MAP, face_stages.ALIGN])
def test_face_step_matches_single_device(stages, stage):
  results = stages.parity(stage)
  assert sorted(results) == sorted([(1, 1), *_step_parity.MESH_SHAPES])
  reference = results[(1, 1)]
  assert int(reference.state.step) == 1
  terms = {"loss", "bpr", "vq", "recon", "distinct_tokens", "grad_norm"}
  if stage == face_stages.ALIGN:
    terms.add("align")
  assert set(reference.metrics) == terms
  assert all(np.isfinite(value) for value in reference.metrics.values())


def test_face_checkpoint_from_8_devices_restores_on_4_and_1(stages, tmp_path):
  # The map state after one step on 8 devices: the item table padded to 32
  # rows, the codebook to 304, all split 8 ways.
  written = stages.parity(face_stages.MAP)[(1, 8)].state
  assert written.params["backbone"]["item"].shape[0] == 32
  saved = checkpoints.EpochCheckpoints(tmp_path / "checkpoints", False)
  saved.save(1, written, {"epoch": 1}, improved=True)
  saved.close()
  checkpoints.write_json_atomic(
    tmp_path / checkpoints.RESULT_FILE, {"best_epoch": 1}
  )
  host = jax.device_get(written.params)
  for shape in [(2, 2), (1, 1)]:
    parts = stages.parts(shape)
    target = face_stages.face_state_target(stages.config, parts)
    params = face_stages.restore_face_params(stages.config, parts, tmp_path)
    for want, got in zip(
      jax.tree.leaves(target.params), jax.tree.leaves(params), strict=True
    ):
      assert got.shape == want.shape and got.sharding == want.sharding
    # Every value exactly as written, padded rows cropped.
    _step_parity.assert_trees_close(host, params, rtol=0, atol=0)
