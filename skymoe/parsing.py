"""Reading model answers back into values: boxes in tile pixels, counts, class names.

:func:`parse_answer` never raises on model text: it returns what it could read and lists
every problem in :attr:`ParsedAnswer.issues` as a readable sentence.

Box syntax (GeoChat's, see :mod:`skymoe.prompts`): ``{<x1><y1><x2><y2>|<theta>}`` with
values on a **0-100 grid** of the tile (percent of the tile's width / height; 0 = left or
top edge, 100 = right or bottom edge). Tolerated variants:

- missing ``|<theta>`` (angle 0), spaces and commas inside: ``{<10>, <20>, <30>, <40>}``,
  ``{10 20 30 40|5}``;
- the four ``<x1><y1><x2><y2>`` values without braces;
- bracket lists ``[x1, y1, x2, y2]`` (brackets with another number of values, such as the
  ``[refer]`` tag, are not boxes and are skipped silently);
- **0-1 fractions**: a box whose four values all lie in 0..1 and are written with a decimal
  point (``[0.12, 0.30, 0.56, 0.71]``, Shikra/Qwen style) is read as fractions of the tile
  and multiplied by 100 (noted in issues). Integer values are always grid values, so
  ``{<0><0><1><1>}`` is a 1 % box.

Each box is then fixed up in this order: values outside 0..100 are clamped (issue),
reversed corners are swapped (issue), zero-area boxes are dropped (issue), and the grid
values are scaled to tile pixels: ``x_px = x_grid / 100 * tile_width_px`` (same for y with
the height), so ``Box`` holds pixel corners in the tile's frame (x right, y down).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from numbers import Real

from skymoe.prompts import TASK_IDS

__all__ = ["Box", "ParsedAnswer", "parse_answer"]

logger = logging.getLogger(__name__)

TileSize = int | tuple[int, int]

_NUM = r"[-+]?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?"
_NUM_RE = re.compile(_NUM)
_BRACE_RE = re.compile(r"\{[^{}]*\}")
_BARE_RE = re.compile(rf"(?:<\s*{_NUM}\s*>[\s,]*){{3}}<\s*{_NUM}\s*>(?:\s*\|\s*<?\s*{_NUM}\s*>?)?")
_BRACKET_RE = re.compile(r"\[[^\[\]]*\]")
_MAX_COUNT_DIGITS = 9
_MAX_TILE_PX = 1e9

_UNITS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen "
    "fourteen fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
_NUMBER_WORDS = {w: i for i, w in enumerate(_UNITS)} | {w: 20 + 10 * i for i, w in enumerate(_TENS)}
_SCALE_WORDS = {"hundred": 100, "thousand": 1000}
_NONE_WORDS = {"no", "none", "nothing"}
_WORD_OR_NUMBER_RE = re.compile(r"[0-9]+(?:\.[0-9]+)?|[^\W\d_]+")

# Phrases before a class name ("This is a tennis court." -> "tennis court"), stripped repeatedly.
_LABEL_PREFIXES = [
    re.compile(p + r"(?:\s+|$)")
    for p in (
        r"(?:the|this)\s+(?:scene|image|picture|photo)\s+(?:is|shows|depicts|contains|belongs\s+to)",
        r"(?:the\s+)?(?:class|category|label|answer)\s+is",
        r"(?:this|it|that)\s+is",
        r"it's",
        r"(?:an?|the)",
        r"(?:an?\s+)?(?:aerial\s+|satellite\s+)?(?:image|picture|photo|view|scene)\s+of",
        r"(?:the\s+)?(?:class|category|label|answer|scene)\s*:",
    )
]
_ANSWER_PREFIX_RE = re.compile(r"^(?:the\s+)?answer\s*(?:is|:)\s*")


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in tile pixels (x right, y down; corners, ``x1 < x2``, ``y1 < y2``).

    Attributes:
        x1_px, y1_px: top-left corner in pixels of the tile.
        x2_px, y2_px: bottom-right corner in pixels of the tile.
        angle_deg: the answer's ``theta``: rotation about the box centre in degrees, positive =
            clockwise on screen (x right, y down); 0 where none was given.
    """

    x1_px: float
    y1_px: float
    x2_px: float
    y2_px: float
    angle_deg: float = 0.0

    @property
    def xyxy_px(self) -> tuple[float, float, float, float]:
        """``(x1_px, y1_px, x2_px, y2_px)``."""
        return (self.x1_px, self.y1_px, self.x2_px, self.y2_px)


@dataclass
class ParsedAnswer:
    """What :func:`parse_answer` read from one answer.

    Attributes:
        task: the task key it was parsed as (as given, even if unknown).
        text: the raw answer text.
        answer: the readable answer: the caption, the class label, the normalised VQA
            answer, the count as digits, or for grounding the text left around the boxes.
        boxes: boxes read (grounding and counting), in tile pixels.
        count: the count (counting only), ``None`` where none could be read.
        label: the normalised class name (classification only).
        issues: one readable sentence per problem met; empty for a clean answer.
    """

    task: str
    text: str
    answer: str = ""
    boxes: list[Box] = field(default_factory=list)
    count: int | None = None
    label: str | None = None
    issues: list[str] = field(default_factory=list)


def parse_answer(task: str, text: str, tile_size: TileSize) -> ParsedAnswer:
    """Parse a model answer for ``task``; never raises.

    Args:
        task: a task key (``"caption"``, ``"classify"``, ``"vqa"``, ``"ground"``, ``"count"``).
            An unknown task yields the stripped text as answer and an issue.
        text: the generated answer (special tokens such as ``</s>`` are tolerated).
        tile_size: the tile's size in pixels, ``int`` (square) or ``(width, height)``;
            boxes are scaled from the 0-100 grid to it.

    Returns:
        A :class:`ParsedAnswer`; problems are listed in its ``issues``.
    """
    try:
        return _parse(task, text, tile_size)
    except Exception as exc:  # never raise on model output; report instead
        logger.exception("parse_answer failed for task %r on %r", task, text)
        return ParsedAnswer(task=str(task), text=str(text), issues=[f"internal parser error: {exc!r}"])


def _parse(task: str, text: str, tile_size: TileSize) -> ParsedAnswer:
    """:func:`parse_answer` without the safety net."""
    issues: list[str] = []
    if not isinstance(text, str):
        issues.append(f"answer is not a string but {type(text).__name__}; read as empty")
        text = ""
    key = task if isinstance(task, str) else None
    parsed = ParsedAnswer(task=key if key is not None else _short(task), text=text, issues=issues)
    body = text.strip()
    if body.endswith("</s>"):
        body = body.removesuffix("</s>").rstrip()
        issues.append("removed a trailing '</s>' end-of-sequence token")
    if not body:
        issues.append("empty answer")
    if key in ("ground", "count"):
        parsed.boxes, body = _read_boxes(body, tile_size, issues)
    if key == "ground":
        parsed.answer = " ".join(body.split())
        if not parsed.boxes:
            issues.append("no valid box found in the grounding answer")
    elif key == "count":
        parsed.count = _read_count(body, len(parsed.boxes), issues)
        parsed.answer = "" if parsed.count is None else str(parsed.count)
    elif key == "classify":
        parsed.label = _normalise_label(body) or None
        parsed.answer = parsed.label or ""
        if body and parsed.label is None:
            issues.append(f"no class name left in {_short(body)} after removing prefixes")
    elif key == "vqa":
        parsed.answer = _normalise_short_answer(body)
        if body and not parsed.answer:
            issues.append(f"no answer left in {_short(body)} after normalising")
    elif key == "caption":
        parsed.answer = body
    else:
        parsed.answer = body
        allowed = ", ".join(TASK_IDS)
        issues.append(f"unknown task {_short(task)}; allowed tasks: {allowed}; kept the text as answer")
    return parsed


def _short(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to about ``limit`` characters, for issue messages."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...(" + str(len(text)) + " chars)"


def _tile_wh(tile_size: TileSize) -> tuple[float, float] | None:
    """``(width_px, height_px)`` of ``tile_size``, or ``None`` unless one or two numbers in [1, 1e9]."""
    sizes = tile_size if isinstance(tile_size, (tuple, list)) else (tile_size, tile_size)
    ok = len(sizes) == 2 and all(
        isinstance(s, Real) and not isinstance(s, bool) and 1 <= s <= _MAX_TILE_PX for s in sizes
    )
    return (float(sizes[0]), float(sizes[1])) if ok else None


def _box_spans(body: str) -> list[tuple[int, int]]:
    """``(start, end)`` of every box-like span in ``body``, in text order.

    Spans are ``{...}`` (innermost braces), ``<x1><y1><x2><y2>`` outside braces, and
    ``[...]`` holding exactly four numbers.
    """
    spans = [m.span() for m in _BRACE_RE.finditer(body)]
    masked = list(body)
    for start, end in spans:
        masked[start:end] = " " * (end - start)
    rest = "".join(masked)
    spans += [m.span() for m in _BARE_RE.finditer(rest)]
    spans += [
        m.span()
        for m in _BRACKET_RE.finditer(rest)
        if len(_NUM_RE.findall(m.group(0))) == 4 and not _BARE_RE.search(m.group(0))
    ]
    return sorted(spans)


def _read_boxes(body: str, tile_size: TileSize, issues: list[str]) -> tuple[list[Box], str]:
    """Boxes of ``body`` in tile pixels, and ``body`` with the box spans removed."""
    wh = _tile_wh(tile_size)
    spans = _box_spans(body)
    if wh is None and spans:
        issues.append(
            f"tile_size {_short(tile_size)} is not a size in pixels "
            "(int or (width, height), 1..1e9); boxes dropped"
        )
    boxes: list[Box] = []
    for number, (start, end) in enumerate(spans, start=1):
        box = _read_one_box(body[start:end], number, wh, issues)
        if box is not None:
            boxes.append(box)
    pieces, last = [], 0
    for start, end in spans:
        pieces.append(body[last:start])
        last = end
    pieces.append(body[last:])
    return boxes, " ".join("".join(pieces).split())


def _read_one_box(raw: str, number: int, wh: tuple[float, float] | None, issues: list[str]) -> Box | None:
    """One box span read into a :class:`Box` in pixels, or ``None`` (with an issue) if unusable."""
    where = f"box {number} {_short(raw)}"
    coords_part, bar, angle_part = raw.partition("|")
    tokens = _NUM_RE.findall(coords_part)
    if len(tokens) != 4:
        issues.append(f"{where}: expected 4 numbers x1 y1 x2 y2, found {len(tokens)}; skipped")
        return None
    grid = [float(t) for t in tokens]
    if all(0.0 <= v <= 1.0 for v in grid) and any("." in t for t in tokens):
        grid = [v * 100.0 for v in grid]
        issues.append(f"{where}: values in 0-1 read as fractions of the tile")
    for i, value in enumerate(grid):
        if not 0.0 <= value <= 100.0:
            grid[i] = min(max(value, 0.0), 100.0)
            issues.append(f"{where}: value {tokens[i]} outside the 0-100 grid, clamped to {grid[i]:g}")
    x1, y1, x2, y2 = grid
    if x1 > x2 or y1 > y2:
        x1, x2, y1, y2 = min(x1, x2), max(x1, x2), min(y1, y2), max(y1, y2)
        issues.append(f"{where}: reversed corners swapped")
    if x1 == x2 or y1 == y2:
        issues.append(f"{where}: zero area after clamping; dropped")
        return None
    angle = _read_angle(angle_part, bool(bar), where, issues)
    if wh is None:
        return None
    width_px, height_px = wh
    x1_px, x2_px = (min(v * width_px / 100, width_px) for v in (x1, x2))  # min: float rounding at 100
    y1_px, y2_px = (min(v * height_px / 100, height_px) for v in (y1, y2))
    return Box(x1_px, y1_px, x2_px, y2_px, angle)


def _read_angle(angle_part: str, has_bar: bool, where: str, issues: list[str]) -> float:
    """The ``|<theta>`` angle in degrees; 0 where absent or unreadable (unreadable noted)."""
    tokens = _NUM_RE.findall(angle_part)
    if not tokens:
        if has_bar:
            issues.append(f"{where}: no angle after '|'; angle 0")
        return 0.0
    angle = float(tokens[0])
    if not math.isfinite(angle):
        issues.append(f"{where}: angle {tokens[0]} is not finite; angle 0")
        return 0.0
    return angle


def _words_value(words: list[str]) -> int:
    """The value of a run of English number words (``["twenty", "one"]`` -> 21)."""
    total, current = 0, 0
    for word in words:
        if word in _SCALE_WORDS:
            scale = _SCALE_WORDS[word]
            if scale == 1000:
                total += max(current, 1) * 1000
                current = 0
            else:
                current = max(current, 1) * scale
        else:
            current += _NUMBER_WORDS[word]
    return total + current


def _numbers_in(text: str, issues: list[str]) -> list[int]:
    """Every number written in ``text`` (digits or English words), in text order."""
    numbers: list[int] = []
    run: list[str] = []
    for match in _WORD_OR_NUMBER_RE.finditer(text.lower()):
        token = match.group(0)
        if token in _NUMBER_WORDS or token in _SCALE_WORDS:
            run.append(token)
            continue
        if token == "and" and run and run[-1] in _SCALE_WORDS:  # "one hundred and five"
            continue
        if run:
            numbers.append(_words_value(run))
            run = []
        if token[0] in "0123456789":
            whole = token.split(".")[0]
            if len(whole) > _MAX_COUNT_DIGITS:
                issues.append(f"number {_short(token, 20)} is implausibly large; ignored")
                continue
            value = float(token)
            if value != int(value):
                issues.append(f"number {token} is not a whole count; rounded to {round(value)}")
            numbers.append(int(round(value)))
    if run:
        numbers.append(_words_value(run))
    return numbers


def _read_count(body: str, n_boxes: int, issues: list[str]) -> int | None:
    """The count stated in ``body`` (box spans already removed), else the number of boxes."""
    numbers = _numbers_in(body, issues)
    if numbers:
        if len(set(numbers)) > 1:
            issues.append(f"several numbers {numbers}; took the first, {numbers[0]}")
        if n_boxes and numbers[0] != n_boxes:
            issues.append(f"stated count {numbers[0]} differs from the {n_boxes} boxes given; kept {numbers[0]}")
        return numbers[0]
    if n_boxes:
        return n_boxes
    words = set(re.findall(r"[^\W\d_]+", body.lower()))
    if words & _NONE_WORDS:
        return 0
    issues.append(f"no count found in {_short(body)}")
    return None


def _normalise_label(body: str) -> str:
    """A class name from a classification answer: first sentence, lower case, no prefix or punctuation.

    ``"This is a Tennis-Court."`` -> ``"tennis court"``.
    """
    first = next((part for part in re.split(r"[\n.;!?]", body) if part.strip()), "")
    label = " ".join(first.lower().replace("_", " ").replace("-", " ").split())
    stripped = True
    while label and stripped:
        stripped = False
        for prefix in _LABEL_PREFIXES:
            match = prefix.match(label)
            if match:
                label, stripped = label[match.end() :], True
                break
    return " ".join(re.sub(r"[^\w\s]", " ", label).replace("_", " ").split())


def _normalise_short_answer(body: str) -> str:
    """A VQA answer for exact-match scoring: lower case, no prefix, punctuation or article.

    A leading yes/no becomes just ``"yes"`` / ``"no"``; an answer made only of number words
    becomes digits (``"Three."`` -> ``"3"``).
    """
    answer = _ANSWER_PREFIX_RE.sub("", " ".join(body.lower().split()))
    yes_no = re.match(r"(yes|no)\b", answer)
    if yes_no:
        return yes_no.group(1)
    answer = answer.strip(" \t\"'`.,;:!?")
    answer = re.sub(r"^(?:an?|the)\s+", "", answer)
    words = answer.replace("-", " ").split()
    if words and all(w in _NUMBER_WORDS or w in _SCALE_WORDS for w in words):
        return str(_words_value(words))
    return answer
