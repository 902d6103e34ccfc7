"""Write instruction datasets: ``DIR/images/``, ``DIR/data.jsonl``, ``DIR/annotations.jsonl``.

:class:`DatasetWriter` stores images (cropped to 504 px where :func:`~train.instructions.needs_crop`
says so), their samples and their annotations; :func:`convert` runs a converter of
:data:`train.converters.FORMATS` through it. ``annotations.jsonl`` holds one
:class:`~train.annotations.AnnotatedImage` per stored image (paths relative to ``DIR``):
``python -m train.data augment`` reads it to build CDA variants.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType

import cv2
import numpy as np
from tqdm import tqdm

from train.annotations import AnnotatedImage
from train.converters.base import EmptyDatasetError, SkipLog
from train.instructions import (
    InstructionSample,
    SampleOptions,
    annotated_image_to_json,
    crop_annotation,
    crop_windows,
    make_samples,
    needs_crop,
)

__all__ = ["RunSummary", "DatasetWriter", "CropOptions", "convert", "read_rgb", "write_rgb"]

logger = logging.getLogger(__name__)

DATA_FILE = "data.jsonl"
ANNOTATIONS_FILE = "annotations.jsonl"
IMAGES_DIR = "images"


@dataclass(frozen=True)
class CropOptions:
    """How large images are split (see :func:`train.instructions.crop_windows`)."""

    size_px: int = 504
    overlap_px: int = 64
    min_visible: float = 0.5
    min_side_px: float = 4.0


@dataclass
class RunSummary:
    """What a run wrote and left out.

    Attributes:
        samples: sample count per ``(task, granularity)``.
        images_in: source images read.
        images_out: images (crops) written.
        skipped: the items left out, with file and line.
    """

    samples: Counter = field(default_factory=Counter)
    images_in: int = 0
    images_out: int = 0
    skipped: SkipLog = field(default_factory=SkipLog)

    @property
    def total(self) -> int:
        """All samples written."""
        return sum(self.samples.values())

    def table(self) -> str:
        """A plain-text table: samples per task and granularity, then the totals."""
        lines = [f"{'task':<6}{'granularity':<13}{'samples':>9}"]
        lines += [f"{t:<6}{g:<13}{n:>9}" for (t, g), n in sorted(self.samples.items())]
        lines.append(f"{'total':<19}{self.total:>9}")
        lines.append(f"images read {self.images_in}, written {self.images_out}, skipped items {len(self.skipped)}")
        return "\n".join(lines)


def read_rgb(path: str | Path) -> np.ndarray:
    """An image file as uint8 RGB ``(height, width, 3)``.

    Raises:
        ValueError: the file cannot be decoded.
    """
    pixels = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if pixels is None:
        raise ValueError(f"cannot read image {path} (missing, or not an image OpenCV can decode)")
    return cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)


def write_rgb(path: str | Path, rgb: np.ndarray) -> None:
    """Write uint8 RGB ``(height, width, 3)`` to ``path`` (format from the ending)."""
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise ValueError(f"cannot write image {path}")


class DatasetWriter:
    """Context manager that writes images, samples and annotations into ``out_dir``.

    Args:
        out_dir: output folder (created; ``data.jsonl``/``annotations.jsonl`` overwritten).
        options: which samples to make.
        crop: how large images are split.
        summary: the summary to add to (a new one by default).
    """

    def __init__(self, out_dir: Path, options: SampleOptions = SampleOptions(), crop: CropOptions = CropOptions(),
                 summary: RunSummary | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.images_dir = self.out_dir / IMAGES_DIR
        self.options = options
        self.crop = crop
        self.summary = summary or RunSummary()
        self._names: set[str] = set()
        self._data = self._annotations = None

    def __enter__(self) -> DatasetWriter:
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self._data = open(self.out_dir / DATA_FILE, "w", encoding="utf-8")
        self._annotations = open(self.out_dir / ANNOTATIONS_FILE, "w", encoding="utf-8")
        return self

    def __exit__(self, kind: type | None, value: BaseException | None, tb: TracebackType | None) -> None:
        for handle in (self._data, self._annotations):
            if handle is not None:
                handle.close()

    def unique_path(self, name: str, suffix: str) -> Path:
        """A free path ``images/<name><suffix>`` (``_1``, ``_2``... appended on collision)."""
        candidate, n = name, 0
        while candidate + suffix in self._names:
            n += 1
            candidate = f"{name}_{n}"
        self._names.add(candidate + suffix)
        return self.images_dir / (candidate + suffix)

    def write_samples(self, image: AnnotatedImage, samples: Iterable[InstructionSample]) -> int:
        """Append ``samples`` and the annotations of ``image`` (already stored under ``images/``)."""
        written = 0
        for sample in samples:
            self._data.write(json.dumps(sample.to_json(), ensure_ascii=False) + "\n")
            self.summary.samples[(sample.task, sample.granularity)] += 1
            written += 1
        record = annotated_image_to_json(image, relative_to=self.out_dir)
        self._annotations.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.summary.images_out += 1
        return written

    def add_pixels(self, image: AnnotatedImage, rgb: np.ndarray, name: str,
                   samples: Iterable[InstructionSample] | None = None) -> AnnotatedImage:
        """Store ``rgb`` as ``images/<name>.png`` with ``image``'s annotations and samples.

        Args:
            image: annotations in ``rgb``'s pixel frame (its ``image_path`` is replaced).
            rgb: uint8 ``(height, width, 3)``.
            name: file stem wanted.
            samples: samples to write; default :func:`make_samples` of ``image``.
        """
        path = self.unique_path(name, ".png")
        write_rgb(path, rgb)
        stored = replace(image, image_path=str(path))
        ref = path.relative_to(self.out_dir).as_posix()
        self.write_samples(stored, samples if samples is not None else make_samples(stored, ref, self.options))
        return stored

    def add_image(self, image: AnnotatedImage) -> list[AnnotatedImage]:
        """Store one source image (cropped when large) with its samples; returns what was stored."""
        self.summary.images_in += 1
        name = Path(image.image_path).stem
        if not needs_crop(image, self.crop.size_px):
            path = self.unique_path(name, Path(image.image_path).suffix.lower())
            shutil.copyfile(image.image_path, path)
            stored = replace(image, image_path=str(path))
            self.write_samples(stored, make_samples(stored, path.relative_to(self.out_dir).as_posix(), self.options))
            return [stored]
        rgb = read_rgb(image.image_path)
        if rgb.shape[:2] != (image.height, image.width):
            raise ValueError(f"{image.image_path}: annotations say {image.width}x{image.height} px, "
                             f"the file holds {rgb.shape[1]}x{rgb.shape[0]}")
        stored = []
        c = self.crop
        for window in crop_windows(image.width, image.height, c.size_px, c.overlap_px):
            part = crop_annotation(image, window, "", min_visible=c.min_visible, min_side_px=c.min_side_px)
            pixels = rgb[window.y_px:window.y_px + window.height_px, window.x_px:window.x_px + window.width_px]
            stored.append(self.add_pixels(part, pixels, f"{name}_{window.x_px}_{window.y_px}"))
        return stored


def convert(
    fmt: str,
    src: Path,
    out_dir: Path,
    *,
    options: SampleOptions | None = None,
    crop: CropOptions = CropOptions(),
    progress: bool = False,
    **reader_args: object,
) -> RunSummary:
    """Convert a public dataset on disk into ``out_dir`` (images + JSONL).

    Args:
        fmt: a key of :data:`train.converters.FORMATS` (``dota``, ``fair1m``, ``dior``, ...).
        src: the dataset folder as distributed.
        out_dir: output folder.
        options: sample options; default: the format's tasks.
        crop: how large images are split.
        progress: show a tqdm bar.
        reader_args: passed to the format's reader (e.g. ``split``).

    Returns:
        The run summary (bad items listed in ``summary.skipped``).

    Raises:
        EmptyDatasetError: nothing usable in ``src``.
        ValueError: unknown format.
    """
    from train.converters import get_format

    spec = get_format(fmt)
    summary = RunSummary()
    options = options or spec.options
    with DatasetWriter(out_dir, options, crop, summary) as writer:
        images = spec.reader(Path(src), summary.skipped, **reader_args)
        for image in tqdm(images, desc=f"convert {fmt}", unit="img", disable=not progress):
            try:
                writer.add_image(image)
            except (OSError, ValueError) as err:
                summary.skipped.skip(image.image_path, None, f"image not stored: {err}")
    if summary.images_out == 0:
        first = "; first: " + str(summary.skipped.items[0]) if summary.skipped.items else ""
        raise EmptyDatasetError(f"no usable image in {src} (format {fmt}); {len(summary.skipped)} items skipped{first}")
    return summary
