"""Merging answers of overlapping tiles: NMS, nodata filtering, ownership counts.

NMS rule (score-aware, class-aware, raster pixel space, on each box's
axis-aligned envelope): within one label, boxes are visited by decreasing
score; a box is suppressed when it overlaps a kept box with IoU above
``iou_threshold``, or -- for boxes from *different* tiles -- when the overlap
covers more than ``containment_threshold`` of the smaller box (an object cut
by one tile's edge is a clipped duplicate of the whole object seen by the
neighbour, so its IoU alone can be low).

Ownership rule for integer-only counts: along each axis the overlap between
two neighbouring tiles is split at its middle, so every raster pixel belongs
to exactly one tile of the grid. A tile's integer count is weighted by the
share of its in-raster area that it owns, and the weighted counts are summed
(then rounded). Without overlap every weight is 1; with overlap no region is
counted twice (assuming objects spread evenly within a tile).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from shapely.geometry import Polygon

from tiling.windows import Tile, TileGrid

__all__ = [
    "Detection",
    "nms",
    "box_valid_share",
    "owned_share",
    "ownership_weighted_count",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Detection:
    """One box predicted on one tile, in raster pixels.

    Attributes:
        label: Class / referring expression (normalised lower case).
        score: Confidence of the tile answer that produced it, in (0, 1].
        tile_id: The tile it was predicted on.
        polygon_px: The (possibly rotated) box in raster pixel coordinates.
    """

    label: str
    score: float
    tile_id: int
    polygon_px: Polygon

    @property
    def envelope_px(self) -> tuple[float, float, float, float]:
        """``(col_min, row_min, col_max, row_max)`` of the polygon."""
        return self.polygon_px.bounds


def nms(
    detections: Sequence[Detection], iou_threshold: float = 0.5, containment_threshold: float = 0.8
) -> list[Detection]:
    """Keep the best of each group of duplicate boxes (rule in the module docstring).

    Args:
        detections: Boxes of all tiles, any order.
        iou_threshold: IoU above which the lower-scored box of one label is dropped.
        containment_threshold: Intersection over the smaller box's area above
            which a lower-scored box from another tile is dropped.

    Returns:
        The kept detections, by label then decreasing score.
    """
    by_label: dict[str, list[Detection]] = defaultdict(list)
    for det in detections:
        by_label[det.label].append(det)
    kept: list[Detection] = []
    for label in sorted(by_label):
        kept.extend(_nms_one_label(by_label[label], iou_threshold, containment_threshold))
    return kept


def _nms_one_label(dets: list[Detection], iou_thr: float, contain_thr: float) -> list[Detection]:
    """Greedy NMS over the detections of one label."""
    dets = sorted(dets, key=lambda d: (-d.score, d.tile_id))
    boxes = np.array([d.envelope_px for d in dets], dtype=np.float64).reshape(-1, 4)  # (n, 4)
    tiles = np.array([d.tile_id for d in dets])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])  # (n,)
    alive = np.ones(len(dets), bool)
    for i in range(len(dets)):
        if not alive[i]:
            continue
        rest = np.flatnonzero(alive[i + 1 :]) + i + 1
        if rest.size == 0:
            break
        iw = np.clip(np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0]), 0, None)
        ih = np.clip(np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1]), 0, None)
        inter = iw * ih
        iou = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-12)
        contain = inter / np.maximum(np.minimum(areas[i], areas[rest]), 1e-12)
        drop = (iou > iou_thr) | ((tiles[rest] != tiles[i]) & (contain > contain_thr))
        alive[rest[drop]] = False
    return [d for d, a in zip(dets, alive) if a]


def box_valid_share(envelope_tile_px: tuple[float, float, float, float], valid: np.ndarray) -> float:
    """Share of valid pixels under a box on its tile.

    Args:
        envelope_tile_px: ``(x1, y1, x2, y2)`` in tile pixels.
        valid: ``(tile_rows, tile_cols)`` bool, True on valid data.

    Returns:
        0..1; 0 for a box with no pixel inside the tile.
    """
    x1, y1, x2, y2 = envelope_tile_px
    rows, cols = valid.shape
    c0, r0 = max(0, math.floor(x1)), max(0, math.floor(y1))
    c1, r1 = min(cols, math.ceil(x2)), min(rows, math.ceil(y2))
    if c1 <= c0 or r1 <= r0:
        return 0.0
    return float(valid[r0:r1, c0:c1].mean())


def _owned_interval(offsets: Sequence[int], offset: int, tile_px: int, length: int) -> float:
    """Length (px) of the part of one axis owned by the tile at ``offset``."""
    i = list(offsets).index(offset)
    lo = offset if i == 0 else (offsets[i - 1] + tile_px + offset) / 2.0
    hi = min(offset + tile_px, length) if i == len(offsets) - 1 else (offset + tile_px + offsets[i + 1]) / 2.0
    return max(0.0, hi - lo)


def owned_share(tile: Tile, grid: TileGrid, width: int, height: int) -> float:
    """Share of a tile's in-raster area that it owns (ownership rule above).

    Args:
        tile: A tile of ``grid``.
        grid: The grid (its full column/row offsets define the split).
        width: Raster columns.
        height: Raster rows.
    """
    in_w = min(tile.col_off_px + tile.width_px, width) - tile.col_off_px
    in_h = min(tile.row_off_px + tile.height_px, height) - tile.row_off_px
    own_w = _owned_interval(grid.col_offsets_px, tile.col_off_px, grid.tile_px, width)
    own_h = _owned_interval(grid.row_offsets_px, tile.row_off_px, grid.tile_px, height)
    return (own_w * own_h) / float(in_w * in_h)


def ownership_weighted_count(
    counts: Iterable[tuple[Tile, int]], grid: TileGrid, width: int, height: int
) -> float:
    """Sum of tile counts, each weighted by :func:`owned_share` (not rounded)."""
    return float(sum(n * owned_share(t, grid, width, height) for t, n in counts))
