"""DIOR-RSVG / RSVG XML (VOC objects with referring expressions) -> AnnotatedImage.

Same layout as DIOR's XML (:mod:`train.converters.dior`), each object carrying its
referring expression::

    <object>
      <name>vehicle</name>
      <bndbox><xmin>..</xmin><ymin>..</ymin><xmax>..</xmax><ymax>..</ymax></bndbox>
      <description>The vehicle on the lower left</description>
    </object>

Objects are not exhaustive (only described ones are annotated), so the format only
yields grounding samples (:data:`train.converters.FORMATS`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from train.annotations import AnnotatedImage, ReferringExpression
from train.converters.base import ImageIndex, SkipLog
from train.converters.dior import find_xml_files, read_voc_file

__all__ = ["read_rsvg"]

logger = logging.getLogger(__name__)


def read_rsvg(src: Path, log: SkipLog, *, images_dir: Path | None = None) -> Iterator[AnnotatedImage]:
    """Yield one AnnotatedImage per XML file with at least one described object.

    Objects without ``<description>`` are logged and skipped.

    Args:
        src: the dataset folder (XML and images searched recursively).
        log: collects skipped files and objects.
        images_dir: where the images are, if not under ``src``.

    Raises:
        EmptyDatasetError: no XML file under ``src``.
    """
    files = find_xml_files(src)
    index = ImageIndex(Path(images_dir) if images_dir else Path(src))
    logger.info("RSVG source %s: %d XML files, %d images", src, len(files), len(index))
    for xml_path in files:
        result = read_voc_file(xml_path, index, log)
        if result is None:
            continue
        image, kept = result
        objects, referring = [], []
        for node, object_index in kept:
            text = " ".join((node.findtext("description") or "").split())
            if not text:
                log.skip(xml_path, node.line, f"<object> {image.objects[object_index].label!r} has no <description>")
                continue
            referring.append(ReferringExpression(text, len(objects)))
            objects.append(image.objects[object_index])
        if not referring:
            log.skip(xml_path, None, "no object with a <description>")
            continue
        yield replace(image, objects=objects, referring=referring)
