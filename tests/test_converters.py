"""Converters on fixtures written here in each public format, and the real DOTA sample."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.path import Path as MplPath
from PIL import Image

from train.converters import EmptyDatasetError, SkipLog, normalise_label, read_captions, read_dior, read_dota
from train.converters import read_rsvg, read_rsvqa
from train.data import CropOptions, convert
from train.instructions import read_samples


def _image(path: Path, width: int, height: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return path


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_normalise_label() -> None:
    assert normalise_label("small-vehicle") == "small vehicle"
    assert normalise_label("Small_Car") == "small car"
    assert normalise_label(" Expressway-Service-area ") == "expressway service area"


# ------------------------------------------------------------------ DOTA / FAIR1M


def _dota_fixture(root: Path) -> None:
    _image(root / "images" / "P0001.png", 120, 90)
    _write(root / "labelTxt" / "P0001.txt", "\n".join([
        "imagesource:GoogleEarth",
        "gsd:0.146343590398",
        "10 10 30 10 30 20 10 20 small-vehicle 0",
        "40 10 60 12 58 30 38 28 small-vehicle 1",
        "70 40 100 40 100 80 70 80 large-vehicle 0",
        "12 abc 30 10 30 20 10 20 small-vehicle 0",      # line 6: malformed
        "200 200 220 200 220 230 200 230 plane 0",      # line 7: outside the 120x90 image
        "",
    ]))
    _write(root / "labelTxt" / "P0002.txt", "1 1 5 1 5 5 1 5 ship 0\n")  # no image


def test_dota_reader_objects_and_bad_lines(tmp_path: Path) -> None:
    _dota_fixture(tmp_path)
    log = SkipLog()
    images = list(read_dota(tmp_path, log))
    assert len(images) == 1
    image = images[0]
    assert (image.width, image.height) == (120, 90)
    assert [o.label for o in image.objects] == ["small vehicle", "small vehicle", "large vehicle"]
    assert image.objects[1].box_px == (38.0, 10.0, 60.0, 30.0)
    assert image.objects[1].polygon_px == ((40.0, 10.0), (60.0, 12.0), (58.0, 30.0), (38.0, 28.0))
    assert image.objects[1].difficult and not image.objects[0].difficult
    reasons = {(Path(s.path).name, s.line): s.reason for s in log.items}
    assert "malformed" in reasons[("P0001.txt", 6)] and "'12 abc" in reasons[("P0001.txt", 6)]
    assert "outside the 120x90 image" in reasons[("P0001.txt", 7)]
    assert "no image named P0002" in reasons[("P0002.txt", None)]
    assert len(log) == 3


def test_fair1m_dota_style_export(tmp_path: Path) -> None:
    _image(tmp_path / "images" / "12.tif", 64, 64)
    _write(tmp_path / "labelTxt" / "12.txt", "imagesource:GF2\ngsd:0.8\n"
           "1 1 20 1 20 10 1 10 Small Car 0\n30 30 60 30 60 60 30 60 Dry_Cargo_Ship\n")
    image = next(read_dota(tmp_path, SkipLog(), dataset="fair1m"))
    assert [o.label for o in image.objects] == ["small car", "dry cargo ship"]
    assert image.source == "fair1m:12"


def test_dota_convert_writes_jsonl_and_summary(tmp_path: Path) -> None:
    _dota_fixture(tmp_path / "src")
    summary = convert("dota", tmp_path / "src", tmp_path / "out")
    samples = list(read_samples(tmp_path / "out" / "data.jsonl"))
    by_id = {s.id: s for s in samples}
    assert by_id["P0001_OC_small_vehicle"].answer == "2"
    assert by_id["P0001_OC_small_vehicle"].prompt.startswith("[count]")
    assert "small vehicle" in by_id["P0001_OC_small_vehicle"].prompt
    # grounding of every small vehicle: boxes on the 0-100 grid of the 120x90 image
    assert by_id["P0001_VG_all_small_vehicle"].answer == "{<8><11><25><22>|<0>}{<32><11><50><33>|<0>}"
    assert (tmp_path / "out" / by_id["P0001_OC_small_vehicle"].image).is_file()
    assert summary.samples[("OC", "local")] == 2 and len(summary.skipped) == 3
    assert "skipped items 3" in summary.table()


def _independent_counts(label_path: Path, x0: int, y0: int, size: int) -> tuple[dict[str, int], dict[str, int]]:
    """Per class: objects with clearly >= 50 % of their polygon in the window, and borderline ones.

    Computed without the converter: the polygon is sampled on a quarter-pixel grid.
    """
    sure: dict[str, int] = {}
    borderline: dict[str, int] = {}
    for line in label_path.read_text().splitlines():
        tokens = line.split()
        if len(tokens) < 9:
            continue
        poly = np.array([float(t) for t in tokens[:8]]).reshape(4, 2)
        label = tokens[8].replace("-", " ")
        (ax, ay), (bx, by) = poly.min(0), poly.max(0)
        xs, ys = np.meshgrid(np.arange(ax, bx, 0.25) + 0.125, np.arange(ay, by, 0.25) + 0.125)
        points = np.stack([xs.ravel(), ys.ravel()], 1)
        inside = MplPath(poly).contains_points(points)
        px, py = points[:, 0], points[:, 1]
        visible = inside & (px >= x0) & (px < x0 + size) & (py >= y0) & (py < y0 + size)
        share = visible.sum() / inside.sum()
        target = borderline if 0.4 < share < 0.6 else sure if share >= 0.6 else None
        if target is not None:
            target[label] = target.get(label, 0) + 1
    return sure, borderline


@pytest.mark.parametrize(("size", "overlap"), [(504, 64), (256, 0)])
def test_real_dota_sample_counts_per_crop(real_data: Path, tmp_path: Path, size: int, overlap: int) -> None:
    src = real_data / "dota_sample"
    summary = convert("dota", src, tmp_path, crop=CropOptions(size_px=size, overlap_px=overlap))
    assert len(summary.skipped) == 0
    counts: dict[str, dict[str, int]] = {}
    for sample in read_samples(tmp_path / "data.jsonl"):
        if sample.task == "OC":
            label = sample.prompt.split("[count] ")[1]
            found = next(lab for lab in ("small vehicle", "large vehicle") if lab in label)
            counts.setdefault(sample.image, {})[found] = int(sample.answer)
    stems = {Path(p).stem for p in (tmp_path / "images").iterdir()}
    assert len(stems) == summary.images_out >= 4
    checked = 0
    for stem in stems:
        x0, y0 = (int(v) for v in stem.split("_")[1:])
        crop = Image.open(tmp_path / "images" / f"{stem}.png")
        assert crop.size == (min(size, 712), min(size, 557))
        sure, borderline = _independent_counts(src / "labelTxt" / "P1888.txt", x0, y0, size)
        got = counts.get(f"images/{stem}.png", {})
        for label in ("small vehicle", "large vehicle"):
            low, extra = sure.get(label, 0), borderline.get(label, 0)
            assert low <= got.get(label, 0) <= low + extra, (stem, label, got, sure, borderline)
            checked += low
    assert checked > 0


# ------------------------------------------------------------------ DIOR / RSVG (VOC XML)

_VOC = """<annotation>
  <filename>{filename}</filename>
  <size><width>100</width><height>100</height><depth>3</depth></size>
{objects}</annotation>
"""


def _voc_object(name: str, box: tuple, description: str | None = None) -> str:
    desc = f"\n    <description>{description}</description>" if description else ""
    return (f"  <object>\n    <name>{name}</name>\n    <pose>Unspecified</pose>\n"
            f"    <bndbox><xmin>{box[0]}</xmin><ymin>{box[1]}</ymin><xmax>{box[2]}</xmax><ymax>{box[3]}</ymax></bndbox>"
            f"\n    <difficult>0</difficult>{desc}\n  </object>\n")


def test_dior_reader_and_bad_xml(tmp_path: Path) -> None:
    _image(tmp_path / "JPEGImages-trainval" / "00001.jpg", 100, 100)
    objects = (_voc_object("vehicle", (10, 10, 20, 30)) + _voc_object("Expressway-Service-area", (40, 40, 90, 95))
               + _voc_object("ship", ("abc", 1, 5, 5)) + _voc_object("ship", (150, 150, 180, 190)))
    ann = tmp_path / "Annotations" / "Horizontal Bounding Boxes"
    _write(ann / "00001.xml", _VOC.format(filename="00001.jpg", objects=objects))
    _write(ann / "00002.xml", _VOC.format(filename="00002.jpg", objects=""))   # image missing
    _write(ann / "00003.xml", "<annotation>\n  <filename>00001.jpg\n</annotation>\n")  # broken on line 3
    log = SkipLog()
    images = list(read_dior(tmp_path, log))
    assert len(images) == 1
    assert [(o.label, o.box_px) for o in images[0].objects] == [
        ("vehicle", (10.0, 10.0, 20.0, 30.0)), ("expressway service area", (40.0, 40.0, 90.0, 95.0))]
    reasons = {(Path(s.path).name, s.line): s.reason for s in log.items}
    assert len(log) == 4
    assert "<xmin> is not a number: 'abc'" in reasons[("00001.xml", 16)]
    assert "outside the 100x100 image" in reasons[("00001.xml", 22)]
    assert "image '00002.jpg' not found" in reasons[("00002.xml", 2)]
    assert "malformed XML" in reasons[("00003.xml", 3)]


def test_dior_oriented_robndbox(tmp_path: Path) -> None:
    _image(tmp_path / "img" / "5.jpg", 100, 100)
    corners = "".join(f"<x_{c}>{x}</x_{c}><y_{c}>{y}</y_{c}>" for c, x, y in
                      [("left_top", 10, 20), ("right_top", 30, 10), ("right_bottom", 40, 30), ("left_bottom", 20, 40)])
    obj = f"  <object><name>ship</name><robndbox>{corners}<angle>30</angle></robndbox></object>\n"
    _write(tmp_path / "ann" / "5.xml", _VOC.format(filename="5.jpg", objects=obj))
    image = next(read_dior(tmp_path, SkipLog()))
    assert image.objects[0].box_px == (10.0, 10.0, 40.0, 40.0)
    assert len(image.objects[0].polygon_px) == 4


def test_rsvg_referring_expressions(tmp_path: Path) -> None:
    _image(tmp_path / "JPEGImages" / "00005.jpg", 100, 100)
    objects = (_voc_object("vehicle", (5, 60, 15, 80), "The vehicle on the lower left")
               + _voc_object("storagetank", (60, 5, 90, 35), "The   storage tank in the upper right")
               + _voc_object("bridge", (40, 40, 60, 60)))
    _write(tmp_path / "Annotations" / "00005.xml", _VOC.format(filename="00005.jpg", objects=objects))
    log = SkipLog()
    image = next(read_rsvg(tmp_path, log))
    assert [(r.text, image.objects[r.object_index].label) for r in image.referring] == [
        ("The vehicle on the lower left", "vehicle"), ("The storage tank in the upper right", "storagetank")]
    assert "no <description>" in log.items[0].reason and log.items[0].line == 18
    convert("rsvg", tmp_path, tmp_path / "out")
    samples = list(read_samples(tmp_path / "out" / "data.jsonl"))
    assert [s.task for s in samples] == ["VG", "VG"]  # RSVG objects are not exhaustive: no counts
    assert samples[0].prompt.count("<p>The vehicle on the lower left</p>") == 1
    assert samples[0].answer == "{<5><60><15><80>|<0>}"


# ------------------------------------------------------------------ captions


def test_caption_json(tmp_path: Path) -> None:
    _image(tmp_path / "imgs" / "1.tif", 64, 64)
    _image(tmp_path / "imgs" / "2.tif", 64, 64)
    data = {"images": [
        {"filename": "1.tif", "imgid": 0, "split": "train", "sentids": [0, 1],
         "sentences": [{"raw": "there is a piece of farmland .", "tokens": ["there"], "imgid": 0, "sentid": 0},
                       {"raw": "Many  green fields", "tokens": ["many"], "imgid": 0, "sentid": 1}]},
        {"filename": "2.tif", "imgid": 1, "split": "test", "sentids": [2],
         "sentences": [{"raw": "a runway .", "tokens": ["a"], "imgid": 1, "sentid": 2}]},
        {"filename": "3.tif", "imgid": 2, "split": "train", "sentids": [3],
         "sentences": [{"raw": "missing image .", "tokens": [], "imgid": 2, "sentid": 3}]},
    ], "dataset": "ucm"}
    _write(tmp_path / "dataset_ucm.json", json.dumps(data))
    log = SkipLog()
    images = list(read_captions(tmp_path, log, split="train"))
    assert [i.captions for i in images] == [["There is a piece of farmland.", "Many green fields."]]
    assert "images[2]: image '3.tif' not found" in log.items[0].reason
    summary = convert("captions", tmp_path, tmp_path / "out")
    assert summary.samples[("IC", "global")] == 3
    _write(tmp_path / "bad" / "dataset_x.json", '{"images": [\n  {"filename": 1,}\n]}')
    with pytest.raises(ValueError, match=r"dataset_x.json:2: invalid JSON"):
        list(read_captions(tmp_path / "bad", SkipLog()))


# ------------------------------------------------------------------ RSVQA


def test_rsvqa_json(tmp_path: Path) -> None:
    for i in (0, 1):
        _image(tmp_path / "Images_LR" / f"{i}.tif", 32, 32)
    questions = [
        {"id": 0, "img_id": 0, "type": "rural_urban", "question": "Is it a rural or an urban area",
         "answers_ids": [0], "active": True},
        {"id": 1, "img_id": 0, "type": "count", "question": "How many buildings are there?",
         "answers_ids": [1], "active": True},
        {"id": 2, "img_id": 1, "type": "presence", "question": "Is there a road?", "answers_ids": [2], "active": False},
        {"id": 3, "img_id": 2, "type": "presence", "question": "Is there water?", "answers_ids": [3], "active": True},
    ]
    answers = [{"id": i, "question_id": i, "answer": a, "active": True} for i, a in enumerate(["rural", "12", "yes", "no"])]
    images = [{"id": 0, "questions_ids": [0, 1], "active": True}, {"id": 1, "questions_ids": [2], "active": True},
              {"id": 2, "questions_ids": [3], "active": True}]
    for part, entries in (("questions", questions), ("answers", answers), ("images", images)):
        _write(tmp_path / f"LR_split_test_{part}.json", json.dumps({part: entries}))
    log = SkipLog()
    result = list(read_rsvqa(tmp_path, log))
    assert len(result) == 1
    assert [(q.question, q.answer, q.kind) for q in result[0].questions] == [
        ("Is it a rural or an urban area?", "rural", "rural_urban"), ("How many buildings are there?", "12", "count")]
    assert "image id 2: no file 2.*" in log.items[0].reason
    samples = list(read_samples(_converted(tmp_path, "rsvqa")))
    assert [(s.task, s.granularity, s.answer) for s in samples] == [("VQA", "global", "rural"), ("VQA", "global", "12")]
    assert "[vqa] Is it a rural or an urban area?" in samples[0].prompt


def _converted(src: Path, fmt: str) -> Path:
    convert(fmt, src, src / "out")
    return src / "out" / "data.jsonl"


# ------------------------------------------------------------------ empty sources


@pytest.mark.parametrize("fmt", ["dota", "dior", "rsvg", "captions", "rsvqa"])
def test_empty_dataset_is_an_error(tmp_path: Path, fmt: str) -> None:
    with pytest.raises(EmptyDatasetError, match=str(tmp_path)):
        convert(fmt, tmp_path, tmp_path / "out")


def test_all_items_bad_is_an_error(tmp_path: Path) -> None:
    _write(tmp_path / "labelTxt" / "A.txt", "1 1 5 1 5 5 1 5 ship 0\n")
    with pytest.raises(EmptyDatasetError, match="1 items skipped; first: .*A.txt: no image named A"):
        convert("dota", tmp_path, tmp_path / "out")
