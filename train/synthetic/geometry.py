"""Pixel geometry shared by the generator and its users: 3x3 grid cells, oriented boxes, IoU.

Frame: image pixels, x to the right, y down, origin at the top-left corner of the
top-left pixel. Angles are degrees clockwise from the +x axis (y points down, so
"clockwise" as seen on screen).
"""

from __future__ import annotations

import logging

import numpy as np

__all__ = [
    "GRID_CELLS",
    "grid_cell",
    "cell_bounds",
    "to_image",
    "oriented_rect",
    "box_of",
    "box_iou",
]

logger = logging.getLogger(__name__)

_ROWS = ("top", "middle", "bottom")
_COLS = ("left", "center", "right")

#: The nine cell names of the 3x3 grid, row by row from the top left.
GRID_CELLS: tuple[str, ...] = (
    "top left", "top center", "top right",
    "middle left", "center", "middle right",
    "bottom left", "bottom center", "bottom right",
)


def grid_cell(x_px: float, y_px: float, width_px: int, height_px: int) -> str:
    """Name of the 3x3 grid cell holding the point ``(x_px, y_px)`` of a ``width_px x height_px`` image."""
    col = min(2, max(0, int(3 * x_px / width_px)))
    row = min(2, max(0, int(3 * y_px / height_px)))
    return GRID_CELLS[3 * row + col]


def cell_bounds(cell: str, width_px: int, height_px: int) -> tuple[float, float, float, float]:
    """Box ``(x1, y1, x2, y2)`` in pixels of a named grid cell.

    Raises:
        ValueError: ``cell`` is not one of :data:`GRID_CELLS`.
    """
    if cell not in GRID_CELLS:
        raise ValueError(f"unknown grid cell {cell!r}; use one of {list(GRID_CELLS)}")
    row, col = divmod(GRID_CELLS.index(cell), 3)
    return (col * width_px / 3, row * height_px / 3, (col + 1) * width_px / 3, (row + 1) * height_px / 3)


def to_image(points_local: np.ndarray, cx: float, cy: float, angle_deg: float) -> np.ndarray:
    """Rotate object-frame points by ``angle_deg`` and move them to centre ``(cx, cy)``.

    Args:
        points_local: ``(n, 2)`` points in pixels, x along the object's long axis (front = +x).
        cx, cy: object centre in image pixels.
        angle_deg: heading, degrees clockwise from +x.

    Returns:
        ``(n, 2)`` float64 image pixel coordinates.
    """
    a = np.deg2rad(angle_deg)
    c, s = np.cos(a), np.sin(a)
    rot = np.array([[c, -s], [s, c]])  # y down: positive angle turns clockwise on screen
    return points_local @ rot.T + (cx, cy)


def oriented_rect(cx: float, cy: float, length_px: float, width_px: float, angle_deg: float) -> np.ndarray:
    """The four corners ``(4, 2)`` of an oriented rectangle: front-left, front-right, rear-right, rear-left."""
    hl, hw = length_px / 2, width_px / 2
    local = np.array([[hl, -hw], [hl, hw], [-hl, hw], [-hl, -hw]])
    return to_image(local, cx, cy, angle_deg)


def box_of(points: np.ndarray) -> tuple[float, float, float, float]:
    """Axis-aligned box ``(x1, y1, x2, y2)`` around ``(n, 2)`` points."""
    x1, y1 = points.min(axis=0)
    x2, y2 = points.max(axis=0)
    return (float(x1), float(y1), float(x2), float(y2))


def box_iou(box: tuple[float, float, float, float], boxes: np.ndarray) -> np.ndarray:
    """IoU of one box with each of ``boxes`` ``(n, 4)``; returns ``(n,)`` (empty for no boxes)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    ix = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = ix * iy
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)
