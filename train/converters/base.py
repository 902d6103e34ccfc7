"""What every converter shares: errors, the skip log, image lookup and box checks.

Converters read one public format and yield :class:`~train.annotations.AnnotatedImage`
per image. Bad items (a malformed line, a missing image, a box off the image) are
recorded in a :class:`SkipLog` with file and line and the run goes on; a source with
nothing usable raises :class:`EmptyDatasetError`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from train.annotations import BoxPx

__all__ = [
    "ConversionError",
    "EmptyDatasetError",
    "Skipped",
    "SkipLog",
    "ImageIndex",
    "IMAGE_SUFFIXES",
    "normalise_label",
    "image_size",
    "clip_box",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
"""File endings taken for images when a source is searched."""


class ConversionError(ValueError):
    """A source cannot be converted at all (wrong folder, unreadable index file, ...)."""


class EmptyDatasetError(ConversionError):
    """The source holds no annotation file, or none of its items could be used."""


@dataclass(frozen=True)
class Skipped:
    """One item left out of a conversion.

    Attributes:
        path: the file that held the bad item.
        line: 1-based line in ``path`` (``None`` where the format has no lines, e.g. a JSON entry).
        reason: what was wrong, with the bad value.
    """

    path: str
    line: int | None
    reason: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else self.path
        return f"{where}: {self.reason}"


class SkipLog:
    """Collects the items a run left out; each is also logged as a warning."""

    def __init__(self) -> None:
        self.items: list[Skipped] = []

    def skip(self, path: str | Path, line: int | None, reason: str) -> None:
        """Record (and log) one skipped item."""
        item = Skipped(str(path), line, reason)
        logger.warning("skipped %s", item)
        self.items.append(item)

    def __len__(self) -> int:
        return len(self.items)


def normalise_label(name: str) -> str:
    """A class name in the project's form: lower case, words split by single spaces.

    ``"small-vehicle"`` -> ``"small vehicle"``, ``"Small_Car"`` -> ``"small car"``,
    ``"Expressway-Service-area"`` -> ``"expressway service area"``.
    """
    return re.sub(r"[\s_\-]+", " ", name).strip().lower()


class ImageIndex:
    """Images under a folder, found by file name or stem (searched recursively, once).

    Args:
        root: folder searched recursively for files ending in :data:`IMAGE_SUFFIXES`.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._by_name: dict[str, Path] = {}
        self._by_stem: dict[str, Path] = {}
        for path in sorted(self.root.rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                self._by_name.setdefault(path.name, path)
                self._by_stem.setdefault(path.stem, path)

    def find(self, name: str) -> Path | None:
        """The image named ``name`` (a file name, or a stem with any image ending)."""
        return self._by_name.get(Path(name).name) or self._by_stem.get(Path(name).stem)

    def __len__(self) -> int:
        return len(self._by_name)


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` in pixels, read from the file header only."""
    with Image.open(path) as image:
        return image.size


def clip_box(box_px: BoxPx, width: int, height: int, min_visible: float = 0.5) -> BoxPx | None:
    """``box_px`` clipped to the image, or ``None`` if less than ``min_visible`` of it lies inside.

    Args:
        box_px: ``(x1, y1, x2, y2)`` in image pixels.
        width, height: image size in pixels.
        min_visible: smallest inside share of the box area that is kept (sources often
            overhang the border by a pixel or two, which is clipped silently).
    """
    x1, y1, x2, y2 = box_px
    area = max(x2 - x1, 0.0) * max(y2 - y1, 0.0)
    cx1, cy1, cx2, cy2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))
    if area <= 0 or cx2 <= cx1 or cy2 <= cy1:
        return None
    if (cx2 - cx1) * (cy2 - cy1) < min_visible * area:
        return None
    return (cx1, cy1, cx2, cy2)

