"""Rendering: noise textures, soft shadows and top-down object drawings (numpy + OpenCV).

All images are ``(height, width, 3)`` RGB; grounds are float32 0-255, final images
uint8. Object drawings are built from polygons in the object's own frame (pixels,
x along the heading, y across it) and filled with anti-aliased ``cv2.fillPoly``.
"""

from __future__ import annotations

import logging
from typing import Callable

import cv2
import numpy as np

from train.synthetic.classes import object_class
from train.synthetic.graph import PlacedObject, SceneGraph
from train.synthetic.geometry import to_image

__all__ = ["fractal_noise", "texture", "object_parts", "draw_objects", "render_scene", "shadow_mask"]

logger = logging.getLogger(__name__)

RGBf = tuple[float, float, float]
#: (points (n, 2) px, rgb, casts shadow): object frame inside the drawers, image frame after ``_parts``.
Part = tuple[np.ndarray, RGBf, bool]


_SHIFT = 3  # fillPoly fixed-point bits: 1/8 px precision
_DARK_GLASS = (38.0, 44.0, 56.0)
_Z_ORDER = {"tennis court": 0, "swimming pool": 0, "car": 1, "truck": 1, "bus": 1, "ship": 1,
            "building": 2, "storage tank": 2, "airplane": 3, "tree": 4}


def fractal_noise(rng: np.random.Generator, height_px: int, width_px: int,
                  octaves: tuple[tuple[int, float], ...] = ((4, 1.0), (12, 0.5), (48, 0.25))) -> np.ndarray:
    """Smooth value noise, ``(height, width)`` float32 with zero mean and unit standard deviation.

    Args:
        rng: random generator.
        height_px, width_px: output size.
        octaves: ``(cells across, weight)`` pairs; each is a random grid resized bicubically.
    """
    out = np.zeros((height_px, width_px), np.float32)
    for cells, weight in octaves:
        grid = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
        out += weight * cv2.resize(grid, (width_px, height_px), interpolation=cv2.INTER_CUBIC)
    out -= out.mean()
    return out / max(float(out.std()), 1e-6)


def texture(rng: np.random.Generator, height_px: int, width_px: int, rgb: tuple[float, float, float],
            amplitude: float = 14.0, octaves: tuple[tuple[int, float], ...] = ((4, 1.0), (12, 0.5), (48, 0.25)),
            ) -> np.ndarray:
    """A smooth noisy ground texture around ``rgb``: ``(height, width, 3)`` float32 0-255.

    The noise is built at a quarter of the resolution and resized up (the per-pixel grain is added
    once for the whole image by :func:`render_scene`).

    Args:
        amplitude: standard deviation (grey levels) of the brightness noise.
        octaves: as :func:`fractal_noise`.
    """
    lh, lw = max(8, height_px // 4), max(8, width_px // 4)
    smooth = fractal_noise(rng, lh, lw, octaves) * amplitude
    tint = fractal_noise(rng, lh, lw, ((3, 1.0),))
    low = np.asarray(rgb, np.float32) + smooth[..., None] + tint[..., None] * np.array([4.0, -3.0, 2.0], np.float32)
    return cv2.resize(low, (width_px, height_px), interpolation=cv2.INTER_LINEAR)


def _fill(img: np.ndarray, points: np.ndarray, rgb: tuple[float, float, float]) -> None:
    pts = np.round(points * (1 << _SHIFT)).astype(np.int32)
    cv2.fillPoly(img, [pts], rgb, lineType=cv2.LINE_AA, shift=_SHIFT)


def _shade(rgb: tuple[float, float, float], factor: float, add: float = 0.0) -> tuple[float, float, float]:
    return tuple(float(np.clip(c * factor + add, 0, 255)) for c in rgb)


def _ellipse(a: float, b: float, n: int = 20, x0: float = 0.0, y0: float = 0.0) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([x0 + a * np.cos(t), y0 + b * np.sin(t)], axis=1)


def _rect(x1: float, y1: float, x2: float, y2: float) -> np.ndarray:
    return np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], np.float64)


def _chamfer_rect(hl: float, hw: float, c: float) -> np.ndarray:
    return np.array([[hl - c, -hw], [hl, -hw + c], [hl, hw - c], [hl - c, hw],
                     [-hl + c, hw], [-hl, hw - c], [-hl, -hw + c], [-hl + c, -hw]], np.float64)


def _car(o: PlacedObject, rgb: RGBf, rng: np.random.Generator) -> list[Part]:
    hl, hw = o.length_px / 2, o.width_px / 2
    return [(_chamfer_rect(hl, hw, 0.35 * hw), rgb, True),
            (_rect(0.12 * hl, -0.82 * hw, 0.52 * hl, 0.82 * hw), _DARK_GLASS, False),
            (_rect(-0.78 * hl, -0.78 * hw, -0.58 * hl, 0.78 * hw), _DARK_GLASS, False),
            (_rect(-0.58 * hl, -0.7 * hw, 0.12 * hl, 0.7 * hw), _shade(rgb, 0.92, 8), False)]


def _truck(o: PlacedObject, rgb: RGBf, rng: np.random.Generator) -> list[Part]:
    hl, hw = o.length_px / 2, o.width_px / 2
    cab = 0.62 * hl
    parts = [(_chamfer_rect(hl, hw * 0.92, 0.2 * hw) + (0, 0), _shade(rgb, 0.55), True),
             (_rect(cab, -0.9 * hw, hl, 0.9 * hw), _shade(rgb, 0.85), True),
             (_rect(hl - 0.1 * hl, -0.8 * hw, hl - 0.02 * hl, 0.8 * hw), _DARK_GLASS, False),
             (_rect(-hl, -hw, cab - 0.06 * hl, hw), rgb, True)]
    for x in np.linspace(-hl + 0.15 * hl, cab - 0.2 * hl, int(2 + hl / 6)):
        parts.append((_rect(x, -hw, x + 0.6, hw), _shade(rgb, 0.8), False))
    return parts


def _bus(o: PlacedObject, rgb: RGBf, rng: np.random.Generator) -> list[Part]:
    hl, hw = o.length_px / 2, o.width_px / 2
    parts = [(_chamfer_rect(hl, hw, 0.3 * hw), rgb, True),
             (_rect(-0.95 * hl, -hw, 0.95 * hl, -0.62 * hw), _DARK_GLASS, False),
             (_rect(-0.95 * hl, 0.62 * hw, 0.95 * hl, hw), _DARK_GLASS, False),
             (_rect(0.9 * hl, -0.8 * hw, hl, 0.8 * hw), _DARK_GLASS, False)]
    for x in (-0.5 * hl, 0.2 * hl):
        parts.append((_rect(x, -0.4 * hw, x + 0.22 * hl, 0.4 * hw), (170.0, 172.0, 175.0), False))
    return parts


def _airplane(o: PlacedObject, rgb: RGBf, rng: np.random.Generator) -> list[Part]:
    hl, span = o.length_px / 2, o.width_px / 2
    fw = 0.055 * o.length_px
    fuselage = np.array([[hl, 0], [0.86 * hl, -fw], [-0.8 * hl, -fw * 0.8], [-hl, -fw * 0.3],
                         [-hl, fw * 0.3], [-0.8 * hl, fw * 0.8], [0.86 * hl, fw]])
    wing = np.array([[0.28 * hl, 0], [-0.12 * hl, span], [-0.3 * hl, span], [-0.12 * hl, 0]])
    tail = np.array([[-0.7 * hl, 0], [-0.92 * hl, 0.34 * span], [-hl, 0.34 * span], [-0.9 * hl, 0]])
    flip = np.array([1.0, -1.0])
    accent = _shade(rgb, 0.7) if rgb[0] > 180 else _shade(rgb, 1.2, 20)
    parts = [(wing, _shade(rgb, 0.9), True), (wing * flip, _shade(rgb, 0.9), True),
             (tail, _shade(rgb, 0.9), True), (tail * flip, _shade(rgb, 0.9), True),
             (fuselage, rgb, True)]
    for side in (-1, 1):
        parts.append((_rect(0.02 * hl, side * 0.34 * span - fw * 0.5, 0.22 * hl, side * 0.34 * span + fw * 0.5),
                      (70.0, 72.0, 78.0), False))
    parts.append((_rect(-hl, -fw * 0.25, -0.72 * hl, fw * 0.25), accent, False))
    parts.append((_rect(0.78 * hl, -fw * 0.6, 0.86 * hl, fw * 0.6), _DARK_GLASS, False))
    return parts


def _ship(o: PlacedObject, rgb: RGBf, rng: np.random.Generator) -> list[Part]:
    hl, hw = o.length_px / 2, o.width_px / 2
    hull = np.array([[hl, 0], [0.55 * hl, -hw], [-hl, -hw * 0.9], [-hl, hw * 0.9], [0.55 * hl, hw]])
    parts = [(hull * 1.0, _shade(rgb, 0.5), True), (hull * (0.94, 0.82), rgb, False),
             (_rect(-0.88 * hl, -0.62 * hw, -0.55 * hl, 0.62 * hw), (225.0, 225.0, 220.0), False),
             (_rect(-0.82 * hl, -0.3 * hw, -0.66 * hl, 0.3 * hw), _DARK_GLASS, False)]
    if o.length_px > 60:
        for x in np.arange(-0.45 * hl, 0.45 * hl, 0.14 * hl):
            c = tuple(float(v) for v in rng.integers(40, 220, 3))
            parts.append((_rect(x, -0.55 * hw, x + 0.12 * hl, 0.55 * hw), c, False))
    return parts


def _tank(o: PlacedObject, rgb: RGBf, rng: np.random.Generator) -> list[Part]:
    r = o.length_px / 2
    return [(_ellipse(r, r, 28), _shade(rgb, 0.82), True), (_ellipse(0.88 * r, 0.88 * r, 28), rgb, False),
            (_ellipse(0.7 * r, 0.7 * r, 24, 0.06 * r, 0.06 * r), _shade(rgb, 0.9), False),
            (_ellipse(0.08 * r + 0.5, 0.08 * r + 0.5, 8), _shade(rgb, 0.6), False)]


def _building(o: PlacedObject, rgb: RGBf, rng: np.random.Generator) -> list[Part]:
    hl, hw = o.length_px / 2, o.width_px / 2
    if o.length_px * o.width_px < 900 or rng.random() < 0.5:  # pitched roof, ridge along the long axis
        return [(_rect(-hl, -hw, hl, hw), _shade(rgb, 0.72), True),
                (_rect(-hl, -hw, hl, 0), _shade(rgb, 1.08, 6), False),
                (_rect(-hl, 0.1, hl, hw), _shade(rgb, 0.8), False)]
    parts = [(_rect(-hl, -hw, hl, hw), _shade(rgb, 0.75), True),
             (_rect(-hl + 1.2, -hw + 1.2, hl - 1.2, hw - 1.2), rgb, False)]
    for _ in range(int(rng.integers(1, 5))):
        x, y = rng.uniform(-0.7, 0.6) * hl, rng.uniform(-0.7, 0.5) * hw
        parts.append((_rect(x, y, x + max(2.0, 0.12 * hl), y + max(2.0, 0.2 * hw)), (150.0, 152.0, 156.0), False))
    return parts


def _court(o: PlacedObject, rgb: RGBf, rng: np.random.Generator) -> list[Part]:
    hl, hw = o.length_px / 2, o.width_px / 2
    line = (240.0, 240.0, 240.0)
    lw = max(0.6, 0.1 * hw)
    px, py = 0.66 * hl, 0.61 * hw
    parts = [(_rect(-hl, -hw, hl, hw), _shade(rgb, 0.85), False), (_rect(-px, -py, px, py), line, False),
             (_rect(-px + lw, -py + lw, px - lw, py - lw), _shade(rgb, 1.15, 10), False),
             (_rect(-lw / 2, -py - 0.1 * hw, lw / 2, py + 0.1 * hw), (60.0, 60.0, 60.0), False)]
    for x in (-0.35 * hl, 0.35 * hl):
        parts.append((_rect(x - lw / 2, -py, x + lw / 2, py), line, False))
    parts.append((_rect(-0.35 * hl, -lw / 2, 0.35 * hl, lw / 2), line, False))
    return parts


def _pool(o: PlacedObject, rgb: RGBf, rng: np.random.Generator) -> list[Part]:
    hl, hw = o.length_px / 2, o.width_px / 2
    rim = max(1.0, 0.14 * hw)
    parts = [(_chamfer_rect(hl, hw, 0.25 * hw), (222.0, 220.0, 212.0), False),
             (_chamfer_rect(hl - rim, hw - rim, 0.2 * hw), rgb, False),
             (_rect(-hl + rim, -hw + rim, -0.2 * hl, hw - rim), _shade(rgb, 1.08, 8), False)]
    if o.length_px > 45:
        for y in np.linspace(-0.5 * hw, 0.5 * hw, 3):
            parts.append((_rect(-0.8 * hl, y - 0.4, 0.8 * hl, y + 0.4), _shade(rgb, 0.6), False))
    return parts


def _tree(o: PlacedObject, rgb: RGBf, rng: np.random.Generator) -> list[Part]:
    r = o.length_px / 2
    t = np.linspace(0, 2 * np.pi, 18, endpoint=False)
    rad = r * (1 + 0.1 * rng.standard_normal(18)).clip(0.78, 1.15)
    crown = np.stack([rad * np.cos(t), rad * np.sin(t)], axis=1)
    parts = [(crown, _shade(rgb, 0.7), True), (crown * 0.8 + (-0.08 * r, -0.08 * r), rgb, False)]
    for _ in range(4):
        cx, cy = rng.uniform(-0.45, 0.3, 2) * r
        parts.append((_ellipse(0.22 * r, 0.2 * r, 10, cx, cy), _shade(rgb, 1.18, 12), False))
    return parts


_DRAWERS: dict[str, Callable[[PlacedObject, RGBf, np.random.Generator], list[Part]]] = {
    "car": _car, "truck": _truck, "bus": _bus, "airplane": _airplane, "ship": _ship,
    "storage tank": _tank, "building": _building, "tennis court": _court, "swimming pool": _pool, "tree": _tree,
}


def _parts(o: PlacedObject) -> list[Part]:
    cls = object_class(o.label)
    rng = np.random.default_rng(o.detail_seed)
    local = _DRAWERS[o.label](o, tuple(float(c) for c in cls.rgb(o.colour)), rng)
    return [(to_image(p, o.cx_px, o.cy_px, o.angle_deg), rgb, shadow) for p, rgb, shadow in local]


def shadow_mask(objects: list[PlacedObject], parts: list[list[Part]], height_px: int, width_px: int,
                gsd_m: float, sun_azimuth_deg: float, shadow_per_m: float) -> np.ndarray:
    """Soft shadow strength ``(height, width)`` float32 in [0, 1] cast by ``objects``.

    Each silhouette polygon is swept along the shadow direction (convex hull of the
    polygon and its offset copy), then blurred for a soft penumbra.
    """
    mask = np.zeros((height_px, width_px), np.float32)
    a = np.deg2rad(sun_azimuth_deg)
    for o, o_parts in zip(objects, parts):
        off = np.array([np.cos(a), np.sin(a)]) * o.height_m * shadow_per_m / gsd_m
        for pts, _, casts in o_parts:
            if casts:
                hull = cv2.convexHull(np.concatenate([pts, pts + off]).astype(np.float32))[:, 0, :]
                _fill(mask, hull.astype(np.float64), (1.0,))
    return cv2.GaussianBlur(mask, (0, 0), 1.2)


def object_parts(objects: list[PlacedObject]) -> list[list[Part]]:
    """The drawing of each object: ``(points (n, 2) image px, rgb, casts shadow)`` polygons, back to front."""
    return [_parts(o) for o in objects]


def draw_objects(img: np.ndarray, objects: list[PlacedObject], parts: list[list[Part]] | None = None) -> None:
    """Draw ``objects`` onto ``img`` ``(height, width, 3)`` in place, low classes (courts) first."""
    parts = object_parts(objects) if parts is None else parts
    for k in sorted(range(len(objects)), key=lambda i: _Z_ORDER[objects[i].label]):
        for pts, rgb, _ in parts[k]:
            _fill(img, pts, rgb)


def render_scene(graph: SceneGraph, with_objects: bool = True) -> np.ndarray:
    """Render a scene graph to a ``(height, width, 3)`` uint8 RGB image.

    Args:
        graph: the composed scene.
        with_objects: False renders the background only (same ground, clutter and noise), for tests
            and for filling vacated regions.
    """
    img = graph.ground.copy()
    if with_objects and graph.objects:
        parts = object_parts(graph.objects)
        shade = shadow_mask(graph.objects, parts, graph.height_px, graph.width_px, graph.gsd_m,
                            graph.sun_azimuth_deg, graph.shadow_per_m)
        img *= (1.0 - 0.5 * shade)[..., None]
        draw_objects(img, graph.objects, parts)
    rng = np.random.default_rng(graph.render_seed)
    grain = rng.standard_normal((graph.height_px, graph.width_px), dtype=np.float32)
    img *= (1.0 + 0.04 * grain)[..., None]
    img = cv2.GaussianBlur(img, (0, 0), 0.55)
    return np.clip(img, 0, 255).astype(np.uint8)
