"""Values that follow `config.model.backbone`.

The authors tune a few values per backbone: the number of propagation
layers, the L2 weight and the epoch cap. A dataset config lists them in
`config.per_backbone.<backbone>.<section>.<field>` and leaves the fields
themselves unset (None). At start-up `face_jax.train.resolve_config` fills
every unset field from the entry of the chosen backbone, so
`--config.model.backbone=simgcl` trains SimGCL with SimGCL's values, while an
explicit `--config.model.reg_weight=1e-4` still wins. The resolved config,
with every value filled in, is written to the workdir.
"""

import ml_collections
from ml_collections import config_dict


def authors_table() -> ml_collections.ConfigDict:
  """The authors' per-backbone values (Amazon-book and Yelp).

  The FACE stages take the epoch cap of the backbone's "_vq" config: 3000,
  or 300 for LightGCL.
  """
  table = ml_collections.ConfigDict()

  table.mf = ml_collections.ConfigDict()
  table.mf.model = ml_collections.ConfigDict()
  # MF propagates nothing.
  table.mf.model.num_layers = 0
  # L2 weight of MF (the authors' GMF).
  table.mf.model.reg_weight = 1e-6
  table.mf.pretrain = ml_collections.ConfigDict()
  # Epoch cap of MF.
  table.mf.pretrain.max_epochs = 3000
  table.mf.map = ml_collections.ConfigDict()
  # Epoch cap of the FACE map stage with MF.
  table.mf.map.max_epochs = 3000
  table.mf.align = ml_collections.ConfigDict()
  # Epoch cap of the FACE align stage with MF.
  table.mf.align.max_epochs = 3000

  table.lightgcn = ml_collections.ConfigDict()
  table.lightgcn.model = ml_collections.ConfigDict()
  # LightGCN propagation layers.
  table.lightgcn.model.num_layers = 3
  # L2 weight of LightGCN.
  table.lightgcn.model.reg_weight = 1e-6
  table.lightgcn.pretrain = ml_collections.ConfigDict()
  # Epoch cap of LightGCN.
  table.lightgcn.pretrain.max_epochs = 3000
  table.lightgcn.map = ml_collections.ConfigDict()
  # Epoch cap of the FACE map stage with LightGCN.
  table.lightgcn.map.max_epochs = 3000
  table.lightgcn.align = ml_collections.ConfigDict()
  # Epoch cap of the FACE align stage with LightGCN.
  table.lightgcn.align.max_epochs = 3000

  table.simgcl = ml_collections.ConfigDict()
  table.simgcl.model = ml_collections.ConfigDict()
  # SimGCL propagation layers.
  table.simgcl.model.num_layers = 3
  # L2 weight of SimGCL.
  table.simgcl.model.reg_weight = 1e-5
  table.simgcl.pretrain = ml_collections.ConfigDict()
  # Epoch cap of SimGCL.
  table.simgcl.pretrain.max_epochs = 3000
  table.simgcl.map = ml_collections.ConfigDict()
  # Epoch cap of the FACE map stage with SimGCL.
  table.simgcl.map.max_epochs = 3000
  table.simgcl.align = ml_collections.ConfigDict()
  # Epoch cap of the FACE align stage with SimGCL.
  table.simgcl.align.max_epochs = 3000

  table.lightgcl = ml_collections.ConfigDict()
  table.lightgcl.model = ml_collections.ConfigDict()
  # LightGCL propagation layers.
  table.lightgcl.model.num_layers = 2
  # L2 weight of LightGCL.
  table.lightgcl.model.reg_weight = 1e-9
  table.lightgcl.pretrain = ml_collections.ConfigDict()
  # Epoch cap of LightGCL (the authors give it 300 rather than 3000).
  table.lightgcl.pretrain.max_epochs = 300
  table.lightgcl.map = ml_collections.ConfigDict()
  # Epoch cap of the FACE map stage with LightGCL.
  table.lightgcl.map.max_epochs = 300
  table.lightgcl.align = ml_collections.ConfigDict()
  # Epoch cap of the FACE align stage with LightGCL.
  table.lightgcl.align.max_epochs = 300

  return table


def follow_backbone(
  config: ml_collections.ConfigDict, table: ml_collections.ConfigDict
) -> None:
  """Makes the fields named in `table` follow `config.model.backbone`.

  Stores the table as `config.per_backbone` and turns each field it names
  into a typed placeholder (None until resolved or set on the command line).

  Args:
    config: an unlocked experiment config.
    table: backbone -> section -> field -> value, as `authors_table`.
  """
  # Backbone name -> config section -> field -> the value it takes when the
  # field is left unset; filled in by face_jax.train.resolve_config.
  config.per_backbone = table
  for entry in table.values():
    for section, fields in entry.items():
      for field, value in fields.items():
        config[section][field] = config_dict.placeholder(type(value))
