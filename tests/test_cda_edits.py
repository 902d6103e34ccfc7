"""Spatial and colour attribute editing: cells, overlap, text/pixel consistency, luminance and hue."""

from __future__ import annotations

import math

import numpy as np
import pytest

from train.annotations import AnnotatedImage, ObjectAnnotation, ReferringExpression
from train.cda import CdaOptions, augment_image
from train.cda.colour import colour_edit, estimate_colour, find_colour_word, rgb_to_lab
from train.cda.cutout import object_mask
from train.cda.spatial import MAX_IOU, find_position, is_relational, replace_position, spatial_edit

SIZE = 240
CELLS = [["top left", "top center", "top right"], ["middle left", "center", "middle right"],
         ["bottom left", "bottom center", "bottom right"]]


def _cell_of(box: tuple[float, float, float, float], width: int, height: int) -> str:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return CELLS[min(int(3 * cy / height), 2)][min(int(3 * cx / width), 2)]


def _iou(a: tuple, b: tuple) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _scene(seed: int = 0) -> tuple[AnnotatedImage, np.ndarray]:
    """Textured grey ground with shaded, striped rectangles ('cars') and two 'tanks'."""
    rng = np.random.default_rng(seed)
    rgb = np.clip(rng.normal(110, 12, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    specs = [("car", (20, 20, 44, 32), (200, 30, 30), "red"), ("car", (150, 30, 174, 42), (40, 70, 180), "blue"),
             ("car", (100, 110, 124, 122), (235, 235, 230), "white"), ("tank", (180, 170, 210, 200), (230, 230, 220), "white"),
             ("tank", (30, 180, 60, 210), (120, 80, 50), "brown")]
    objects = []
    for label, (x1, y1, x2, y2), colour, word in specs:
        shade = np.linspace(0.6, 1.15, x2 - x1)[None, :, None]  # left-to-right shading
        stripes = np.where(np.arange(y2 - y1)[:, None, None] % 4 == 0, 0.8, 1.0)  # texture
        rgb[y1:y2, x1:x2] = np.clip(np.array(colour) * shade * stripes, 0, 255).astype(np.uint8)
        polygon = ((x1, y1), (x2, y1), (x2, y2), (x1, y2))
        objects.append(ObjectAnnotation(label, (float(x1), float(y1), float(x2), float(y2)),
                                        tuple((float(x), float(y)) for x, y in polygon), word))
    image = AnnotatedImage("drawn.png", SIZE, SIZE, objects,
                           referring=[ReferringExpression("the red car in the top left", 0),
                                      ReferringExpression("the white tank", 3)])
    return image, rgb


@pytest.mark.parametrize(("text", "cell"), [
    ("The vehicle on the lower left", "bottom left"), ("the tank in the upper right corner", "top right"),
    ("the red car in the top center", "top center"), ("a ship at the bottom", "bottom center"),
    ("the bridge on the left", "middle left"), ("the field in the middle", "center"),
    ("the car to the left of the truck", None), ("the red car", None),
])
def test_find_position(text: str, cell: str | None) -> None:
    found = find_position(text)
    assert (found[2] if found else None) == cell


def test_replace_position_and_relations() -> None:
    assert replace_position("The vehicle on the lower left", "top right") == "The vehicle on the top right"
    assert replace_position("the red car", "center") == "the red car in the center"
    assert is_relational("the car closest to the building") and not is_relational("the car in the top left")
    assert find_colour_word("the grey ship in the top left") == (4, 8, "grey")
    assert find_colour_word("the red and blue ship") is None


@pytest.mark.parametrize("seed", range(6))
def test_spatial_edit_lands_in_named_cell_without_overlap(seed: int) -> None:
    image, rgb = _scene(seed)
    edit = spatial_edit(image, rgb, image.referring[0], np.random.default_rng(seed))
    assert edit is not None
    new_box = edit.image.objects[0].box_px
    # text and box agree: the phrase names the cell of the new box centre, computed here
    assert edit.to_cell == _cell_of(new_box, SIZE, SIZE) != "top left"
    assert edit.new_text == f"the red car in the {edit.to_cell}" and find_position(edit.new_text)[2] == edit.to_cell
    assert all(_iou(new_box, o.box_px) < MAX_IOU for i, o in enumerate(image.objects) if i != 0)
    # no other car there: the expression still names one object
    assert all(_cell_of(o.box_px, SIZE, SIZE) != edit.to_cell for o in image.objects[1:] if o.label == "car")
    # the object's pixels moved with it (exactly), the old place no longer shows a red car
    dx, dy = int(new_box[0] - 20), int(new_box[1] - 20)
    assert np.array_equal(edit.rgb[20 + dy:32 + dy, 20 + dx:44 + dx], rgb[20:32, 20:44])
    old = edit.rgb[20:32, 20:44].astype(float)
    assert old[..., 0].mean() - old[..., 1].mean() < 25 < rgb[20:32, 20:44, 0].mean() - rgb[20:32, 20:44, 1].mean()
    # far from both places nothing changed
    far = np.ones((SIZE, SIZE), bool)
    for x1, y1, x2, y2 in ((20, 20, 44, 32), new_box):
        far[max(int(y1) - 8, 0):int(y2) + 8, max(int(x1) - 8, 0):int(x2) + 8] = False
    assert np.array_equal(edit.rgb[far], rgb[far])
    assert edit.record()["type"] == "spatial" and edit.record()["fill"] in ("patch", "inpaint")


def _hue_deg(lab: np.ndarray) -> float:
    return math.degrees(math.atan2(float(lab[..., 2].mean()), float(lab[..., 1].mean())))


def _hue_gap(a: float, b: float) -> float:
    return abs((a - b + 180) % 360 - 180)


@pytest.mark.parametrize("seed", range(4))
def test_colour_edit_changes_hue_keeps_luminance_structure(seed: int) -> None:
    image, rgb = _scene()
    edit = colour_edit(image, rgb, image.referring[0], np.random.default_rng(seed))
    assert edit is not None and edit.old_colour == "red" and edit.new_colour != "red"
    assert edit.new_text == f"the {edit.new_colour} car in the top left"
    assert edit.image.objects[0].colour == edit.new_colour
    region = (slice(20, 32), slice(20, 44))
    before, after = rgb_to_lab(rgb[region]), rgb_to_lab(edit.rgb[region])
    # luminance structure (shading gradient + stripes) kept: L before/after linearly related
    corr = np.corrcoef(before[..., 0].ravel(), after[..., 0].ravel())[0, 1]
    assert corr > 0.97, corr
    # hue moved to the new colour's, far from red's
    target = rgb_to_lab(np.array({"blue": (38, 78, 176), "green": (48, 132, 58), "yellow": (232, 200, 46),
                                  "orange": (230, 122, 30)}[edit.new_colour], np.uint8))
    assert _hue_gap(_hue_deg(after), _hue_deg(target)) < 20
    assert _hue_gap(_hue_deg(after), _hue_deg(before)) > 25
    # the pixels now read as the new word; everything else untouched
    assert estimate_colour(edit.rgb, object_mask(edit.image.objects[0], SIZE, SIZE)) == edit.new_colour
    outside = ~object_mask(image.objects[0], SIZE, SIZE)
    assert np.array_equal(edit.rgb[outside], rgb[outside])


def test_colour_edit_keeps_expression_unique() -> None:
    image, rgb = _scene()
    # the other cars are blue and white: blue must never be chosen for the red car
    chosen = {colour_edit(image, rgb, image.referring[0], np.random.default_rng(s)).new_colour for s in range(30)}
    assert "blue" not in chosen and "red" not in chosen and len(chosen) >= 2


def test_augment_image_on_synthetic_scenes() -> None:
    from train.synthetic import generate_scene

    kinds = set()
    for seed in range(3):
        rgb, ann = generate_scene(seed, "parking lot", 504, 0.3, 0.6)
        for v in augment_image(ann, rgb, np.random.default_rng(seed)):
            kinds.add(v.record["type"])
            if v.record["type"] == "cutout":
                assert int(v.answer) == sum(o.label == v.query for o in v.image.objects) == v.record["count"]
            else:
                obj = v.image.objects[v.record["object_index"]]
                assert v.query == v.image.referring[0].text
                if v.record["type"] == "spatial":
                    assert _cell_of(obj.box_px, 504, 504) == v.record["to_cell"]
                    assert all(_iou(obj.box_px, o.box_px) < MAX_IOU for o in v.image.objects if o is not obj)
                else:
                    assert obj.colour == v.record["new_colour"] and v.record["new_colour"] in v.query
    assert kinds == {"cutout", "spatial", "colour"}


def test_augment_real_dota_sample(real_data) -> None:
    from train.converters import SkipLog, read_dota
    from train.data import read_rgb

    image = next(read_dota(real_data / "dota_sample", SkipLog()))
    rgb = read_rgb(image.image_path)
    variants = augment_image(image, rgb, np.random.default_rng(0), CdaOptions(spatial_edits=2, colour_edits=2))
    by_type = {}
    for v in variants:
        by_type.setdefault(v.record["type"], []).append(v)
    assert len(by_type["cutout"]) == 8  # 4 per vehicle class
    for v in by_type["spatial"] + by_type["colour"]:
        assert v.record["expression_constructed"]
        obj = v.image.objects[v.record["object_index"]]
        if v.record["type"] == "spatial":
            assert v.query.endswith(f"in the {v.record['to_cell']}")
            assert _cell_of(obj.box_px, image.width, image.height) == v.record["to_cell"]
        else:
            assert v.record["old_colour_estimated"] and v.query.startswith(f"the {v.record['new_colour']} ")
    assert len(by_type["spatial"]) >= 1 and len(by_type["colour"]) >= 1


def test_spatial_edit_keeps_objects_on_like_ground() -> None:
    """Half the image is water: a car standing on the grey half is never moved onto it."""
    rng = np.random.default_rng(0)
    rgb = np.clip(rng.normal(110, 6, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    rgb[:, : SIZE // 2] = (30, 60, 140)
    rgb[150:160, 180:200] = (200, 30, 30)
    car = ObjectAnnotation("car", (180.0, 150.0, 200.0, 160.0))
    image = AnnotatedImage("w.png", SIZE, SIZE, [car])
    moved_to = []
    for seed in range(8):
        edit = spatial_edit(image, rgb, ReferringExpression("the car", 0), np.random.default_rng(seed))
        if edit is not None:
            moved_to.append(edit.to_cell)
            assert (edit.new_box_px[0] + edit.new_box_px[2]) / 2 > SIZE // 2  # on the grey half
    assert moved_to  # there is grey ground in other cells, so some moves happen


def test_colour_targets_follow_the_class() -> None:
    from train.cda.colour import allowed_colours

    assert "blue" not in allowed_colours("tree") and "green" in allowed_colours("tree")
    assert allowed_colours("windmill") == ["red", "blue", "green", "yellow", "orange"]  # not a synthetic class
