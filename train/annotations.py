"""Annotated images: the value that converters, the synthetic generator and CDA exchange.

Coordinates are image pixels of the stored image, x to the right, y down, boxes
half-open ``(x1, y1, x2, y2)`` with ``x1 < x2`` and ``y1 < y2``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

BoxPx = tuple[float, float, float, float]
PointPx = tuple[float, float]


@dataclass(frozen=True)
class ObjectAnnotation:
    """One object of an image.

    Attributes:
        label: class name in lower case with spaces, e.g. ``"small vehicle"``.
        box_px: axis-aligned box ``(x1, y1, x2, y2)`` in image pixels.
        polygon_px: the source's oriented box or outline (e.g. DOTA's four corners), if any.
        colour: colour word (``"red"``), where known.
        difficult: the source marks it hard (DOTA/DIOR ``difficult``).
        attributes: further facts (size word, orientation in degrees, ...).
    """

    label: str
    box_px: BoxPx
    polygon_px: tuple[PointPx, ...] | None = None
    colour: str | None = None
    difficult: bool = False
    attributes: dict = field(default_factory=dict, hash=False, compare=False)

    def moved(self, box_px: BoxPx) -> ObjectAnnotation:
        """The same object at another box (polygon dropped: it no longer matches)."""
        return replace(self, box_px=box_px, polygon_px=None)


@dataclass(frozen=True)
class ReferringExpression:
    """A phrase that names exactly one object of the image (``object_index`` into ``objects``)."""

    text: str
    object_index: int


@dataclass(frozen=True)
class QuestionAnswer:
    """A VQA pair; ``kind`` is e.g. presence, count, comparison, position, colour."""

    question: str
    answer: str
    kind: str = ""


@dataclass
class AnnotatedImage:
    """An image on disk and everything known about it.

    Attributes:
        image_path: path of the image file.
        width, height: image size in pixels.
        objects: annotated objects.
        scene_class: scene label for classification, if any.
        captions: reference captions, if any.
        referring: referring expressions with their target object.
        questions: VQA pairs.
        source: dataset name and original id, for error messages and provenance.
    """

    image_path: str
    width: int
    height: int
    objects: list[ObjectAnnotation] = field(default_factory=list)
    scene_class: str | None = None
    captions: list[str] = field(default_factory=list)
    referring: list[ReferringExpression] = field(default_factory=list)
    questions: list[QuestionAnswer] = field(default_factory=list)
    source: str = ""
