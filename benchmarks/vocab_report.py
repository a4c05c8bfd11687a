"""Reports the descriptor vocabulary a config's LLM keeps.

  python benchmarks/vocab_report.py [--config=configs/movielens.py]

Appends one row (stage "vocabulary") to benchmarks/results.jsonl: the
tokenizer's whole-word tokens, the word-list size, how many tokens the
descriptor vocabulary keeps, and 30 of them drawn at random (seeded), so
that a reader sees what descriptors can be made of.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import platform
import shlex
import sys

import numpy as np
from absl import app, flags
from ml_collections import config_flags

import configs
from face_jax import llm as llm_lib
from face_jax.llm import vocab as vocab_lib

_HERE = pathlib.Path(__file__).resolve().parent
_CONFIG = config_flags.DEFINE_config_file(
  "config",
  str(pathlib.Path(configs.__file__).parent / "movielens.py"),
  "Experiment config; its llm and vocab sections are read.",
)
_SAMPLE = flags.DEFINE_integer("sample", 30, "Random tokens to list.")
_RESULTS = flags.DEFINE_string(
  "results", str(_HERE / "results.jsonl"), "JSONL file to append to."
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  model = llm_lib.load_llm(config.llm)
  vocabulary = vocab_lib.descriptor_vocabulary(model.tokenizer, config.vocab)
  rng = np.random.default_rng(0)
  picks = rng.choice(len(vocabulary), size=_SAMPLE.value, replace=False)
  row = {
    "stage": "vocabulary",
    "llm": config.llm.model,
    "word_list": config.vocab.word_list or "built-in",
    "list_words_used": vocabulary.list_size,
    "whole_word_tokens": vocabulary.whole_word_tokens,
    "kept_tokens": len(vocabulary),
    "random_tokens": sorted(vocabulary.words[i] for i in picks),
    "command": shlex.join([sys.executable, *sys.argv]),
    "machine": f"{platform.machine()}, {platform.system()}",
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
  }
  with open(_RESULTS.value, "a", encoding="utf-8") as results:
    results.write(json.dumps(row) + "\n")
  print(json.dumps(row, indent=1))


if __name__ == "__main__":
  app.run(main)
