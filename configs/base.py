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
  # local copy of ml-100k (u.data, u.item, u.user).
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
  # Number of graph propagation layers (ignored by MF).
  config.model.num_layers = 3
  # LightGCN: share of edges kept during training (kept ones not rescaled).
  config.model.keep_rate = 0.8
  # L2 weight; Adam gets weight_decay = 2 * reg_weight, coupled.
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
  # (user, positive, negative) triples per step.
  config.pretrain.batch_size = 256
  # Adam learning rate of the backbone.
  config.pretrain.learning_rate = 1e-3
  # Upper bound on epochs; early stopping usually ends sooner.
  config.pretrain.max_epochs = 3000
  # Epochs without a better validation Recall@20 before stopping.
  config.pretrain.patience = 10

  config.eval = ml_collections.ConfigDict()
  # Cut-offs of Recall@K and NDCG@K.
  config.eval.ks = (5, 10, 20)
  # Users scored against all items at once.
  config.eval.batch_size = 1024

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

  return config
