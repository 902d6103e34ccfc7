"""Scene composition: place objects into a layout and turn the result into an :class:`AnnotatedImage`.

``generate_scene(seed, ...)`` is deterministic for a seed: one ``numpy`` Generator
seeded with ``seed`` drives the layout, the placement and (through
``SceneGraph.render_seed``) the render noise.

Placement: objects are proposed in their class's zones (largest classes first),
sized from their class's metre range through the GSD, and kept only when their
oriented box lies inside the image and outside the zone's keep-out mask, overlaps
no earlier object (occupancy raster) and has axis-aligned IoU < 0.3 with every box
of its own class (NMS-friendly). Counts are of placed objects only.
"""

from __future__ import annotations

import logging

import cv2
import numpy as np

from train.annotations import AnnotatedImage, ObjectAnnotation
from train.synthetic.classes import SCENE_CLASSES, SIZE_WORDS, ObjectClass, count_range, object_class, scene_spec
from train.synthetic.geometry import box_iou
from train.synthetic.graph import PlacedObject, SceneGraph
from train.synthetic.language import describe_scene
from train.synthetic.layout import Zone, build_layout
from train.synthetic.render import render_scene

__all__ = ["build_scene", "generate_scene", "annotate", "object_annotation", "Placer", "MAX_SAME_CLASS_IOU"]

logger = logging.getLogger(__name__)

#: Largest axis-aligned IoU between two objects of one class.
MAX_SAME_CLASS_IOU = 0.3
_PLACE_ORDER = ("airplane", "tennis court", "storage tank", "building", "ship", "swimming pool",
                "bus", "truck", "car", "tree")
_SIZE_BINS = ((0.0, 0.28), (0.38, 0.62), (0.72, 1.0))  # length fraction per size word, with gaps
_TRIES_PER_OBJECT = 30


def _size_weights(difficulty: float) -> np.ndarray:
    easy, hard = np.array([0.1, 0.3, 0.6]), np.full(3, 1 / 3)
    return easy + (hard - easy) * difficulty


class Placer:
    """Occupancy and per-class boxes of the objects placed so far in one scene."""

    def __init__(self, rng: np.random.Generator, height_px: int, width_px: int, gsd_m: float,
                 difficulty: float) -> None:
        self.rng, self.h, self.w = rng, height_px, width_px
        self.gsd_m, self.difficulty = gsd_m, difficulty
        self.occupancy = np.zeros((height_px, width_px), np.uint8)
        self.objects: list[PlacedObject] = []
        self._centres: dict[int, np.ndarray] = {}
        self._slots_used: dict[int, set[int]] = {}

    def _size(self, cls: ObjectClass) -> tuple[str, float, float]:
        k = int(self.rng.choice(3, p=_size_weights(self.difficulty)))
        frac = self.rng.uniform(*_SIZE_BINS[k])
        length_m = cls.length_m[0] + frac * (cls.length_m[1] - cls.length_m[0])
        width_m = length_m * self.rng.uniform(*cls.width_ratio)
        return SIZE_WORDS[k], length_m / self.gsd_m, width_m / self.gsd_m

    def _pose(self, zone: Zone) -> tuple[float, float, float] | None:
        if zone.slots is not None:
            used = self._slots_used.setdefault(id(zone), set())
            free = [i for i in range(len(zone.slots)) if i not in used]
            if not free:
                return None
            i = int(self.rng.choice(free))
            used.add(i)
            cx, cy, base = zone.slots[i]
            return float(cx), float(cy), float(base + self.rng.normal(0, zone.jitter_deg))
        flat = self._centres.get(id(zone))
        if flat is None:
            flat = self._centres[id(zone)] = np.flatnonzero(zone.centres)
        if flat.size == 0:
            return None
        y, x = divmod(int(flat[self.rng.integers(flat.size)]), self.w)
        cx, cy = x + self.rng.random(), y + self.rng.random()
        if zone.angle is None:
            return cx, cy, float(self.rng.uniform(0, 360))
        base = zone.angle if np.isscalar(zone.angle) else float(zone.angle[y, x])
        return cx, cy, float(base + self.rng.choice(zone.turns) + self.rng.normal(0, zone.jitter_deg))

    def _fits(self, obj: PlacedObject, zone: Zone) -> bool:
        corners = obj.corners_px
        x1, y1, x2, y2 = obj.box_px
        if x1 < 1 or y1 < 1 or x2 > self.w - 1 or y2 > self.h - 1:
            return False
        if zone.keep_out is not None:
            probe = np.concatenate([corners, (corners + np.roll(corners, 1, 0)) / 2, [[obj.cx_px, obj.cy_px]]])
            xi, yi = probe[:, 0].astype(int), probe[:, 1].astype(int)
            if zone.keep_out[yi, xi].any():
                return False
        same = [o.box_px for o in self.objects if o.label == obj.label]
        if same and box_iou(obj.box_px, np.array(same)).max() >= MAX_SAME_CLASS_IOU:
            return False
        return self._overlap(obj) < 0.02

    def _footprint(self, obj: PlacedObject, grow: float) -> tuple[np.ndarray, tuple[int, int]]:
        pts = (obj.corners_px - (obj.cx_px, obj.cy_px)) * grow + (obj.cx_px, obj.cy_px)
        ox, oy = int(max(0, pts[:, 0].min())), int(max(0, pts[:, 1].min()))
        local = np.zeros((int(pts[:, 1].max()) - oy + 2, int(pts[:, 0].max()) - ox + 2), np.uint8)
        cv2.fillPoly(local, [np.round(pts - (ox, oy)).astype(np.int32)], 1)
        return local, (ox, oy)

    def _overlap(self, obj: PlacedObject) -> float:
        local, (ox, oy) = self._footprint(obj, 1.1)
        region = self.occupancy[oy:oy + local.shape[0], ox:ox + local.shape[1]]
        local = local[:region.shape[0], :region.shape[1]]
        return float((region & local).sum()) / max(1, int(local.sum()))

    def _commit(self, obj: PlacedObject) -> None:
        local, (ox, oy) = self._footprint(obj, 1.1)
        region = self.occupancy[oy:oy + local.shape[0], ox:ox + local.shape[1]]
        region |= local[:region.shape[0], :region.shape[1]]
        self.objects.append(obj)

    def place(self, label: str, zones: list[Zone], n: int) -> int:
        """Try to place ``n`` objects of class ``label``; return how many fit."""
        cls = object_class(label)
        placed = 0
        weights = np.array([max(1, int(z.centres.sum()) if z.slots is None else len(z.slots)) for z in zones], float)
        for _ in range(_TRIES_PER_OBJECT * n):
            if placed == n:
                break
            zone = zones[int(self.rng.choice(len(zones), p=weights / weights.sum()))]
            pose = self._pose(zone)
            if pose is None:
                continue
            size, length_px, width_px = self._size(cls)
            angle = 0.0 if cls.round else pose[2] % 360.0
            height = cls.height_m * (length_px * self.gsd_m / cls.length_m[1] if label in ("building", "tree") else 1)
            obj = PlacedObject(label, self._colour(cls), size, pose[0], pose[1], length_px, width_px, angle,
                               max(1.0, height), int(self.rng.integers(2**31)))
            if self._fits(obj, zone):
                self._commit(obj)
                placed += 1
        return placed

    def _colour(self, cls: ObjectClass) -> str:
        words = list(cls.colours)
        p = np.array([cls.colours[c] for c in words], float)
        return words[int(self.rng.choice(len(words), p=p / p.sum()))]


def build_scene(seed: int, scene_class: str | None = None, size_px: int = 504, gsd_m: float = 0.3,
                difficulty: float = 1.0) -> SceneGraph:
    """Compose a scene graph (background + placed objects) without rendering it.

    Args:
        seed: scene seed; everything is a function of it and the other arguments.
        scene_class: one of ``SCENE_CLASSES`` or None to draw one uniformly.
        size_px: image width and height in pixels (>= 128).
        gsd_m: ground sample distance in metres per pixel, in [0.1, 1.0].
        difficulty: 0 (few, mostly large objects, little clutter) to 1 (dense scenes).

    Raises:
        ValueError: unknown scene class, a negative seed, or an out-of-range size, GSD or difficulty.
    """
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not 128 <= size_px <= 8192:
        raise ValueError(f"size_px must be in [128, 8192], got {size_px!r}")
    if not 0.1 <= gsd_m <= 1.0:
        raise ValueError(f"gsd_m must be in [0.1, 1.0] metres per pixel, got {gsd_m!r}")
    if not 0.0 <= difficulty <= 1.0:
        raise ValueError(f"difficulty must be in [0, 1], got {difficulty!r}")
    rng = np.random.default_rng(seed)
    names = sorted(SCENE_CLASSES)
    name = scene_class if scene_class is not None else names[int(rng.integers(len(names)))]
    spec = scene_spec(name)
    layout = build_layout(rng, name, size_px, size_px, gsd_m, difficulty)
    placer = Placer(rng, size_px, size_px, gsd_m, difficulty)
    for label in _PLACE_ORDER:
        if label in spec.counts:
            lo, hi = count_range(*spec.counts[label], difficulty)
            placer.place(label, [layout.zones[z] for z in spec.zones[label]], int(rng.integers(lo, hi + 1)))
    return SceneGraph(name, size_px, size_px, gsd_m, layout.ground, placer.objects,
                      sun_azimuth_deg=float(rng.uniform(0, 360)), shadow_per_m=float(rng.uniform(0.5, 1.1)),
                      render_seed=int(rng.integers(2**31)), difficulty=difficulty, seed=seed)


def object_annotation(o: PlacedObject, graph: SceneGraph) -> ObjectAnnotation:
    """The :class:`ObjectAnnotation` of a placed object (box clipped to the image, oriented corners, attributes)."""
    x1, y1, x2, y2 = o.box_px
    box = (round(max(0.0, x1), 2), round(max(0.0, y1), 2),
           round(min(float(graph.width_px), x2), 2), round(min(float(graph.height_px), y2), 2))
    poly = tuple((round(float(x), 2), round(float(y), 2)) for x, y in o.corners_px)
    attrs = {"size": o.size, "orientation_deg": round(o.angle_deg, 1),
             "grid_cell": o.cell(graph.width_px, graph.height_px),
             "length_m": round(o.length_px * graph.gsd_m, 2), "width_m": round(o.width_px * graph.gsd_m, 2)}
    return ObjectAnnotation(o.label, box, poly, o.colour, False, attrs)


def annotate(graph: SceneGraph, image_path: str = "") -> AnnotatedImage:
    """The :class:`AnnotatedImage` of a scene graph: objects, scene class, captions, VQA, referring expressions.

    ``objects[i]`` corresponds to ``graph.objects[i]``.
    """
    captions, questions, referring = describe_scene(graph)
    return AnnotatedImage(
        image_path=image_path, width=graph.width_px, height=graph.height_px,
        objects=[object_annotation(o, graph) for o in graph.objects], scene_class=graph.scene_class,
        captions=captions, referring=referring, questions=questions,
        source=f"synthetic:seed={graph.seed}:gsd={graph.gsd_m}:difficulty={graph.difficulty:.3f}")


def generate_scene(seed: int, scene_class: str | None = None, size_px: int = 504, gsd_m: float = 0.3,
                   difficulty: float = 1.0) -> tuple[np.ndarray, AnnotatedImage]:
    """Generate one synthetic aerial scene.

    Args: as :func:`build_scene`.

    Returns:
        ``(image, annotation)``: ``(size_px, size_px, 3)`` uint8 RGB and its :class:`AnnotatedImage`
        (``image_path`` empty: the caller writes the image, see ``generate_dataset``).
    """
    graph = build_scene(seed, scene_class, size_px, gsd_m, difficulty)
    return render_scene(graph), annotate(graph)
