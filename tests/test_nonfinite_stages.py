"""A NaN loss stops every training stage and names the stage and step.

Each case reuses the finished earlier stages of the shared tiny run and
poisons one stage: pretraining and map through their config, align
through its cached profile embeddings (so that its step, already compiled
for the shared run, is not compiled again).
"""

import math
import shutil

import numpy as np
import pytest
from _face_fixtures import cache_folder, shared_compilation_cache
from _finished_run import finished_run

from face_jax import runs, train
from face_jax.llm import profiles
from face_jax.training import NonFiniteLossError


def _poison_config(section, field, value):
  def poison(config, workdir):
    del workdir
    with config.unlocked():
      config[section][field] = value

  return poison


def _poison_profiles(config, workdir):
  del config
  for path in (workdir / profiles.CACHE_FOLDER).glob("user-*.npy"):
    embeddings = np.load(path)
    np.save(path, np.full_like(embeddings, np.nan))


@pytest.mark.parametrize(
  ("stage", "poison"),
  [
    ("pretrain", _poison_config("pretrain", "learning_rate", math.inf)),
    ("map", _poison_config("face", "vq_weight", math.nan)),
    ("align", _poison_profiles),
  ],
)
def test_a_nan_loss_stops_the_stage(tmp_path_factory, tmp_path, stage, poison):
  source, dataset = finished_run(tmp_path_factory)
  config = runs.read_config(source)
  stages = train.stages_until(stage)
  for earlier in stages[:-1]:
    shutil.copytree(source / earlier.name, tmp_path / earlier.name)
  shutil.copytree(
    source / profiles.CACHE_FOLDER, tmp_path / profiles.CACHE_FOLDER
  )
  poison(config, tmp_path)
  with (
    shared_compilation_cache(cache_folder(tmp_path_factory)),
    pytest.raises(
      NonFiniteLossError,
      match=rf"^{stage}: the loss is (nan|inf|-inf) at step \d+ \(epoch 1\)",
    ),
  ):
    train.run_stages(config, dataset, tmp_path, stages)
  assert not (tmp_path / stage / "result.json").exists()
