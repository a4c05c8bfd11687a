"""Steam with the authors' Steam hyperparameters.

The RLMRec Steam train split is not public, so face_jax re-splits the
public validation and test interactions 3:1:1 into the "steam-vt" folder
(RLMRec layout). Its numbers are not comparable to published Steam results.
"""

from configs import backbone_defaults, base


def get_config():
  config = base.get_base_config()
  # Dataset name in logs, results and the workdir name; "-vt" marks the
  # re-split of the public validation and test interactions.
  config.data.name = "steam-vt"
  # A folder of RLMRec pickles.
  config.data.source = "rlmrec"
  # The prepared steam-vt folder.
  config.data.dir = "~/.cache/face_jax/steam-vt"
  # Items are games in the alignment prompt.
  config.data.item_noun = "game"
  # SimGCL on Steam: smaller noise norm.
  config.model.simgcl_eps = 0.2
  # SimGCL on Steam: softer contrastive temperature.
  config.model.simgcl_temperature = 0.5
  table = backbone_defaults.authors_table()
  # LightGCN on Steam propagates over 2 layers (SimGCL keeps 3).
  table.lightgcn.model.num_layers = 2
  backbone_defaults.follow_backbone(config, table)
  config.lock()
  return config
