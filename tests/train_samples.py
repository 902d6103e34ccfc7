"""Test helper for the train tests: a small instruction JSONL with real PNG images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

import skymoe

__all__ = ["instruction_line", "write_instruction_jsonl"]


def instruction_line(sample_id: str, image: str, task: str, query: str | None, answer: str) -> str:
    """One JSONL line for task key ``task`` with the canonical prompt (``<image>\\n`` first)."""
    spec = skymoe.TASKS[task]
    human = "<image>\n" + skymoe.build_prompt(task, query)
    return json.dumps({"id": sample_id, "image": image, "task": spec.code, "granularity": spec.granularity,
                       "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]})


def write_instruction_jsonl(root: Path, items: list[tuple[str, str | None, str]], size_px: int = 56,
                            name: str = "data.jsonl") -> Path:
    """Write ``root/img/{i}.png`` (random pixels, seed 0) and one line per ``(task, query, answer)``."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i, (task, query, answer) in enumerate(items):
        Image.fromarray(rng.integers(0, 255, (size_px, size_px, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
        lines.append(instruction_line(f"s{i}", f"img/{i}.png", task, query, answer))
    path = root / name
    path.write_text("\n".join(lines) + "\n")
    return path
