"""Evaluation metrics of the five tasks.

- Captioning (IC): BLEU-4, METEOR and ROUGE-L from pycocoevalcap (the standard
  COCO implementation; its PTB tokenizer and METEOR need Java), reported x100.
- Scene classification (SC) and VQA: accuracy by normalised exact match, with
  these rules (:func:`normalize_answer`), applied to prediction and reference alike:
  lower case; ``_`` and ``-`` become spaces; a leading "the answer is" is dropped;
  an answer starting with yes/no is just ``yes``/``no``; punctuation is removed;
  the articles a/an/the are dropped; an answer made only of number words becomes
  digits (``"three"`` -> ``"3"``); whitespace is collapsed.
- Grounding (VG): IoU of the first predicted box with the reference box;
  acc@0.5 / acc@0.7 = share of samples with IoU >= 0.5 / 0.7 (no box = miss).
  A reference of several boxes ("every car") is scored as a set
  (:func:`set_box_iou`): predicted and reference boxes are paired one-to-one,
  greedily by IoU, and the paired IoUs are summed and divided by the larger of
  the two box counts, so a missed box and an extra box both cost.
  IoU is of the boxes as regions: touching boxes and zero-area boxes give 0,
  identical boxes 1. Rotated boxes (``angle_deg != 0``) are intersected as polygons.
- Counting (OC): exact accuracy and accuracy within +-1 (no count read = miss).

All accuracies are percentages in [0, 100].
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

__all__ = [
    "JavaNotFoundError",
    "normalize_answer",
    "exact_match_accuracy",
    "box_iou",
    "set_box_iou",
    "grounding_accuracy",
    "count_accuracy",
    "caption_scores",
]

logger = logging.getLogger(__name__)

BoxXYXY = tuple[float, float, float, float]

class JavaNotFoundError(RuntimeError):
    """pycocoevalcap's PTB tokenizer and METEOR need a Java runtime, and none is on PATH."""


_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())}
_ARTICLES = {"a", "an", "the"}
_ANSWER_PREFIX = re.compile(r"^(?:the\s+)?answer\s*(?:is|:)\s*")


def normalize_answer(text: str | None) -> str:
    """Normalise a short answer or class name for exact match (rules in the module docstring)."""
    if not text:
        return ""
    answer = " ".join(text.lower().replace("_", " ").replace("-", " ").split())
    answer = _ANSWER_PREFIX.sub("", answer)
    yes_no = re.match(r"(yes|no)\b", answer)
    if yes_no:
        return yes_no.group(1)
    words = [w for w in re.sub(r"[^\w\s]", " ", answer).split() if w not in _ARTICLES]
    if words and all(w in _NUMBER_WORDS for w in words):
        words = [_NUMBER_WORDS[w] for w in words]
    return " ".join(words)


def exact_match_accuracy(predictions: Sequence[str | None], references: Sequence[str]) -> float:
    """Percentage of predictions equal to their reference after :func:`normalize_answer`.

    Raises:
        ValueError: the two lists differ in length.
    """
    _same_length(predictions, references)
    if not references:
        return float("nan")
    hits = sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references))
    return 100.0 * hits / len(references)


def box_iou(a: BoxXYXY, b: BoxXYXY, angle_a_deg: float = 0.0, angle_b_deg: float = 0.0) -> float:
    """Intersection over union of two boxes ``(x1, y1, x2, y2)`` (any consistent unit).

    A box with ``x2 <= x1`` or ``y2 <= y1`` has zero area; the IoU with it is 0.
    With a non-zero angle, the box is rotated by ``angle_deg`` (counter-clockwise in a
    y-up frame, i.e. clockwise on screen with y down) about its centre.
    """
    if angle_a_deg or angle_b_deg:
        return _polygon_iou(_rotated(a, angle_a_deg), _rotated(b, angle_b_deg))
    inter_w = min(a[2], b[2]) - max(a[0], b[0])
    inter_h = min(a[3], b[3]) - max(a[1], b[1])
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    if inter_w <= 0 or inter_h <= 0 or area_a <= 0 or area_b <= 0:
        return 0.0
    inter = inter_w * inter_h
    return inter / (area_a + area_b - inter)


def _rotated(box: BoxXYXY, angle_deg: float):
    from shapely import affinity
    from shapely.geometry import box as shapely_box

    x1, y1, x2, y2 = box
    if x2 <= x1 or y2 <= y1:
        return None
    return affinity.rotate(shapely_box(x1, y1, x2, y2), angle_deg, origin="center")


def _polygon_iou(pa, pb) -> float:
    if pa is None or pb is None:
        return 0.0
    inter = pa.intersection(pb).area
    union = pa.area + pb.area - inter
    return inter / union if union > 0 else 0.0


def set_box_iou(predicted: Sequence[tuple[BoxXYXY, float]], reference: Sequence[tuple[BoxXYXY, float]]) -> float:
    """Score of predicted boxes against a reference of one or more boxes, in [0, 1].

    One reference box: the IoU of the FIRST predicted box (the standard VG rule). Several: boxes
    are paired one-to-one, the pair with the highest IoU first; the score is the sum of the
    paired IoUs over ``max(len(predicted), len(reference))``. No predicted box scores 0.

    Args:
        predicted / reference: ``(box_xyxy, angle_deg)`` pairs in one unit.
    """
    if not predicted or not reference:
        return 0.0
    if len(reference) == 1:
        (a, angle_a), (b, angle_b) = predicted[0], reference[0]
        return box_iou(a, b, angle_a, angle_b)
    pairs = sorted(((box_iou(p, r, pa, ra), i, j) for i, (p, pa) in enumerate(predicted)
                    for j, (r, ra) in enumerate(reference)), reverse=True)
    used_p, used_r, total = set(), set(), 0.0
    for iou, i, j in pairs:
        if iou > 0 and i not in used_p and j not in used_r:
            used_p.add(i)
            used_r.add(j)
            total += iou
    return total / max(len(predicted), len(reference))


def grounding_accuracy(ious: Sequence[float], thresholds: Sequence[float] = (0.5, 0.7)) -> dict[str, float]:
    """``{"acc@0.5": %, "acc@0.7": %, "mean_iou": %}`` from one IoU per sample (0 for a miss)."""
    n = len(ious)
    out = {f"acc@{t:g}": (100.0 * sum(iou >= t for iou in ious) / n if n else float("nan")) for t in thresholds}
    out["mean_iou"] = 100.0 * sum(ious) / n if n else float("nan")
    return out


def count_accuracy(predictions: Sequence[int | None], references: Sequence[int]) -> dict[str, float]:
    """``{"exact": %, "within1": %, "mae": mean absolute error over read counts}``.

    A prediction of ``None`` (no count could be read) is a miss for both accuracies
    and left out of the MAE.

    Raises:
        ValueError: the two lists differ in length.
    """
    _same_length(predictions, references)
    n = len(references)
    if not n:
        return {"exact": float("nan"), "within1": float("nan"), "mae": float("nan")}
    read = [(p, r) for p, r in zip(predictions, references) if p is not None]
    return {
        "exact": 100.0 * sum(p == r for p, r in read) / n,
        "within1": 100.0 * sum(abs(p - r) <= 1 for p, r in read) / n,
        "mae": sum(abs(p - r) for p, r in read) / len(read) if read else float("nan"),
    }


def caption_scores(references: dict[str, Sequence[str]], hypotheses: dict[str, str]) -> dict[str, float]:
    """BLEU-4, METEOR and ROUGE-L (x100) of captions through pycocoevalcap.

    Args:
        references: sample id -> reference captions (one or more).
        hypotheses: sample id -> generated caption (same ids).

    Returns:
        ``{"BLEU-4", "METEOR", "ROUGE-L"}`` corpus scores in [0, 100].

    Raises:
        ValueError: ids differ, or a sample has no reference.
        JavaNotFoundError: Java (needed by the PTB tokenizer and METEOR) is not installed.
    """
    import shutil

    if set(references) != set(hypotheses):
        raise ValueError(f"caption ids differ: {len(set(references) ^ set(hypotheses))} id(s) only on one side")
    if not references:
        return {"BLEU-4": float("nan"), "METEOR": float("nan"), "ROUGE-L": float("nan")}
    empty = [k for k, v in references.items() if not v]
    if empty:
        raise ValueError(f"sample {empty[0]!r} has no reference caption")
    if shutil.which("java") is None:
        raise JavaNotFoundError("captioning metrics need Java (pycocoevalcap's PTB tokenizer and METEOR); "
                           "install a JRE, e.g. apt-get install default-jre-headless")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
    res = tokenizer.tokenize({k: [{"caption": hypotheses[k] or ""}] for k in references})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    meteor, _ = Meteor().compute_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    return {"BLEU-4": 100.0 * bleu[3], "METEOR": 100.0 * meteor, "ROUGE-L": 100.0 * rouge}


def _same_length(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} predictions for {len(b)} references; give one prediction per reference")
