"""Caption JSON in the ``dataset_*.json`` layout (UCM-Captions, Sydney-Captions, RSICD) -> AnnotatedImage.

The layout (Karpathy-style, as the datasets distribute it)::

    {"images": [{"filename": "1.tif", "imgid": 0, "split": "train",
                 "sentences": [{"raw": "There is a piece of farmland .", "tokens": [...],
                                "imgid": 0, "sentid": 0}, ...],
                 "sentids": [0, 1, 2, 3, 4]}, ...],
     "dataset": "ucm"}

Images (``imgs/``, ``RSICD_images/`` ...) are looked up by ``filename`` under the source.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

from train.annotations import AnnotatedImage
from train.converters.base import ConversionError, EmptyDatasetError, ImageIndex, SkipLog, image_size

__all__ = ["read_captions", "clean_caption", "load_json"]

logger = logging.getLogger(__name__)


def load_json(path: Path) -> object:
    """A JSON file's content.

    Raises:
        ConversionError: invalid JSON, naming file, line and column.
    """
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from None


def clean_caption(raw: str) -> str:
    """One caption tidied: single spaces, no space before ``.``/``,``, first letter upper case, final period."""
    text = re.sub(r"\s+([.,;!?])", r"\1", " ".join(raw.split()))
    if not text:
        return ""
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else text + "."


def _find_json(src: Path) -> Path:
    """The ``dataset_*.json`` file: ``src`` itself or the only one under it."""
    if Path(src).is_file():
        return Path(src)
    files = sorted(Path(src).rglob("dataset*.json"))
    if len(files) != 1:
        found = ", ".join(str(f) for f in files) or "none"
        raise EmptyDatasetError(f"expected exactly one dataset_*.json under {src}, found {found}; pass the file as --src")
    return files[0]


def read_captions(src: Path, log: SkipLog, *, images_dir: Path | None = None,
                  split: str | None = None) -> Iterator[AnnotatedImage]:
    """Yield one AnnotatedImage (captions only) per entry of ``images``.

    Args:
        src: the ``dataset_*.json`` file or the folder holding it (and the images).
        log: collects skipped entries, named ``images[i]``.
        images_dir: where the images are; default the JSON file's folder (searched recursively).
        split: keep only entries of this ``split`` (``train``/``val``/``test``); all by default.

    Raises:
        EmptyDatasetError: no JSON file, or no ``images`` entry.
        ConversionError: invalid JSON.
    """
    path = _find_json(Path(src))
    data = load_json(path)
    entries = data.get("images") if isinstance(data, dict) else None
    if not entries:
        raise EmptyDatasetError(f"{path}: no entries under \"images\" (expected the dataset_*.json layout)")
    index = ImageIndex(Path(images_dir) if images_dir else path.parent)
    name = data.get("dataset") or path.stem.removeprefix("dataset_")
    for i, entry in enumerate(entries):
        where = f"images[{i}]"
        if not isinstance(entry, dict) or not entry.get("filename"):
            log.skip(path, None, f"{where}: entry without \"filename\"")
            continue
        if split is not None and entry.get("split") != split:
            continue
        captions = [clean_caption(s.get("raw", "")) for s in entry.get("sentences", []) if isinstance(s, dict)]
        captions = [c for c in captions if c]
        if not captions:
            log.skip(path, None, f"{where} ({entry['filename']}): no sentence with \"raw\" text")
            continue
        image_path = index.find(entry["filename"])
        if image_path is None:
            log.skip(path, None, f"{where}: image {entry['filename']!r} not found under {index.root}")
            continue
        width, height = image_size(image_path)
        yield AnnotatedImage(str(image_path), width, height, captions=captions,
                             source=f"{name}:{entry.get('imgid', i)}")
