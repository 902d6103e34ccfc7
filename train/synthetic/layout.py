"""Scene backgrounds: textured ground, roads, runways, water, piers, fields, and the placement zones.

Each scene class has a builder ``(rng, height_px, width_px, gsd_m, difficulty) -> Layout``;
the zone names match ``SceneClass.zones`` in ``classes.py``. Builders draw in a
canonical orientation and :func:`_transpose` flips half of them to the other axis.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import cv2
import numpy as np

from train.synthetic.render import fractal_noise, texture

__all__ = ["Zone", "Layout", "build_layout", "dashes", "LAYOUT_BUILDERS", "GROUNDS"]

logger = logging.getLogger(__name__)

#: Base RGB of each ground material.
GROUNDS = {
    "grass": (98, 126, 66), "asphalt": (92, 93, 97), "concrete": (172, 170, 162), "dirt": (150, 128, 98),
    "water": (40, 74, 92), "forest floor": (72, 72, 46), "gravel": (140, 136, 128), "sand": (196, 182, 150),
}


@dataclass
class Zone:
    """Where one kind of object may go.

    Attributes:
        centres: ``(height, width)`` bool, allowed object centres.
        keep_out: ``(height, width)`` bool, pixels no object corner may touch (None: anywhere).
        angle: heading in degrees, a constant, a ``(height, width)`` map, or None for random.
        turns: extra rotations (degrees) drawn uniformly and added to ``angle``.
        jitter_deg: standard deviation of a random heading perturbation.
        slots: ``(n, 3)`` float ``(cx_px, cy_px, angle_deg)`` fixed positions (parking stalls); used instead
            of ``centres`` when given.
    """

    centres: np.ndarray
    keep_out: np.ndarray | None = None
    angle: float | np.ndarray | None = None
    turns: tuple[float, ...] = (0.0,)
    jitter_deg: float = 4.0
    slots: np.ndarray | None = None


@dataclass
class Layout:
    """A background and its placement zones; ``ground`` is ``(height, width, 3)`` float32 RGB 0-255."""

    ground: np.ndarray
    zones: dict[str, Zone] = field(default_factory=dict)


def _m(gsd_m: float, metres: float) -> int:
    return max(1, int(round(metres / gsd_m)))


def _paint(rng: np.random.Generator, ground: np.ndarray, mask: np.ndarray, rgb: tuple[float, float, float],
           amplitude: float, blur_px: float = 0.0) -> None:
    """Paint a textured material over ``mask`` (soft edge of ``blur_px``), working only in the mask's bbox."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return
    pad = int(3 * blur_px) + 1
    y0, y1 = max(0, rows[0] - pad), min(mask.shape[0], rows[-1] + pad + 1)
    x0, x1 = max(0, cols[0] - pad), min(mask.shape[1], cols[-1] + pad + 1)
    material = texture(rng, y1 - y0, x1 - x0, rgb, amplitude)
    roi = ground[y0:y1, x0:x1]
    if blur_px <= 0:
        np.copyto(roi, material, where=mask[y0:y1, x0:x1, None])
        return
    alpha = cv2.GaussianBlur(mask[y0:y1, x0:x1].astype(np.float32), (0, 0), blur_px)[..., None]
    roi += (material - roi) * alpha


def _line_mask(h: int, w: int, pts: np.ndarray, width_px: int) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    cv2.polylines(mask, [np.round(pts).astype(np.int32)], False, 1, thickness=max(1, width_px))
    return mask.astype(bool)


def dashes(ground: np.ndarray, p0, p1, rgb, dash_px: int, thickness: int = 1) -> None:
    """Draw a dashed line (dashes and gaps of ``dash_px``) from ``p0`` to ``p1`` (x, y pixels) on ``ground``."""
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    n = int(np.linalg.norm(p1 - p0) // (2 * dash_px))
    for i in range(n):
        a = p0 + (p1 - p0) * (2 * i) / (2 * n)
        b = p0 + (p1 - p0) * (2 * i + 1) / (2 * n)
        cv2.line(ground, tuple(np.round(a).astype(int)), tuple(np.round(b).astype(int)), rgb, thickness, cv2.LINE_AA)


def _clutter(rng: np.random.Generator, ground: np.ndarray, gsd_m: float, n: int) -> None:
    """Small low-contrast non-target blobs (stains, bushes, debris) smaller than any object class."""
    h, w = ground.shape[:2]
    local = cv2.resize(ground, (max(1, w // 16), max(1, h // 16)), interpolation=cv2.INTER_AREA)  # no line colours
    for _ in range(n):
        cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))
        ax, ay = (rng.uniform(0.3, 1.0, 2) / gsd_m).astype(int) + 1
        delta = rng.uniform(-22, 12)
        ref = local[min(cy // 16, local.shape[0] - 1), min(cx // 16, local.shape[1] - 1)]
        col = tuple(float(c) for c in np.clip(ref + delta, 0, 255))
        cv2.ellipse(ground, (cx, cy), (int(ax), int(ay)), float(rng.uniform(0, 180)), 0, 360, col, -1, cv2.LINE_AA)


def _road(rng: np.random.Generator, ground: np.ndarray, h: int, w: int, gsd_m: float, horizontal: bool, pos: float,
          width_m: float = 8.0, material: str = "asphalt", centre_line: bool = True) -> tuple[np.ndarray, Zone]:
    """Draw a straight road across the image; return its mask and a two-lane vehicle zone."""
    rw = _m(gsd_m, width_m)
    mask = np.zeros((h, w), bool)
    lanes = np.zeros((h, w), bool)
    c = int(pos * (h if horizontal else w))
    lo, hi = c - rw // 2, c + rw // 2
    q = max(1, rw // 8)
    if horizontal:
        mask[max(0, lo):hi] = True
        lanes[max(0, lo + rw // 4 - q):lo + rw // 4 + q] = True
        lanes[max(0, hi - rw // 4 - q):hi - rw // 4 + q] = True
    else:
        mask[:, max(0, lo):hi] = True
        lanes[:, max(0, lo + rw // 4 - q):lo + rw // 4 + q] = True
        lanes[:, max(0, hi - rw // 4 - q):hi - rw // 4 + q] = True
    _paint(rng, ground, mask, GROUNDS[material], 7, 1.0)
    if centre_line and material == "asphalt":
        p0, p1 = ((0, c), (w, c)) if horizontal else ((c, 0), (c, h))
        dashes(ground, p0, p1, (222, 222, 210), _m(gsd_m, 3.0))
    return mask, Zone(lanes, angle=0.0 if horizontal else 90.0, turns=(0.0, 180.0), jitter_deg=1.5)


def _stalls(h: int, w: int, gsd_m: float, ground: np.ndarray, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Draw double rows of parking stalls between rows y0..y1, columns x0..x1; return slots ``(n, 3)``."""
    sw, sd, aisle = 2.7 / gsd_m, 5.4 / gsd_m, 7.0 / gsd_m
    slots = []
    y = y0 + aisle
    line = (206, 206, 198)
    while y + 2 * sd <= y1:
        for row, facing in ((0, 90.0), (1, 270.0)):
            top = y + row * sd
            xs = np.arange(x0, x1 - sw, sw)
            for x in xs:
                cv2.line(ground, (int(x), int(top)), (int(x), int(top + sd)), line, 1, cv2.LINE_AA)
                slots.append((x + sw / 2, top + sd / 2, facing))
            cv2.line(ground, (int(xs[-1] + sw), int(top)), (int(xs[-1] + sw), int(top + sd)), line, 1, cv2.LINE_AA)
        cv2.line(ground, (x0, int(y + sd)), (int(x1 - sw), int(y + sd)), line, 1, cv2.LINE_AA)
        y += 2 * sd + aisle
    return np.array(slots, np.float64).reshape(-1, 3)


def _band(h: int, w: int, horizontal: bool, a: int, b: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    if horizontal:
        m[max(0, a):max(0, b)] = True
    else:
        m[:, max(0, a):max(0, b)] = True
    return m


def _parking_lot(rng: np.random.Generator, h: int, w: int, gsd_m: float, difficulty: float) -> Layout:
    ground = texture(rng, h, w, GROUNDS["asphalt"], 7)
    verge = _m(gsd_m, rng.uniform(9, 14))
    grass = _band(h, w, True, 0, verge)
    _paint(rng, ground, grass, GROUNDS["grass"], 14, 1.0)
    lane_w = _m(gsd_m, 9.0)
    lane_c = verge + lane_w // 2 + 2
    cv2.line(ground, (0, verge + 1), (w, verge + 1), (190, 190, 184), 1, cv2.LINE_AA)
    dashes(ground, (0, lane_c), (w, lane_c), (222, 210, 120), _m(gsd_m, 3.0))
    margin = _m(gsd_m, 3.0)
    slots = _stalls(h, w, gsd_m, ground, verge + lane_w, h - margin, margin, w - margin)
    lane = _band(h, w, True, lane_c - _m(gsd_m, 2.6), lane_c - _m(gsd_m, 1.8)) | \
        _band(h, w, True, lane_c + _m(gsd_m, 1.8), lane_c + _m(gsd_m, 2.6))
    zones = {"stalls": Zone(np.ones((h, w), bool), slots=slots, jitter_deg=2.5),
             "lane": Zone(lane, angle=0.0, turns=(0.0, 180.0), jitter_deg=1.0),
             "verge": Zone(_band(h, w, True, verge // 4, verge - verge // 4), keep_out=~grass)}
    return Layout(ground, zones)


def _residential(rng: np.random.Generator, h: int, w: int, gsd_m: float, difficulty: float) -> Layout:
    ground = texture(rng, h, w, GROUNDS["grass"], 14)
    pos = rng.uniform(0.35, 0.65)
    road, road_zone = _road(rng, ground, h, w, gsd_m, True, pos)
    c, rw = int(pos * h), _m(gsd_m, 8.0)
    setback, depth = _m(gsd_m, 5.0), _m(gsd_m, 6.0)
    lots = _band(h, w, True, c - rw // 2 - setback - depth, c - rw // 2 - setback) | \
        _band(h, w, True, c + rw // 2 + setback, c + rw // 2 + setback + depth)
    driveway = _band(h, w, True, c - rw // 2 - setback, c + rw // 2 + setback)
    yards = ~(lots | driveway | _band(h, w, True, c - rw, c + rw))
    zones = {"road": replace(road_zone, keep_out=~road),
             "lots": Zone(lots, keep_out=road, angle=0.0, turns=(0.0, 180.0), jitter_deg=2.0),
             "yards": Zone(yards, keep_out=road | lots, angle=0.0, turns=(0.0, 90.0), jitter_deg=6.0)}
    return Layout(ground, zones)


def _industrial(rng: np.random.Generator, h: int, w: int, gsd_m: float, difficulty: float) -> Layout:
    ground = texture(rng, h, w, GROUNDS["concrete"], 9)
    pos = rng.uniform(0.4, 0.6)
    road, road_zone = _road(rng, ground, h, w, gsd_m, True, pos, width_m=10.0)
    top = _band(h, w, True, 0, int(pos * h) - _m(gsd_m, 6.0))
    bottom = _band(h, w, True, int(pos * h) + _m(gsd_m, 6.0), h)
    farm, yard = (top, bottom) if rng.random() < 0.5 else (bottom, top)
    _paint(rng, ground, farm, GROUNDS["gravel"], 8, 1.0)
    zones = {"road": replace(road_zone, keep_out=~road),
             "yard": Zone(yard, keep_out=~yard, angle=0.0, turns=(0.0, 90.0, 180.0, 270.0), jitter_deg=2.0),
             "tankfarm": Zone(farm, keep_out=~farm)}
    return Layout(ground, zones)


def _airport(rng: np.random.Generator, h: int, w: int, gsd_m: float, difficulty: float) -> Layout:
    ground = texture(rng, h, w, GROUNDS["grass"], 12)
    rw, tw = _m(gsd_m, 30.0), _m(gsd_m, 14.0)
    r0 = _m(gsd_m, 4.0)
    runway = _band(h, w, True, r0, r0 + rw)
    _paint(rng, ground, runway, (108, 108, 110), 6)
    for y in (r0 + 2, r0 + rw - 3):
        cv2.line(ground, (0, y), (w, y), (230, 230, 226), 1, cv2.LINE_AA)
    dashes(ground, (0, r0 + rw // 2), (w, r0 + rw // 2), (236, 236, 232), _m(gsd_m, 10.0), 2)
    t0 = r0 + rw + _m(gsd_m, 10.0)
    apron = _band(h, w, True, t0, h)
    _paint(rng, ground, apron, GROUNDS["concrete"], 8)
    dashes(ground, (0, t0 + tw // 2), (w, t0 + tw // 2), (220, 190, 60), _m(gsd_m, 2.0))
    stands = _band(h, w, True, t0 + tw, h)
    zones = {"apron": Zone(stands, keep_out=~apron, angle=90.0, turns=(0.0, 180.0), jitter_deg=12.0),
             "service": Zone(stands, keep_out=~apron)}
    return Layout(ground, zones)


def _harbour(rng: np.random.Generator, h: int, w: int, gsd_m: float, difficulty: float) -> Layout:
    ground = texture(rng, h, w, GROUNDS["concrete"], 9)
    edge = int(h * rng.uniform(0.45, 0.6))
    water = _band(h, w, True, 0, edge)
    _paint(rng, ground, water, GROUNDS["water"], 5)
    cv2.line(ground, (0, edge), (w, edge), (200, 198, 190), 2, cv2.LINE_AA)
    pier_w = _m(gsd_m, 9.0)
    piers = np.zeros((h, w), bool)
    for x in rng.choice(np.arange(pier_w, w - pier_w, 2 * pier_w), size=int(rng.integers(1, 3)), replace=False):
        piers[int(edge * rng.uniform(0.3, 0.6)):edge, int(x):int(x) + pier_w] = True
    _paint(rng, ground, piers, GROUNDS["concrete"], 7)
    land = ~water | piers
    road, road_zone = _road(rng, ground, h, w, gsd_m, True, 1 - _m(gsd_m, 7.0) / h)
    zones = {"water": Zone(water & ~piers, keep_out=land, angle=0.0, turns=(0.0, 180.0), jitter_deg=8.0),
             "quay": Zone(~water & ~road, keep_out=~(~water & ~road), angle=0.0,
                          turns=(0.0, 90.0, 180.0, 270.0), jitter_deg=2.0)}
    return Layout(ground, zones)


def _fields(rng, ground: np.ndarray, h: int, w: int, gsd_m: float) -> np.ndarray:
    """Paint crop fields with row stripes; return the boundary mask between them."""
    xs = np.sort(rng.uniform(0.3, 0.7, 1)) * w
    ys = np.sort(rng.uniform(0.3, 0.7, 1)) * h
    boundary = np.zeros((h, w), bool)
    crops = [(110, 140, 60), (170, 160, 90), (130, 104, 72), (86, 120, 52), (190, 176, 110)]
    for ya, yb in zip([0, *ys.astype(int)], [*ys.astype(int), h]):
        for xa, xb in zip([0, *xs.astype(int)], [*xs.astype(int), w]):
            yy, xx = np.mgrid[ya:yb, xa:xb].astype(np.float32)
            theta = rng.uniform(0, np.pi)
            period = rng.uniform(1.5, 4.0) / gsd_m
            stripes = np.sin((xx * np.cos(theta) + yy * np.sin(theta)) * (2 * np.pi / period))
            base = crops[int(rng.integers(0, len(crops)))]
            ground[ya:yb, xa:xb] = texture(rng, yb - ya, xb - xa, base, 8) + (stripes * 9.0)[..., None]
    half = max(1, _m(gsd_m, 1.0))
    for x in xs:
        boundary[:, int(x) - half:int(x) + half] = True
    for y in ys:
        boundary[int(y) - half:int(y) + half, :] = True
    return boundary


def _farmland(rng: np.random.Generator, h: int, w: int, gsd_m: float, difficulty: float) -> Layout:
    ground = np.zeros((h, w, 3), np.float32)
    boundary = _fields(rng, ground, h, w, gsd_m)
    road, road_zone = _road(rng, ground, h, w, gsd_m, False, rng.uniform(0.1, 0.9), 6.0, "dirt")
    hedge = cv2.dilate(boundary.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool) & ~road
    x0 = int(rng.uniform(0.1, 0.5) * w)
    y0 = int(rng.uniform(0.1, 0.5) * h)
    yard = np.zeros((h, w), bool)
    yard[y0:y0 + h // 3, x0:x0 + w // 3] = True
    _paint(rng, ground, yard & ~road, GROUNDS["dirt"], 10, 2.0)
    zones = {"hedge": Zone(hedge, keep_out=road), "road": replace(road_zone, keep_out=~road),
             "farmyard": Zone(yard, keep_out=~yard | road, angle=0.0, turns=(0.0, 90.0), jitter_deg=5.0)}
    return Layout(ground, zones)


def _forest(rng: np.random.Generator, h: int, w: int, gsd_m: float, difficulty: float) -> Layout:
    ground = texture(rng, h, w, GROUNDS["forest floor"], 16, ((6, 1.0), (24, 0.8), (80, 0.6)))
    xs = np.linspace(0, w, 48)
    ys = h * (0.5 + 0.25 * np.sin(xs / w * 2 * np.pi * rng.uniform(0.5, 1.2) + rng.uniform(0, 6)))
    pts = np.stack([xs, ys], axis=1)
    track = _line_mask(h, w, pts, _m(gsd_m, 5.0))
    _paint(rng, ground, track, GROUNDS["dirt"], 10, 1.0)
    lane = _line_mask(h, w, pts, 2)
    angle = _polyline_angle(h, w, pts)
    clear = np.zeros((h, w), np.uint8)
    cv2.ellipse(clear, (int(rng.uniform(0.25, 0.75) * w), int(rng.uniform(0.2, 0.8) * h)),
                (_m(gsd_m, 22.0), _m(gsd_m, 16.0)), float(rng.uniform(0, 180)), 0, 360, 1, -1)
    clearing = clear.astype(bool) & ~track
    _paint(rng, ground, clearing, GROUNDS["grass"], 12, 3.0)
    zones = {"woods": Zone(~track & ~clearing, keep_out=track), "track": Zone(lane, keep_out=~track, angle=angle,
                                                                              turns=(0.0, 180.0), jitter_deg=2.0),
             "clearing": Zone(clearing, keep_out=~clearing, angle=float(rng.uniform(0, 90)), jitter_deg=3.0)}
    return Layout(ground, zones)


def _polyline_angle(h: int, w: int, pts: np.ndarray) -> np.ndarray:
    """A ``(height, width)`` map of the heading (degrees) of a left-to-right polyline, per column."""
    dx, dy = np.gradient(pts[:, 0]), np.gradient(pts[:, 1])
    per_col = np.interp(np.arange(w), pts[:, 0], np.degrees(np.arctan2(dy, dx)))
    return np.broadcast_to(per_col[None, :], (h, w)).astype(np.float32)


def _river(rng: np.random.Generator, h: int, w: int, gsd_m: float, difficulty: float) -> Layout:
    ground = texture(rng, h, w, GROUNDS["grass"], 14)
    xs = np.linspace(0, w, 24)
    ys = h * (0.5 + 0.18 * np.sin(xs / w * 2 * np.pi * rng.uniform(0.4, 1.0) + rng.uniform(0, 6)))
    pts = np.stack([xs, ys], axis=1)
    width_px = _m(gsd_m, rng.uniform(30, 45))
    water = _line_mask(h, w, pts, width_px)
    banks = _line_mask(h, w, pts, width_px + _m(gsd_m, 3.0))
    _paint(rng, ground, banks, GROUNDS["sand"], 10, 1.0)
    _paint(rng, ground, water, GROUNDS["water"], 5, 1.5)
    road, road_zone = _road(rng, ground, h, w, gsd_m, False, rng.uniform(0.25, 0.75), 8.0)
    bridge = road & water
    ground[bridge] = ground[bridge] * 1.25
    near = _line_mask(h, w, pts, width_px + _m(gsd_m, 50.0)) & ~banks & ~road
    zones = {"water": Zone(water & ~road, keep_out=~water | road, angle=_polyline_angle(h, w, pts),
                           turns=(0.0, 180.0), jitter_deg=4.0),
             "road": replace(road_zone, keep_out=~road),
             "bank": Zone(near, keep_out=banks | road, angle=0.0, turns=(0.0, 90.0), jitter_deg=10.0)}
    return Layout(ground, zones)


def _sports_ground(rng: np.random.Generator, h: int, w: int, gsd_m: float, difficulty: float) -> Layout:
    ground = texture(rng, h, w, GROUNDS["grass"], 10)
    cw, cl = 18.0 / gsd_m, 36.0 / gsd_m
    pad_h = int(cl + _m(gsd_m, 4.0))
    pad = _band(h, w, True, h - pad_h, h)
    _paint(rng, ground, pad, GROUNDS["concrete"], 6)
    xs = np.arange(_m(gsd_m, 3.0) + cw / 2, w - cw / 2, cw + _m(gsd_m, 1.0))
    courts = np.stack([xs, np.full_like(xs, h - pad_h / 2), np.full_like(xs, 90.0)], axis=1)
    lot_h = _m(gsd_m, 25.0)
    lot = _band(h, w, True, 0, lot_h)
    _paint(rng, ground, lot, GROUNDS["asphalt"], 7)
    stalls = _stalls(h, w, gsd_m, ground, -_m(gsd_m, 6.0), lot_h, _m(gsd_m, 3.0), w - _m(gsd_m, 3.0))
    lawn = ~pad & ~_band(h, w, True, 0, lot_h + _m(gsd_m, 3.0))
    zones = {"courts": Zone(pad, slots=courts, jitter_deg=0.5),
             "parking": Zone(lot, slots=stalls, jitter_deg=2.5),
             "lawn": Zone(lawn, keep_out=~lawn, angle=0.0, turns=(0.0, 90.0), jitter_deg=5.0)}
    return Layout(ground, zones)


def _transpose(layout: Layout) -> Layout:
    """Mirror a layout across its main diagonal: x <-> y, heading a -> 90 - a."""
    def angle(a):
        return None if a is None else (90.0 - a if np.isscalar(a) else np.ascontiguousarray((90.0 - a).T))

    zones = {}
    for name, z in layout.zones.items():
        slots = None if z.slots is None else np.stack([z.slots[:, 1], z.slots[:, 0], 90.0 - z.slots[:, 2]], 1)
        zones[name] = Zone(np.ascontiguousarray(z.centres.T),
                           None if z.keep_out is None else np.ascontiguousarray(z.keep_out.T),
                           angle(z.angle), tuple(-t for t in z.turns), z.jitter_deg, slots)
    return Layout(np.ascontiguousarray(layout.ground.transpose(1, 0, 2)), zones)


LAYOUT_BUILDERS = {
    "parking lot": _parking_lot, "residential": _residential, "industrial": _industrial, "airport": _airport,
    "harbour": _harbour, "farmland": _farmland, "forest": _forest, "river": _river, "sports ground": _sports_ground,
}


def build_layout(rng: np.random.Generator, scene: str, height_px: int, width_px: int, gsd_m: float,
                 difficulty: float) -> Layout:
    """Background and zones of a ``scene`` class; half of the scenes are drawn transposed (rotated layout).

    Square images only are transposed; clutter density grows with ``difficulty``.
    """
    layout = LAYOUT_BUILDERS[scene](rng, height_px, width_px, gsd_m, difficulty)
    _clutter(rng, layout.ground, gsd_m, int(height_px * width_px / 2500 * (0.4 + difficulty)))
    if height_px == width_px and rng.random() < 0.5:
        layout = _transpose(layout)
    return layout
