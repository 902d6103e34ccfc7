"""Templated language from a scene graph: captions, VQA pairs and referring expressions.

Answers are short and regular: ``yes``/``no``, counts as digits, colour words,
grid-cell names (``"top left"`` ... ``"bottom right"``, see ``geometry.GRID_CELLS``).

Referring expressions have the form ``the [size] [colour] LABEL [in the CELL]``
(attributes added in a fixed order until exactly one object of the class matches),
or, as a last resort, ``the [colour] LABEL closest to the ANCHOR`` where the
anchor is the only object of its class. :func:`parse_reference` reads them back.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from train.annotations import QuestionAnswer, ReferringExpression
from train.synthetic.classes import COLOURS, OBJECT_CLASSES, SCENE_CLASSES, SIZE_WORDS, object_class
from train.synthetic.geometry import GRID_CELLS
from train.synthetic.graph import PlacedObject, SceneGraph

__all__ = ["Reference", "describe_scene", "parse_reference", "reference_text", "matches", "object_attributes",
           "SCENE_PHRASES"]

logger = logging.getLogger(__name__)

#: Scene class -> noun phrase with article used in captions.
SCENE_PHRASES = {
    "parking lot": "a parking lot", "residential": "a residential area", "industrial": "an industrial area",
    "airport": "an airport", "harbour": "a harbour", "farmland": "farmland", "forest": "a forest",
    "river": "a river", "sports ground": "a sports ground",
}
_ATTR_ORDER = ((), ("colour",), ("cell",), ("size",), ("colour", "cell"), ("size", "colour"),
               ("size", "cell"), ("size", "colour", "cell"))
_NEAREST_MARGIN = 1.3  # the target must be this much closer to the anchor than any look-alike


@dataclass(frozen=True)
class Reference:
    """The attributes a referring expression states (None: not stated)."""

    label: str
    size: str | None = None
    colour: str | None = None
    cell: str | None = None
    anchor: str | None = None


def reference_text(ref: Reference) -> str:
    """``the [size] [colour] label [in the cell | closest to the anchor]``."""
    words = ["the", *(w for w in (ref.size, ref.colour) if w), ref.label]
    if ref.cell:
        words += ["in the", ref.cell]
    if ref.anchor:
        words += ["closest to the", ref.anchor]
    return " ".join(words)


_LABELS = "|".join(sorted(OBJECT_CLASSES, key=len, reverse=True))
_REF_RE = re.compile(
    rf"^the (?:(?P<size>{'|'.join(SIZE_WORDS)}) )?(?:(?P<colour>{'|'.join(COLOURS)}) )?(?P<label>{_LABELS})"
    rf"(?: in the (?P<cell>{'|'.join(GRID_CELLS)}))?(?: closest to the (?P<anchor>{_LABELS}))?$")


def parse_reference(text: str) -> Reference:
    """Read a referring expression written by :func:`reference_text` back into its attributes.

    Raises:
        ValueError: the text is not in the generator's referring-expression grammar.
    """
    m = _REF_RE.match(text)
    if m is None:
        raise ValueError(f"not a synthetic referring expression: {text!r}")
    return Reference(m["label"], m["size"], m["colour"], m["cell"], m["anchor"])


def object_attributes(graph: SceneGraph) -> list[dict[str, str]]:
    """Per object: ``label``, ``size``, ``colour`` and grid ``cell``, the words references use."""
    return [{"label": o.label, "size": o.size, "colour": o.colour, "cell": o.cell(graph.width_px, graph.height_px)}
            for o in graph.objects]


def matches(ref: Reference, attrs: list[dict[str, str]]) -> list[int]:
    """Indices of the objects (attributes from :func:`object_attributes`) an anchor-free reference describes."""
    stated = [(k, v) for k, v in (("label", ref.label), ("size", ref.size), ("colour", ref.colour),
                                  ("cell", ref.cell)) if v is not None]
    return [i for i, a in enumerate(attrs) if all(a[k] == v for k, v in stated)]


def _unique_reference(i: int, attrs: list[dict[str, str]], exclude: str | None = None) -> Reference | None:
    """Shortest attribute reference naming only object ``i`` (not stating ``exclude``), else None."""
    a = attrs[i]
    size_ok = object_class(a["label"]).size_words
    same = [b for b in attrs if b["label"] == a["label"]]
    for combo in _ATTR_ORDER:
        if exclude in combo or ("size" in combo and not size_ok):
            continue
        if sum(all(b[k] == a[k] for k in combo) for b in same) == 1:
            return Reference(a["label"], **{k: a[k] for k in combo})
    return None


def _anchored_reference(i: int, graph: SceneGraph, attrs: list[dict[str, str]]) -> Reference | None:
    """``the [colour] label closest to the anchor`` when object ``i`` is clearly the closest look-alike."""
    objs = graph.objects
    counts = Counter(o.label for o in objs)
    o = objs[i]
    for anchor in objs:
        if counts[anchor.label] != 1 or anchor.label == o.label:
            continue
        for colour in (None, o.colour):
            ref = Reference(o.label, colour=colour, anchor=anchor.label)
            rivals = matches(Reference(o.label, colour=colour), attrs)
            d = {j: np.hypot(objs[j].cx_px - anchor.cx_px, objs[j].cy_px - anchor.cy_px) for j in rivals}
            others = [d[j] for j in rivals if j != i]
            if not others or min(others) > _NEAREST_MARGIN * d[i]:
                return ref
    return None


def _referring(graph: SceneGraph, attrs: list[dict[str, str]]) -> list[ReferringExpression]:
    out = []
    for i in range(len(graph.objects)):
        ref = _unique_reference(i, attrs) or _anchored_reference(i, graph, attrs)
        if ref is not None:
            out.append(ReferringExpression(reference_text(ref), i))
    return out


def _plural(label: str, n: int) -> str:
    return label if n == 1 else object_class(label).plural


def _count_phrase(counts: Counter) -> str:
    items = [f"{n} {_plural(label, n)}" for label, n in counts.most_common()]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _captions(graph: SceneGraph) -> list[str]:
    scene = SCENE_PHRASES[graph.scene_class]
    counts = Counter(o.label for o in graph.objects)
    if not counts:
        return [f"An aerial image of {scene}.", f"This is {scene} seen from above, with no notable objects."]
    phrase = _count_phrase(counts)
    main, n_main = counts.most_common(1)[0]
    main_objs = [o for o in graph.objects if o.label == main]
    colour, n_col = Counter(o.colour for o in main_objs).most_common(1)[0]
    cell = Counter(o.cell(graph.width_px, graph.height_px) for o in main_objs).most_common(1)[0][0]
    where = f"in the {cell}" if n_main == 1 else f"mostly in the {cell}"
    tint = f"is {colour}" if n_main == 1 else (f"are {colour}" if n_col == n_main else f"are mostly {colour}")
    be = "is" if n_main == 1 else "are"
    return [
        f"An aerial image of {scene} with {phrase}.",
        f"This is {scene} seen from above. It contains {phrase}.",
        f"There {be} {n_main} {_plural(main, n_main)} in {scene}, {where}; the {_plural(main, n_main)} {tint}.",
        f"A top-down view of {scene}: {phrase}.",
    ]


def _presence_count(graph: SceneGraph, rng: np.random.Generator) -> list[QuestionAnswer]:
    counts = Counter(o.label for o in graph.objects)
    possible = sorted(SCENE_CLASSES[graph.scene_class].counts)
    absent = sorted(set(OBJECT_CLASSES) - set(counts))
    qs = []
    for label in rng.permutation(sorted(counts))[:3]:
        qs.append(QuestionAnswer(f"Is there a {label} in the image?", "yes", "presence"))
        qs.append(QuestionAnswer(f"How many {object_class(label).plural} are there?", str(counts[label]), "count"))
    for label in rng.permutation(absent)[:2]:
        qs.append(QuestionAnswer(f"Is there a {label} in the image?", "no", "presence"))
    zero = [lab for lab in possible if counts[lab] == 0]
    if zero:
        label = zero[int(rng.integers(len(zero)))]
        qs.append(QuestionAnswer(f"How many {object_class(label).plural} are there?", "0", "count"))
    pairs = [p for p in combinations(possible, 2) if counts[p[0]] != counts[p[1]]]
    for k in rng.permutation(len(pairs))[:2]:
        a, b = pairs[k] if rng.random() < 0.5 else pairs[k][::-1]
        qs.append(QuestionAnswer(f"Are there more {object_class(a).plural} than {object_class(b).plural}?",
                                 "yes" if counts[a] > counts[b] else "no", "comparison"))
    return qs


def _object_questions(graph: SceneGraph, attrs: list[dict[str, str]],
                      rng: np.random.Generator) -> list[QuestionAnswer]:
    n = len(graph.objects)
    qs: list[QuestionAnswer] = []
    for i in rng.permutation(n)[:4]:
        o = graph.objects[i]
        if (ref := _unique_reference(i, attrs, exclude="cell")) is not None and len(qs) < 2:
            qs.append(QuestionAnswer(f"Where is {reference_text(ref)}?", attrs[i]["cell"], "position"))
        if (ref := _unique_reference(i, attrs, exclude="colour")) is not None:
            qs.append(QuestionAnswer(f"What colour is {reference_text(ref)}?", o.colour, "colour"))
    refs = {i: r for i in range(n) if (r := _unique_reference(i, attrs)) is not None}
    keys = sorted(refs)
    for _ in range(6):
        if len(keys) < 2 or sum(q.kind == "relative position" for q in qs) >= 2:
            break
        i, j = rng.choice(keys, size=2, replace=False)
        a, b = graph.objects[i], graph.objects[j]
        dx, dy = a.cx_px - b.cx_px, a.cy_px - b.cy_px
        ta, tb = reference_text(refs[i]), reference_text(refs[j])
        if abs(dx) > 0.1 * graph.width_px and abs(dx) >= abs(dy):
            qs.append(QuestionAnswer(f"Is {ta} to the left of {tb}?", "yes" if dx < 0 else "no", "relative position"))
        elif abs(dy) > 0.1 * graph.height_px:
            qs.append(QuestionAnswer(f"Is {ta} above {tb}?", "yes" if dy < 0 else "no", "relative position"))
    return qs


def describe_scene(graph: SceneGraph) -> tuple[list[str], list[QuestionAnswer], list[ReferringExpression]]:
    """Captions, VQA pairs and referring expressions of a scene graph (deterministic for its seed)."""
    rng = np.random.default_rng([graph.seed, 1])
    captions = _captions(graph)
    attrs = object_attributes(graph)
    questions = _presence_count(graph, rng) + _object_questions(graph, attrs, rng)
    return captions, questions, _referring(graph, attrs)
