"""DIOR's Pascal-VOC XML -> AnnotatedImage (also the object reader shared with RSVG).

One XML file per image, as distributed (``Annotations/Horizontal Bounding Boxes/00001.xml``)::

    <annotation>
      <filename>00001.jpg</filename>
      <size><width>800</width><height>800</height><depth>3</depth></size>
      <object>
        <name>golffield</name><pose>Unspecified</pose>
        <bndbox><xmin>133</xmin><ymin>237</ymin><xmax>684</xmax><ymax>672</ymax></bndbox>
        <difficult>0</difficult>
      </object>
    </annotation>

DIOR-R's oriented ``<robndbox>`` (``x_left_top``, ``y_left_top``, ... ``y_left_bottom``) is
read into ``polygon_px``. Images are looked up by ``<filename>`` anywhere under the source.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from train.annotations import AnnotatedImage, ObjectAnnotation
from train.converters.base import EmptyDatasetError, ImageIndex, SkipLog, clip_box, image_size, normalise_label
from train.converters.xml_tree import XmlNode, XmlSyntaxError, parse_xml

__all__ = ["read_dior", "read_voc_file", "parse_voc_object", "find_xml_files"]

logger = logging.getLogger(__name__)

_BOX_KEYS = ("xmin", "ymin", "xmax", "ymax")
_CORNER_KEYS = ("left_top", "right_top", "right_bottom", "left_bottom")


def _number(node: XmlNode, key: str) -> float:
    """The number in child ``key`` of ``node``; ValueError naming the key and value."""
    text = node.findtext(key)
    if text is None:
        raise ValueError(f"<{node.tag}> has no <{key}>")
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"<{key}> is not a number: {text!r}") from None


def parse_voc_object(node: XmlNode) -> ObjectAnnotation:
    """One ``<object>`` element as an ObjectAnnotation.

    Raises:
        ValueError: no name, no box, a non-numeric or reversed box.
    """
    label = normalise_label(node.findtext("name") or "")
    if not label:
        raise ValueError("<object> without <name>")
    polygon = None
    if (bndbox := node.find("bndbox")) is not None:
        x1, y1, x2, y2 = (_number(bndbox, k) for k in _BOX_KEYS)
    elif (robndbox := node.find("robndbox")) is not None:
        polygon = tuple((_number(robndbox, f"x_{c}"), _number(robndbox, f"y_{c}")) for c in _CORNER_KEYS)
        xs, ys = [p[0] for p in polygon], [p[1] for p in polygon]
        x1, y1, x2, y2 = min(xs), min(ys), max(xs), max(ys)
    else:
        raise ValueError(f"<object> {label!r} has neither <bndbox> nor <robndbox>")
    if not (x1 < x2 and y1 < y2):
        raise ValueError(f"box of {label!r} is empty or reversed: ({x1}, {y1}, {x2}, {y2})")
    return ObjectAnnotation(label=label, box_px=(x1, y1, x2, y2), polygon_px=polygon,
                            difficult=(node.findtext("difficult") or "0").strip() not in ("0", ""))


def read_voc_file(
    xml_path: Path, index: ImageIndex, log: SkipLog
) -> tuple[AnnotatedImage, list[tuple[XmlNode, int]]] | None:
    """Read one VOC XML file.

    Returns:
        The image with its usable objects, and ``(object node, index into objects)`` for each
        kept object (RSVG reads descriptions from the nodes); ``None`` when the file is skipped.
    """
    try:
        root = parse_xml(xml_path)
    except XmlSyntaxError as err:
        log.skip(xml_path, err.line, f"malformed XML: {err.reason}")
        return None
    filename = root.findtext("filename")
    if not filename:
        log.skip(xml_path, root.line, "no <filename> in <annotation>")
        return None
    image_path = index.find(filename)
    if image_path is None:
        log.skip(xml_path, (root.find("filename") or root).line, f"image {filename!r} not found under {index.root}")
        return None
    width, height = image_size(image_path)
    objects: list[ObjectAnnotation] = []
    kept: list[tuple[XmlNode, int]] = []
    for node in root.findall("object"):
        try:
            obj = parse_voc_object(node)
        except ValueError as err:
            log.skip(xml_path, node.line, f"malformed <object>: {err}")
            continue
        box = clip_box(obj.box_px, width, height)
        if box is None:
            log.skip(xml_path, node.line, f"box {obj.box_px} of {obj.label!r} lies outside the {width}x{height} image")
            continue
        kept.append((node, len(objects)))
        objects.append(ObjectAnnotation(obj.label, box, obj.polygon_px, difficult=obj.difficult))
    image = AnnotatedImage(str(image_path), width, height, objects, source=f"{xml_path.parent.name}:{xml_path.stem}")
    return image, kept


def find_xml_files(src: Path) -> list[Path]:
    """All ``*.xml`` under ``src``; EmptyDatasetError if none."""
    files = sorted(Path(src).rglob("*.xml"))
    if not files:
        raise EmptyDatasetError(f"no VOC XML annotation files (*.xml) under {src}")
    return files


def read_dior(src: Path, log: SkipLog, *, images_dir: Path | None = None) -> Iterator[AnnotatedImage]:
    """Yield one AnnotatedImage per DIOR XML file whose image exists.

    Args:
        src: the DIOR folder (XML files and images are searched recursively).
        log: collects skipped files and objects.
        images_dir: where the images are, if not under ``src``.

    Raises:
        EmptyDatasetError: no XML file under ``src``.
    """
    files = find_xml_files(src)
    index = ImageIndex(Path(images_dir) if images_dir else Path(src))
    logger.info("VOC source %s: %d XML files, %d images", src, len(files), len(index))
    for xml_path in files:
        result = read_voc_file(xml_path, index, log)
        if result is not None:
            yield result[0]
