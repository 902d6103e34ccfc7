"""Instruction samples, 504 px crops and JSONL input/output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skymoe.parsing import parse_answer
from skymoe.prompts import task_of_prompt
from train.annotations import AnnotatedImage, ObjectAnnotation, QuestionAnswer, ReferringExpression
from train.instructions import (
    CropWindow,
    InstructionSample,
    JsonlError,
    SampleOptions,
    annotated_image_from_json,
    annotated_image_to_json,
    crop_annotation,
    crop_windows,
    make_samples,
    needs_crop,
    read_samples,
)

TASK_OF_CODE = {"SC": "classify", "IC": "caption", "VQA": "vqa", "VG": "ground", "OC": "count"}


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 3000), st.integers(1, 3000), st.integers(32, 600), st.data())
def test_crop_windows_cover_the_image(width: int, height: int, size: int, data: st.DataObject) -> None:
    overlap = data.draw(st.integers(0, size - 1))
    windows = crop_windows(width, height, size, overlap)
    xs = sorted({w.x_px for w in windows})
    ys = sorted({w.y_px for w in windows})
    for w in windows:
        assert 0 <= w.x_px and w.x_px + w.width_px <= width and 0 <= w.y_px and w.y_px + w.height_px <= height
        assert (w.width_px, w.height_px) == (min(size, width), min(size, height))
    # union covers every column/row: consecutive windows touch or overlap by >= overlap (where there are two)
    assert xs[0] == 0 and xs[-1] + min(size, width) == width
    assert ys[0] == 0 and ys[-1] + min(size, height) == height
    for a, b in zip(xs, xs[1:]):
        assert size - (b - a) >= overlap
    for a, b in zip(ys, ys[1:]):
        assert size - (b - a) >= overlap
    assert len(windows) == len(xs) * len(ys)


def test_crop_windows_rejects_bad_overlap() -> None:
    with pytest.raises(ValueError, match="overlap_px must be in"):
        crop_windows(1000, 1000, 504, 504)


def test_crop_annotation_clips_and_drops() -> None:
    objects = [
        ObjectAnnotation("car", (90.0, 10.0, 110.0, 20.0)),   # half inside a 100 px window: kept, clipped
        ObjectAnnotation("car", (94.0, 30.0, 114.0, 40.0)),   # 30 % inside: dropped
        ObjectAnnotation("car", (97.0, 50.0, 98.5, 90.0)),    # 1.5 px wide: dropped (< 4 px)
        ObjectAnnotation("ship", (10.0, 10.0, 30.0, 30.0), ((10.0, 20.0), (20.0, 10.0), (30.0, 20.0), (20.0, 30.0))),
        ObjectAnnotation("ship", (150.0, 150.0, 170.0, 170.0)),  # outside
    ]
    image = AnnotatedImage("big.png", 200, 200, objects, source="t")
    crop = crop_annotation(image, CropWindow(0, 0, 100, 100), "c.png")
    assert [(o.label, o.box_px) for o in crop.objects] == [("car", (90.0, 10.0, 100.0, 20.0)),
                                                           ("ship", (10.0, 10.0, 30.0, 30.0))]
    assert crop.objects[1].polygon_px is not None and len(crop.objects[1].polygon_px) == 4
    shifted = crop_annotation(image, CropWindow(100, 0, 100, 100), "d.png")
    # exactly half of the first car lies in each window: kept in both; the second car is 70 % in here
    assert [o.box_px for o in shifted.objects] == [(0.0, 10.0, 10.0, 20.0), (0.0, 30.0, 14.0, 40.0)]
    # a window cutting the diamond leaves a clipped polygon within the window
    half = crop_annotation(image, CropWindow(18, 0, 100, 100), "e.png", min_visible=0.3)
    poly = np.array(half.objects[-1].polygon_px)
    assert poly[:, 0].min() >= 0 and half.objects[-1].box_px[0] == 0.0


def _image() -> AnnotatedImage:
    objects = [ObjectAnnotation("car", (0.0, 0.0, 50.0, 25.0)), ObjectAnnotation("car", (100.0, 50.0, 150.0, 90.0)),
               ObjectAnnotation("storage tank", (150.0, 0.0, 200.0, 50.0))]
    return AnnotatedImage("x.png", 200, 100, objects, scene_class="parking lot",
                          captions=["A parking lot with two cars.", "Cars park."],
                          referring=[ReferringExpression("the car in the top left", 0)],
                          questions=[QuestionAnswer("Is there a car?", "yes", "presence")])


def test_make_samples_all_tasks() -> None:
    samples = make_samples(_image(), "images/x.png")
    codes = [s.task for s in samples]
    assert codes.count("SC") == 1 and codes.count("IC") == 2 and codes.count("VQA") == 1
    assert codes.count("OC") == 2 and codes.count("VG") == 3  # referring + "every car" + "every storage tank"
    for s in samples:
        assert s.conversations[0]["value"].startswith("<image>\n")
        assert task_of_prompt(s.prompt) == TASK_OF_CODE[s.task]
        assert s.granularity == ("local" if s.task in ("VG", "OC") else "global")
        assert s.image == "images/x.png"
    assert len({s.id for s in samples}) == len(samples)
    by_id = {s.id: s for s in samples}
    assert by_id["x_OC_car"].answer == "2" and by_id["x_SC"].answer == "parking lot"
    assert "<p>the car in the top left</p>" in by_id["x_VG_0"].prompt
    # grounding answers parse back to the pixel boxes (0-100 grid of the 200x100 image)
    parsed = parse_answer("ground", by_id["x_VG_all_car"].answer, (200, 100))
    assert [(b.x1_px, b.y1_px, b.x2_px, b.y2_px) for b in parsed.boxes] == [(0, 0, 50, 25), (100, 50, 150, 90)]


def test_make_samples_options() -> None:
    only_vg = make_samples(_image(), "x.png", SampleOptions(tasks=frozenset({"VG"}), max_ground_instances=0))
    assert [s.id for s in only_vg] == ["x_VG_0"]
    local_vqa = make_samples(_image(), "x.png", SampleOptions(tasks=frozenset({"VQA"}), vqa_granularity="local"))
    assert [s.granularity for s in local_vqa] == ["local"]
    canonical = make_samples(_image(), "x.png", SampleOptions(vary_templates=False))
    assert all(s.prompt.startswith(("[count] How many", "[refer] Where is", "[classify] Which", "[caption] Describe",
                                    "[vqa] Is there")) for s in canonical)


def test_needs_crop() -> None:
    big = AnnotatedImage("x.png", 800, 800, [ObjectAnnotation("car", (0.0, 0.0, 5.0, 5.0))])
    assert needs_crop(big)
    assert not needs_crop(AnnotatedImage("x.png", 800, 800, captions=["A field."]))
    assert not needs_crop(AnnotatedImage("x.png", 504, 504))


def test_annotated_image_round_trip(tmp_path: Path) -> None:
    image = _image()
    image.image_path = str(tmp_path / "images" / "x.png")
    image.objects[0] = ObjectAnnotation("car", (0.0, 0.0, 50.0, 25.0), ((0.0, 0.0), (50.0, 0.0), (50.0, 25.0)),
                                        "red", True, {"size": "small"})
    record = json.loads(json.dumps(annotated_image_to_json(image, relative_to=tmp_path)))
    assert record["image_path"] == "images/x.png"
    back = annotated_image_from_json(record, base_dir=tmp_path)
    assert back == image and back.objects[0].attributes == {"size": "small"}
    with pytest.raises(ValueError, match="not an annotated image record"):
        annotated_image_from_json({"image_path": "x.png"})


def test_read_samples_names_file_and_line(tmp_path: Path) -> None:
    good = make_samples(_image(), "x.png")[0].to_json()
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + '{"id": 1,\n')
    with pytest.raises(JsonlError, match=r"data.jsonl:3: invalid JSON"):
        list(read_samples(path))
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "task": "XX"}) + "\n")
    with pytest.raises(JsonlError, match=r"data.jsonl:2: task 'XX' is not one of"):
        list(read_samples(path))
    path.write_text(json.dumps({**good, "augmentation": {"type": "colour"}}) + "\n")
    (sample,) = read_samples(path)
    assert isinstance(sample, InstructionSample) and sample.to_json()["augmentation"] == {"type": "colour"}
