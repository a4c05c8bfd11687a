"""notebooks/explore_run.ipynb runs top to bottom on a finished tiny run.

Its code cells are executed in order in one namespace (as a kernel would,
without needing one), headless with matplotlib's Agg backend.
"""

import collections
import contextlib
import io
import json
import pathlib

import matplotlib.pyplot as plt
import pytest
from _finished_run import finished_run

_METRICS = (
  "recall@5",
  "recall@10",
  "recall@20",
  "ndcg@5",
  "ndcg@10",
  "ndcg@20",
)
_NOTEBOOK = (
  pathlib.Path(__file__).resolve().parents[1] / "notebooks/explore_run.ipynb"
)


def _cells():
  return json.loads(_NOTEBOOK.read_text(encoding="utf-8"))["cells"]


def test_notebook_is_committed_without_outputs():
  for cell in _cells():
    if cell["cell_type"] == "code":
      assert cell["outputs"] == []
      assert cell["execution_count"] is None


def test_notebook_runs_on_a_finished_run(tmp_path_factory, monkeypatch):
  plt.switch_backend("Agg")
  workdir, dataset = finished_run(tmp_path_factory)
  monkeypatch.setenv("FACE_WORKDIR", str(workdir))
  namespace = {"__name__": "__main__"}
  figures = []
  # plt.show() is a no-op under Agg; keep each figure for the checks.
  monkeypatch.setattr(plt, "show", lambda: figures.append(plt.gcf()))
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    for cell in _cells():
      if cell["cell_type"] == "code":
        exec(
          compile("".join(cell["source"]), str(_NOTEBOOK), "exec"), namespace
        )
  output = printed.getvalue()
  run = namespace["run"]
  assert run.workdir == workdir
  for entity in range(3):
    words = ", ".join(run.descriptors["user"][entity]["words"])
    assert f"user {entity} (align): {words}" in output
  assert "retrieval shuffled" in output
  test = run.results["align"]["test"]
  align_test = next(
    line for line in output.splitlines() if line.startswith("align    test")
  )
  assert align_test.split()[3:] == [f"{test[name]:.4f}" for name in _METRICS]
  assert "user 0, descriptors after align" in output
  assert output.count("       words: ") == 5
  bars, curves = figures
  counts = collections.Counter(
    word
    for kind in ("user", "item")
    for record in run.descriptors[kind]
    for word in record["words"]
  )
  bars.canvas.draw()  # Categorical tick labels are set when drawn.
  heights = [patch.get_width() for patch in bars.axes[0].patches]
  labels = [label.get_text() for label in bars.axes[0].get_yticklabels()]
  # The most used words, the most used at the top (drawn last).
  assert heights == sorted(counts.values())[-len(heights) :]
  assert len(heights) == min(20, len(counts))
  assert [counts[label] for label in labels] == heights
  loss_axis = curves.axes[0]
  assert [line.get_label() for line in loss_axis.lines] == [
    "pretrain",
    "map",
    "align",
  ]
  map_epochs = run.results["map"]["epochs"]
  assert len(loss_axis.lines[1].get_xdata()) == map_epochs
  assert namespace["explainer"].dataset.num_users == dataset.num_users
  plt.close("all")


@pytest.fixture(autouse=True)
def _no_figures_left():
  yield
  plt.close("all")
