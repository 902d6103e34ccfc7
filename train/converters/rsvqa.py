"""RSVQA (LR/HR) questions/answers/images JSON -> AnnotatedImage with question-answer pairs.

Three files per split, as distributed (e.g. ``LR_split_train_questions.json``)::

    {"questions": [{"id": 0, "img_id": 0, "type": "rural_urban", "active": true,
                    "question": "Is it a rural or an urban area", "answers_ids": [0]}, ...]}
    {"answers":   [{"id": 0, "question_id": 0, "answer": "rural", "active": true}, ...]}
    {"images":    [{"id": 0, "questions_ids": [0, 1, ...], "active": true}, ...]}

Images are ``<id>.tif`` (``Images_LR/``, ``Data/``), found by stem under the source.
Inactive entries (``"active": false``) are left out.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from train.annotations import AnnotatedImage, QuestionAnswer
from train.converters.base import EmptyDatasetError, ImageIndex, SkipLog, image_size
from train.converters.captions import load_json

__all__ = ["read_rsvqa", "find_split_prefix"]

logger = logging.getLogger(__name__)

_PARTS = ("questions", "answers", "images")


def find_split_prefix(src: Path, split: str | None) -> str:
    """The file prefix (e.g. ``"LR_split_train"``) of the split to read.

    Raises:
        EmptyDatasetError: no ``*_questions.json`` under ``src``, or several and ``split`` names none of them.
    """
    prefixes = sorted(p.name.removesuffix("_questions.json") for p in Path(src).glob("*_questions.json"))
    if split is not None and split in prefixes:
        return split
    if split is None and len(prefixes) == 1:
        return prefixes[0]
    raise EmptyDatasetError(
        f"{src}: choose the split with --split; found question files for: {', '.join(prefixes) or 'none'}"
    )


def _active(entries: object, key: str, path: Path) -> dict[int, dict]:
    """Active entries of a part file by id."""
    if not isinstance(entries, dict) or not isinstance(entries.get(key), list):
        raise EmptyDatasetError(f"{path}: expected an object with a \"{key}\" list")
    return {e["id"]: e for e in entries[key] if isinstance(e, dict) and "id" in e and e.get("active", True)}


def _pairs(image: dict, questions: dict[int, dict], answers: dict[int, dict], path: Path,
           log: SkipLog) -> list[QuestionAnswer]:
    """The question-answer pairs of one image entry."""
    pairs = []
    for qid in image.get("questions_ids", []):
        question = questions.get(qid)
        if question is None:
            continue
        answer_ids = [a for a in question.get("answers_ids", []) if a in answers]
        if not question.get("question") or not answer_ids:
            log.skip(path, None, f"question id {qid}: no question text or no active answer")
            continue
        text = question["question"].strip()
        text = text if text.endswith("?") else text + "?"
        pairs.append(QuestionAnswer(text, str(answers[answer_ids[0]]["answer"]).strip(), question.get("type", "")))
    return pairs


def read_rsvqa(src: Path, log: SkipLog, *, split: str | None = None,
               images_dir: Path | None = None) -> Iterator[AnnotatedImage]:
    """Yield one AnnotatedImage per active image with at least one answered question.

    Args:
        src: folder holding the three JSON files (and, by default, the images).
        log: collects skipped questions and images.
        split: file prefix, e.g. ``"LR_split_train"``; needed when several splits lie in ``src``.
        images_dir: where ``<id>.tif`` lie, if not under ``src``.

    Raises:
        EmptyDatasetError: missing files or no image entries.
        ConversionError: invalid JSON.
    """
    prefix = find_split_prefix(Path(src), split)
    paths = {part: Path(src) / f"{prefix}_{part}.json" for part in _PARTS}
    for part, path in paths.items():
        if not path.is_file():
            raise EmptyDatasetError(f"missing {path} (RSVQA needs {prefix}_questions/_answers/_images.json)")
    questions = _active(load_json(paths["questions"]), "questions", paths["questions"])
    answers = _active(load_json(paths["answers"]), "answers", paths["answers"])
    images = _active(load_json(paths["images"]), "images", paths["images"])
    if not images:
        raise EmptyDatasetError(f"{paths['images']}: no active image entry")
    index = ImageIndex(Path(images_dir) if images_dir else Path(src))
    for image_id, entry in images.items():
        pairs = _pairs(entry, questions, answers, paths["questions"], log)
        if not pairs:
            continue
        image_path = index.find(str(image_id))
        if image_path is None:
            log.skip(paths["images"], None, f"image id {image_id}: no file {image_id}.* under {index.root}")
            continue
        width, height = image_size(image_path)
        yield AnnotatedImage(str(image_path), width, height, questions=pairs, source=f"rsvqa:{prefix}:{image_id}")
