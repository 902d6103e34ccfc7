"""Context-disentangled augmentation (CDA): count-varying cutout, spatial and colour attribute editing.

:func:`augment_image` applies the three edits of the SkyMoE paper to one annotated image
and returns :class:`Variant` s, each a new image with the one sample its edit supports
(a count for cutout, a grounding for attribute edits) and a record of what was edited.

Images without referring expressions (detection data such as DOTA) get constructed ones:
``"the <label>"``, which the edits turn into ``"the <label> in the <cell>"`` (spatial: the
target cell holds no other object of the class) or ``"the <colour> <label>"`` (colour: no
other object of the class has that colour, colours of real objects being estimated from
pixels); the record then says ``"expression_constructed": true``.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from skymoe.prompts import format_boxes, format_count
from train.annotations import AnnotatedImage, ReferringExpression
from train.cda.colour import ColourEdit, colour_edit, estimate_colour, recolour
from train.cda.cutout import CutoutVariant, cutout_variants, object_mask
from train.cda.spatial import SpatialEdit, find_position, replace_position, spatial_edit
from train.instructions import InstructionSample, box_norm100, make_sample

__all__ = [
    "CdaOptions",
    "Variant",
    "augment_image",
    "cutout_variants",
    "spatial_edit",
    "colour_edit",
    "object_mask",
    "estimate_colour",
    "recolour",
    "find_position",
    "replace_position",
    "CutoutVariant",
    "SpatialEdit",
    "ColourEdit",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CdaOptions:
    """How many variants :func:`augment_image` makes.

    Attributes:
        cutout_variants: cutout variants per class (4 in the paper).
        min_count: classes with fewer objects are not cut out.
        spatial_edits: spatial edits per image.
        colour_edits: colour edits per image.
        max_attempts: expressions tried per edit kind before giving up on an image.
    """

    cutout_variants: int = 4
    min_count: int = 4
    spatial_edits: int = 1
    colour_edits: int = 1
    max_attempts: int = 8


@dataclass(frozen=True)
class Variant:
    """One augmented image and the sample it supports.

    Attributes:
        name: file-name suffix, e.g. ``"cut_car_2"``, ``"spatial_0"``.
        image: annotations of the variant (``image_path`` set when it is stored).
        rgb: uint8 pixels ``(height, width, 3)``.
        task: skymoe task key (``"count"`` or ``"ground"``).
        query: the class name or referring expression.
        answer: the answer text.
        record: what was edited (written as the sample's ``augmentation``).
    """

    name: str
    image: AnnotatedImage
    rgb: np.ndarray
    task: str
    query: str
    answer: str
    record: dict

    def samples(self, image_ref: str, vary_templates: bool = True) -> list[InstructionSample]:
        """The variant's sample, pointing at ``image_ref``."""
        stem = Path(image_ref).stem
        return [make_sample(f"{stem}_{self.task}", image_ref, self.task, self.answer, self.query,
                            vary_templates=vary_templates, augmentation=self.record)]


def _cutouts(image: AnnotatedImage, rgb: np.ndarray, rng: np.random.Generator, options: CdaOptions) -> list[Variant]:
    out = []
    for label, n in sorted(Counter(o.label for o in image.objects).items()):
        if n < options.min_count:
            continue
        for k, v in enumerate(cutout_variants(image, rgb, label, rng, n_variants=options.cutout_variants), 1):
            out.append(Variant(f"cut_{label.replace(' ', '_')}_{k}", v.image, v.rgb, "count", label,
                               format_count(v.count), v.record()))
    return out


def _expressions(image: AnnotatedImage, rng: np.random.Generator, limit: int) -> list[tuple[ReferringExpression, bool]]:
    """Expressions to edit, shuffled: the image's own, else constructed ``"the <label>"`` ones."""
    if image.referring:
        refs = [(image.referring[i], False) for i in rng.permutation(len(image.referring))]
    else:
        refs = [(ReferringExpression(f"the {image.objects[i].label}", int(i)), True)
                for i in rng.permutation(len(image.objects))]
    return refs[:limit]


def _attribute_edits(image: AnnotatedImage, rgb: np.ndarray, rng: np.random.Generator,
                     options: CdaOptions) -> list[Variant]:
    out = []
    for kind, edit_fn, wanted in (("spatial", spatial_edit, options.spatial_edits),
                                  ("colour", colour_edit, options.colour_edits)):
        made = 0
        for ref, constructed in _expressions(image, rng, options.max_attempts if wanted else 0):
            if made >= wanted:
                break
            edit = edit_fn(image, rgb, ref, rng)
            if edit is None:
                continue
            record = {**edit.record(), "expression_constructed": constructed}
            target = edit.image.objects[edit.object_index]
            answer = format_boxes([box_norm100(target.box_px, image.width, image.height)])
            out.append(Variant(f"{kind}_{made}", edit.image, edit.rgb, "ground", edit.new_text, answer, record))
            made += 1
    return out


def augment_image(image: AnnotatedImage, rgb: np.ndarray, rng: np.random.Generator,
                  options: CdaOptions = CdaOptions()) -> list[Variant]:
    """All CDA variants of one image: cutout ladders per class, then spatial and colour edits.

    Args:
        image: annotations in ``rgb``'s pixel frame.
        rgb: uint8 ``(height, width, 3)``.
        rng: random generator (the only source of randomness).
        options: how many variants.

    Returns:
        The variants (possibly none: too few objects, no room to move, no free colour).
    """
    if rgb.shape[:2] != (image.height, image.width):
        raise ValueError(f"{image.image_path}: pixels are {rgb.shape[1]}x{rgb.shape[0]}, "
                         f"annotations say {image.width}x{image.height}")
    return _cutouts(image, rgb, rng, options) + _attribute_edits(image, rgb, rng, options)
