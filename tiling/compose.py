"""Scene-level answers composed from per-tile answers (one rule per task, stated below).

- count: the scene count (merged boxes, or ownership-weighted tile integers)
  with the number of tiles and which rule produced it;
- ground: how many merged boxes match, and the best one's tile and confidence;
- classify: confidence-weighted vote over tiles (sum of confidences per
  label), the winner with its share of tiles, runners-up listed;
- vqa: yes/no questions are existence questions, so the scene answer is "yes"
  when any tile answered yes (those tiles are listed), else "no"; other
  answers: confidence-weighted vote with the tiles that gave the winner;
- caption: the highest-confidence tile captions (up to three distinct ones),
  each with its tile id and confidence.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Protocol

__all__ = ["compose_scene_answer", "normalise_answer"]

_YES, _NO = "yes", "no"


class _Answer(Protocol):
    tile_id: int
    answer: str
    confidence: float


def normalise_answer(text: str) -> str:
    """Lower-case, strip spaces and a final full stop (``"Yes."`` -> ``"yes"``)."""
    return text.strip().rstrip(".").strip().lower()


def compose_scene_answer(
    task: str, query: str | None, answers: Sequence[_Answer], counts: dict[str, int],
    n_boxes: int, count_rule: str,
) -> str:
    """One sentence for the whole scene (rules in the module docstring).

    Args:
        task: Task key.
        query: The query (class, expression or question).
        answers: Per-tile answers (``answer`` is the parsed, readable answer).
        counts: Scene counts per label.
        n_boxes: Merged boxes in the scene.
        count_rule: ``"boxes"``, ``"tile counts"`` or ``"boxes + tile counts"``.
    """
    if not answers:
        return "No tile was analysed."
    if task == "count":
        n = sum(counts.values())
        return f"{n} {query} in {len(answers)} tiles (from {count_rule}; overlaps counted once)."
    if task == "ground":
        best = max(answers, key=lambda a: a.confidence)
        if n_boxes == 0:
            return f"No match for '{query}' in {len(answers)} tiles."
        return f"{n_boxes} match(es) for '{query}'; most confident answer on tile {best.tile_id} ({best.confidence:.2f})."
    if task == "caption":
        return _captions(answers)
    if task == "vqa" and {normalise_answer(a.answer) for a in answers} <= {_YES, _NO}:
        return _existence(answers)
    return _vote(answers)


def _captions(answers: Sequence[_Answer], top: int = 3) -> str:
    """Up to ``top`` distinct captions by decreasing confidence, with tile references."""
    seen: set[str] = set()
    parts = []
    for a in sorted(answers, key=lambda a: -a.confidence):
        key = normalise_answer(a.answer)
        if not key or key in seen:
            continue
        seen.add(key)
        parts.append(f"Tile {a.tile_id} ({a.confidence:.2f}): {a.answer.strip()}")
        if len(parts) == top:
            break
    return " | ".join(parts) if parts else "No caption was produced."


def _existence(answers: Sequence[_Answer]) -> str:
    """Yes when any tile says yes, listing those tiles."""
    yes = sorted(a.tile_id for a in answers if normalise_answer(a.answer) == _YES)
    if yes:
        shown = ", ".join(str(t) for t in yes[:20]) + (" ..." if len(yes) > 20 else "")
        return f"yes (tiles {shown}: {len(yes)} of {len(answers)} tiles)"
    return f"no (all {len(answers)} tiles)"


def _vote(answers: Sequence[_Answer]) -> str:
    """Confidence-weighted vote; the winner with its tiles, then the runners-up."""
    weight: dict[str, float] = defaultdict(float)
    tiles: dict[str, list[int]] = defaultdict(list)
    for a in answers:
        key = normalise_answer(a.answer)
        if key:
            weight[key] += a.confidence
            tiles[key].append(a.tile_id)
    if not weight:
        return "No readable answer."
    ranked = sorted(weight, key=lambda k: -weight[k])
    best = ranked[0]
    text = f"{best} ({len(tiles[best])} of {len(answers)} tiles: {', '.join(map(str, tiles[best][:20]))})"
    others = [f"{k} ({len(tiles[k])})" for k in ranked[1:4]]
    return text + (f"; also {', '.join(others)}" if others else "")
