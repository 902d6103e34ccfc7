"""Spatial attribute editing (SkyMoE paper, "Attribute Editing").

The position phrase of a referring expression is replaced by another cell of the 3x3
grid (``"in the top left"`` -> ``"in the bottom right"``; an expression without one gets
``"in the <cell>"`` appended), and the object is moved there: its pixels are cut by its
polygon (or box) together with a ring of its surroundings and pasted with Poisson
blending (``cv2.seamlessClone``) at a spot whose box centre lies in the named cell and whose
IoU with every other object is below 0.1, on ground that looks like the ground it left
(mean Lab of the ring within Delta-E 20). The object's own pixels are then put back
unchanged: Poisson blending alone would tint the whole object by the difference between
the old and the new background (a red car moved onto grass turns olive), which would
falsify its colour word; the blended ring carries the transition.
The vacated region is filled with a background patch of the same image (Poisson-blended
too), or by ``cv2.inpaint`` where no object-free patch exists. The new cell holds no
other object of the same class, so the edited expression names exactly one object.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace

import cv2
import numpy as np

from train.annotations import AnnotatedImage, BoxPx, ReferringExpression
from train.cda.colour import rgb_to_lab
from train.cda.cutout import object_mask
from train.synthetic.geometry import GRID_CELLS, box_iou, cell_bounds, grid_cell

__all__ = ["SpatialEdit", "find_position", "replace_position", "is_relational", "spatial_edit", "MAX_IOU"]

logger = logging.getLogger(__name__)

MAX_IOU = 0.1
"""The moved object's IoU with every other object stays below this (paper)."""

_ROW = {"top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom",
        "middle": "middle", "center": "middle", "centre": "middle", "central": "middle"}
_COL = {"left": "left", "right": "right", "center": "center", "centre": "center", "middle": "center"}
_POSITION_RE = re.compile(
    r"\b(?:(?P<row>top|upper|bottom|lower|middle|center|centre|central)[\s-]+)?"
    r"(?P<col>left|right|center|centre|middle|top|upper|bottom|lower)\b(?P<corner>\s+corner)?(?!\s+(?:of|to)\b)",
    re.IGNORECASE,
)
_RELATIONAL_RE = re.compile(r"\b(?:closest|nearest|next to|near|beside|between|above|below|of the|left of|right of)\b",
                            re.IGNORECASE)
_FILL_MARGIN_PX = 3
_RING_PX = 4
_CLONE_ERODE_PX = 4  # cv2.seamlessClone erodes its mask by 3 px and keeps dst gradients there
_MAX_GROUND_DELTA_E = 20.0


@dataclass(frozen=True)
class SpatialEdit:
    """A moved object.

    Attributes:
        image: annotations after the move (moved object's box and polygon translated,
            referring = the edited expression only; captions and questions dropped).
        rgb: uint8 ``(height, width, 3)`` pixels after the move.
        object_index: the moved object.
        old_text, new_text: the expression before and after.
        from_cell, to_cell: grid cells of the box centre before and after.
        old_box_px, new_box_px: boxes before and after.
        fill: how the vacated region was filled (``"patch"`` or ``"inpaint"``).
    """

    image: AnnotatedImage
    rgb: np.ndarray
    object_index: int
    old_text: str
    new_text: str
    from_cell: str
    to_cell: str
    old_box_px: BoxPx
    new_box_px: BoxPx
    fill: str

    def record(self) -> dict:
        """The sample's ``augmentation`` entry."""
        return {"type": "spatial", "object_index": self.object_index, "old_text": self.old_text,
                "new_text": self.new_text, "from_cell": self.from_cell, "to_cell": self.to_cell,
                "old_box_px": [round(v, 2) for v in self.old_box_px],
                "new_box_px": [round(v, 2) for v in self.new_box_px], "fill": self.fill}


def _cell_name(row: str, col: str) -> str:
    """Canonical GRID_CELLS name of a row/column word pair."""
    if row == "middle" and col == "center":
        return "center"
    return f"{row} {col}" if row != "middle" else f"middle {col}"


def find_position(text: str) -> tuple[int, int, str] | None:
    """The last absolute position phrase in ``text`` as ``(start, end, grid cell)``.

    ``"upper right corner"`` -> ``"top right"``, ``"left"`` -> ``"middle left"``,
    ``"bottom"`` -> ``"bottom center"``; ``"left of"`` (a relation) is no position.
    """
    found = None
    for m in _POSITION_RE.finditer(text):
        row_word, col_word = (m["row"] or "").lower(), m["col"].lower()
        if col_word in ("top", "upper", "bottom", "lower"):  # a lone row word: "at the bottom"
            if row_word:
                continue
            row, col = _ROW[col_word], "center"
        else:
            row, col = (_ROW[row_word] if row_word else "middle"), _COL[col_word]
        found = (m.start(), m.end(), _cell_name(row, col))
    return found


def is_relational(text: str) -> bool:
    """Whether ``text`` places the object relative to another (moving it would falsify that)."""
    return bool(_RELATIONAL_RE.search(text))


def replace_position(text: str, cell: str) -> str:
    """``text`` with its position phrase set to ``cell`` (appended as ``" in the <cell>"`` if it has none)."""
    if cell not in GRID_CELLS:
        raise ValueError(f"unknown grid cell {cell!r}; use one of {list(GRID_CELLS)}")
    found = find_position(text)
    if found is None:
        return f"{text.rstrip(' .')} in the {cell}"
    start, end, _ = found
    return text[:start] + cell + text[end:]


def _region(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Bounding rectangle ``(x0, y0, x1, y1)`` (exclusive ends) of a bool mask."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _dilate(mask: np.ndarray, px: int) -> np.ndarray:
    return cv2.dilate(mask.astype(np.uint8), np.ones((2 * px + 1, 2 * px + 1), np.uint8)).astype(bool)


def _clone(dst: np.ndarray, src_patch: np.ndarray, mask_patch: np.ndarray, x0: int, y0: int) -> np.ndarray:
    """Poisson-blend ``src_patch`` (where ``mask_patch``) into ``dst`` with its top-left at ``(x0, y0)``."""
    h, w = mask_patch.shape
    mask = np.zeros((h + 2, w + 2), np.uint8)  # a free border: the mask's bounding box is then the patch
    mask[1:-1, 1:-1] = mask_patch.astype(np.uint8) * 255
    src = cv2.copyMakeBorder(src_patch, 1, 1, 1, 1, cv2.BORDER_REPLICATE)
    centre = (x0 - 1 + (w + 2) // 2, y0 - 1 + (h + 2) // 2)
    out = cv2.seamlessClone(np.ascontiguousarray(src[..., ::-1]), np.ascontiguousarray(dst[..., ::-1]),
                            mask, centre, cv2.NORMAL_CLONE)
    return np.ascontiguousarray(out[..., ::-1])


def _fill_vacated(rgb: np.ndarray, hole: np.ndarray, busy: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """Fill ``hole`` with an object-free patch of the same image (Poisson), else inpaint."""
    x0, y0, x1, y1 = _region(hole)
    h, w = y1 - y0, x1 - x0
    height, width = hole.shape
    if height - h > 4 and width - w > 4:
        for _ in range(60):
            sx, sy = int(rng.integers(1, width - w - 1)), int(rng.integers(1, height - h - 1))
            if not busy[sy:sy + h, sx:sx + w].any() and x0 >= 1 and y0 >= 1 and x1 < width - 1 and y1 < height - 1:
                patch = rgb[sy:sy + h, sx:sx + w]
                return _clone(rgb, patch, hole[y0:y1, x0:x1], x0, y0), "patch"
    bgr = cv2.inpaint(np.ascontiguousarray(rgb[..., ::-1]), hole.astype(np.uint8), 5, cv2.INPAINT_TELEA)
    return np.ascontiguousarray(bgr[..., ::-1]), "inpaint"


@dataclass(frozen=True)
class _Cut:
    """The pixels carried by a move: the region (object + ring) of the source image.

    ``x0, y0`` is the region's top-left in the source; ``mask``/``body`` are bool
    ``(h, w)`` masks of the region and of the object itself; ``ring_lab`` the mean Lab of
    the ring (region minus object), i.e. the background the object stood on.
    """

    x0: int
    y0: int
    mask: np.ndarray
    body: np.ndarray
    ring_lab: np.ndarray

    @property
    def size(self) -> tuple[int, int]:
        """``(w, h)`` of the region."""
        return self.mask.shape[1], self.mask.shape[0]


def _make_cut(obj_mask: np.ndarray, lab: np.ndarray) -> _Cut:
    region = _dilate(obj_mask, _RING_PX + _CLONE_ERODE_PX)
    x0, y0, x1, y1 = _region(region)
    mask, body = region[y0:y1, x0:x1], obj_mask[y0:y1, x0:x1]
    ring = mask & ~body
    return _Cut(x0, y0, mask, body, lab[y0:y1, x0:x1][ring].mean(axis=0))


def _free_spot(image: AnnotatedImage, index: int, cell: str, cut: _Cut, lab: np.ndarray,
               rng: np.random.Generator, tries: int = 150) -> tuple[int, int] | None:
    """Top-left ``(x, y)`` for the cut region such that the object box centre lies in ``cell``,
    the box has IoU < 0.1 with every other object, the whole region (object and blended ring)
    is clear of them, and the ground there looks like the ground it came from (mean Lab of
    the ring within Delta-E 20: no cars on rivers)."""
    w, h = cut.size
    x1b, y1b, x2b, y2b = image.objects[index].box_px
    ox, oy, bw, bh = x1b - cut.x0, y1b - cut.y0, x2b - x1b, y2b - y1b  # box inside the region, and its size
    others = np.array([o.box_px for i, o in enumerate(image.objects) if i != index], np.float64).reshape(-1, 4)
    cx1, cy1, cx2, cy2 = cell_bounds(cell, image.width, image.height)
    ring = cut.mask & ~cut.body
    for _ in range(tries):
        cx, cy = rng.uniform(cx1, cx2), rng.uniform(cy1, cy2)
        x, y = int(round(cx - ox - bw / 2)), int(round(cy - oy - bh / 2))
        if x < 1 or y < 1 or x + w > image.width - 1 or y + h > image.height - 1:
            continue
        box = (x + ox, y + oy, x + ox + bw, y + oy + bh)
        if grid_cell((box[0] + box[2]) / 2, (box[1] + box[3]) / 2, image.width, image.height) != cell:
            continue
        if len(others) and (box_iou(box, others).max() >= MAX_IOU or box_iou((x, y, x + w, y + h), others).max() > 0):
            continue
        if np.linalg.norm(lab[y:y + h, x:x + w][ring].mean(axis=0) - cut.ring_lab) < _MAX_GROUND_DELTA_E:
            return x, y
    return None


def _target_cells(image: AnnotatedImage, index: int, avoid: set[str]) -> list[str]:
    """Cells holding no other object of the moved object's class (keeps the expression unique)."""
    label = image.objects[index].label
    taken = {grid_cell((o.box_px[0] + o.box_px[2]) / 2, (o.box_px[1] + o.box_px[3]) / 2, image.width, image.height)
             for i, o in enumerate(image.objects) if i != index and o.label == label}
    return [c for c in GRID_CELLS if c not in taken and c not in avoid]


def spatial_edit(image: AnnotatedImage, rgb: np.ndarray, referring: ReferringExpression,
                 rng: np.random.Generator) -> SpatialEdit | None:
    """Move the object of ``referring`` to another grid cell and rewrite the expression.

    Args:
        image: annotations in ``rgb``'s pixel frame.
        rgb: uint8 ``(height, width, 3)``.
        referring: the expression to edit (its ``object_index`` is the object moved).
        rng: random generator.

    Returns:
        The edit, or ``None`` when the expression is relational or no cell has room.
    """
    if is_relational(referring.text):
        return None
    index = referring.object_index
    obj = image.objects[index]
    body = object_mask(obj, image.height, image.width)
    if not body.any():
        return None
    lab = rgb_to_lab(rgb)
    cut = _make_cut(body, lab)
    x1b, y1b, x2b, y2b = obj.box_px
    from_cell = grid_cell((x1b + x2b) / 2, (y1b + y2b) / 2, image.width, image.height)
    phrase = find_position(referring.text)
    cells = _target_cells(image, index, {from_cell} | ({phrase[2]} if phrase else set()))
    for cell in rng.permutation(cells) if cells else []:
        spot = _free_spot(image, index, str(cell), cut, lab, rng)
        if spot is not None:
            break
    else:
        return None
    busy = np.zeros(body.shape, bool)
    for o in image.objects:
        busy |= _dilate(object_mask(o, image.height, image.width), _FILL_MARGIN_PX + _CLONE_ERODE_PX)
    filled, fill = _fill_vacated(rgb, _dilate(body, _FILL_MARGIN_PX + _CLONE_ERODE_PX), busy, rng)
    nx, ny = spot
    (w, h), x0, y0 = cut.size, cut.x0, cut.y0
    moved = _clone(filled, rgb[y0:y0 + h, x0:x0 + w], cut.mask, nx, ny)
    # the object keeps its own pixels; the ring around it carries the blend
    moved[ny:ny + h, nx:nx + w][cut.body] = rgb[y0:y0 + h, x0:x0 + w][cut.body]
    dx, dy = nx - x0, ny - y0
    new_box = (x1b + dx, y1b + dy, x2b + dx, y2b + dy)
    polygon = tuple((x + dx, y + dy) for x, y in obj.polygon_px) if obj.polygon_px else None
    attributes = {**obj.attributes, "grid_cell": str(cell)} if "grid_cell" in obj.attributes else obj.attributes
    objects = list(image.objects)
    objects[index] = replace(obj, box_px=new_box, polygon_px=polygon, attributes=attributes)
    new_text = replace_position(referring.text, str(cell))
    edited = replace(image, objects=objects, referring=[ReferringExpression(new_text, index)], captions=[], questions=[])
    return SpatialEdit(edited, moved, index, referring.text, new_text, from_cell, str(cell), obj.box_px, new_box, fill)
