"""Count-varying cutout (SkyMoE paper, "Context-Disentangled Data Augmentation").

The paper: for an image with ``N`` objects of a class, sample ``r ~ U(0.15, 0.30)``,
remove ``m = ceil(r * N)`` objects by zero-filling their regions (new count ``N - m``),
and make four variants per image whose counts differ by at least ``ceil(0.1 * N)``.

Read literally (four independent draws, each ``N - m``) the last condition can never be
met: ``m`` only ranges over ``ceil(0.15 N) .. ceil(0.30 N)``, about ``0.15 N`` values, while
four counts pairwise ``ceil(0.1 N)`` apart need a range of ``3 * ceil(0.1 N) >= 0.3 N``
(:func:`max_independent_variants` computes how many fit: at most 2 for every ``N``).
This module therefore builds the variants as a **density ladder**: variant ``k`` removes
``m_k = ceil(r_k * N)`` further objects (``r_k ~ U(0.15, 0.30)``, always relative to the
original ``N``) from variant ``k - 1``. Every step is the paper's operation, the counts
``N - (m_1 + ... + m_k)`` differ pairwise by at least ``min m_k >= ceil(0.15 N) >= ceil(0.1 N)``,
and the ``r_k`` are redrawn jointly until the removals fit into ``N``.

When ``N`` is too small for four steps (``4 * ceil(0.15 N) > N``: ``N`` in {1, 2, 3, 7}),
fewer variants are made (as many as fit: 1, 2, 3 and 3); ``N = 0`` gives none.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import cv2
import numpy as np

from train.annotations import AnnotatedImage, ObjectAnnotation

__all__ = [
    "RATIO_RANGE",
    "CutoutVariant",
    "cutout_variants",
    "object_mask",
    "min_count_gap",
    "max_independent_variants",
]

logger = logging.getLogger(__name__)

RATIO_RANGE = (0.15, 0.30)
"""The masking ratio ``r`` is drawn uniformly from this range (paper)."""


@dataclass(frozen=True)
class CutoutVariant:
    """One cutout variant.

    Attributes:
        image: annotations of the variant (removed objects gone; referring expressions,
            captions and questions dropped since they may no longer hold; scene class kept).
        rgb: uint8 pixels ``(height, width, 3)``, removed objects' regions set to 0.
        label: the class that was thinned.
        original_count: ``N``, objects of ``label`` in the source image.
        ratios: ``r_1 .. r_k`` of the steps that led to this variant.
        removed: indices (into the source image's ``objects``) of all removed objects.
        count: objects of ``label`` left, ``N - sum(ceil(r_i * N))``.
    """

    image: AnnotatedImage
    rgb: np.ndarray
    label: str
    original_count: int
    ratios: tuple[float, ...]
    removed: tuple[int, ...]
    count: int

    def record(self) -> dict:
        """The sample's ``augmentation`` entry: what was edited."""
        return {
            "type": "cutout",
            "label": self.label,
            "original_count": self.original_count,
            "count": self.count,
            "step": len(self.ratios),
            "ratios": [round(r, 4) for r in self.ratios],
            "removed_per_step": [math.ceil(r * self.original_count) for r in self.ratios],
            "removed_objects": list(self.removed),
        }


def min_count_gap(n: int) -> int:
    """``ceil(0.1 * N)``: the smallest count difference between variants (paper)."""
    return math.ceil(0.1 * n)


def max_independent_variants(n: int) -> int:
    """How many independent one-step variants (``N - ceil(r N)``) can be ``ceil(0.1 N)`` apart.

    The greedy count over the reachable removals ``ceil(0.15 N) .. ceil(0.30 N)``; it is
    at most 2 for every ``N``, which is why :func:`cutout_variants` builds a ladder.
    """
    if n <= 0:
        return 0
    low, high, gap = math.ceil(RATIO_RANGE[0] * n), math.ceil(RATIO_RANGE[1] * n), min_count_gap(n)
    return (high - low) // gap + 1


def object_mask(obj: ObjectAnnotation, height: int, width: int) -> np.ndarray:
    """The pixels of ``obj``: its polygon where given, else its box; bool ``(height, width)``.

    Box pixels are the columns ``floor(x1) .. ceil(x2) - 1`` and rows likewise; polygons are
    rasterised by OpenCV (vertices rounded to whole pixels).
    """
    mask = np.zeros((height, width), np.uint8)
    if obj.polygon_px and len(obj.polygon_px) >= 3:
        points = np.round(np.asarray(obj.polygon_px, np.float64)).astype(np.int32)
        cv2.fillPoly(mask, [points], 1)
    else:
        x1, y1, x2, y2 = obj.box_px
        mask[max(math.floor(y1), 0):max(math.ceil(y2), 0), max(math.floor(x1), 0):max(math.ceil(x2), 0)] = 1
    return mask.astype(bool)


def _draw_steps(n: int, steps: int, rng: np.random.Generator, max_tries: int) -> list[float] | None:
    """``steps`` ratios whose removals ``ceil(r * n)`` fit into ``n``, or ``None`` after ``max_tries``."""
    for _ in range(max_tries):
        ratios = rng.uniform(*RATIO_RANGE, size=steps)
        if sum(math.ceil(r * n) for r in ratios) <= n:
            return [float(r) for r in ratios]
    return None


def cutout_variants(
    image: AnnotatedImage,
    rgb: np.ndarray,
    label: str,
    rng: np.random.Generator,
    *,
    n_variants: int = 4,
    max_tries: int = 200,
) -> list[CutoutVariant]:
    """The count-varying cutout ladder for the objects of ``label``.

    Args:
        image: annotations in ``rgb``'s pixel frame.
        rgb: uint8 ``(height, width, 3)``.
        label: class to thin out.
        rng: random generator (the only source of randomness).
        n_variants: variants wanted (4 in the paper); fewer when ``N`` is too small (module doc).
        max_tries: joint redraws of the ratios per variant number tried.

    Returns:
        Variants with strictly decreasing counts, pairwise at least ``ceil(0.1 N)`` apart.
    """
    indices = [i for i, o in enumerate(image.objects) if o.label == label]
    n = len(indices)
    ratios = None
    for steps in range(n_variants, 0, -1):
        if n and steps * math.ceil(RATIO_RANGE[0] * n) <= n:
            ratios = _draw_steps(n, steps, rng, max_tries)
            if ratios is not None:
                break
    if not ratios:
        logger.debug("%s: %d %r objects, too few for a cutout variant", image.source, n, label)
        return []
    order = [indices[i] for i in rng.permutation(n)]
    variants, removed, taken = [], [], 0
    zeroed = np.zeros(rgb.shape[:2], bool)
    for step, _ in enumerate(ratios, 1):
        m = math.ceil(ratios[step - 1] * n)
        for index in order[taken:taken + m]:
            zeroed |= object_mask(image.objects[index], *rgb.shape[:2])
        removed += order[taken:taken + m]
        taken += m
        pixels = rgb.copy()
        pixels[zeroed] = 0
        kept = [o for i, o in enumerate(image.objects) if i not in set(removed)]
        variant_image = replace(image, objects=kept, captions=[], questions=[], referring=[])
        variants.append(CutoutVariant(variant_image, pixels, label, n, tuple(ratios[:step]),
                                      tuple(sorted(removed)), n - taken))
    return variants
