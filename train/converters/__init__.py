"""Readers of public remote-sensing formats, each yielding :class:`~train.annotations.AnnotatedImage`.

:data:`FORMATS` maps a format name (the ``python -m train.data convert FORMAT`` argument)
to its reader and the tasks its annotations support.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

from train.annotations import AnnotatedImage
from train.instructions import SampleOptions
from train.converters.base import ConversionError, EmptyDatasetError, Skipped, SkipLog, normalise_label
from train.converters.captions import read_captions
from train.converters.dior import read_dior
from train.converters.dota import read_dota
from train.converters.rsvqa import read_rsvqa
from train.converters.rsvg import read_rsvg

__all__ = [
    "FormatSpec",
    "FORMATS",
    "get_format",
    "ConversionError",
    "EmptyDatasetError",
    "Skipped",
    "SkipLog",
    "normalise_label",
    "read_dota",
    "read_dior",
    "read_rsvg",
    "read_captions",
    "read_rsvqa",
]

Reader = Callable[..., Iterator[AnnotatedImage]]


@dataclass(frozen=True)
class FormatSpec:
    """A convertible format.

    Attributes:
        name: format key.
        reader: ``reader(src, log, **options) -> Iterator[AnnotatedImage]``.
        options: the samples its annotations support (RSVG's objects are not exhaustive:
            grounding of the described objects only, no counts, no "every CLASS").
        description: one line for ``--help``.
    """

    name: str
    reader: Reader
    options: SampleOptions
    description: str


_DETECTION = SampleOptions(tasks=frozenset({"OC", "VG"}))

FORMATS: dict[str, FormatSpec] = {
    spec.name: spec
    for spec in (
        FormatSpec("dota", read_dota, _DETECTION, "DOTA v1/v1.5/v2 labelTxt/ + images/"),
        FormatSpec("fair1m", partial(read_dota, dataset="fair1m"), _DETECTION,
                   "FAIR1M in DOTA-style labelTxt export"),
        FormatSpec("dior", read_dior, _DETECTION, "DIOR VOC XML (Annotations/ + JPEGImages*/)"),
        FormatSpec("rsvg", read_rsvg, SampleOptions(tasks=frozenset({"VG"}), max_ground_instances=0), "DIOR-RSVG / RSVG XML with <description> per object"),
        FormatSpec("captions", read_captions, SampleOptions(tasks=frozenset({"IC", "SC"})),
                   "UCM-Captions / Sydney-Captions / RSICD dataset_*.json + images"),
        FormatSpec("rsvqa", read_rsvqa, SampleOptions(tasks=frozenset({"VQA"})), "RSVQA LR/HR *_questions/_answers/_images.json"),
    )
}
"""Converters by name."""


def get_format(name: str) -> FormatSpec:
    """The :class:`FormatSpec` of ``name``; ValueError listing the known formats otherwise."""
    try:
        return FORMATS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown format {name!r}; known formats: {', '.join(FORMATS)}") from None

