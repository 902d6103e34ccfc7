"""Figures for the Routing tab (matplotlib's object API: no pyplot, no global state)."""

from __future__ import annotations

import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from skymoe.routing_plots import plot_expert_heatmaps

__all__ = ["expert_heatmap_figure", "expert_load_figure"]

MAX_LAYER_ROWS = 8


def _to_image(fig: Figure) -> Image.Image:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def expert_heatmap_figure(tile_rgb: np.ndarray, heatmaps: np.ndarray, layer_ids: list[int]) -> Image.Image:
    """The tile and, per MoE layer (rows) and expert (columns), the share of patches routed there.

    Rendered by :func:`skymoe.routing_plots.plot_expert_heatmaps` (shared with ``train.viz_router``),
    at most :data:`MAX_LAYER_ROWS` layers so the figure stays readable in the tab.

    Args:
        tile_rgb: ``(height_px, width_px, 3)`` uint8 tile.
        heatmaps: ``(num_moe_layers, num_experts, grid_h, grid_w)`` shares in 0..1.
        layer_ids: decoder-layer index of each row of ``heatmaps``.
    """
    title = None
    if len(heatmaps) > MAX_LAYER_ROWS:
        title = f"first {MAX_LAYER_ROWS} of {len(heatmaps)} MoE layers"
    fig = plot_expert_heatmaps(heatmaps[:MAX_LAYER_ROWS], tile_rgb, layer_ids[:MAX_LAYER_ROWS], title=title)
    return _to_image(fig)


def expert_load_figure(loads: dict[str, np.ndarray]) -> Image.Image:
    """Grouped bars: per task, the share of tokens sent to each expert (mean over MoE layers).

    Args:
        loads: task name -> ``(num_moe_layers, num_experts)`` load shares.
    """
    tasks = list(loads)
    n_experts = next(iter(loads.values())).shape[1]
    width = 0.8 / max(len(tasks), 1)
    fig = Figure(figsize=(max(6, 0.9 * n_experts + 2), 3.2))
    ax = fig.subplots()
    for i, task in enumerate(tasks):
        ax.bar(np.arange(n_experts) + i * width, loads[task].mean(axis=0), width, label=task)
    ax.set_xticks(np.arange(n_experts) + width * (len(tasks) - 1) / 2, [f"E{e}" for e in range(n_experts)])
    ax.set_ylabel("share of tokens (top-k)")
    ax.legend(fontsize=8, ncols=min(len(tasks), 5))
    return _to_image(fig)
