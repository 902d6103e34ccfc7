"""Task prompts, the Vicuna-v1 conversation format and the answer-side formatters.

One table (:data:`TASKS`) holds the five SkyMoE tasks: their JSONL code, the GeoChat-style
tag that starts every user message, the granularity and the instruction templates (the
first template is the canonical one used at inference; the others vary training data).

Answers follow GeoChat's conventions so GeoChat-style outputs parse
(:mod:`skymoe.parsing` reads them back):

- boxes: ``{<x1><y1><x2><y2>|<theta>}`` with integer values on a **0-100 grid** of the
  tile (0 = left/top edge, 100 = right/bottom edge, i.e. percent of the tile's width and
  height; pixel corners, not centres), ``theta`` the box's rotation about its centre in
  integer degrees, positive = clockwise on screen (x right, y down); several boxes are
  concatenated without separator.
- counts: a bare integer, e.g. ``"3"``.

This module imports nothing from the rest of :mod:`skymoe` (only :mod:`skymoe.parsing`
imports it), so it works before the model code exists.
"""

from __future__ import annotations

import logging
import math
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "TaskSpec",
    "TASKS",
    "TASK_IDS",
    "VICUNA_SYSTEM",
    "VICUNA_CHAT_TEMPLATE",
    "chat_template",
    "IMAGE_TOKEN",
    "build_prompt",
    "render_conversation",
    "without_image",
    "task_of_prompt",
    "code_of_task",
    "task_of_code",
    "format_boxes",
    "format_count",
]

logger = logging.getLogger(__name__)

Granularity = Literal["global", "local"]

IMAGE_TOKEN = "<image>"
"""Placeholder for the image in the first user turn; the processor expands it to N image tokens."""

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
"""LLaVA-1.5's Vicuna-v1 system line (``conv_vicuna_v1`` / ``conv_llava_v1``)."""


@dataclass(frozen=True)
class TaskSpec:
    """One task of the prompt table.

    Attributes:
        name: task key, one of ``TASK_IDS`` (``"caption"``, ``"classify"``, ...).
        code: the JSONL task code (``"IC"``, ``"SC"``, ``"VQA"``, ``"VG"``, ``"OC"``).
        tag: the tag that starts the user message, e.g. ``"[refer]"``.
        granularity: ``"global"`` (whole-image tasks) or ``"local"`` (object tasks); the
            default for the task (VQA data may say otherwise per sample).
        template: the canonical instruction, used at inference; ``{query}`` marks where
            the query goes for tasks that take one.
        alternatives: further phrasings of the same instruction, for training variety.
        query_kind: what the query is (``"a question"``, ...); ``None`` if the task takes none.
    """

    name: str
    code: str
    tag: str
    granularity: Granularity
    template: str
    alternatives: tuple[str, ...] = ()
    query_kind: str | None = None

    @property
    def templates(self) -> tuple[str, ...]:
        """All templates, the canonical one first."""
        return (self.template, *self.alternatives)

    @property
    def needs_query(self) -> bool:
        """Whether :func:`build_prompt` requires a query for this task."""
        return self.query_kind is not None


TASKS: dict[str, TaskSpec] = {
    "caption": TaskSpec(
        name="caption",
        code="IC",
        tag="[caption]",
        granularity="global",
        template="[caption] Describe the image in detail.",
        alternatives=(
            "[caption] Write a short description of this remote sensing image.",
            "[caption] What does this aerial image show? Describe it.",
        ),
    ),
    "classify": TaskSpec(
        name="classify",
        code="SC",
        tag="[classify]",
        granularity="global",
        template="[classify] Which scene does this image belong to?",
        alternatives=(
            "[classify] Classify the scene shown in this image.",
            "[classify] What type of scene is this? Answer with the class name.",
        ),
    ),
    "vqa": TaskSpec(
        name="vqa",
        code="VQA",
        tag="[vqa]",
        granularity="global",
        template="[vqa] {query} Answer the question using a single word or phrase.",
        alternatives=("[vqa] {query}",),
        query_kind="a question",
    ),
    "ground": TaskSpec(
        name="ground",
        code="VG",
        tag="[refer]",
        granularity="local",
        template="[refer] Where is <p>{query}</p>?",
        alternatives=(
            "[refer] Give the location of <p>{query}</p>.",
            "[refer] Locate <p>{query}</p> in the image.",
        ),
        query_kind="a referring expression",
    ),
    "count": TaskSpec(
        name="count",
        code="OC",
        tag="[count]",
        granularity="local",
        template="[count] How many {query} are there?",
        alternatives=(
            "[count] Count the {query} in this image.",
            "[count] What is the number of {query} in the image?",
        ),
        query_kind="a class name",
    ),
}
"""The five tasks by key. Every template starts with its task's tag."""

TASK_IDS: tuple[str, ...] = ("caption", "classify", "vqa", "ground", "count")
"""Fixed order of the task keys: ``TASK_IDS.index(task)`` is the router's task id.

Never reorder: checkpoints trained with ``router_mode="task"`` store one bias row per id.
"""

# GeoChat's grounded-description tag: its answers carry boxes, so they parse as grounding.
# GeoChat's ``[identify]`` (a region in, a class out) has no SkyMoE task: it maps to None.
_TAG_ALIASES = {"[grounding]": "ground"}
_TASK_OF_TAG = {spec.tag: name for name, spec in TASKS.items()} | _TAG_ALIASES
_TAG_RE = re.compile(r"\[[a-z]+\]", re.IGNORECASE)


def _spec(task: str) -> TaskSpec:
    """The :class:`TaskSpec` of ``task``; ValueError naming the allowed keys otherwise."""
    spec = TASKS.get(task) if isinstance(task, str) else None
    if spec is None:
        raise ValueError(f"unknown task {task!r}; allowed tasks: {', '.join(TASK_IDS)}")
    return spec


def build_prompt(task: str, query: str | None = None, *, template_index: int = 0) -> str:
    """The user message for ``task``, without the ``<image>`` line.

    Examples: ``build_prompt("count", "small vehicle")`` ->
    ``"[count] How many small vehicle are there?"``; ``build_prompt("ground", "the red car")``
    -> ``"[refer] Where is <p>the red car</p>?"``.

    Args:
        task: a task key of :data:`TASKS`.
        query: the question (vqa), referring expression (ground) or class name (count);
            stripped of surrounding whitespace. ``caption`` and ``classify`` take none: a
            query given to them is ignored with a logged warning (a UI may pass whatever
            its query box holds).
        template_index: which template of the task to use; 0 (the canonical one) at inference.

    Returns:
        The instruction text, starting with the task's tag.

    Raises:
        ValueError: unknown task, a missing or empty query where one is required, a query
            that is not a string, or a template index out of range.
    """
    spec = _spec(task)
    if not 0 <= template_index < len(spec.templates):
        raise ValueError(
            f"template_index {template_index} out of range for task {task!r}: "
            f"it has {len(spec.templates)} templates (0..{len(spec.templates) - 1})"
        )
    if query is not None and not isinstance(query, str):
        raise ValueError(f"query must be a string, got {type(query).__name__}: {query!r}")
    text = (query or "").strip()
    if spec.needs_query and not text:
        raise ValueError(f"task {task!r} needs {spec.query_kind} as query, got {query!r}")
    if not spec.needs_query and text:
        logger.warning("task %r takes no query; ignoring %r", task, query)
    template = spec.templates[template_index]
    return template.format(query=text) if spec.needs_query else template


def task_of_prompt(text: str) -> str | None:
    """The task key named by the first known tag in ``text`` (case-insensitive).

    ``text`` may be a bare user message, a message with the ``<image>`` line or a whole
    rendered conversation. GeoChat's ``[grounding]`` reads as ``"ground"``.

    Returns:
        The task key, or ``None`` where no known tag occurs (or ``text`` is not a string).
    """
    if not isinstance(text, str):
        return None
    for match in _TAG_RE.finditer(text):
        task = _TASK_OF_TAG.get(match.group(0).lower())
        if task is not None:
            return task
    return None


def code_of_task(task: str) -> str:
    """The JSONL code of a task key (``"ground"`` -> ``"VG"``); ValueError if unknown."""
    return _spec(task).code


def task_of_code(code: str) -> str:
    """The task key of a JSONL code (``"VG"`` -> ``"ground"``, case-insensitive); ValueError if unknown."""
    wanted = code.upper() if isinstance(code, str) else code
    for name, spec in TASKS.items():
        if spec.code == wanted:
            return name
    codes = ", ".join(TASKS[n].code for n in TASK_IDS)
    raise ValueError(f"unknown task code {code!r}; allowed codes: {codes}")


def render_conversation(
    turns: Sequence[tuple[str, str | None]],
    add_generation_prompt: bool = True,
    *,
    system: str = VICUNA_SYSTEM,
    image_after_question: bool = False,
) -> str:
    """Render turns as LLaVA-1.5's Vicuna-v1 text.

    The exact layout, separators spelled out (``␣`` is one space)::

        {system}␣USER:␣<image>\\n{q1}␣ASSISTANT:␣{a1}</s>USER:␣{q2}␣ASSISTANT:

    i.e. the system line and one space; each user turn as ``"USER: " + q + " "``; each
    answered assistant turn as ``"ASSISTANT: " + a + "</s>"`` (no space after ``</s>``);
    and, when the last turn has no answer and ``add_generation_prompt`` is true, a final
    ``"ASSISTANT:"`` with no trailing space. ``"<image>\\n"`` is put before the first user
    text unless that text already contains ``<image>`` (so JSONL human values, which carry
    it, render the same). :data:`VICUNA_CHAT_TEMPLATE` renders identical text.

    With ``image_after_question`` (a checkpoint's ``config.image_after_question``) the first
    user turn is ``"USER: " + q1 + "\\n<image> "`` instead: the ``<image>`` line a JSONL
    human value carries is moved after the question.

    Args:
        turns: ``(user_text, assistant_text_or_None)`` pairs; only the last answer may be None.
        add_generation_prompt: end with ``"ASSISTANT:"`` when the last answer is None.
        system: the system line.
        image_after_question: put the image after the first question, not before it.

    Returns:
        The prompt text (tokenize it with the BOS token added, as LLaVA does).

    Raises:
        ValueError: no turns, a non-string user text, or a None answer before the last turn.
    """
    if not turns:
        raise ValueError("render_conversation needs at least one (user, assistant) turn, got none")
    parts = [system, " "]
    for index, (user, assistant) in enumerate(turns):
        if not isinstance(user, str):
            raise ValueError(f"turn {index}: user text must be a string, got {type(user).__name__}")
        if assistant is None and index != len(turns) - 1:
            raise ValueError(f"turn {index}: only the last turn may lack an answer ({len(turns)} turns)")
        if index == 0:
            user = _place_image(user, image_after_question)
        parts.append(f"USER: {user} ")
        if assistant is not None:
            parts.append(f"ASSISTANT: {assistant}</s>")
        elif add_generation_prompt:
            parts.append("ASSISTANT:")
    return "".join(parts)


def without_image(user: str) -> str:
    """A user message without its ``<image>`` line (a JSONL human value -> the bare question), stripped."""
    return user.replace(f"{IMAGE_TOKEN}\n", "", 1).replace(IMAGE_TOKEN, "", 1).strip()


def _place_image(user: str, after_question: bool) -> str:
    """The first user text with its one ``<image>`` line before the question, or after it."""
    if not after_question:
        return user if IMAGE_TOKEN in user else f"{IMAGE_TOKEN}\n{user}"
    return f"{without_image(user)}\n{IMAGE_TOKEN}"


# Jinja for tokenizer/processor ``apply_chat_template``: the same text as
# render_conversation for messages [{"role": "system"|"user"|"assistant", "content": ...}].
# ``content`` is a string, or a list of {"type": "image"} / {"type": "text", "text": ...}
# items (processor style), where each image item writes "<image>\n" in place.
# Whitespace control ({%- -%}) makes it render the same with or without trim_blocks.
_FIRST_USER_IMAGE_BEFORE = (
    "{%- if ns.first_user and '<image>' not in content -%}"
    "{%- set content = '<image>\\n' + content -%}"
    "{%- endif -%}"
)
_FIRST_USER_IMAGE_AFTER = (
    "{%- if ns.first_user -%}"
    "{%- set content = (content.replace('<image>\\n', '', 1).replace('<image>', '', 1) | trim) + '\\n<image>' -%}"
    "{%- endif -%}"
)


def chat_template(image_after_question: bool = False) -> str:
    """The Jinja chat template rendering exactly :func:`render_conversation`'s text in a layout."""
    first_user = _FIRST_USER_IMAGE_AFTER if image_after_question else _FIRST_USER_IMAGE_BEFORE
    return (
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] -%}{%- set messages = messages[1:] -%}"
        "{%- else -%}"
        "{%- set system = '" + VICUNA_SYSTEM.replace("'", "\\'") + "' -%}"
        "{%- endif -%}"
        "{{- system + ' ' -}}"
        "{%- set ns = namespace(first_user=true) -%}"
        "{%- for message in messages -%}"
        "{%- if message['content'] is string -%}"
        "{%- set content = message['content'] -%}"
        "{%- else -%}"
        "{%- set content = namespace(text='') -%}"
        "{%- for item in message['content'] -%}"
        "{%- if item['type'] == 'image' -%}{%- set content.text = content.text + '<image>\\n' -%}"
        "{%- elif item['type'] == 'text' -%}{%- set content.text = content.text + item['text'] -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- set content = content.text -%}"
        "{%- endif -%}"
        "{%- if message['role'] == 'user' -%}"
        + first_user +
        "{%- set ns.first_user = false -%}"
        "{{- 'USER: ' + content + ' ' -}}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{{- 'ASSISTANT: ' + content + '</s>' -}}"
        "{%- else -%}"
        "{{- raise_exception('unsupported role ' + message['role'] + '; use system, user or assistant') -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt and messages and messages[-1]['role'] == 'user' -%}"
        "{{- 'ASSISTANT:' -}}"
        "{%- endif -%}"
    )


VICUNA_CHAT_TEMPLATE = chat_template()
"""Jinja chat template rendering exactly :func:`render_conversation`'s text (image first)."""


def _grid_value(value: float, what: str) -> int:
    """``value`` on the 0-100 grid rounded to an int; ValueError if non-finite or off the grid."""
    value = float(value)
    if not math.isfinite(value) or not 0.0 <= value <= 100.0:
        raise ValueError(f"{what} = {value!r} is not on the 0-100 grid (percent of the tile)")
    return int(round(value))


def _format_one_box(box: Sequence[float], angle: float, index: int) -> str:
    """One box as ``{<x1><y1><x2><y2>|<theta>}``; see :func:`format_boxes`."""
    if len(box) != 4:
        raise ValueError(f"box {index}: expected (x1, y1, x2, y2), got {len(box)} values: {box!r}")
    x1, y1, x2, y2 = (_grid_value(v, f"box {index} {n}") for v, n in zip(box, ("x1", "y1", "x2", "y2")))
    if x1 > x2 or y1 > y2:
        raise ValueError(f"box {index}: corners reversed (x1 <= x2 and y1 <= y2 required): {box!r}")
    # A box thinner than one grid unit would round to zero width; keep it one unit wide.
    if x1 == x2:
        x1, x2 = (x1, x1 + 1) if x1 < 100 else (99, 100)
    if y1 == y2:
        y1, y2 = (y1, y1 + 1) if y1 < 100 else (99, 100)
    theta = float(angle)
    if not math.isfinite(theta):
        raise ValueError(f"box {index}: angle {angle!r} is not finite")
    return f"{{<{x1}><{y1}><{x2}><{y2}>|<{int(round(theta))}>}}"


def format_boxes(
    boxes_norm100: Sequence[Sequence[float]],
    angles: Sequence[float] | None = None,
) -> str:
    """Boxes in GeoChat syntax, concatenated: ``{<x1><y1><x2><y2>|<theta>}{...}``.

    Args:
        boxes_norm100: ``(x1, y1, x2, y2)`` per box on the 0-100 grid of the tile
            (``x_norm100 = x_px / tile_width_px * 100``), ``x1 <= x2``, ``y1 <= y2``.
            Values are rounded to integers; a box narrower than one grid unit after
            rounding is widened to one unit so it stays a box.
        angles: rotation in degrees per box (rounded to integers); ``None`` writes 0.

    Returns:
        The answer text; ``""`` for no boxes.

    Raises:
        ValueError: a value off the 0-100 grid or not finite, reversed corners, a box
            without 4 values, or ``angles`` of another length than ``boxes_norm100``.
    """
    if angles is not None and len(angles) != len(boxes_norm100):
        raise ValueError(f"got {len(angles)} angles for {len(boxes_norm100)} boxes; give one per box or None")
    thetas = angles if angles is not None else [0.0] * len(boxes_norm100)
    return "".join(_format_one_box(box, theta, i) for i, (box, theta) in enumerate(zip(boxes_norm100, thetas)))


def format_count(n: int) -> str:
    """A count answer: the integer as digits, e.g. ``format_count(3) == "3"``.

    Raises:
        ValueError: ``n`` is not an integer (bools and floats included) or is negative.
    """
    if isinstance(n, bool):
        raise ValueError(f"count must be an integer, got bool {n!r}")
    try:
        value = operator.index(n)
    except TypeError:
        raise ValueError(f"count must be an integer, got {type(n).__name__} {n!r}") from None
    if value < 0:
        raise ValueError(f"count must be >= 0, got {value}")
    return str(value)
