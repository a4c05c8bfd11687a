"""The authors' FACE module on exported inputs: bench_collapse.py's other half.

Run by benchmarks/bench_collapse.py with a Python that has torch and pandas
(face_jax itself needs neither). It imports the authors' encoder/FACE.py
from --face_py unchanged, gives it the exported codebook rows in place of
their LLM wrapper, trains its map-stage terms (vq_weight * VQ +
recon_weight * reconstruction; their trainer's FACE group: Adam, no weight
decay) on the exported fixed CF embeddings and batches, and writes to
--output as JSON every entity's descriptor token indices at init and after
each epoch, and per epoch the mean distinct tokens of a training batch and
the losses. Their prompts only matter in the align stage,
which this does not reach, so their item prompt is built for "amazon" (the
constructor knows no other datasets' nouns) and the prompt rows are zeros.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys
import time
import types

import numpy as np
import pandas as pd
import torch

_LLM_NAME = "exported"


def _install_llm_stub(codebook: np.ndarray) -> None:
  """Makes `embedding_models.exported` importable, as their code expects."""
  table = torch.tensor(codebook)

  class Exported:
    def __init__(self, dataset_name):
      del dataset_name

    def filter_and_get_vocabulary(self):
      # Row k of the codebook is token k; the "word" is its index, read
      # back from forward_explain's output.
      rows = np.arange(len(codebook))
      return pd.DataFrame({"token_id": rows, "token": [str(k) for k in rows]})

    def get_token_embedding_matrix(self):
      return torch.nn.Embedding.from_pretrained(table)

    def get_text_token_embeddings(self, texts):
      count = 1 if isinstance(texts, str) else len(texts)
      return torch.zeros(count, 1, table.shape[1])

  package = types.ModuleType("embedding_models")
  module = types.ModuleType(f"embedding_models.{_LLM_NAME}")
  module.Exported = Exported
  package.exported = module
  sys.modules["embedding_models"] = package
  sys.modules[module.__name__] = module


def _load_face_class(face_py: pathlib.Path):
  spec = importlib.util.spec_from_file_location("authors_face", face_py)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.FACE


def _describe(
  model, x: torch.Tensor, num_words: int, chunk: int = 1024
) -> np.ndarray:
  """[n, W] token indices of every row of `x`, dropout off.

  In chunks of entities: their forward_explain builds the whole
  [entities * W, vocabulary] distance matrix.
  """
  model.eval()
  words = []
  with torch.no_grad():
    for rows in torch.split(x, chunk):
      z_e = model.transformer_encoder(model.linear_encoder(rows))
      words += model.quantizer.forward_explain(z_e.reshape(-1, z_e.shape[-1]))[
        1
      ]
  model.train()
  return np.asarray([int(w) for w in words]).reshape(-1, num_words)


def _batch_distinct(model, z_q: torch.Tensor) -> int:
  """Distinct tokens behind a batch's straight-through outputs.

  Their forward returns z_e + (z_q - z_e).detach(), equal to the chosen
  mapped rows up to rounding, so each row's nearest mapped row is its
  token.
  """
  with torch.no_grad():
    quantizer = model.quantizer
    mapped = quantizer.codebook_mapping(quantizer.codebook_tensor_pca)
    return int(torch.unique(torch.cdist(z_q, mapped).argmin(dim=1)).numel())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--face_py", required=True, type=pathlib.Path)
  parser.add_argument("--inputs", required=True, type=pathlib.Path)
  parser.add_argument("--settings", required=True, type=json.loads)
  parser.add_argument("--output", required=True, type=pathlib.Path)
  args = parser.parse_args()
  s = args.settings
  arrays = np.load(args.inputs)
  torch.manual_seed(s["seed"])
  _install_llm_stub(arrays["codebook"])
  pathlib.Path("data/vocabulary").mkdir(parents=True, exist_ok=True)
  model = _load_face_class(args.face_py)(
    input_dim=s["embed_dim"],
    word_num=s["num_words"],
    word_dim=s["word_dim"],
    dataset_name="amazon",
    llm_name=_LLM_NAME,
  )
  model.train()
  optimizer = torch.optim.Adam(model.parameters(), lr=s["learning_rate"])
  users = torch.tensor(arrays["user_embeddings"])
  items = torch.tensor(arrays["item_embeddings"])
  everyone = torch.cat([users, items])
  captured = {}
  model.quantizer.register_forward_hook(
    lambda module, inputs, outputs: captured.update(z_q=outputs[0].detach())
  )
  history = {
    "init": _describe(model, everyone, s["num_words"]).tolist(),
    "epochs": [],
  }
  step_seconds = []
  for epoch in range(1, s["epochs"] + 1):
    batch_tokens, vq, recon = [], [], []
    # An npz file reads an array again at every lookup: once per epoch.
    user_ids, pos_ids, neg_ids = (
      arrays[f"epoch{epoch}_{name}"] for name in ("user", "pos", "neg")
    )
    for j in range(len(user_ids)):
      start = time.perf_counter()
      x = torch.cat([users[user_ids[j]], items[pos_ids[j]], items[neg_ids[j]]])
      _, vq_loss, recon_loss, _ = model(x, "map")
      loss = s["vq_weight"] * vq_loss + s["recon_weight"] * recon_loss
      optimizer.zero_grad()
      loss.backward()
      optimizer.step()
      vq.append(vq_loss.item())
      recon.append(recon_loss.item())
      step_seconds.append(time.perf_counter() - start)
      batch_tokens.append(_batch_distinct(model, captured["z_q"]))
    history["epochs"].append(
      {
        "descriptors": _describe(model, everyone, s["num_words"]).tolist(),
        "batch_tokens": float(np.mean(batch_tokens)),
        "vq": [vq[0], vq[-1]],
        "recon": recon[-1],
      }
    )
    print(f"authors' module: epoch {epoch} of {s['epochs']} done", flush=True)
  # Timed like face_jax's steps: without the first, when there are others.
  history["seconds_per_step"] = float(
    np.median(step_seconds[1:] or step_seconds)
  )
  history["steps"] = len(step_seconds)
  args.output.write_text(json.dumps(history))


if __name__ == "__main__":
  main()
