"""Experiment configs: per-backbone values, resolution, comments."""

import pathlib
import re

import pytest

import configs
from configs import amazon, movielens, steam, tiny, yelp
from face_jax import train

CONFIG_MODULES = {
  "amazon": amazon,
  "movielens": movielens,
  "steam": steam,
  "tiny": tiny,
  "yelp": yelp,
}
BACKBONES = ("mf", "lightgcn", "simgcl", "lightgcl")


def _resolved(module, backbone):
  config = module.get_config()
  config.model.backbone = backbone
  return train.resolve_config(config)


@pytest.mark.parametrize("name", sorted(CONFIG_MODULES))
def test_configs_are_locked_and_resolve_for_every_backbone(name):
  config = CONFIG_MODULES[name].get_config()
  assert config.is_locked
  with pytest.raises(AttributeError):
    config.pretrain.unknown_field = 1
  for backbone in BACKBONES:
    resolved = _resolved(CONFIG_MODULES[name], backbone)
    assert resolved.is_locked
    assert resolved.model.reg_weight > 0
    assert resolved.model.num_layers >= 0
    assert resolved.pretrain.max_epochs >= 1
  # Resolution copies; the input keeps its unset fields.
  assert config.model.reg_weight is None


def test_authors_values_per_dataset_and_backbone():
  for module in (amazon, yelp):
    assert _resolved(module, "mf").model.reg_weight == 1e-6
    lightgcn = _resolved(module, "lightgcn")
    assert (lightgcn.model.num_layers, lightgcn.model.reg_weight) == (3, 1e-6)
    simgcl = _resolved(module, "simgcl")
    assert (simgcl.model.num_layers, simgcl.model.reg_weight) == (3, 1e-5)
    assert (simgcl.model.simgcl_eps, simgcl.model.simgcl_temperature) == (
      0.9,
      0.2,
    )
    lightgcl = _resolved(module, "lightgcl")
    assert lightgcl.model.num_layers == 2
    assert lightgcl.model.reg_weight == 1e-9
    assert lightgcl.pretrain.max_epochs == 300
  assert _resolved(steam, "lightgcn").model.num_layers == 2
  steam_simgcl = _resolved(steam, "simgcl")
  assert steam_simgcl.model.num_layers == 3
  assert steam_simgcl.model.simgcl_eps == 0.2
  assert steam_simgcl.model.simgcl_temperature == 0.5
  nouns = {
    name: module.get_config().data.item_noun
    for name, module in CONFIG_MODULES.items()
  }
  assert nouns["amazon"] == "book"
  assert nouns["yelp"] == "restaurant"
  assert nouns["steam"] == "game"
  assert nouns["movielens"] == "movie"
  for module in (amazon, yelp, steam):
    assert module.get_config().data.source == "rlmrec"
  assert steam.get_config().data.dir.endswith("steam-vt")


def test_explicit_values_win_over_per_backbone_values():
  config = amazon.get_config()
  config.model.backbone = "simgcl"
  config.model.reg_weight = 3e-3
  resolved = train.resolve_config(config)
  assert resolved.model.reg_weight == 3e-3
  assert resolved.model.num_layers == 3


def test_unknown_backbone_names_the_known_ones():
  config = amazon.get_config()
  config.model.backbone = "ngcf"
  with pytest.raises(train.ConfigError, match=r"lightgcl.*mf"):
    train.resolve_config(config)


def test_every_config_field_has_a_comment_above():
  folder = pathlib.Path(configs.__file__).parent
  assignment = re.compile(r"^\s*(config|table|entry)(\.\w+)+ = (?!ml_coll)")
  missing = []
  for path in sorted(folder.glob("*.py")):
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines):
      if assignment.match(line) and not lines[number - 1].strip().startswith(
        "#"
      ):
        missing.append(f"{path.name}:{number + 1}: {line.strip()}")
  assert not missing, "\n".join(missing)
