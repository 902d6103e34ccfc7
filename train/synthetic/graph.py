"""The scene graph: what the generator places, before it is rendered or described.

Values crossing ``layout`` -> ``scene`` -> ``render`` / ``language``. Coordinates
are image pixels (x right, y down); angles are degrees clockwise from +x.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from train.synthetic.geometry import box_of, grid_cell, oriented_rect

__all__ = ["PlacedObject", "SceneGraph"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlacedObject:
    """One object of a scene.

    Attributes:
        label: object class name (``train.synthetic.classes.OBJECT_CLASSES``).
        colour: colour word it is painted in.
        size: size word (``"small" | "medium" | "large"``) from its length within its class's range.
        cx_px, cy_px: centre in image pixels.
        length_px, width_px: extent along / across its heading, in pixels.
        angle_deg: heading in [0, 360), degrees clockwise from +x (the front of a vehicle points there).
        height_m: height above ground in metres (shadow length).
        detail_seed: seed of the per-object details (windows, containers, crown shape).
    """

    label: str
    colour: str
    size: str
    cx_px: float
    cy_px: float
    length_px: float
    width_px: float
    angle_deg: float
    height_m: float
    detail_seed: int

    @property
    def corners_px(self) -> np.ndarray:
        """``(4, 2)`` oriented-box corners (front-left, front-right, rear-right, rear-left)."""
        return oriented_rect(self.cx_px, self.cy_px, self.length_px, self.width_px, self.angle_deg)

    @property
    def box_px(self) -> tuple[float, float, float, float]:
        """Axis-aligned box ``(x1, y1, x2, y2)`` around the oriented box."""
        return box_of(self.corners_px)

    def cell(self, width_px: int, height_px: int) -> str:
        """The 3x3 grid cell of the object's centre."""
        return grid_cell(self.cx_px, self.cy_px, width_px, height_px)


@dataclass
class SceneGraph:
    """A composed scene before rendering.

    Attributes:
        scene_class: scene label.
        width_px, height_px: image size.
        gsd_m: ground sample distance, metres per pixel.
        ground: ``(height, width, 3)`` float32 RGB 0-255, the background with roads, water and clutter.
        objects: placed objects (drawing order is by class, see ``render.py``).
        sun_azimuth_deg: direction shadows fall to, degrees clockwise from +x.
        shadow_per_m: shadow length in metres per metre of object height.
        render_seed: seed of the render-time noise (same for a background-only render).
        difficulty: curriculum difficulty in [0, 1] the scene was built at.
        seed: the scene seed.
    """

    scene_class: str
    width_px: int
    height_px: int
    gsd_m: float
    ground: np.ndarray
    objects: list[PlacedObject] = field(default_factory=list)
    sun_azimuth_deg: float = 45.0
    shadow_per_m: float = 0.8
    render_seed: int = 0
    difficulty: float = 1.0
    seed: int = 0
