"""AnnotatedImage -> instruction samples (JSONL), 504 px crops, and JSONL input/output.

One sample per line (``../shared/DESIGN.md`` section 6)::

    {"id", "image", "task": "SC|IC|VQA|VG|OC", "granularity": "global|local",
     "conversations": [{"from": "human", "value": "<image>\\n" + prompt},
                       {"from": "gpt", "value": answer}],
     "augmentation": {...}}            # only on CDA variants: what was edited

``image`` is relative to the JSONL file's folder. Prompts come from
:func:`skymoe.prompts.build_prompt`; boxes are written on the 0-100 grid of the stored
image (crop) with :func:`skymoe.prompts.format_boxes`.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from shapely.geometry import Polygon, box

from skymoe.prompts import IMAGE_TOKEN, TASKS, build_prompt, code_of_task, format_boxes, format_count
from train.annotations import AnnotatedImage, BoxPx, ObjectAnnotation, QuestionAnswer, ReferringExpression

__all__ = [
    "InstructionSample",
    "SampleOptions",
    "CropWindow",
    "JsonlError",
    "ALL_TASK_CODES",
    "make_samples",
    "make_sample",
    "box_norm100",
    "crop_windows",
    "crop_annotation",
    "needs_crop",
    "read_jsonl",
    "read_samples",
    "write_jsonl",
    "annotated_image_to_json",
    "annotated_image_from_json",
]

logger = logging.getLogger(__name__)

ALL_TASK_CODES = frozenset(spec.code for spec in TASKS.values())
_GRANULARITIES = ("global", "local")


class JsonlError(ValueError):
    """A JSONL line that is not valid JSON or not a valid sample; names file and line."""


@dataclass
class InstructionSample:
    """One training sample (one JSONL line).

    Attributes:
        id: unique id.
        image: image path relative to the JSONL file's folder.
        task: task code ``SC|IC|VQA|VG|OC``.
        granularity: ``"global"`` or ``"local"``.
        conversations: ``[{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]``.
        augmentation: what a CDA variant edited (``None`` for original samples).
    """

    id: str
    image: str
    task: str
    granularity: str
    conversations: list[dict[str, str]]
    augmentation: dict | None = None

    @property
    def prompt(self) -> str:
        """The first human message without its ``<image>`` line."""
        return self.conversations[0]["value"].replace(f"{IMAGE_TOKEN}\n", "", 1)

    @property
    def answer(self) -> str:
        """The first gpt message."""
        return self.conversations[1]["value"]

    def to_json(self) -> dict:
        """The JSONL record (``augmentation`` left out when ``None``)."""
        record = asdict(self)
        if record["augmentation"] is None:
            del record["augmentation"]
        return record

    @classmethod
    def from_json(cls, record: object, where: str = "sample") -> InstructionSample:
        """Validate a decoded JSONL record.

        Raises:
            ValueError: a missing or wrong field; the message starts with ``where``.
        """
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        missing = [k for k in ("id", "image", "task", "granularity", "conversations") if k not in record]
        if missing:
            raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
        if record["task"] not in ALL_TASK_CODES:
            raise ValueError(f"{where}: task {record['task']!r} is not one of {sorted(ALL_TASK_CODES)}")
        if record["granularity"] not in _GRANULARITIES:
            raise ValueError(f"{where}: granularity {record['granularity']!r} is not global or local")
        turns = record["conversations"]
        if (
            not isinstance(turns, list)
            or len(turns) < 2
            or not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns)
            or [t.get("from") for t in turns[:2]] != ["human", "gpt"]
        ):
            raise ValueError(f"{where}: conversations must be [{{from: human, value}}, {{from: gpt, value}}, ...]")
        return cls(
            id=str(record["id"]),
            image=str(record["image"]),
            task=record["task"],
            granularity=record["granularity"],
            conversations=turns,
            augmentation=record.get("augmentation"),
        )


@dataclass(frozen=True)
class SampleOptions:
    """How :func:`make_samples` turns annotations into samples.

    Attributes:
        tasks: task codes to emit (e.g. ``{"VG"}`` for RSVG, whose objects are not exhaustive).
        vqa_granularity: granularity written on VQA samples.
        max_ground_instances: "where is every CLASS" samples only for classes with at most
            this many instances (0 turns them off); counting covers dense classes.
        vary_templates: pick among each task's phrasings (deterministic per sample id);
            otherwise the canonical template.
    """

    tasks: frozenset[str] = ALL_TASK_CODES
    vqa_granularity: str = "global"
    max_ground_instances: int = 10
    vary_templates: bool = True


def box_norm100(box_px: BoxPx, width: int, height: int) -> tuple[float, float, float, float]:
    """``box_px`` on the 0-100 grid of a ``width`` x ``height`` image (clamped to it)."""
    x1, y1, x2, y2 = box_px
    scaled = (x1 / width, y1 / height, x2 / width, y2 / height)
    return tuple(min(max(v * 100.0, 0.0), 100.0) for v in scaled)


def make_sample(
    sample_id: str,
    image_ref: str,
    task: str,
    answer: str,
    query: str | None = None,
    *,
    granularity: str | None = None,
    vary_templates: bool = True,
    augmentation: dict | None = None,
) -> InstructionSample:
    """One sample of ``task`` (a :data:`skymoe.prompts.TASKS` key) with its prompt and answer."""
    spec = TASKS[task]
    template_index = zlib.crc32(sample_id.encode()) % len(spec.templates) if vary_templates else 0
    prompt = build_prompt(task, query, template_index=template_index)
    return InstructionSample(
        id=sample_id,
        image=image_ref,
        task=code_of_task(task),
        granularity=granularity or spec.granularity,
        conversations=[
            {"from": "human", "value": f"{IMAGE_TOKEN}\n{prompt}"},
            {"from": "gpt", "value": answer},
        ],
        augmentation=augmentation,
    )


def _by_label(objects: Iterable[ObjectAnnotation]) -> dict[str, list[ObjectAnnotation]]:
    """Objects grouped by label, labels in order of first appearance."""
    groups: dict[str, list[ObjectAnnotation]] = defaultdict(list)
    for obj in objects:
        groups[obj.label].append(obj)
    return dict(groups)


def _object_samples(image: AnnotatedImage, ref: str, stem: str, options: SampleOptions) -> list[InstructionSample]:
    """OC per class present and VG "every CLASS" per sparse class."""
    samples = []
    vary = options.vary_templates
    for label, objs in _by_label(image.objects).items():
        key = label.replace(" ", "_")
        if "OC" in options.tasks:
            samples.append(make_sample(f"{stem}_OC_{key}", ref, "count", format_count(len(objs)), label,
                                       vary_templates=vary))
        if "VG" in options.tasks and 0 < len(objs) <= options.max_ground_instances:
            # reading order: top to bottom, then left to right
            boxes = sorted((box_norm100(o.box_px, image.width, image.height) for o in objs),
                           key=lambda b: (round(b[1]), b[0]))
            samples.append(make_sample(f"{stem}_VG_all_{key}", ref, "ground", format_boxes(boxes),
                                       f"every {label}", vary_templates=vary))
    return samples


def make_samples(image: AnnotatedImage, image_ref: str, options: SampleOptions = SampleOptions()) -> list[InstructionSample]:
    """All samples one annotated image yields.

    SC from ``scene_class``; IC per caption; VQA per question; VG per referring expression
    (the target's box) and "every CLASS" for classes with few instances; OC per class present.

    Args:
        image: annotations in the pixel frame of the stored image.
        image_ref: the image path to write into the samples (relative to the JSONL folder).
        options: which tasks and how.

    Returns:
        Samples with ids ``"<image stem>_<TASK>_<key>"``.
    """
    stem = Path(image_ref).stem
    vary = options.vary_templates
    samples: list[InstructionSample] = []
    if image.scene_class and "SC" in options.tasks:
        samples.append(make_sample(f"{stem}_SC", image_ref, "classify", image.scene_class, vary_templates=vary))
    if "IC" in options.tasks:
        samples += [make_sample(f"{stem}_IC_{i}", image_ref, "caption", c, vary_templates=vary)
                    for i, c in enumerate(image.captions)]
    if "VQA" in options.tasks:
        samples += [make_sample(f"{stem}_VQA_{i}", image_ref, "vqa", qa.answer, qa.question,
                                granularity=options.vqa_granularity, vary_templates=vary)
                    for i, qa in enumerate(image.questions)]
    if "VG" in options.tasks:
        for i, ref in enumerate(image.referring):
            target = image.objects[ref.object_index]
            answer = format_boxes([box_norm100(target.box_px, image.width, image.height)])
            samples.append(make_sample(f"{stem}_VG_{i}", image_ref, "ground", answer, ref.text, vary_templates=vary))
    samples += _object_samples(image, image_ref, stem, options)
    return samples


# ----------------------------------------------------------------------------- crops


@dataclass(frozen=True)
class CropWindow:
    """A crop of an image: top-left corner and size in pixels of the source image."""

    x_px: int
    y_px: int
    width_px: int
    height_px: int


def _starts(length: int, size: int, stride: int) -> list[int]:
    """Window starts covering ``[0, length)``; the last window is aligned to the end."""
    if length <= size:
        return [0]
    starts = list(range(0, length - size, stride))
    return starts + [length - size]


def crop_windows(width: int, height: int, size_px: int = 504, overlap_px: int = 64) -> list[CropWindow]:
    """Windows of ``size_px`` covering the whole image, neighbours overlapping by >= ``overlap_px``.

    Starts are ``0, s, 2s, ...`` with stride ``s = size_px - overlap_px`` and a last window
    flush with the right/bottom edge; an image side shorter than ``size_px`` is one window
    of that side's length.

    Raises:
        ValueError: ``overlap_px`` not in ``[0, size_px)``.
    """
    if not 0 <= overlap_px < size_px:
        raise ValueError(f"overlap_px must be in [0, {size_px}), got {overlap_px}")
    stride = size_px - overlap_px
    return [
        CropWindow(x, y, min(size_px, width), min(size_px, height))
        for y in _starts(height, size_px, stride)
        for x in _starts(width, size_px, stride)
    ]


def needs_crop(image: AnnotatedImage, size_px: int = 504) -> bool:
    """Whether the image is cropped: larger than ``size_px`` and annotated by objects only.

    Captions, questions, scene labels and referring expressions describe the whole image
    (``"on the left"``), so such images are kept whole.
    """
    whole_image_facts = image.captions or image.questions or image.scene_class or image.referring
    return (image.width > size_px or image.height > size_px) and not whole_image_facts


def _clip_object(obj: ObjectAnnotation, window: CropWindow, min_visible: float, min_side_px: float) -> ObjectAnnotation | None:
    """``obj`` in the crop's pixel frame, or ``None`` when too little of it is inside."""
    frame = box(window.x_px, window.y_px, window.x_px + window.width_px, window.y_px + window.height_px)
    shape = Polygon(obj.polygon_px) if obj.polygon_px and len(obj.polygon_px) >= 3 else box(*obj.box_px)
    if not shape.is_valid or shape.area <= 0:
        shape = box(*obj.box_px)
    inside = shape.intersection(frame)
    if inside.is_empty or inside.area < min_visible * shape.area:
        return None
    x1, y1, x2, y2 = inside.bounds
    if min(x2 - x1, y2 - y1) < min_side_px:
        return None
    dx, dy = window.x_px, window.y_px
    polygon = None
    if obj.polygon_px and isinstance(inside, Polygon):
        polygon = tuple((x - dx, y - dy) for x, y in list(inside.exterior.coords)[:-1])
    return replace(obj, box_px=(x1 - dx, y1 - dy, x2 - dx, y2 - dy), polygon_px=polygon)


def crop_annotation(
    image: AnnotatedImage,
    window: CropWindow,
    image_path: str,
    *,
    min_visible: float = 0.5,
    min_side_px: float = 4.0,
) -> AnnotatedImage:
    """The objects of ``image`` that are visible in ``window``, in the crop's pixel frame.

    An object is kept when at least ``min_visible`` of its area (polygon where given, else
    box) lies inside and its clipped box is at least ``min_side_px`` on both sides; its box
    and polygon are clipped to the crop. Whole-image facts are not carried (see :func:`needs_crop`).

    Args:
        image: the full image's annotations.
        window: the crop in the full image's pixels.
        image_path: where the crop's pixels are stored.
    """
    objects = [c for o in image.objects if (c := _clip_object(o, window, min_visible, min_side_px)) is not None]
    return AnnotatedImage(
        image_path=image_path,
        width=window.width_px,
        height=window.height_px,
        objects=objects,
        source=f"{image.source}@{window.x_px},{window.y_px}",
    )


# ----------------------------------------------------------------------------- JSON(L)


def annotated_image_to_json(image: AnnotatedImage, relative_to: Path | None = None) -> dict:
    """A JSON-ready dict of ``image`` (``image_path`` made relative to ``relative_to`` if given)."""
    record = asdict(image)
    if relative_to is not None:
        record["image_path"] = Path(image.image_path).resolve().relative_to(Path(relative_to).resolve()).as_posix()
    return record


def annotated_image_from_json(record: dict, base_dir: Path | None = None) -> AnnotatedImage:
    """Inverse of :func:`annotated_image_to_json` (a relative ``image_path`` is joined to ``base_dir``).

    Raises:
        ValueError: a missing or malformed field.
    """
    try:
        objects = [
            ObjectAnnotation(
                label=o["label"],
                box_px=tuple(float(v) for v in o["box_px"]),
                polygon_px=tuple(tuple(map(float, p)) for p in o["polygon_px"]) if o.get("polygon_px") else None,
                colour=o.get("colour"),
                difficult=bool(o.get("difficult", False)),
                attributes=dict(o.get("attributes") or {}),
            )
            for o in record.get("objects", [])
        ]
        path = Path(record["image_path"])
        return AnnotatedImage(
            image_path=str(base_dir / path if base_dir is not None and not path.is_absolute() else path),
            width=int(record["width"]),
            height=int(record["height"]),
            objects=objects,
            scene_class=record.get("scene_class"),
            captions=list(record.get("captions", [])),
            referring=[ReferringExpression(r["text"], int(r["object_index"])) for r in record.get("referring", [])],
            questions=[QuestionAnswer(q["question"], q["answer"], q.get("kind", "")) for q in record.get("questions", [])],
            source=record.get("source", ""),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"not an annotated image record ({type(err).__name__}: {err})") from None


def write_jsonl(path: Path, records: Iterable[dict]) -> int:
    """Write one JSON object per line; returns the number written."""
    count = 0
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line of a JSONL file.

    Raises:
        JsonlError: a line that is not a JSON object, naming file and line.
        FileNotFoundError: no such file.
    """
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise JsonlError(f"{path}:{number}: invalid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(record, dict):
                raise JsonlError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            yield number, record


def read_samples(path: Path) -> Iterator[InstructionSample]:
    """The samples of a JSONL file, validated.

    Raises:
        JsonlError: invalid JSON or an invalid sample, naming file and line.
    """
    for number, record in read_jsonl(path):
        try:
            yield InstructionSample.from_json(record, where=f"{path}:{number}")
        except ValueError as err:
            raise JsonlError(str(err)) from None

