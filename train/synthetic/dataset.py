"""Batches of synthetic scenes written as PNGs, with a difficulty curriculum.

Sample ``i`` of ``generate_dataset(out_dir, n, seed)`` is scene
``generate_scene(sample_seed(seed, i), scene, size_px, gsd_m, difficulty_i)``: the
scene classes are balanced (a seeded permutation of ``i mod 9``) and the difficulty
ramps linearly from ``difficulty[0]`` (first sample) to ``difficulty[1]`` (last),
so reading the list in order is an easy-to-dense curriculum.
"""

from __future__ import annotations

import logging
import multiprocessing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np

from train.annotations import AnnotatedImage
from train.synthetic.classes import SCENE_CLASSES, scene_spec
from train.synthetic.scene import generate_scene

__all__ = ["SampleSpec", "sample_specs", "sample_seed", "generate_dataset", "write_image", "IMAGE_FORMATS"]

#: Image file formats ``generate_dataset`` writes: PNG (lossless, default) or JPEG (quality 95, ~3x faster to write).
IMAGE_FORMATS = ("png", "jpg")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleSpec:
    """Everything that determines one sample: ``generate_scene(seed, scene_class, size_px, gsd_m, difficulty)``."""

    index: int
    seed: int
    scene_class: str
    size_px: int
    gsd_m: float
    difficulty: float
    image_path: str


def sample_seed(seed: int, index: int) -> int:
    """The scene seed of sample ``index`` of a dataset seeded ``seed`` (independent streams per sample)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def sample_specs(out_dir: str | Path, n: int, seed: int, size_px: int = 504,
                 gsd_m: float | tuple[float, float] = 0.3,
                 difficulty: float | tuple[float, float] = (0.0, 1.0),
                 scene_classes: Sequence[str] | None = None, image_format: str = "png") -> list[SampleSpec]:
    """The specs of a dataset, without generating anything (see :func:`generate_dataset`)."""
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1 sample, got {n!r}")
    lo, hi = (difficulty, difficulty) if isinstance(difficulty, (int, float)) else difficulty
    for d in (lo, hi):
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"difficulty must be in [0, 1], got {difficulty!r}")
    names = sorted(SCENE_CLASSES) if scene_classes is None else [scene_spec(s).name for s in scene_classes]
    order = np.random.default_rng(seed).permutation(n) % len(names)
    images = Path(out_dir) / "images"
    ramp = np.linspace(lo, hi, n) if n > 1 else np.array([lo])
    gsd = (np.full(n, float(gsd_m)) if isinstance(gsd_m, (int, float))
           else np.random.default_rng([seed, 2]).uniform(gsd_m[0], gsd_m[1], n).round(3))
    return [SampleSpec(i, sample_seed(seed, i), names[order[i]], size_px, float(gsd[i]), float(ramp[i]),
                       str(images / f"synth_{seed}_{i:06d}.{image_format}")) for i in range(n)]


def write_image(path: str | Path, image: np.ndarray) -> None:
    """Write a ``(H, W, 3)`` uint8 RGB image as PNG (fast compression) or JPEG (quality 95), by extension.

    Raises:
        OSError: the file could not be written (names the path).
    """
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if str(path).endswith(".jpg") else [cv2.IMWRITE_PNG_COMPRESSION, 1]
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), params):
        raise OSError(f"could not write image {path}: check that the folder exists and is writable")


def _make(spec: SampleSpec) -> AnnotatedImage:
    image, ann = generate_scene(spec.seed, spec.scene_class, spec.size_px, spec.gsd_m, spec.difficulty)
    write_image(spec.image_path, image)
    return replace(ann, image_path=spec.image_path, source=f"{ann.source}:index={spec.index}")


def generate_dataset(out_dir: str | Path, n: int, seed: int = 0, size_px: int = 504,
                     gsd_m: float | tuple[float, float] = 0.3,
                     difficulty: float | tuple[float, float] = (0.0, 1.0),
                     scene_classes: Sequence[str] | None = None, workers: int = 1,
                     progress: Callable[[int, int], None] | None = None,
                     image_format: str = "png") -> list[AnnotatedImage]:
    """Generate ``n`` scenes, write ``out_dir/images/synth_{seed}_{i:06d}.{png|jpg}``, return their annotations.

    Args:
        out_dir: output folder (created).
        n: number of samples.
        seed: dataset seed; the same arguments give the same images and annotations.
        size_px: image width and height in pixels.
        gsd_m: ground sample distance in metres per pixel, or a ``(min, max)`` range drawn per sample
            (e.g. ``(0.3, 0.5)`` to cover the 0.4 m sample mosaic); the value is in each ``source``.
        difficulty: a constant in [0, 1] or a ``(first, last)`` linear ramp (curriculum order).
        scene_classes: restrict to these scene classes (default: all, balanced).
        workers: processes; 1 generates in this process.
        progress: called as ``progress(done, n)`` after each sample.
        image_format: ``"png"`` (lossless) or ``"jpg"`` (faster, smaller).

    Returns:
        The annotations in sample order, ``image_path`` set to the written PNG.
    """
    specs = sample_specs(out_dir, n, seed, size_px, gsd_m, difficulty, scene_classes, image_format)
    (Path(out_dir) / "images").mkdir(parents=True, exist_ok=True)
    out: list[AnnotatedImage] = []
    if workers <= 1:
        results = map(_make, specs)
        pool = None
    else:
        pool = multiprocessing.get_context("fork").Pool(workers)
        results = pool.imap(_make, specs, chunksize=8)
    try:
        for ann in results:
            out.append(ann)
            if progress is not None:
                progress(len(out), n)
    finally:
        if pool is not None:
            pool.terminate()
    logger.info("generated %d synthetic scenes in %s", len(out), out_dir)
    return out
