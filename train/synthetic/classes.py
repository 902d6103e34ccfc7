"""Catalogue of the synthetic generator's object and scene classes.

Object sizes are real-world metres; the renderer converts them to pixels through
the ground sample distance (``length_px = length_m / gsd_m``). Scene classes list
how many objects of each class a scene of that type holds at full difficulty;
:func:`count_range` shrinks the upper bound for easier curriculum stages.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

__all__ = [
    "COLOURS",
    "ObjectClass",
    "SceneClass",
    "OBJECT_CLASSES",
    "SCENE_CLASSES",
    "SIZE_WORDS",
    "count_range",
    "object_class",
    "scene_spec",
]

logger = logging.getLogger(__name__)

RGB = tuple[int, int, int]

#: Colour words and the RGB value (0-255) that the renderer paints for them.
COLOURS: Mapping[str, RGB] = MappingProxyType({
    "white": (236, 236, 230),
    "black": (34, 34, 38),
    "grey": (128, 130, 134),
    "red": (190, 40, 36),
    "blue": (38, 78, 176),
    "green": (48, 132, 58),
    "yellow": (232, 200, 46),
    "orange": (230, 122, 30),
    "brown": (122, 80, 48),
})

#: Size words in increasing order; an object's word is the third of its class's length range it falls in.
SIZE_WORDS: tuple[str, ...] = ("small", "medium", "large")


@dataclass(frozen=True)
class ObjectClass:
    """One object class.

    Attributes:
        name: label, lower case (``"storage tank"``).
        plural: plural for language (``"storage tanks"``).
        length_m: ``(min, max)`` length of the long axis in metres (diameter for round objects).
        width_ratio: ``(min, max)`` width / length.
        height_m: height in metres, for the shadow length.
        colours: colour words this class is painted in, with relative weights.
        round: drawn as a disc (no meaningful orientation).
        size_words: size words are visually distinct enough to refer to an object by.
        palette: per-class RGB overrides of :data:`COLOURS` (e.g. pool water "blue").
    """

    name: str
    plural: str
    length_m: tuple[float, float]
    width_ratio: tuple[float, float]
    height_m: float
    colours: Mapping[str, float]
    round: bool = False
    size_words: bool = True
    palette: Mapping[str, RGB] = field(default_factory=dict)

    def rgb(self, colour: str) -> RGB:
        """The RGB value painted for ``colour`` on this class."""
        return self.palette.get(colour, COLOURS[colour])


def _w(**weights: float) -> Mapping[str, float]:
    return MappingProxyType(dict(weights))


OBJECT_CLASSES: Mapping[str, ObjectClass] = MappingProxyType({c.name: c for c in (
    ObjectClass("car", "cars", (4.0, 5.2), (0.40, 0.44), 1.5,
                _w(white=3, black=1, grey=3, red=2, blue=2, yellow=1, green=1), size_words=False),
    ObjectClass("truck", "trucks", (8.0, 16.0), (0.28, 0.32), 3.5,
                _w(white=3, red=2, blue=2, yellow=1, green=1, orange=1)),
    ObjectClass("bus", "buses", (11.0, 14.0), (0.20, 0.22), 3.2,
                _w(yellow=2, white=2, red=1, blue=1, green=1), size_words=False),
    ObjectClass("airplane", "airplanes", (28.0, 56.0), (0.95, 1.05), 9.0,
                _w(white=5, grey=2, blue=1, red=1)),
    ObjectClass("ship", "ships", (12.0, 40.0), (0.22, 0.30), 6.0,
                _w(white=3, grey=2, red=1, blue=1, black=1, orange=1)),
    ObjectClass("storage tank", "storage tanks", (10.0, 30.0), (1.0, 1.0), 10.0,
                _w(white=4, grey=2, green=1), round=True),
    ObjectClass("building", "buildings", (9.0, 30.0), (0.55, 0.85), 7.0,
                _w(red=3, grey=3, brown=2, white=2, blue=1, black=1)),
    ObjectClass("tennis court", "tennis courts", (34.0, 37.0), (0.48, 0.52), 0.3,
                _w(green=3, blue=2, red=2), size_words=False,
                palette=MappingProxyType({"green": (58, 128, 80), "blue": (52, 96, 160), "red": (176, 84, 58)})),
    ObjectClass("swimming pool", "swimming pools", (8.0, 20.0), (0.42, 0.55), 0.2,
                _w(blue=5, green=1),
                palette=MappingProxyType({"blue": (64, 176, 214), "green": (70, 160, 130)})),
    ObjectClass("tree", "trees", (4.0, 11.0), (1.0, 1.0), 8.0,
                _w(green=8, yellow=1, orange=1), round=True,
                palette=MappingProxyType({"green": (50, 106, 42), "yellow": (168, 150, 40),
                                          "orange": (178, 96, 34)})),
)})


@dataclass(frozen=True)
class SceneClass:
    """One scene class.

    Attributes:
        name: scene label (``"parking lot"``).
        counts: object class -> ``(min, max)`` objects at difficulty 1.
        zones: object class -> layout zone names the objects are placed in (see ``layout.py``).
    """

    name: str
    counts: Mapping[str, tuple[int, int]]
    zones: Mapping[str, tuple[str, ...]]


def _scene(name: str, **spec: tuple[int, int, tuple[str, ...]]) -> SceneClass:
    counts = {k.replace("_", " "): (v[0], v[1]) for k, v in spec.items()}
    zones = {k.replace("_", " "): v[2] for k, v in spec.items()}
    return SceneClass(name, MappingProxyType(counts), MappingProxyType(zones))


SCENE_CLASSES: Mapping[str, SceneClass] = MappingProxyType({s.name: s for s in (
    _scene("parking lot", car=(4, 40, ("stalls",)), truck=(0, 3, ("lane",)), bus=(0, 3, ("lane",)),
           tree=(0, 6, ("verge",))),
    _scene("residential", building=(3, 12, ("lots",)), swimming_pool=(0, 4, ("yards",)),
           tree=(2, 14, ("yards",)), car=(0, 8, ("road",))),
    _scene("industrial", building=(1, 5, ("yard",)), storage_tank=(1, 9, ("tankfarm",)),
           truck=(0, 8, ("road", "yard")), car=(0, 6, ("road",))),
    _scene("airport", airplane=(1, 4, ("apron",)), bus=(0, 3, ("service",)), truck=(0, 3, ("service",)),
           car=(0, 4, ("service",))),
    _scene("harbour", ship=(1, 7, ("water",)), storage_tank=(0, 5, ("quay",)), truck=(0, 5, ("quay",)),
           building=(0, 3, ("quay",))),
    _scene("farmland", tree=(2, 14, ("hedge",)), building=(0, 3, ("farmyard",)), truck=(0, 2, ("road",))),
    _scene("forest", tree=(8, 40, ("woods",)), car=(0, 3, ("track",)), building=(0, 2, ("clearing",))),
    _scene("river", ship=(0, 4, ("water",)), tree=(2, 12, ("bank",)), car=(0, 5, ("road",)),
           building=(0, 3, ("bank",))),
    _scene("sports ground", tennis_court=(1, 4, ("courts",)), swimming_pool=(0, 2, ("lawn",)),
           building=(0, 2, ("lawn",)), tree=(1, 10, ("lawn",)), car=(0, 8, ("parking",))),
)})


def count_range(lo: int, hi: int, difficulty: float) -> tuple[int, int]:
    """The ``(min, max)`` object count at ``difficulty`` in [0, 1].

    Difficulty 0 keeps at most ``min + 25 %`` of the span (sparse scenes), difficulty 1 the full span;
    the upper bound grows linearly in between.

    Raises:
        ValueError: ``difficulty`` outside [0, 1].
    """
    if not 0.0 <= difficulty <= 1.0:
        raise ValueError(f"difficulty must be in [0, 1], got {difficulty!r}")
    span = hi - lo
    top = lo + round(span * (0.25 + 0.75 * difficulty))
    return lo, max(lo, top)


def object_class(name: str) -> ObjectClass:
    """The :class:`ObjectClass` called ``name``; ValueError lists the known names."""
    try:
        return OBJECT_CLASSES[name]
    except KeyError:
        raise ValueError(f"unknown object class {name!r}; known: {sorted(OBJECT_CLASSES)}") from None


def scene_spec(name: str) -> SceneClass:
    """The :class:`SceneClass` called ``name``; ValueError lists the known names."""
    try:
        return SCENE_CLASSES[name]
    except KeyError:
        raise ValueError(f"unknown scene class {name!r}; known: {sorted(SCENE_CLASSES)}") from None
