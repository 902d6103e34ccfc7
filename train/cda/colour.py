"""Colour attribute editing (SkyMoE paper, "Attribute Editing").

The colour word of a referring expression is swapped (``"red"`` -> ``"blue"``; an expression
without one gets the new word before the class name) and the object is recoloured by
palette transfer in CIE Lab: the object's body pixels (those of its polygon/box within
a colour distance of the body's median, so windows, shadows and ground corners stay)
are shifted so that their mean Lab equals the target colour's Lab, each pixel keeping its
deviation from the mean. Shading and texture (the L pattern) therefore survive: the
luminance of the body before and after is linearly related (correlation ~1; only gamut
clipping can lower it), while the hue moves to the target's.

Colour words of objects without one (real data, e.g. DOTA) are estimated from pixels
with :func:`estimate_colour` (nearest palette colour in Lab to the body's median): an
estimate, not ground truth.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace

import cv2
import numpy as np

from train.annotations import AnnotatedImage, ReferringExpression
from train.cda.cutout import object_mask
from train.synthetic.classes import COLOURS, OBJECT_CLASSES

__all__ = [
    "ColourEdit",
    "CHROMATIC",
    "rgb_to_lab",
    "lab_to_rgb",
    "body_mask",
    "estimate_colour",
    "recolour",
    "find_colour_word",
    "allowed_colours",
    "colour_edit",
]

logger = logging.getLogger(__name__)

CHROMATIC = ("red", "blue", "green", "yellow", "orange")
"""Target colours of edits: chromatic, so the edit is a hue change."""

_SYNONYMS = {"gray": "grey"}
_WORD_RE = re.compile(r"\b(" + "|".join([*COLOURS, *_SYNONYMS]) + r")\b", re.IGNORECASE)
_BODY_DELTA_E = 30.0
_MIN_BODY_SHARE = 0.3


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB ``(..., 3)`` -> float32 CIE Lab (L 0-100, a/b about -128..127)."""
    flat = np.asarray(rgb, np.uint8).reshape(-1, 1, 3).astype(np.float32) / 255.0
    return cv2.cvtColor(flat, cv2.COLOR_RGB2Lab).reshape(np.shape(rgb))


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """float CIE Lab ``(..., 3)`` -> uint8 RGB (out-of-gamut values clipped)."""
    flat = np.asarray(lab, np.float32).reshape(-1, 1, 3)
    rgb = cv2.cvtColor(flat, cv2.COLOR_Lab2RGB).reshape(np.shape(lab))
    return np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)


_PALETTE_LAB = {word: rgb_to_lab(np.array(value, np.uint8)) for word, value in COLOURS.items()}


def body_mask(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The object's body: pixels of ``mask`` within Delta-E 30 of the mask's median Lab.

    Falls back to the whole mask when fewer than 30 % of it qualify. Bool ``(height, width)``.
    """
    lab = rgb_to_lab(rgb[mask])
    if len(lab) == 0:
        return mask
    near = np.linalg.norm(lab - np.median(lab, axis=0), axis=1) < _BODY_DELTA_E
    if near.mean() < _MIN_BODY_SHARE:
        return mask
    body = np.zeros_like(mask)
    body[mask] = near
    return body


def estimate_colour(rgb: np.ndarray, mask: np.ndarray) -> str:
    """The palette word nearest (Lab distance) to the median colour of the object's body."""
    median = np.median(rgb_to_lab(rgb[body_mask(rgb, mask)]), axis=0)
    return min(_PALETTE_LAB, key=lambda w: float(np.linalg.norm(_PALETTE_LAB[w] - median)))


def recolour(rgb: np.ndarray, mask: np.ndarray, target: str) -> tuple[np.ndarray, np.ndarray]:
    """Palette transfer of the object's body to colour ``target``.

    Args:
        rgb: uint8 ``(height, width, 3)``.
        mask: the object's pixels, bool ``(height, width)``.
        target: a colour word of :data:`train.synthetic.classes.COLOURS`.

    Returns:
        ``(new_rgb, body)``: the recoloured image and the body mask that was changed.

    Raises:
        ValueError: unknown colour word.
    """
    if target not in _PALETTE_LAB:
        raise ValueError(f"unknown colour {target!r}; use one of {sorted(_PALETTE_LAB)}")
    body = body_mask(rgb, mask)
    lab = rgb_to_lab(rgb[body])
    shifted = lab + (_PALETTE_LAB[target] - lab.mean(axis=0))
    shifted[:, 0] = np.clip(shifted[:, 0], 0.0, 100.0)
    out = rgb.copy()
    out[body] = lab_to_rgb(shifted)
    return out, body


def find_colour_word(text: str) -> tuple[int, int, str] | None:
    """The only colour word of ``text`` as ``(start, end, word)``; ``None`` if none or several."""
    found = list(_WORD_RE.finditer(text))
    if len(found) != 1:
        return None
    word = found[0].group(1).lower()
    return found[0].start(), found[0].end(), _SYNONYMS.get(word, word)


@dataclass(frozen=True)
class ColourEdit:
    """A recoloured object.

    Attributes:
        image: annotations after the edit (object's ``colour`` set; referring = the edited
            expression only; captions and questions dropped).
        rgb: uint8 ``(height, width, 3)`` after the edit.
        object_index: the recoloured object.
        old_text, new_text: the expression before and after.
        old_colour, new_colour: colour words before (given or estimated) and after.
        estimated: the old colour was estimated from pixels (no annotation had it).
        changed_pixels: pixels recoloured.
    """

    image: AnnotatedImage
    rgb: np.ndarray
    object_index: int
    old_text: str
    new_text: str
    old_colour: str
    new_colour: str
    estimated: bool
    changed_pixels: int

    def record(self) -> dict:
        """The sample's ``augmentation`` entry."""
        return {"type": "colour", "object_index": self.object_index, "old_text": self.old_text,
                "new_text": self.new_text, "old_colour": self.old_colour, "new_colour": self.new_colour,
                "old_colour_estimated": self.estimated, "changed_pixels": self.changed_pixels}


def _colours(image: AnnotatedImage, rgb: np.ndarray) -> list[str]:
    """Each object's colour word, estimated from pixels where not annotated."""
    return [o.colour or estimate_colour(rgb, object_mask(o, image.height, image.width)) for o in image.objects]


def allowed_colours(label: str) -> list[str]:
    """Target colours for an object of ``label``: the :data:`CHROMATIC` words the class is
    painted in where it is a synthetic class (no blue trees), all of them otherwise."""
    cls = OBJECT_CLASSES.get(label)
    return [c for c in CHROMATIC if cls is None or c in cls.colours]


def _new_text(text: str, label: str, colour: str) -> str | None:
    """``text`` with its colour word set to ``colour`` (inserted before ``label`` if it has none)."""
    found = find_colour_word(text)
    if found is not None:
        return text[:found[0]] + colour + text[found[1]:]
    at = text.lower().find(label)
    return text[:at] + f"{colour} " + text[at:] if at >= 0 else None


def colour_edit(image: AnnotatedImage, rgb: np.ndarray, referring: ReferringExpression,
                rng: np.random.Generator) -> ColourEdit | None:
    """Recolour the object of ``referring`` to another colour and swap the colour word.

    The new colour is one of :func:`allowed_colours` that no other object of the same class
    has (so the expression stays unique).

    Returns:
        The edit, or ``None`` when no colour is free or the expression names no colour and
        not the class either.
    """
    index = referring.object_index
    obj = image.objects[index]
    mask = object_mask(obj, image.height, image.width)
    if not mask.any():
        return None
    colours = _colours(image, rgb)
    taken = {c for i, (o, c) in enumerate(zip(image.objects, colours)) if i != index and o.label == obj.label}
    choices = [c for c in allowed_colours(obj.label) if c != colours[index] and c not in taken]
    if not choices:
        return None
    target = str(rng.choice(choices))
    new_text = _new_text(referring.text, obj.label, target)
    if new_text is None:
        return None
    pixels, body = recolour(rgb, mask, target)
    objects = list(image.objects)
    objects[index] = replace(obj, colour=target)
    edited = replace(image, objects=objects, referring=[ReferringExpression(new_text, index)], captions=[], questions=[])
    return ColourEdit(edited, pixels, index, referring.text, new_text, colours[index], target,
                      obj.colour is None, int(body.sum()))
