"""DOTA v1/v1.5/v2 ``labelTxt`` (and FAIR1M's DOTA-style export) -> AnnotatedImage.

A label file ``labelTxt/P0001.txt`` belongs to the image ``images/P0001.png`` (any image
ending). Its lines are optional headers ``imagesource:GoogleEarth`` and ``gsd:0.13``
(``gsd:null`` in v1.5/v2), then one object per line::

    x1 y1 x2 y2 x3 y3 x4 y4 class-name difficult

four corners of the oriented box in image pixels (clockwise), the class (FAIR1M names
may hold spaces or underscores) and ``difficult`` 0/1 (missing in some exports).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

from train.annotations import AnnotatedImage, ObjectAnnotation, PointPx
from train.converters.base import (
    EmptyDatasetError,
    ImageIndex,
    SkipLog,
    clip_box,
    image_size,
    normalise_label,
)

__all__ = ["read_dota", "parse_dota_line", "find_label_dir"]

logger = logging.getLogger(__name__)

_HEADER_RE = re.compile(r"^(imagesource|gsd)\s*:", re.IGNORECASE)


def find_label_dir(src: Path) -> Path:
    """The folder of ``*.txt`` label files in a DOTA-style source.

    ``src`` may be the label folder itself or hold ``labelTxt`` (or ``labelTxt-v1.0`` ...).

    Raises:
        EmptyDatasetError: no such folder, or it holds no ``.txt`` file.
    """
    src = Path(src)
    candidates = [src / "labelTxt", *sorted(src.glob("labelTxt*")), src]
    for folder in candidates:
        if folder.is_dir() and any(folder.glob("*.txt")):
            return folder
    raise EmptyDatasetError(
        f"no DOTA label files (*.txt) in {src} or its labelTxt* folder; "
        "point --src at the folder that holds labelTxt/ and images/"
    )


def parse_dota_line(line: str) -> ObjectAnnotation | None:
    """One labelTxt line as an object (``None`` for a blank or header line).

    Returns:
        The object with ``polygon_px`` = the four corners and ``box_px`` = their bounds.

    Raises:
        ValueError: the line is not ``8 numbers, class[, difficult]``; the message quotes it.
    """
    text = line.strip()
    if not text or _HEADER_RE.match(text):
        return None
    tokens = text.split()
    if len(tokens) < 9:
        raise ValueError(f"expected 'x1 y1 ... x4 y4 class [difficult]', got {len(tokens)} fields: {text!r}")
    try:
        coords = [float(t) for t in tokens[:8]]
    except ValueError:
        raise ValueError(f"corner coordinates are not numbers: {' '.join(tokens[:8])!r}") from None
    rest = tokens[8:]
    difficult = False
    if len(rest) > 1 and rest[-1].isdigit():
        difficult = rest[-1] != "0"
        rest = rest[:-1]
    label = normalise_label(" ".join(rest))
    if not label or label.replace(".", "").isdigit():
        raise ValueError(f"missing class name: {text!r}")
    polygon: tuple[PointPx, ...] = tuple((coords[i], coords[i + 1]) for i in range(0, 8, 2))
    xs, ys = coords[0::2], coords[1::2]
    box = (min(xs), min(ys), max(xs), max(ys))
    return ObjectAnnotation(label=label, box_px=box, polygon_px=polygon, difficult=difficult)


def _read_objects(label_path: Path, width: int, height: int, log: SkipLog) -> list[ObjectAnnotation]:
    """All usable objects of one label file; bad lines go to ``log``."""
    objects = []
    for number, line in enumerate(label_path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            obj = parse_dota_line(line)
        except ValueError as err:
            log.skip(label_path, number, f"malformed labelTxt line: {err}")
            continue
        if obj is None:
            continue
        box = clip_box(obj.box_px, width, height)
        if box is None:
            log.skip(label_path, number, f"box {tuple(round(v, 1) for v in obj.box_px)} lies outside the "
                     f"{width}x{height} image (less than half of it inside)")
            continue
        objects.append(ObjectAnnotation(obj.label, box, obj.polygon_px, difficult=obj.difficult))
    return objects


def read_dota(
    src: Path,
    log: SkipLog,
    *,
    images_dir: Path | None = None,
    dataset: str = "dota",
) -> Iterator[AnnotatedImage]:
    """Yield one AnnotatedImage per label file that has its image.

    Args:
        src: folder holding ``labelTxt*/`` and ``images/`` (or the label folder itself).
        log: collects the skipped lines and images.
        images_dir: where the images are; default: searched under ``src`` (and its parent
            when ``src`` is the label folder).
        dataset: name put into ``source`` (``"dota"``, ``"fair1m"``).

    Raises:
        EmptyDatasetError: no label file found.
    """
    label_dir = find_label_dir(Path(src))
    root = Path(images_dir) if images_dir else (Path(src) if label_dir != Path(src) else Path(src).parent)
    index = ImageIndex(root)
    label_files = sorted(label_dir.glob("*.txt"))
    logger.info("DOTA-style source %s: %d label files, %d images", label_dir, len(label_files), len(index))
    for label_path in label_files:
        image_path = index.find(label_path.stem)
        if image_path is None:
            log.skip(label_path, None, f"no image named {label_path.stem}.* under {root}")
            continue
        width, height = image_size(image_path)
        objects = _read_objects(label_path, width, height, log)
        yield AnnotatedImage(
            image_path=str(image_path),
            width=width,
            height=height,
            objects=objects,
            source=f"{dataset}:{label_path.stem}",
        )
