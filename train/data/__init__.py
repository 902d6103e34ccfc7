"""Write instruction datasets: ``DIR/images/``, ``DIR/data.jsonl``, ``DIR/annotations.jsonl``.

:class:`DatasetWriter` stores images (cropped to 504 px where :func:`~train.instructions.needs_crop`
says so), their samples and their annotations; :func:`convert` runs a converter of
:data:`train.converters.FORMATS` through it. ``annotations.jsonl`` holds one
:class:`~train.annotations.AnnotatedImage` per stored image (paths relative to ``DIR``):
``python -m train.data augment`` reads it to build CDA variants.
"""

from __future__ import annotations

import inspect
import json
import logging
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from types import TracebackType

import cv2
import numpy as np
from tqdm import tqdm

from train.annotations import AnnotatedImage
from train.cda import CdaOptions, augment_image
from train.converters.base import EmptyDatasetError, SkipLog
from train.instructions import (
    InstructionSample,
    JsonlError,
    annotated_image_from_json,
    read_jsonl,
    SampleOptions,
    annotated_image_to_json,
    crop_annotation,
    crop_windows,
    make_samples,
    needs_crop,
)

__all__ = ["RunSummary", "DatasetWriter", "CropOptions", "convert", "augment", "synth", "read_rgb", "write_rgb"]

logger = logging.getLogger(__name__)

VARIANT_MARK = "+cda:"
"""Put into the ``source`` of stored CDA variants; ``augment`` leaves such images alone."""

SamplesFor = Callable[[str], list[InstructionSample]]

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

    def _store(self, stored: AnnotatedImage, samples_for: SamplesFor | None) -> AnnotatedImage:
        """Append the samples and the annotations of ``stored`` (its pixels already under ``images/``)."""
        ref = Path(stored.image_path).relative_to(self.out_dir).as_posix()
        samples = samples_for(ref) if samples_for is not None else make_samples(stored, ref, self.options)
        for sample in samples:
            self._data.write(json.dumps(sample.to_json(), ensure_ascii=False) + "\n")
            self.summary.samples[(sample.task, sample.granularity)] += 1
        record = annotated_image_to_json(stored, relative_to=self.out_dir)
        self._annotations.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.summary.images_out += 1
        return stored

    def add_pixels(self, image: AnnotatedImage, rgb: np.ndarray, name: str,
                   samples_for: SamplesFor | None = None) -> AnnotatedImage:
        """Store ``rgb`` as ``images/<name>.png`` with ``image``'s annotations and samples.

        Args:
            image: annotations in ``rgb``'s pixel frame (its ``image_path`` is replaced).
            rgb: uint8 ``(height, width, 3)``.
            name: file stem wanted.
            samples_for: ``samples_for(image_ref)`` gives the samples to write; default
                :func:`~train.instructions.make_samples` of ``image``.

        Returns:
            ``image`` with its stored path.
        """
        path = self.unique_path(name, ".png")
        write_rgb(path, rgb)
        return self._store(replace(image, image_path=str(path)), samples_for)

    def add_image(self, image: AnnotatedImage) -> list[AnnotatedImage]:
        """Store one source image (cropped when large) with its samples; returns what was stored.

        An image that already lies in ``images/`` (e.g. written by the synthetic generator) is
        used in place; others are copied, or cropped when :func:`~train.instructions.needs_crop`.
        """
        self.summary.images_in += 1
        source = Path(image.image_path)
        if source.resolve().parent == self.images_dir.resolve():
            self._names.add(source.name)
            return [self._store(image, None)]
        if not needs_crop(image, self.crop.size_px):
            path = self.unique_path(source.stem, source.suffix.lower())
            shutil.copyfile(source, path)
            return [self._store(replace(image, image_path=str(path)), None)]
        rgb = read_rgb(source)
        if rgb.shape[:2] != (image.height, image.width):
            raise ValueError(f"{source}: annotations say {image.width}x{image.height} px, "
                             f"the file holds {rgb.shape[1]}x{rgb.shape[0]}")
        c = self.crop
        return [
            self.add_pixels(crop_annotation(image, w, "", min_visible=c.min_visible, min_side_px=c.min_side_px),
                            rgb[w.y_px:w.y_px + w.height_px, w.x_px:w.x_px + w.width_px], f"{source.stem}_{w.x_px}_{w.y_px}")
            for w in crop_windows(image.width, image.height, c.size_px, c.overlap_px)
        ]

    def add_variants(self, image: AnnotatedImage, rgb: np.ndarray, rng: np.random.Generator,
                     options: CdaOptions = CdaOptions()) -> int:
        """Store the CDA variants of ``image`` (pixels ``rgb``); returns how many."""
        variants = augment_image(image, rgb, rng, options)
        stem = Path(image.image_path).stem
        for variant in variants:
            marked = replace(variant.image, source=f"{image.source}{VARIANT_MARK}{variant.name}")
            self.add_pixels(marked, variant.rgb, f"{stem}_{variant.name}",
                            partial(variant.samples, vary_templates=self.options.vary_templates))
        return len(variants)


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
        ValueError: unknown format, or a reader option the format does not take.
    """
    from train.converters import get_format

    spec = get_format(fmt)
    accepted = [n for n, p in inspect.signature(spec.reader).parameters.items() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(reader_args) - set(accepted))
    if unknown:
        raise ValueError(f"format {fmt} does not take {', '.join(unknown)}; it takes: {', '.join(accepted) or 'nothing'}")
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


def _load_annotations(data_file: Path, annotations_file: Path | None) -> list[tuple[str, AnnotatedImage]]:
    """The annotated images stored next to ``data_file`` (``annotations.jsonl``), with ``file:line``.

    Raises:
        FileNotFoundError: no annotations file.
        JsonlError: a bad line, naming file and line.
    """
    path = Path(annotations_file) if annotations_file else Path(data_file).parent / ANNOTATIONS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {path}: CDA needs the annotations that convert/synth write next to "
                                f"{Path(data_file).name} (or pass --annotations)")
    out = []
    for number, record in read_jsonl(path):
        try:
            out.append((f"{path}:{number}", annotated_image_from_json(record, base_dir=path.parent)))
        except ValueError as err:
            raise JsonlError(f"{path}:{number}: {err}") from None
    return out


def augment(data_file: Path, out_dir: Path, *, seed: int = 0, cda: CdaOptions = CdaOptions(),
            annotations_file: Path | None = None, progress: bool = False) -> RunSummary:
    """Write the CDA variants of a dataset written by :func:`convert` or :func:`synth`.

    Args:
        data_file: the dataset's ``data.jsonl`` (its ``annotations.jsonl`` is read).
        out_dir: output folder for the variants (images + ``data.jsonl`` of augmented samples only);
            images that are CDA variants themselves (from ``synth --cda``) are not augmented again.
        seed: random seed; the same seed gives the same variants.
        cda: how many variants.
        annotations_file: the annotations, if not next to ``data_file``.
        progress: show a tqdm bar.

    Raises:
        FileNotFoundError: no data or annotations file.
        EmptyDatasetError: no annotated image, or none gave a variant.
    """
    if not Path(data_file).is_file():
        raise FileNotFoundError(f"no dataset file {data_file}")
    images = _load_annotations(Path(data_file), annotations_file)
    if not images:
        raise EmptyDatasetError(f"no annotated image next to {data_file}")
    summary = RunSummary()
    rng = np.random.default_rng(seed)
    with DatasetWriter(out_dir, summary=summary) as writer:
        for where, image in tqdm(images, desc="augment", unit="img", disable=not progress):
            if VARIANT_MARK in image.source:
                continue
            summary.images_in += 1
            try:
                writer.add_variants(image, read_rgb(image.image_path), rng, cda)
            except ValueError as err:
                summary.skipped.skip(where, None, str(err))
    if summary.images_out == 0:
        raise EmptyDatasetError(f"no CDA variant could be made from {len(images)} images of {data_file} "
                                f"({len(summary.skipped)} skipped): do they have objects?")
    return summary


def synth(out_dir: Path, n: int, *, seed: int = 0, with_cda: bool = False, cda: CdaOptions = CdaOptions(),
          workers: int = 1, progress: bool = False) -> RunSummary:
    """Generate ``n`` synthetic scenes (:mod:`train.synthetic`) and their samples (all five tasks).

    Args:
        out_dir: output folder (``images/``, ``data.jsonl``, ``annotations.jsonl``).
        n: number of scenes (each gives many samples).
        seed: dataset seed.
        with_cda: also write the CDA variants of every scene into the same dataset.
        cda: how many variants.
        workers: generator processes.
        progress: show tqdm bars.
    """
    from train.synthetic import generate_dataset

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with tqdm(total=n, desc="generate", unit="scene", disable=not progress) as bar:
        scenes = generate_dataset(out_dir, n, seed, workers=workers, progress=lambda done, total: bar.update(1))
    summary = RunSummary()
    rng = np.random.default_rng([seed, 1])
    with DatasetWriter(out_dir, summary=summary) as writer:
        for image in tqdm(scenes, desc="samples" + (" + CDA" if with_cda else ""), unit="scene",
                          disable=not progress):
            writer.add_image(image)
            if with_cda:
                writer.add_variants(image, read_rgb(image.image_path), rng, cda)
    return summary
