"""What a run logs per epoch: metrics.jsonl and TensorBoard event files.

Checked on the shared tiny run (every stage, event files on): every
training stage logs its loss terms, gradient norm, learning rates,
throughput and validation metrics.
"""

import math
import struct

import pytest
from _finished_run import finished_run
from tensorboardX.proto import event_pb2

from face_jax import runs

_RATES = {
  "pretrain": {"backbone": ("pretrain", "learning_rate")},
  "map": {
    "face": ("face", "learning_rate"),
    "backbone": ("face", "backbone_learning_rate"),
  },
}
_RATES["align"] = _RATES["map"]


def _event_tags(folder):
  """Every scalar tag in the TFRecord event files under folder."""
  tags = set()
  for path in folder.glob("events.out.tfevents.*"):
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
      # TFRecord: u64 length, u32 length CRC, payload, u32 payload CRC.
      (length,) = struct.unpack_from("<Q", data, offset)
      payload = data[offset + 12 : offset + 12 + length]
      offset += 12 + length + 4
      event = event_pb2.Event.FromString(payload)
      tags.update(value.tag for value in event.summary.value)
  return tags


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return finished_run(tmp_path_factory)[0]


def test_every_epoch_logs_rates_gradients_and_throughput(workdir):
  config = runs.read_config(workdir)
  records = [record for record in runs.read_log(workdir) if "train" in record]
  for stage, rates in _RATES.items():
    epochs = [record for record in records if record["stage"] == stage]
    assert epochs, stage
    assert [record["epoch"] for record in epochs] == list(
      range(1, len(epochs) + 1)
    )
    for record in epochs:
      assert record["lr"] == {
        group: config[section][field]
        for group, (section, field) in rates.items()
      }
      assert math.isfinite(record["train"]["grad_norm"])
      assert record["train"]["grad_norm"] > 0
      throughput = record["throughput"]
      assert throughput["steps_per_second"] > 0
      # Every step of a stage takes a full batch.
      assert throughput["examples_per_second"] == pytest.approx(
        throughput["steps_per_second"] * config[stage].batch_size
      )
      assert "recall@20" in record["valid"]


def test_tensorboard_mirrors_the_log(workdir):
  tags = _event_tags(workdir / "tensorboard")
  for stage in _RATES:
    assert f"{stage}/train/loss" in tags
    assert f"{stage}/train/grad_norm" in tags
    assert f"{stage}/valid/recall_20" in tags
    assert f"{stage}/throughput/examples_per_second" in tags
    assert f"{stage}/lr/backbone" in tags
    assert f"{stage}/test/ndcg_20" in tags
  assert "align/lr/face" in tags and "align/train/align" in tags
