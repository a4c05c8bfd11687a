"""MovieLens-100K: the built-in default dataset, fetched by face_jax.

The authors did not train on MovieLens; it takes their Amazon-book values.
Pick the backbone with `--config.model.backbone=...`.

This is the config of `python -m face_jax.main` with no flags, which runs
the whole job on a laptop's CPU in minutes: the backbone trains to early
stopping as the authors do, but the FACE stages take a few short epochs
(CPU shortcuts, each marked below). For the paper's schedule, lift them:
`--config.map.steps_per_epoch=0 --config.map.max_epochs=3000
--config.align.steps_per_epoch=0 --config.align.max_epochs=3000
--config.align.batch_size=256 --config.descriptors.max_entities=0`.
"""

from configs import backbone_defaults, base


def get_config():
  config = base.get_base_config()
  # Dataset name in logs, results and the workdir name.
  config.data.name = "movielens"
  # Fetched and split by face_jax (data.dir may point at a local ml-100k).
  config.data.source = "movielens"
  # Items are movies in the alignment prompt.
  config.data.item_noun = "movie"
  # CPU shortcut: 10 map steps (of 130) per epoch.
  config.map.steps_per_epoch = 10
  # CPU shortcut: align sentences of 32 triples (96 sentences) per step
  # instead of 256.
  config.align.batch_size = 32
  # CPU shortcut: 10 align steps per epoch.
  config.align.steps_per_epoch = 10
  # CPU shortcut: measure descriptor retrieval on 300 users and 300 items
  # (each ranked against all profiles of its type).
  config.descriptors.max_entities = 300
  table = backbone_defaults.authors_table()
  for entry in table.values():
    # CPU shortcut: 3 map epochs.
    entry.map.max_epochs = 3
    # CPU shortcut: 2 align epochs.
    entry.align.max_epochs = 2
  backbone_defaults.follow_backbone(config, table)
  config.lock()
  return config
