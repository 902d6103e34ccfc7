"""Count-varying cutout: the paper's invariants as property tests, plus the real DOTA sample."""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from shapely.geometry import Polygon

from train.annotations import AnnotatedImage, ObjectAnnotation
from train.cda.cutout import RATIO_RANGE, cutout_variants, max_independent_variants, object_mask

SIZE = 64


def _expected_variants(n: int) -> int:
    """Variants the ladder makes for N (module doc): 4, fewer for N in {1, 2, 3, 7}, none for 0."""
    return {0: 0, 1: 1, 2: 2, 3: 3, 7: 3}.get(n, 4)


@st.composite
def scenes(draw: st.DrawFn) -> tuple[AnnotatedImage, np.ndarray, int]:
    """An image with N 'car' boxes (integer corners) and a few 'tree' boxes; no pixel is 0."""
    n = draw(st.integers(0, 40))
    n_other = draw(st.integers(0, 3))
    boxes = []
    for _ in range(n + n_other):
        x1, y1 = draw(st.integers(0, SIZE - 2)), draw(st.integers(0, SIZE - 2))
        w, h = draw(st.integers(1, 12)), draw(st.integers(1, 12))
        boxes.append((float(x1), float(y1), float(min(x1 + w, SIZE)), float(min(y1 + h, SIZE))))
    objects = [ObjectAnnotation("car" if i < n else "tree", b) for i, b in enumerate(boxes)]
    seed = draw(st.integers(0, 2**32 - 1))
    rgb = np.random.default_rng(seed).integers(1, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    return AnnotatedImage("x.png", SIZE, SIZE, objects), rgb, seed


@settings(max_examples=60, deadline=None)
@given(scenes())
def test_cutout_invariants(scene: tuple[AnnotatedImage, np.ndarray, int]) -> None:
    image, rgb, seed = scene
    n = sum(o.label == "car" for o in image.objects)
    variants = cutout_variants(image, rgb, "car", np.random.default_rng(seed))
    assert len(variants) == _expected_variants(n)
    removed_so_far = 0
    for k, variant in enumerate(variants, 1):
        # ratio range and m = ceil(r N) per step; count = N - sum(m)
        assert len(variant.ratios) == k
        assert all(RATIO_RANGE[0] <= r < RATIO_RANGE[1] for r in variant.ratios)
        removed_so_far += math.ceil(variant.ratios[-1] * n)
        assert variant.count == n - removed_so_far >= 0
        assert len(variant.removed) == removed_so_far
        assert variant.record()["removed_per_step"] == [math.ceil(r * n) for r in variant.ratios]
        # annotations updated: the removed cars are gone, every other object is kept
        assert sum(o.label == "car" for o in variant.image.objects) == variant.count
        assert variant.image.objects == [o for i, o in enumerate(image.objects) if i not in variant.removed]
        assert all(image.objects[i].label == "car" for i in variant.removed)
        # zeroed pixels are exactly the removed boxes (computed here by slicing), nothing else changed
        expected = np.zeros((SIZE, SIZE), bool)
        for i in variant.removed:
            x1, y1, x2, y2 = (int(v) for v in image.objects[i].box_px)
            expected[y1:y2, x1:x2] = True
        assert np.array_equal((variant.rgb == 0).all(axis=-1), expected)
        assert np.array_equal(variant.rgb[~expected], rgb[~expected])
    # four variants (where N allows), counts pairwise at least ceil(0.1 N) apart
    for a, b in combinations(variants, 2):
        assert abs(a.count - b.count) >= math.ceil(0.1 * n)
    assert [v.count for v in variants] == sorted((v.count for v in variants), reverse=True)


def test_independent_draws_cannot_give_four_spaced_variants() -> None:
    """Why the ladder: one-step variants N - ceil(rN) fit at most 2 counts ceil(0.1N) apart."""
    assert max(max_independent_variants(n) for n in range(1, 5000)) == 2


def test_same_seed_same_variants() -> None:
    objects = [ObjectAnnotation("car", (float(4 * i), 0.0, float(4 * i + 3), 3.0)) for i in range(15)]
    image = AnnotatedImage("x.png", SIZE, SIZE, objects)
    rgb = np.full((SIZE, SIZE, 3), 7, np.uint8)
    a = cutout_variants(image, rgb, "car", np.random.default_rng(3))
    b = cutout_variants(image, rgb, "car", np.random.default_rng(3))
    assert [v.removed for v in a] == [v.removed for v in b]
    assert all(np.array_equal(x.rgb, y.rgb) for x, y in zip(a, b))


def test_polygon_mask_matches_polygon_area() -> None:
    """Oriented objects are zero-filled by their polygon, not their (larger) box."""
    polygon = ((30.0, 10.0), (50.0, 30.0), (30.0, 50.0), (10.0, 30.0))  # a diamond, area 800
    obj = ObjectAnnotation("car", (10.0, 10.0, 50.0, 50.0), polygon)
    mask = object_mask(obj, SIZE, SIZE)
    assert abs(mask.sum() - Polygon(polygon).area) / Polygon(polygon).area < 0.08
    assert not mask[10, 10] and mask[30, 30]


def test_cutout_on_real_dota_sample(real_data) -> None:
    """The DOTA sample's large vehicles (oriented boxes) thinned four times."""
    from train.converters import SkipLog, read_dota
    from train.data import read_rgb

    image = next(read_dota(real_data / "dota_sample", SkipLog()))
    rgb = read_rgb(image.image_path)
    n = sum(o.label == "large vehicle" for o in image.objects)
    variants = cutout_variants(image, rgb, "large vehicle", np.random.default_rng(0))
    assert len(variants) == 4
    for v in variants:
        expected = np.zeros(rgb.shape[:2], bool)
        for i in v.removed:
            expected |= object_mask(image.objects[i], *rgb.shape[:2])
        assert v.count == n - len(v.removed)
        assert (v.rgb[expected] == 0).all() and np.array_equal(v.rgb[~expected], rgb[~expected])
    assert min(a.count - b.count for a, b in zip(variants, variants[1:])) >= math.ceil(0.1 * n)


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_small_n_gives_fewer_variants(n: int) -> None:
    objects = [ObjectAnnotation("car", (float(5 * i), 0.0, float(5 * i + 4), 4.0)) for i in range(n)]
    variants = cutout_variants(AnnotatedImage("x.png", SIZE, SIZE, objects), np.ones((SIZE, SIZE, 3), np.uint8),
                               "car", np.random.default_rng(0))
    assert len(variants) == _expected_variants(n)
    assert len({v.count for v in variants}) == len(variants)
