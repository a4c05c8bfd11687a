"""Shared base of every experiment config.

Dataset configs call `get_base_config()`, override what differs and lock the
result. Each field can be overridden on the command line, for example
`--config.pretrain.batch_size=1024`.
"""

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
  """Returns the unlocked base config with the authors' default values."""
  config = ml_collections.ConfigDict()

  # Seed for parameter init, edge dropout, negatives and noise.
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  # Dataset name used in logs, results and the item prompt.
  config.data.name = "movielens"
  # Where the data comes from: "movielens" (MovieLens-100K, fetched and
  # split by face_jax) or "rlmrec" (a folder of trn/val/tst_mat.pkl).
  config.data.source = "movielens"
  # Dataset folder. For "rlmrec" it is required; for "movielens" an optional
  # local copy of ml-100k (u.data, u.item, u.user, or RecBole's
  # ml-100k.inter/.item/.user); empty means cache, then download.
  config.data.dir = ""
  # Folder that caches downloads and prepared splits.
  config.data.cache_dir = "~/.cache/face_jax"
  # Noun for items in the alignment prompt ("The game attracts ...").
  config.data.item_noun = "movie"
  # MovieLens only: ratings at or above this count as positive feedback.
  config.data.min_rating = 4.0
  # Seed of the per-user 3:1:1 split when face_jax makes the split.
  config.data.split_seed = 0

  config.model = ml_collections.ConfigDict()
  # CF backbone: "mf", "lightgcn", "simgcl" or "lightgcl".
  config.model.backbone = "lightgcn"
  # Size of the user and item embeddings.
  config.model.embed_dim = 256
  # Number of graph propagation layers (ignored by MF). The authors use 3,
  # except LightGCN on Steam (2) and LightGCL (2).
  config.model.num_layers = 3
  # LightGCN: share of edges kept during training (kept ones not rescaled).
  config.model.keep_rate = 0.8
  # L2 weight; Adam gets weight_decay = 2 * reg_weight, coupled. The
  # authors use 1e-6 for LightGCN, 1e-5 for SimGCL, 1e-9 for LightGCL.
  config.model.reg_weight = 1e-6
  # Sparse propagation kernel: "segment_sum", "csr" or "auto" (fastest
  # for the platform: CSR on CPU and GPU, segment_sum on TPU).
  config.model.propagation = "auto"
  # SimGCL: norm of the per-layer noise.
  config.model.simgcl_eps = 0.9
  # SimGCL: InfoNCE temperature between the two noisy views.
  config.model.simgcl_temperature = 0.2
  # SimGCL: weight of the contrastive term.
  config.model.simgcl_weight = 0.1
  # LightGCL: rank of the SVD view of the normalised matrix.
  config.model.lightgcl_rank = 5
  # LightGCL: temperature of the graph/SVD contrastive term.
  config.model.lightgcl_temperature = 0.1
  # LightGCL: weight of the contrastive term.
  config.model.lightgcl_weight = 0.1

  config.pretrain = ml_collections.ConfigDict()
  # (user, positive, negative) triples per step; the last partial batch of
  # an epoch is filled up with the epoch's first triples.
  config.pretrain.batch_size = 256
  # Adam learning rate of the backbone.
  config.pretrain.learning_rate = 1e-3
  # Upper bound on epochs; early stopping usually ends sooner.
  config.pretrain.max_epochs = 3000
  # Epochs without a better validation `monitor` before stopping.
  config.pretrain.patience = 10
  # Validation metric that selects the best epoch and drives early stopping.
  config.pretrain.monitor = "recall@20"
  # Steps between progress-bar loss updates and NaN/Inf checks.
  config.pretrain.log_every = 50

  config.face = ml_collections.ConfigDict()
  # W: LLM tokens (descriptors) per user and item.
  config.face.num_words = 16
  # Width of each word, of the encoder/decoder layers and of the mapped
  # codebook.
  config.face.word_dim = 256
  # Attention heads of the encoder and decoder layers.
  config.face.num_heads = 1
  # Feed-forward width of the encoder and decoder layers.
  config.face.ff_dim = 2048
  # Dropout of the encoder and decoder layers while training.
  config.face.dropout_rate = 0.1
  # Epsilon of their layer norms.
  config.face.layer_norm_eps = 1e-5
  # Projection init: "flat" (torch orthogonal_ on the whole [W, d,
  # word_dim] tensor, as the authors) or "per_map" (each map orthogonal).
  config.face.projection_init = "flat"
  # Codebook rows compared per step of the nearest-token search; bounds
  # the [entities * W, chunk] distance block held in memory (200 MB at
  # batch 256, W 16). Larger chunks search faster on CPU (batch 256, 7,957
  # tokens: 0.34 s at 8192, 0.45 s at 4096, 0.53 s at 2048, 0.70 s at
  # 1024).
  config.face.chunk_size = 4096
  # JAX PRNG behind the train steps' randomness (FACE and LLM dropout, edge
  # drop, SimGCL noise; pretraining too): "philox4x32", "threefry2x32"
  # (JAX's default) or "auto". Philox draws them 3-10x faster on CPU, but its
  # multiply-high op fails to compile in a step partitioned over several
  # devices (jax 0.10); "auto" takes philox on one device, else threefry.
  config.face.rng_impl = "auto"
  # Adam learning rate of the FACE parameters (no L2, as the authors).
  config.face.learning_rate = 1e-3
  # Adam learning rate of the backbone in the FACE stages (the authors'
  # lr / 10); its coupled L2 stays 2 * model.reg_weight.
  config.face.backbone_learning_rate = 1e-4
  # Weight of the VQ loss (codebook 0.75 + commitment 0.25).
  config.face.vq_weight = 1.0
  # Weight of the reconstruction MSE of the CF embeddings.
  config.face.recon_weight = 1.0
  # Weight of the alignment InfoNCE (align stage only).
  config.face.align_weight = 0.1
  # Softmax temperature of the alignment InfoNCE.
  config.face.temperature = 0.02

  config.map = ml_collections.ConfigDict()
  # (user, positive, negative) triples per step; FACE sees 3x as many rows.
  config.map.batch_size = 256
  # Upper bound on epochs; early stopping usually ends sooner.
  config.map.max_epochs = 3000
  # Epochs without a better validation `monitor` before stopping.
  config.map.patience = 10
  # Validation metric (of the backbone) that selects the best epoch.
  config.map.monitor = "recall@20"
  # Steps between progress-bar loss updates and NaN/Inf checks.
  config.map.log_every = 50
  # Steps per epoch; 0 runs every train triple once per epoch. A positive
  # value trains on that many batches of a fresh shuffle each epoch (a CPU
  # shortcut; the authors use whole epochs).
  config.map.steps_per_epoch = 0

  config.align = ml_collections.ConfigDict()
  # Triples per step; each step encodes 3x as many sentences with the LLM.
  config.align.batch_size = 256
  # Upper bound on epochs; early stopping usually ends sooner.
  config.align.max_epochs = 3000
  # Epochs without a better validation `monitor` before stopping.
  config.align.patience = 10
  # Validation metric (of the backbone) that selects the best epoch.
  config.align.monitor = "recall@20"
  # Steps between progress-bar loss updates and NaN/Inf checks.
  config.align.log_every = 10
  # Steps per epoch; 0 runs every train triple once per epoch. A positive
  # value trains on that many batches of a fresh shuffle each epoch (a CPU
  # shortcut; the authors use whole epochs).
  config.align.steps_per_epoch = 0

  # Sentences per call of the frozen LLM in a step, under rematerialisation
  # (jax.checkpoint): the backward pass keeps one chunk's activations
  # rather than all 3 * batch_size sentences', for one more LLM forward
  # pass; 0 encodes all at once. On 2 CPU cores, batch 256, MiniLM: 48
  # takes 2.9 GB and 36 s a step, 0 takes 13 GB and 50 s.
  config.align.llm_chunk = 48

  config.descriptors = ml_collections.ConfigDict()
  # Entities described per batch (CF embeddings through FACE).
  config.descriptors.batch_size = 1024
  # Descriptor sentences per batch through the frozen LLM when measuring
  # how well they retrieve their own profile.
  config.descriptors.encode_batch_size = 128
  # Retrieval cut-offs: an entity counts at K when its own profile is
  # among the K profiles most similar to its descriptor sentence.
  config.descriptors.ks = (1, 10)
  # Measure retrieval for at most this many users and this many items
  # (a seeded sample, ranked against all profiles of the type); 0 for all.
  config.descriptors.max_entities = 0

  config.cold_start = ml_collections.ConfigDict()
  # Hold a share of the users and items out of every training stage and,
  # after the others, run the cold_start stage: rank them from their text
  # alone with FACE, an AlphaRec-style mapper, text similarity and random.
  config.cold_start.enabled = False
  # Share of the items held out (their interactions are the test set).
  config.cold_start.item_share = 0.2
  # Share of the users held out, drawn apart from the items.
  config.cold_start.user_share = 0.2
  # Seed of the draw of the cold users and items.
  config.cold_start.seed = 0
  # Cut-offs of the cold-start Recall@K and NDCG@K.
  config.cold_start.ks = (5, 20)
  # Hidden width of the text heads (profile embedding -> FACE words, and
  # the AlphaRec-style profile embedding -> CF embedding mapper).
  config.cold_start.hidden_dim = 512
  # Upper bound on the heads' training epochs over the warm entities.
  config.cold_start.max_epochs = 300
  # Epochs without a lower held-out loss before a head stops training.
  config.cold_start.patience = 20
  # Share of the warm entities held out to pick a head's best epoch.
  config.cold_start.valid_share = 0.1
  # Warm entities per step of head training.
  config.cold_start.batch_size = 256
  # AdamW learning rate of the heads.
  config.cold_start.learning_rate = 1e-3
  # AdamW weight decay of the heads.
  config.cold_start.weight_decay = 1e-4

  config.eval = ml_collections.ConfigDict()
  # Cut-offs of Recall@K and NDCG@K.
  config.eval.ks = (5, 10, 20)
  # Users scored against all items at once (the last batch is padded).
  config.eval.batch_size = 1024

  config.checkpoint = ml_collections.ConfigDict()
  # Write checkpoints in a background thread while training goes on.
  config.checkpoint.async_save = True

  config.log = ml_collections.ConfigDict()
  # Show a progress bar with loss and ETA for every epoch.
  config.log.progress_bar = True
  # Also write TensorBoard event files to <workdir>/tensorboard.
  config.log.tensorboard = True

  config.llm = ml_collections.ConfigDict()
  # Hugging Face id or local folder of the frozen LLM.
  config.llm.model = "sentence-transformers/all-MiniLM-L6-v2"
  # Dtype of the frozen LLM weights: "float32" or "bfloat16".
  config.llm.dtype = "float32"
  # Longest profile text, in tokens, kept for the profile embeddings.
  config.llm.max_length = 256
  # Profiles encoded per batch when caching profile embeddings.
  config.llm.batch_size = 64
  # Pooling of hidden states: "mean" over real tokens, "last" real token,
  # or "auto" (the model folder's 1_Pooling/config.json when present, else
  # mean for BERT and last for decoders).
  config.llm.pooling = "auto"
  # Decoders only: "causal", "bidirectional" (every position sees every
  # real token), or "auto" (config.json's is_causal when present, else
  # causal). BERT is always bidirectional.
  config.llm.attention = "auto"
  # Text put before each descriptor sentence (the query side), e.g. for
  # gte-Qwen2: "Instruct: Given a query composed of 8 descriptors, retrieve
  # the original user/item profile\nQuery:". Profiles get none.
  config.llm.instruction = ""
  # Decoders only: end every profile and descriptor sentence with the EOS
  # token (gte-Qwen2 reads its embedding there; its EOS is also its pad).
  config.llm.append_eos = False
  # Align stage: keep the LLM's own dropout active while training, as the
  # authors do (it acts as noise on the alignment); False runs it frozen
  # and deterministic.
  config.llm.train_dropout = True

  config.vocab = ml_collections.ConfigDict()
  # Word list restricting the codebook: "" for the built-in list, else a
  # text file (one word a line, most frequent first) or the COCA xlsx.
  config.vocab.word_list = ""
  # Keep this many of the most frequent nouns and adjectives of the list.
  config.vocab.size = 20000

  config.mesh = ml_collections.ConfigDict()
  # Names of the device mesh axes: the batch is split over "data"; tables,
  # the vocabulary and the frozen LLM's weights over "model" (see rules).
  config.mesh.axes = ("data", "model")
  # Size of each mesh axis; one -1 takes the devices left over. (1, -1)
  # spreads the codebook and a 7B LLM over every device.
  config.mesh.shape = (-1, 1)
  # Logical axis -> mesh axis, a tuple of mesh axes, or None (replicated).
  # A name may repeat: its rules are tried in order and the first whose
  # axes are free and divide the dimension wins, else it is replicated.
  config.mesh.rules = (
    # Examples of a batch (users, triples, entities, profile texts).
    ("batch", "data"),
    # Rows of the user table.
    ("users", "model"),
    # Rows of the item table.
    ("items", "model"),
    # Rows of the LLM token table and of the codebook mapped from it.
    ("vocab", "model"),
    # Embedding widths: CF, FACE word and LLM hidden size.
    ("embed", None),
    # The FACE words of one entity.
    ("words", None),
    # Attention heads of the frozen LLM.
    ("heads", "model"),
    # Width of one attention head.
    ("kv", None),
    # Hidden units of the LLM's feed-forward layers.
    ("mlp", "model"),
    # Token positions of a text.
    ("length", None),
    # Stacked layers of the LLM.
    ("layers", None),
  )
  # Join the processes of a multi-host job (TPU pod slice, GPU cluster)
  # with jax.distributed.initialize before any device is used.
  config.mesh.distributed = False
  # "host:port" of process 0's coordinator; "" lets JAX detect it
  # (Cloud TPU, SLURM, Open MPI, GKE).
  config.mesh.coordinator_address = ""
  # Number of processes in the job; 0 lets JAX detect it.
  config.mesh.num_processes = 0
  # Index of this process, 0 .. num_processes - 1; -1 lets JAX detect it.
  config.mesh.process_id = -1

  return config
