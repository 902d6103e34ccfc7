"""Instruction JSONL -> tokenised training samples, and the padding collator.

A JSONL line (DESIGN.md section 6)::

    {"id", "image", "task": "SC|IC|VQA|VG|OC", "granularity": "global|local",
     "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}]}

``image`` is relative to the JSONL file's folder. Broken lines are reported with
their line number and skipped. Labels are -100 everywhere except the tokens of
the assistant answers (each answer's closing ``</s>`` included), so the loss is
computed on answer tokens only (paper eq. 6).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from skymoe.prompts import TASK_IDS, TASKS, render_conversation, task_of_code, without_image

__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "InstructionRecord",
    "BadLine",
    "read_instruction_jsonl",
    "answer_char_spans",
    "answer_token_labels",
    "encode_sample",
    "InstructionDataset",
    "PaddingCollator",
]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label value that the cross-entropy loss ignores."""

_GRANULARITIES = ("global", "local")


class DataError(ValueError):
    """An instruction file cannot be used (unreadable, no valid line, tokenisation mismatch)."""


@dataclass(frozen=True)
class InstructionRecord:
    """One valid JSONL line.

    Attributes:
        id: the sample id.
        image_path: absolute path of the image.
        task: task key of :data:`skymoe.TASKS` (``"count"``, ...).
        granularity: ``"global"`` or ``"local"``.
        turns: ``(user_text, assistant_text)`` pairs; the first user text keeps ``<image>``.
        source: ``"file.jsonl:LINE"`` for messages.
    """

    id: str
    image_path: Path
    task: str
    granularity: str
    turns: tuple[tuple[str, str], ...]
    source: str

    @property
    def prompt(self) -> str:
        """The first user message without its ``<image>`` line (as from ``build_prompt``)."""
        return without_image(self.turns[0][0])

    @property
    def answer(self) -> str:
        """The first assistant answer (the reference at evaluation)."""
        return self.turns[0][1]


@dataclass(frozen=True)
class BadLine:
    """A skipped JSONL line and why."""

    line_no: int
    reason: str


def read_instruction_jsonl(path: str | Path,
                           check_images: bool = True) -> tuple[list[InstructionRecord], list[BadLine]]:
    """Read an instruction JSONL file, skipping (and logging) broken lines.

    Args:
        path: the JSONL file.
        check_images: also skip lines whose image file does not exist.

    Returns:
        ``(records, bad_lines)``; line numbers are 1-based.

    Raises:
        DataError: the file cannot be read or holds no valid line.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read instruction file {path}: {exc}") from exc
    records: list[InstructionRecord] = []
    bad: list[BadLine] = []
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(_parse_line(line, path, line_no, check_images))
        except ValueError as exc:
            bad.append(BadLine(line_no, str(exc)))
            logger.warning("%s:%d skipped: %s", path, line_no, exc)
    if bad:
        logger.warning("%s: skipped %d broken line(s) of %d: lines %s", path, len(bad),
                       len(bad) + len(records), ", ".join(str(b.line_no) for b in bad[:20]))
    if not records:
        raise DataError(f"{path}: no valid sample ({len(bad)} broken line(s); first: "
                        f"{bad[0].line_no}: {bad[0].reason})" if bad else f"{path}: the file is empty")
    return records, bad


def _parse_line(line: str, path: Path, line_no: int, check_images: bool) -> InstructionRecord:
    """One JSONL line -> record; ValueError saying what is wrong."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in ("id", "image", "task", "conversations") if k not in obj]
    if missing:
        raise ValueError(f"missing key(s) {missing}")
    task = task_of_code(str(obj["task"]))
    granularity = obj.get("granularity", TASKS[task].granularity)
    if granularity not in _GRANULARITIES:
        raise ValueError(f"granularity {granularity!r} is not one of {list(_GRANULARITIES)}")
    image_path = (path.parent / str(obj["image"])).resolve()
    if check_images and not image_path.is_file():
        raise ValueError(f"image {obj['image']!r} not found (looked for {image_path})")
    return InstructionRecord(
        id=str(obj["id"]), image_path=image_path, task=task, granularity=granularity,
        turns=_parse_turns(obj["conversations"]), source=f"{path.name}:{line_no}",
    )


def _parse_turns(conversations: object) -> tuple[tuple[str, str], ...]:
    """``[{"from": "human"|"gpt", "value"}...]`` -> ``((user, answer), ...)``."""
    if not isinstance(conversations, list) or not conversations or len(conversations) % 2:
        raise ValueError("conversations must be a non-empty list of alternating human/gpt messages")
    turns = []
    for i in range(0, len(conversations), 2):
        human, gpt = conversations[i], conversations[i + 1]
        for j, msg, role in ((i, human, "human"), (i + 1, gpt, "gpt")):
            if not isinstance(msg, dict) or msg.get("from") != role or not isinstance(msg.get("value"), str):
                raise ValueError(f'conversations[{j}] must be {{"from": "{role}", "value": "..."}}, '
                                 f"got {msg!r}"[:300])
        if not gpt["value"].strip():
            raise ValueError(f"conversations[{i + 1}]: empty answer")
        turns.append((human["value"], gpt["value"]))
    if "<image>" not in turns[0][0]:
        raise ValueError("the first human message must start with '<image>\\n'")
    return tuple(turns)


def answer_char_spans(turns: Sequence[tuple[str, str]],
                      image_after_question: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each answer in it.

    Each span runs from just after ``"ASSISTANT:"`` to the end of the answer's ``</s>``.
    ``image_after_question``: the model's layout (:func:`skymoe.render_conversation`).

    Returns:
        ``(text, [(start, end), ...])`` with half-open character offsets into ``text``.
    """
    layout = {"image_after_question": image_after_question}
    text = render_conversation(list(turns), add_generation_prompt=False, **layout)
    spans = []
    for i, (user, _) in enumerate(turns):
        prefix = render_conversation([*turns[:i], (user, None)], add_generation_prompt=True, **layout)
        upto = render_conversation(list(turns[: i + 1]), add_generation_prompt=False, **layout)
        if not (upto.startswith(prefix) and text.startswith(upto)):
            raise DataError("render_conversation is not prefix-stable; cannot locate the answer tokens")
        spans.append((len(prefix), len(upto)))
    return text, spans


def answer_token_labels(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` (``<image>`` as one token) and labels that keep answer tokens."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"{type(tokenizer).__name__} is not a fast tokenizer; offsets are needed to find answer tokens")
    enc = tokenizer(text, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    for t, (start, end) in enumerate(enc["offset_mapping"]):
        if end > start and any(s <= start and end <= e for s, e in spans):
            labels[t] = ids[t]
    return ids, labels


def _expand_image_labels(ids: list[int], labels: list[int], full_ids: list[int], image_token_id: int,
                         source: str) -> list[int]:
    """Labels aligned to the processor's ids, where each ``<image>`` became a run of image tokens."""
    out: list[int] = []
    j = 0
    for t, tok in enumerate(full_ids):
        if tok == image_token_id and t > 0 and full_ids[t - 1] == image_token_id:
            out.append(IGNORE_INDEX)
            continue
        if j >= len(ids) or ids[j] != tok:
            raise DataError(f"{source}: processor ids and tokenizer ids disagree at position {t}; "
                            "the processor must only expand <image> into image tokens")
        out.append(labels[j] if tok != image_token_id else IGNORE_INDEX)
        j += 1
    if j != len(ids):
        raise DataError(f"{source}: processor dropped {len(ids) - j} token(s) of the text")
    return out


def encode_sample(record: InstructionRecord, processor, max_length: int,
                  image_after_question: bool = False) -> dict[str, torch.Tensor]:
    """Tokenise one record with its image, rendered in the model's layout (``image_after_question``).

    Returns:
        ``input_ids (seq,)``, ``attention_mask (seq,)``, ``labels (seq,)`` (-100 except
        answer tokens), ``pixel_values (3, H, W)`` float, ``task_ids ()`` index into
        :data:`skymoe.TASK_IDS`.

    Raises:
        DataError: the image cannot be read, or the image tokens do not fit in ``max_length``.
    """
    text, spans = answer_char_spans(record.turns, image_after_question)
    try:
        with Image.open(record.image_path) as img:
            image = img.convert("RGB")
    except OSError as exc:
        raise DataError(f"{record.source}: cannot read image {record.image_path}: {exc}") from exc
    ids, labels = answer_token_labels(processor.tokenizer, text, spans)
    batch = processor(images=image, text=text, return_tensors="pt")
    full_ids = batch["input_ids"][0].tolist()
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    full_labels = _expand_image_labels(ids, labels, full_ids, image_token_id, record.source)
    if len(full_ids) > max_length:
        last_image = max(i for i, tok in enumerate(full_ids) if tok == image_token_id)
        if last_image >= max_length:
            raise DataError(f"{record.source}: image tokens end at {last_image + 1} > max_length {max_length}")
        logger.warning("%s: %d tokens truncated to max_length %d", record.source, len(full_ids), max_length)
        full_ids, full_labels = full_ids[:max_length], full_labels[:max_length]
    return {
        "input_ids": torch.tensor(full_ids, dtype=torch.long),
        "attention_mask": torch.ones(len(full_ids), dtype=torch.long),
        "labels": torch.tensor(full_labels, dtype=torch.long),
        "pixel_values": batch["pixel_values"][0],
        "task_ids": torch.tensor(TASK_IDS.index(record.task), dtype=torch.long),
    }


class InstructionDataset(torch.utils.data.Dataset):
    """Records of an instruction JSONL, tokenised lazily (one sample per index).

    ``image_after_question`` is the layout of the model being trained (its config's field).
    """

    def __init__(self, records: Sequence[InstructionRecord], processor, max_length: int = 2048,
                 image_after_question: bool = False) -> None:
        self.records = list(records)
        self.processor = processor
        self.max_length = max_length
        self.image_after_question = image_after_question

    @classmethod
    def from_jsonl(cls, path: str | Path, processor, max_length: int = 2048,
                   image_after_question: bool = False) -> InstructionDataset:
        """Read ``path`` (broken lines skipped and logged) into a dataset."""
        records, _ = read_instruction_jsonl(path)
        return cls(records, processor, max_length, image_after_question)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return encode_sample(self.records[index], self.processor, self.max_length, self.image_after_question)


@dataclass(frozen=True)
class PaddingCollator:
    """Right-pads samples of :func:`encode_sample` into a batch.

    Attributes:
        pad_token_id: id written into padded ``input_ids`` positions (masked out).
    """

    pad_token_id: int

    def __call__(self, samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Returns ``input_ids/attention_mask/labels (batch, max_seq)``, ``pixel_values
        (batch, 3, H, W)`` and ``task_ids (batch,)``."""
        length = max(s["input_ids"].shape[0] for s in samples)

        def pad(key: str, value: int) -> torch.Tensor:
            out = torch.full((len(samples), length), value, dtype=torch.long)
            for i, s in enumerate(samples):
                out[i, : s[key].shape[0]] = s[key]
            return out

        return {
            "input_ids": pad("input_ids", self.pad_token_id),
            "attention_mask": pad("attention_mask", 0),
            "labels": pad("labels", IGNORE_INDEX),
            "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
            "task_ids": torch.stack([s["task_ids"] for s in samples]),
        }
