"""Rendering of per-expert routing heatmaps (used by the app's Routing tab and ``train.viz_router``).

Pure plotting over numpy arrays, e.g. :meth:`skymoe.RoutingTrace.expert_heatmaps`; matplotlib's
object API only (no pyplot, no global state). Not imported by ``skymoe/__init__`` so that the
model package does not load matplotlib unless a plot is asked for.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

__all__ = ["plot_expert_heatmaps", "figure_png_bytes"]


def plot_expert_heatmaps(heatmaps: np.ndarray, image: Image.Image | np.ndarray,
                         layer_indices: Sequence[int] | None = None, title: str | None = None) -> Figure:
    """Per-expert routing heatmaps over an image's patch grid.

    Args:
        heatmaps: ``(num_experts, grid_h, grid_w)`` for one MoE layer or
            ``(num_moe_layers, num_experts, grid_h, grid_w)``; values in [0, 1] (share of the
            patch's top-k routing that went to the expert), e.g. ``RoutingTrace.expert_heatmaps()``.
        image: the model's input image, PIL or ``(H, W, 3)`` uint8; shown under each map.
        layer_indices: decoder-layer index of each row, for the row labels.
        title: figure title.

    Returns:
        A matplotlib ``Figure`` (no pyplot state): rows = MoE layers, first column the image,
        then one column per expert with the heatmap blended over the image.

    Raises:
        ValueError: ``heatmaps`` is not 3-D or 4-D.
    """
    maps = np.asarray(heatmaps, dtype=np.float32)
    if maps.ndim == 3:
        maps = maps[None]
    if maps.ndim != 4:
        raise ValueError(f"heatmaps must be (experts, h, w) or (layers, experts, h, w), got shape {maps.shape}")
    rows, experts = maps.shape[:2]
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    fig = Figure(figsize=(1.6 * (experts + 1), 1.7 * rows + 0.4), layout="constrained")
    axes = np.asarray(fig.subplots(rows, experts + 1, squeeze=False))
    extent = (0, rgb.shape[1], rgb.shape[0], 0)  # heatmap cells stretched over the image, y down
    mappable = None
    for r in range(rows):
        layer = layer_indices[r] if layer_indices is not None else r
        axes[r, 0].imshow(rgb)
        axes[r, 0].set_ylabel(f"layer {layer}", fontsize=8)
        for e in range(experts):
            ax = axes[r, e + 1]
            ax.imshow(rgb, alpha=0.55)
            mappable = ax.imshow(maps[r, e], cmap="magma", vmin=0.0, vmax=1.0, alpha=0.65,
                                 extent=extent, interpolation="nearest")
            if r == 0:
                ax.set_title(f"expert {e}", fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.colorbar(mappable, ax=axes[:, 1:].ravel().tolist(), shrink=0.8, label="routing share")
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def figure_png_bytes(fig: Figure, dpi: int = 110) -> bytes:
    """The figure rendered as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
