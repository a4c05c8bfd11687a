"""Regenerates benchmarks/RESULTS.md from benchmarks/results.jsonl.

  python benchmarks/render_results.py

One table per stage, one row per run (sorted by dataset, model, date), then
the command of every row. Ranking runs (with "metrics") get the metric
columns; stages listed in `_COLUMNS` get theirs; any other stage a column
per field of its rows.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib

_HERE = pathlib.Path(__file__).resolve().parent
_METRICS = [f"{name}@{k}" for k in (5, 10, 20) for name in ("recall", "ndcg")]
_TITLES = {"recall": "Recall", "ndcg": "NDCG"}
# Stages whose rows are not ranking runs: (column title, field) in order.
_COLUMNS = {
  "sharding": (
    ("measure", "measure"),
    ("vocab", "vocab_size"),
    ("hidden", "hidden"),
    ("LLM layers", "layers"),
    ("mesh", "mesh"),
    ("peak MB/device", "per_device_peak_mb"),
    ("arguments MB", "argument_mb"),
    ("temp MB", "temp_mb"),
    ("step s", "step_seconds"),
    ("load", "load_average"),
    ("date", "date"),
    ("machine", "machine"),
  ),
}
_COLUMNS["collapse"] = (
  ("implementation", "implementation"),
  ("dataset", "dataset"),
  ("model", "model"),
  ("entities", "entities"),
  ("codebook", "codebook"),
  ("batch", "batch"),
  ("steps", "steps"),
  ("tokens at init", "init_tokens"),
  ("sets at init", "init_sets"),
  ("tokens per batch, by epoch", "batch_tokens"),
  ("tokens after each epoch", "tokens"),
  ("sets after each epoch", "sets"),
  ("VQ first, last", "vq"),
  ("recon last", "recon"),
  ("s/step", "seconds_per_step"),
  ("load", "load_average"),
  ("date", "date"),
)
# What a stage's table shows, said under its heading.
_NOTES = {
  "sharding": (
    "Memory per device from XLA's analysis of the compiled step (peak: "
    "arguments, outputs and temporaries). Quantiser steps are timed for the "
    "vocabularies the command runs (`--time_max_vocab`, 20k by default); "
    "the 8 devices are fake and share the machine's cores, so times do not "
    "fall with more shards. align_7b rows are compiled, never run."
  ),
}
# Stages whose tables name the machine under the commands, not in a column.
_FACE_MACHINE = ("map", "align", "face_step")
# Fields left out of the generic columns (the command is listed below).
_NOT_COLUMNS = ("stage", "command")


def _epochs(run: dict) -> str:
  epochs = run.get("epochs", "")
  if run.get("early_stopped"):
    return f"{epochs} (early stop, best {run.get('best_epoch')})"
  if "max_epochs" in run:
    return f"{epochs} (capped at {run['max_epochs']})"
  return str(epochs)


def _number(value, digits: int) -> str:
  if value is None:
    return ""
  return f"{value:.{digits}f}"


def _row(index: int, run: dict) -> str:
  metrics = run.get("metrics", {})
  cells = [
    str(index),
    run.get("dataset", ""),
    run.get("model", ""),
    run.get("split", ""),
    *(_number(metrics.get(name), 4) for name in _METRICS),
    _epochs(run),
    _number(run.get("seconds_per_epoch"), 2),
    _number(run.get("eval_seconds"), 3),
    _number(run.get("peak_rss_mb"), 0),
    _number((run.get("load_average") or [None])[0], 1),
    run.get("date", "")[:10],
    run.get("machine", ""),
  ]
  return "| " + " | ".join(cells) + " |"


def _pair(before, after) -> str:
  if before is None or after is None:
    return ""
  return f"{before:.4f} → {after:.4f}"


def _retrieval(run: dict, kind: str) -> str:
  scores = (run.get("retrieval") or {}).get(kind)
  if not scores:
    return ""
  text = f"{scores['top1']:.3f} / {scores['top10']:.3f}"
  # Earlier runs measured the floor with random descriptors, later ones
  # with the real descriptors shuffled across entities.
  for name in ("shuffled", "random"):
    floor = (run.get(f"{name}_retrieval") or {}).get(kind)
    if floor:
      text += f" ({name} {floor['top1']:.3f} / {floor['top10']:.3f})"
  return text


# Columns of the FACE stage tables: header -> cell of a run.
_FACE_COLUMNS = {
  "dataset": lambda run: run.get("dataset", ""),
  "model": lambda run: run.get("model", ""),
  **{
    f"{_TITLES[name.split('@')[0]]}@{name.split('@')[1]} backbone → FACE": (
      lambda run, name=name: _pair(
        run.get("backbone_metrics", {}).get(name),
        run.get("metrics", {}).get(name),
      )
    )
    for name in _METRICS
  },
  "users top-1 / top-10": lambda run: _retrieval(run, "user"),
  "items top-1 / top-10": lambda run: _retrieval(run, "item"),
  "distinct tokens": lambda run: str(run.get("distinct_tokens") or ""),
  "epochs": _epochs,
  "batch": lambda run: str(run.get("batch_size", "")),
  "steps/epoch": lambda run: str(run.get("steps_per_epoch", "")),
  "s/step": lambda run: _number(run.get("step_seconds"), 3),
  "job wall s": lambda run: _number(run.get("wall_seconds"), 0),
  "peak RSS MB": lambda run: _number(run.get("peak_rss_mb"), 0),
  "load": lambda run: _number((run.get("load_average") or [None])[0], 1),
  "date": lambda run: run.get("date", "")[:10],
}

_STEP_COLUMNS = {
  "dataset": lambda run: run.get("dataset", ""),
  "model": lambda run: run.get("model", ""),
  "step": lambda run: run.get("step", ""),
  "batch": lambda run: str(run.get("batch_size", "")),
  "codebook": lambda run: str(run.get("vocabulary_size", "")),
  "s/step (median)": lambda run: _number(run.get("step_seconds"), 3),
  "GFLOP/step": lambda run: _number(run.get("gflop"), 1),
  "GFLOP/s": lambda run: _number(run.get("achieved_gflops"), 1),
  "matmul peak GFLOP/s": lambda run: _number(run.get("matmul_peak_gflops"), 1),
  "peak RSS MB": lambda run: _number(run.get("peak_rss_mb"), 0),
  "compile s": lambda run: _number(run.get("compile_seconds"), 1),
  "load": lambda run: _number((run.get("load_average") or [None])[0], 1),
  "date": lambda run: run.get("date", "")[:10],
}


def _head(run: dict) -> str:
  head = run.get("head")
  if not head:
    return ""
  return f"{head['best_epoch']} of {head['epochs']}"


def _shortcuts(run: dict) -> str:
  return ", ".join(f"{k}={v}" for k, v in (run.get("shortcuts") or {}).items())


# Columns of the cold-start table: one row per cold entity type and method.
_COLD_METRICS = ("recall@5", "ndcg@5", "recall@20", "ndcg@20")
_COLD_COLUMNS = {
  "dataset": lambda run: run.get("dataset", ""),
  "model": lambda run: run.get("model", ""),
  "cold": lambda run: f"{run.get('cold', '')}s",
  "method": lambda run: run.get("method", ""),
  **{
    f"{_TITLES[name.split('@')[0]]}@{name.split('@')[1]}": (
      lambda run, name=name: _number(run.get("metrics", {}).get(name), 4)
    )
    for name in _COLD_METRICS
  },
  "ranking users": lambda run: str(run.get("queries", "")),
  "candidates": lambda run: str(run.get("candidates", "")),
  "FACE after": lambda run: run.get("after", ""),
  "head best epoch": _head,
  "distinct descriptor sets": lambda run: _cell(
    run.get("distinct_descriptor_sets")
  ),
  "load": lambda run: _number((run.get("load_average") or [None])[0], 1),
  "date": lambda run: run.get("date", "")[:10],
}


def _cold_start_lines(runs: list[dict]) -> list[str]:
  """The cold-start table and its commands, each job's command once.

  A job appends one row per cold entity type and method; its rows share a
  command and a date, so the table numbers jobs and the commands (with
  the config's CPU shortcuts) are listed once per job.
  """
  ordered = sorted(
    runs,
    key=lambda run: (
      run.get("dataset", ""),
      run.get("model", ""),
      run.get("date", ""),
    ),
  )
  jobs = {}
  for run in ordered:
    jobs.setdefault((run.get("command", ""), run.get("date", "")), run)
  number = {key: index for index, key in enumerate(jobs, 1)}
  columns = {
    "job": lambda run: str(
      number[(run.get("command", ""), run.get("date", ""))]
    ),
    **_COLD_COLUMNS,
  }
  lines = _table(ordered, columns)
  lines += ["", "Jobs:", ""]
  for index, run in enumerate(jobs.values(), 1):
    lines.append(
      f"{index}. `{run.get('command', '')}` ({run.get('machine', '')}); "
      f"CPU shortcuts: {_shortcuts(run)}"
    )
  return lines


def _table(ordered: list[dict], columns: dict) -> list[str]:
  lines = ["| # | " + " | ".join(columns) + " |"]
  lines.append("|" + "---|" * (len(columns) + 1))
  for index, run in enumerate(ordered, 1):
    cells = [str(index), *(cell(run) for cell in columns.values())]
    lines.append("| " + " | ".join(cells) + " |")
  return lines


_NOTES.update(
  {
    "map": "Test metrics of the pretrained backbone alone → after the map "
    "stage (the backbone is scored; FACE does not change scoring). Retrieval: "
    "fraction of entities whose descriptor sentence, encoded by the frozen "
    "LLM, ranks its own profile first / in the top 10 among all profiles of "
    "its type, beside the floor: random descriptors (earlier runs) or the "
    "real ones shuffled across entities.",
    "align": "As for map, after the align stage.",
    "cold_start": "Cold users and items (a seeded 20% of each, held out of "
    "every training stage) ranked from their text alone. Cold items: each "
    "warm user with interactions with cold items ranks all cold items; cold "
    "users: each cold user ranks all warm items. FACE: profile embedding → "
    "text head → FACE words → quantiser → FACE decoder → CF embedding; "
    "alpharec: an MLP from the profile embedding to the CF embedding; text: "
    "cosine of the user's and item's profile embeddings; random: the exact "
    "expectation of a random ranking.",
    "collapse": "The map stage's FACE terms (VQ + reconstruction, Adam, "
    "dropout on) trained by face_jax and by the authors' own module "
    "(their encoder/FACE.py, run unchanged under PyTorch) on the same "
    "inputs: the fixed final CF embeddings of a pretrained backbone, the "
    "same codebook rows and the same batches "
    "(`benchmarks/bench_collapse.py`). Tokens and sets: distinct tokens "
    "and distinct descriptor sets among all users and items (dropout "
    "off); tokens per batch: the mean over an epoch's training batches "
    "of the distinct tokens of a batch's descriptors (W = 16 is one "
    "shared set). The two modules start from different random draws.",
    "face_step": "Median wall time of one jitted train step after a compiling "
    "warm-up; GFLOP as XLA counts the step; GFLOP/s achieved beside a "
    "float32 4096 x 4096 matmul measured in the same process.",
  }
)


def _cell(value) -> str:
  if value is None:
    return ""
  if isinstance(value, list):
    return ", ".join(_cell(item) for item in value)
  return str(value)


def _field_columns(runs: list[dict]) -> tuple[tuple[str, str], ...]:
  """A column per field of `runs`, in first-seen order."""
  fields = {}
  for run in runs:
    fields.update(dict.fromkeys(k for k in run if k not in _NOT_COLUMNS))
  return tuple((name, name) for name in fields)


def _field_table(runs: list[dict], columns) -> list[str]:
  lines = ["| # | " + " | ".join(title for title, _ in columns) + " |"]
  lines.append("|" + "---|" * (len(columns) + 1))
  for index, run in enumerate(runs, 1):
    cells = [str(index)]
    for _, field in columns:
      value = run.get(field)
      if field == "load_average" and value:
        value = value[0]
      elif field == "date" and value:
        value = value[:10]
      cells.append(_cell(value))
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def _sort_key(run: dict) -> tuple:
  names = (str(run.get(field, "")) for field in ("dataset", "model", "measure"))
  sizes = (
    run.get(field) or 0 for field in ("vocab_size", "vocab_shards", "layers")
  )
  return (*names, *sizes, run.get("date", ""))


def render(runs: list[dict]) -> str:
  """The Markdown text for `runs` (one dict per JSONL line)."""
  by_stage = collections.defaultdict(list)
  for run in runs:
    by_stage[run.get("stage", "unknown")].append(run)
  header = [
    "#",
    "dataset",
    "model",
    "split",
    *(
      name.replace("recall", "Recall").replace("ndcg", "NDCG")
      for name in _METRICS
    ),
    "epochs",
    "s/epoch",
    "eval s",
    "peak RSS MB",
    "load",
    "date",
    "machine",
  ]
  lines = [
    "# Benchmark results",
    "",
    "Generated by `python benchmarks/render_results.py` from "
    "`benchmarks/results.jsonl`; do not edit by hand. Metrics are full-rank "
    "test metrics of the best validation epoch; s/epoch is the median "
    "training time of an epoch, eval s the median full-rank test evaluation "
    "(embeddings and ranking); load is the machine's 1-minute load average "
    "when the run started (timings on a busy machine are slower). Runs "
    "capped by max_epochs are smoke runs, not trained to convergence.",
  ]
  for stage in sorted(by_stage):
    lines += ["", f"## Stage: {stage}", ""]
    if stage in _NOTES:
      lines += [_NOTES[stage], ""]
    if stage == "cold_start":
      lines += _cold_start_lines(by_stage[stage])
      continue
    face_columns = {"map": _FACE_COLUMNS, "align": _FACE_COLUMNS}.get(
      stage, _STEP_COLUMNS if stage == "face_step" else None
    )
    if face_columns:
      ordered = sorted(
        by_stage[stage],
        key=lambda run: (
          run.get("dataset", ""),
          run.get("model", ""),
          run.get("date", ""),
        ),
      )
      lines += _table(ordered, face_columns)
    elif stage in _COLUMNS or not any("metrics" in r for r in by_stage[stage]):
      ordered = sorted(by_stage[stage], key=_sort_key)
      columns = _COLUMNS.get(stage) or _field_columns(ordered)
      lines += _field_table(ordered, columns)
    else:
      ordered = sorted(
        by_stage[stage],
        key=lambda run: (
          run.get("dataset", ""),
          run.get("model", ""),
          run.get("date", ""),
        ),
      )
      lines.append("| " + " | ".join(header) + " |")
      lines.append("|" + "---|" * len(header))
      lines += [_row(index, run) for index, run in enumerate(ordered, 1)]
    lines += ["", "Commands:", ""]
    lines += [
      f"{index}. `{run.get('command', '')}`"
      + (
        f" ({run['machine']})"
        if stage in _FACE_MACHINE and "machine" in run
        else ""
      )
      for index, run in enumerate(ordered, 1)
    ]
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--results", default=str(_HERE / "results.jsonl"))
  parser.add_argument("--output", default=str(_HERE / "RESULTS.md"))
  args = parser.parse_args()
  path = pathlib.Path(args.results)
  runs = [
    json.loads(line)
    for line in path.read_text(encoding="utf-8").splitlines()
    if line.strip()
  ]
  pathlib.Path(args.output).write_text(render(runs), encoding="utf-8")


if __name__ == "__main__":
  main()
