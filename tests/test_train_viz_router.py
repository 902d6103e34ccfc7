"""Router plots: heatmap rendering and the viz_router command on a tiny MoE checkpoint."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from train_samples import write_instruction_jsonl

import skymoe
from train.viz_router import figure_png_bytes, main, plot_expert_heatmaps


def test_plot_expert_heatmaps_layout_and_png():
    maps = np.zeros((2, 4, 3, 3), np.float32)
    maps[1, 2, 0, 0] = 1.0
    image = Image.fromarray(np.full((30, 30, 3), 120, np.uint8))
    fig = plot_expert_heatmaps(maps, image, layer_indices=[1, 3], title="t")
    grid_axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(grid_axes) == 2 * (4 + 1)  # rows = layers, columns = image + experts
    assert grid_axes[0].get_ylabel() == "layer 1"
    png = figure_png_bytes(fig)
    assert Image.open(io.BytesIO(png)).format == "PNG"
    single = plot_expert_heatmaps(maps[0], np.asarray(image))  # one layer (E, h, w)
    assert len([ax for ax in single.axes if ax.get_label() != "<colorbar>"]) == 5
    with pytest.raises(ValueError, match=r"got shape \(3, 3\)"):
        plot_expert_heatmaps(maps[0, 0], image)


def _write_data(root):
    items = [("count", "ship", "x"), ("ground", "the red car", "x"), ("caption", None, "x"),
             ("classify", None, "x"), ("count", "plane", "x")]
    return write_instruction_jsonl(root, items)


def test_viz_router_writes_pngs_and_summary(tmp_path):
    folder = skymoe.make_tiny_checkpoint(tmp_path / "moe", num_experts=4)
    data = _write_data(tmp_path)
    assert main(["--model", str(folder), "--data", str(data), "--out", str(tmp_path / "plots"),
                 "--heatmap-samples", "1"]) == 0
    names = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert names == ["expert_load_per_task.png", "expert_share_local_global.png", "heatmaps_0_count.png",
                     "heatmaps_1_ground.png", "heatmaps_2_caption.png", "heatmaps_3_classify.png"]
    for name in names:
        assert Image.open(tmp_path / "plots" / name).size[0] > 100
    summary = json.loads((tmp_path / "plots" / "routing_summary.json").read_text())
    assert summary["layers"] == [1, 3] and summary["samples_per_task"]["count"] == 2
    for load in list(summary["load_by_task"].values()) + list(summary["load_by_granularity"].values()):
        assert np.allclose(np.sum(load, axis=1), 1.0, atol=1e-3)  # shares of top-k assignments per layer
    assert set(summary["load_by_granularity"]) == {"global", "local"}


def test_viz_router_refuses_a_dense_model(tmp_path, capsys):
    folder = skymoe.make_tiny_checkpoint(tmp_path / "dense", num_experts=1)
    data = _write_data(tmp_path)
    assert main(["--model", str(folder), "--data", str(data), "--out", str(tmp_path / "p")]) == 2
    assert "dense model" in capsys.readouterr().err
