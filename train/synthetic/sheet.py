"""Contact sheets of generated scenes with their boxes, for looking at the generator's output.

``python -m train.synthetic.sheet --out /tmp/synthetic_sheet.png --n 16 --seed 0`` renders
``n`` scenes (cycling through the scene classes), draws each object's oriented box and
label, the scene class and one question/answer, and tiles them into one PNG.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import cv2
import numpy as np

from train.annotations import AnnotatedImage
from train.synthetic.classes import OBJECT_CLASSES, SCENE_CLASSES
from train.synthetic.scene import generate_scene

__all__ = ["draw_annotations", "contact_sheet", "main"]

logger = logging.getLogger(__name__)

_PALETTE = [(255, 64, 64), (64, 255, 64), (64, 160, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255),
            (255, 160, 0), (160, 96, 255), (255, 255, 255), (128, 255, 160)]
_LABEL_COLOUR = {label: _PALETTE[i % len(_PALETTE)] for i, label in enumerate(OBJECT_CLASSES)}


def draw_annotations(image: np.ndarray, ann: AnnotatedImage, text: bool = True) -> np.ndarray:
    """A copy of ``image`` ``(H, W, 3)`` uint8 RGB with each object's oriented box and label drawn."""
    out = image.copy()
    for o in ann.objects:
        col = _LABEL_COLOUR.get(o.label, (255, 255, 255))
        pts = np.round(np.array(o.polygon_px)).astype(np.int32)
        cv2.polylines(out, [pts], True, col, 1, cv2.LINE_AA)
        if text and o.label not in ("tree", "car"):
            x1, y1 = int(o.box_px[0]), int(o.box_px[1])
            cv2.putText(out, f"{o.label[:5]} {o.colour}", (x1, max(8, y1 - 2)), cv2.FONT_HERSHEY_PLAIN, 0.7, col, 1)
    return out


def contact_sheet(n: int, seed: int, size_px: int = 504, gsd_m: float = 0.3, cols: int = 4,
                  boxes: bool = True) -> np.ndarray:
    """``n`` scenes (scene classes in turn, difficulty rising) with boxes and one QA each, tiled in ``cols``."""
    names = sorted(SCENE_CLASSES)
    tiles = []
    for i in range(n):
        difficulty = i / max(1, n - 1)
        img, ann = generate_scene(seed + i, names[i % len(names)], size_px, gsd_m, difficulty)
        tile = draw_annotations(img, ann) if boxes else img.copy()
        qa = ann.questions[int(np.random.default_rng(i).integers(len(ann.questions)))] if ann.questions else None
        lines = [f"{ann.scene_class} d={difficulty:.2f} n={len(ann.objects)}"]
        if qa:
            lines += [qa.question[:70], f"-> {qa.answer}"]
        top = size_px - 6 - 14 * len(lines)
        tile[top:] = (tile[top:] * 0.35).astype(np.uint8)
        for k, line in enumerate(lines):
            cv2.putText(tile, line, (4, top + 13 + 14 * k), cv2.FONT_HERSHEY_PLAIN, 0.9, (255, 255, 255), 1,
                        cv2.LINE_AA)
        tiles.append(tile)
    while len(tiles) % cols:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.concatenate(tiles[r:r + cols], axis=1) for r in range(0, len(tiles), cols)]
    return np.concatenate(rows, axis=0)


def main(argv: list[str] | None = None) -> int:
    """CLI: write a contact sheet PNG."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cols", type=int, default=4)
    p.add_argument("--no-boxes", action="store_true", help="draw nothing over the images")
    args = p.parse_args(argv)
    sheet = contact_sheet(args.n, args.seed, cols=args.cols, boxes=not args.no_boxes)
    cv2.imwrite(str(args.out), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    print(f"wrote {args.out} ({sheet.shape[1]} x {sheet.shape[0]} px)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
