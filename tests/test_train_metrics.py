"""Metrics agree with hand-computed values and with pycocoevalcap."""

from __future__ import annotations

import math
import shutil

import pytest

from train.metrics import (
    box_iou,
    set_box_iou,
    caption_scores,
    count_accuracy,
    exact_match_accuracy,
    grounding_accuracy,
    normalize_answer,
)


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ((0, 0, 10, 10), (0, 0, 10, 10), 1.0),  # identical
        ((0, 0, 10, 10), (10, 0, 20, 10), 0.0),  # touching along an edge
        ((0, 0, 10, 10), (10, 10, 20, 20), 0.0),  # touching at a corner
        ((0, 0, 10, 10), (2, 2, 6, 6), 16 / 100),  # contained
        ((0, 0, 10, 10), (5, 0, 15, 10), 50 / 150),  # half overlap
        ((0, 0, 10, 10), (5, 5, 5, 8), 0.0),  # zero width
        ((3, 3, 3, 3), (3, 3, 3, 3), 0.0),  # two points: zero area, not 0/0
        ((0, 0, 10, 10), (20, 20, 30, 30), 0.0),  # disjoint
        ((0, 0, 4, 2), (1, -1, 3, 5), 4 / (8 + 12 - 4)),  # cross shape
    ],
)
def test_box_iou_edge_cases(a, b, expected):
    assert box_iou(a, b) == pytest.approx(expected, abs=1e-12)
    assert box_iou(b, a) == pytest.approx(expected, abs=1e-12)


def test_rotated_iou_uses_polygons():
    # a 10x2 bar rotated by 90 degrees about its centre becomes a 2x10 bar: cross of area 4
    bar = (0, 4, 10, 6)
    assert box_iou(bar, bar, 90, 0) == pytest.approx(4 / (20 + 20 - 4), abs=1e-9)
    assert box_iou(bar, bar, 30, 30) == pytest.approx(1.0)


def test_grounding_accuracy_thresholds():
    ious = [1.0, 0.7, 0.69, 0.5, 0.49, 0.0]
    acc = grounding_accuracy(ious)
    assert acc["acc@0.5"] == pytest.approx(100 * 4 / 6)
    assert acc["acc@0.7"] == pytest.approx(100 * 2 / 6)
    assert acc["mean_iou"] == pytest.approx(100 * sum(ious) / 6)
    assert math.isnan(grounding_accuracy([])["acc@0.5"])


def test_count_accuracy_exact_and_within_one():
    acc = count_accuracy([3, 4, 6, None, 0], [3, 3, 3, 2, 1])
    assert acc["exact"] == pytest.approx(20.0)
    assert acc["within1"] == pytest.approx(60.0)  # 3, 4 and 0 (vs 1)
    assert acc["mae"] == pytest.approx((0 + 1 + 3 + 1) / 4)
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        count_accuracy([1, 2], [1])


@pytest.mark.parametrize(
    ("pred", "ref"),
    [
        ("Yes.", "yes"),
        ("yes, there is one", "Yes"),
        ("The answer is: Three", "3"),
        ("Tennis-Court", "tennis_court"),
        ("an airport", "Airport"),
        ("  Storage   tanks! ", "storage tanks"),
    ],
)
def test_normalised_exact_match_rules(pred, ref):
    assert normalize_answer(pred) == normalize_answer(ref)


def test_exact_match_accuracy_counts_mismatches():
    assert exact_match_accuracy(["yes", "no", "two", "harbour"], ["yes", "yes", "2", "harbor"]) == 50.0
    assert normalize_answer("no") != normalize_answer("none")


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs Java")
def test_caption_scores_match_pycocoevalcap_and_hand_values():
    refs = {"a": ["A red car is parked near the building."], "b": ["many planes are at the airport"],
            "c": ["two ships in the harbour"]}
    hyps = {"a": "a red car parked near a building", "b": "many planes at an airport",
            "c": "two ships in the harbour"}
    scores = caption_scores(refs, hyps)
    # ROUGE-L (beta 1.2) by hand: LCS a = 6 of (7, 8) tokens, b = 4 of (5, 6), c identical
    def f(lcs, n_hyp, n_ref, beta=1.2):
        p, r = lcs / n_hyp, lcs / n_ref
        return (1 + beta**2) * p * r / (r + beta**2 * p)
    assert scores["ROUGE-L"] == pytest.approx(100 * (f(6, 7, 8) + f(4, 5, 6) + 1.0) / 3, abs=1e-6)

    from pycocoevalcap.bleu.bleu import Bleu

    # the PTB tokenizer lower-cases and drops punctuation; these captions need nothing else
    gts = {k: [c.lower().rstrip(".") for c in v] for k, v in refs.items()}
    res = {k: [v] for k, v in hyps.items()}
    assert scores["BLEU-4"] == pytest.approx(100 * Bleu(4).compute_score(gts, res, verbose=0)[0][3])
    assert 0 < scores["METEOR"] < 100


def test_set_box_iou_single_reference_is_the_first_box_and_sets_pair_one_to_one():
    a, b, c = (0, 0, 10, 10), (20, 0, 30, 10), (0, 20, 10, 30)
    half = (0, 0, 10, 5)  # IoU 0.5 with a
    one = lambda *boxes: [(box, 0.0) for box in boxes]  # noqa: E731
    assert set_box_iou(one(half, a), one(a)) == pytest.approx(0.5)  # single reference: first box only
    assert set_box_iou([], one(a)) == 0.0 and set_box_iou(one(a), []) == 0.0
    assert set_box_iou(one(b, a), one(a, b)) == pytest.approx(1.0)  # order does not matter
    assert set_box_iou(one(a), one(a, b)) == pytest.approx(0.5)  # a missed box costs
    assert set_box_iou(one(a, b, c), one(a, b)) == pytest.approx(2 / 3)  # an extra box costs
    assert set_box_iou(one(a, a), one(a, b)) == pytest.approx(0.5)  # one prediction cannot match twice
    assert set_box_iou(one(half, b), one(a, b)) == pytest.approx((0.5 + 1.0) / 2)
