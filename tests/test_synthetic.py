"""Synthetic scene generator: determinism, truth == pixels, language consistent with the scene graph."""

from __future__ import annotations

import re
from collections import Counter

import cv2
import numpy as np
import pytest

from train.synthetic import GRID_CELLS, OBJECT_CLASSES, SCENE_CLASSES, build_scene, generate_scene, render_scene
from train.synthetic.classes import COLOURS, count_range
from train.synthetic.dataset import generate_dataset, sample_seed, sample_specs
from train.synthetic.geometry import box_iou, cell_bounds, grid_cell
from train.synthetic.language import matches, object_attributes, parse_reference
from train.synthetic.scene import MAX_SAME_CLASS_IOU, annotate

SCENES = sorted(SCENE_CLASSES)


@pytest.fixture(scope="module")
def scenes():
    """One dense and one sparse scene per scene class: ``(graph, image, annotation)``."""
    out = []
    for k, name in enumerate(SCENES):
        for difficulty in (0.0, 1.0):
            graph = build_scene(1000 + k, name, 504, 0.3, difficulty)
            out.append((graph, render_scene(graph), annotate(graph)))
    return out


def test_catalogue_has_enough_classes():
    assert len(OBJECT_CLASSES) >= 8
    assert len(SCENE_CLASSES) >= 8
    used = {label for s in SCENE_CLASSES.values() for label in s.counts}
    assert used == set(OBJECT_CLASSES)


def test_every_scene_class_gets_objects_of_its_main_class(scenes):
    for graph, _, ann in scenes:
        assert ann.scene_class == graph.scene_class
        spec = SCENE_CLASSES[graph.scene_class]
        required = [label for label, (lo, _) in spec.counts.items() if lo >= 1]
        labels = Counter(o.label for o in ann.objects)
        assert any(labels[label] >= 1 for label in required), (graph.scene_class, labels)


def test_deterministic_for_a_seed():
    img_a, ann_a = generate_scene(42, "harbour")
    img_b, ann_b = generate_scene(42, "harbour")
    img_c, _ = generate_scene(43, "harbour")
    assert np.array_equal(img_a, img_b)
    assert ann_a == ann_b
    assert [o.attributes for o in ann_a.objects] == [o.attributes for o in ann_b.objects]
    assert not np.array_equal(img_a, img_c)


def test_boxes_inside_image_and_same_class_overlap_small(scenes):
    for _, img, ann in scenes:
        h, w = img.shape[:2]
        for o in ann.objects:
            x1, y1, x2, y2 = o.box_px
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
            poly = np.array(o.polygon_px)
            assert poly.shape == (4, 2) and (poly >= 0).all() and (poly[:, 0] <= w).all() and (poly[:, 1] <= h).all()
            assert o.attributes["grid_cell"] == grid_cell((x1 + x2) / 2, (y1 + y2) / 2, w, h)
        for label in {o.label for o in ann.objects}:
            boxes = np.array([o.box_px for o in ann.objects if o.label == label])
            for i in range(len(boxes)):
                others = np.delete(boxes, i, axis=0)
                if len(others):
                    assert box_iou(tuple(boxes[i]), others).max() < MAX_SAME_CLASS_IOU


def _object_masks(ann, shape):
    masks = []
    for o in ann.objects:
        m = np.zeros(shape, np.uint8)
        cv2.fillPoly(m, [np.round(np.array(o.polygon_px)).astype(np.int32)], 1)
        masks.append(m.astype(bool))
    return masks


def test_objects_differ_from_background_and_nothing_else_is_drawn(scenes):
    """Each annotated object changes its pixels (also after a 504 -> 336 resize); pixels far from every
    object (beyond its shadow) are unchanged, so nothing unannotated is drawn."""
    for graph, img, ann in scenes:
        bg = render_scene(graph, with_objects=False)
        diff = np.abs(img.astype(np.int16) - bg.astype(np.int16)).mean(axis=2)
        small = np.abs(cv2.resize(img, (336, 336), interpolation=cv2.INTER_AREA).astype(np.int16)
                       - cv2.resize(bg, (336, 336), interpolation=cv2.INTER_AREA).astype(np.int16)).mean(axis=2)
        masks = _object_masks(ann, diff.shape)
        for o, m in zip(graph.objects, masks):
            assert diff[m].mean() > 12, (graph.scene_class, o.label, diff[m].mean())
            m_small = cv2.resize(m.astype(np.uint8), (336, 336), interpolation=cv2.INTER_NEAREST).astype(bool)
            if m_small.any():
                assert small[m_small].mean() > 8, (graph.scene_class, o.label)
        if not masks:
            assert (diff < 1).all()
            continue
        reach = int(max(o.height_m for o in graph.objects) * graph.shadow_per_m / graph.gsd_m) + 6
        union = np.any(masks, axis=0).astype(np.uint8)
        near = cv2.dilate(union, np.ones((2 * reach + 1, 2 * reach + 1), np.uint8)).astype(bool)
        assert (diff[~near] < 1).all()


def test_counts_in_questions_and_captions_equal_drawn_objects(scenes):
    for _, _, ann in scenes:
        counts = Counter(o.label for o in ann.objects)
        plural = {c.plural: name for name, c in OBJECT_CLASSES.items()}
        for qa in ann.questions:
            if qa.kind == "count":
                label = plural[re.match(r"How many (.+) are there\?", qa.question)[1]]
                assert qa.answer == str(counts[label])
            if qa.kind == "presence":
                label = re.match(r"Is there a (.+) in the image\?", qa.question)[1]
                assert qa.answer == ("yes" if counts[label] else "no")
            if qa.kind == "comparison":
                a, b = re.match(r"Are there more (.+) than (.+)\?", qa.question).groups()
                assert qa.answer == ("yes" if counts[plural[a]] > counts[plural[b]] else "no")
        said = dict((label if label in OBJECT_CLASSES else plural[label], int(n))
                    for n, label in re.findall(r"(\d+) ([a-z ]+?)(?:,| and|\.)", ann.captions[0]))
        assert said == dict(counts)
        assert len(set(ann.captions)) >= 3


def test_referring_expressions_name_exactly_one_object(scenes):
    n_refs = 0
    for graph, _, ann in scenes:
        attrs = object_attributes(graph)
        for ref_expr in ann.referring:
            ref = parse_reference(ref_expr.text)
            target = ann.objects[ref_expr.object_index]
            assert ref.label == target.label
            candidates = matches(ref, attrs)
            assert ref_expr.object_index in candidates
            if ref.anchor is None:
                assert candidates == [ref_expr.object_index], ref_expr.text
            else:
                anchors = [o for o in graph.objects if o.label == ref.anchor]
                assert len(anchors) == 1
                d = {i: np.hypot(graph.objects[i].cx_px - anchors[0].cx_px, graph.objects[i].cy_px - anchors[0].cy_px)
                     for i in candidates}
                assert min(d, key=d.get) == ref_expr.object_index
            n_refs += 1
    assert n_refs > 50


def test_answers_are_short_and_match_objects(scenes):
    for graph, _, ann in scenes:
        attrs = object_attributes(graph)
        for qa in ann.questions:
            if qa.kind in ("presence", "comparison", "relative position"):
                assert qa.answer in ("yes", "no")
            elif qa.kind == "count":
                assert qa.answer.isdigit()
            elif qa.kind == "colour":
                ref = parse_reference(re.match(r"What colour is (.+)\?", qa.question)[1])
                (i,) = matches(ref, attrs)
                assert ref.colour is None and qa.answer == graph.objects[i].colour in COLOURS
            elif qa.kind == "position":
                ref = parse_reference(re.match(r"Where is (.+)\?", qa.question)[1])
                (i,) = matches(ref, attrs)
                assert ref.cell is None and qa.answer == attrs[i]["cell"] in GRID_CELLS
            else:
                pytest.fail(f"unexpected question kind {qa.kind!r}")


def test_relative_position_answers_follow_centres(scenes):
    checked = 0
    for graph, _, ann in scenes:
        attrs = object_attributes(graph)
        for qa in ann.questions:
            if qa.kind != "relative position":
                continue
            m = re.match(r"Is (.+) (to the left of|above) (.+)\?", qa.question)
            (i,), (j,) = matches(parse_reference(m[1]), attrs), matches(parse_reference(m[3]), attrs)
            a, b = graph.objects[i], graph.objects[j]
            truth = a.cx_px < b.cx_px if m[2] == "to the left of" else a.cy_px < b.cy_px
            assert qa.answer == ("yes" if truth else "no")
            checked += 1
    assert checked > 5


def test_sizes_follow_gsd():
    for gsd in (0.3, 0.5):
        graph = build_scene(7, "parking lot", 504, gsd, 0.5)
        for o in annotate(graph).objects:
            poly = np.array(o.polygon_px)
            length_px = np.linalg.norm(poly[0] - poly[3])
            assert abs(length_px * gsd - o.attributes["length_m"]) < 0.05
            lo, hi = OBJECT_CLASSES[o.label].length_m
            assert lo - 0.01 <= o.attributes["length_m"] <= hi + 0.01


def test_difficulty_controls_density():
    sparse = [len(build_scene(s, "parking lot", difficulty=0.0).objects) for s in range(3)]
    dense = [len(build_scene(s, "parking lot", difficulty=1.0).objects) for s in range(3)]
    assert max(sparse) < min(dense)
    assert count_range(4, 40, 0.0) == (4, 13) and count_range(4, 40, 1.0) == (4, 40)


def test_grid_cells_round_trip():
    for cell in GRID_CELLS:
        x1, y1, x2, y2 = cell_bounds(cell, 504, 504)
        assert grid_cell((x1 + x2) / 2, (y1 + y2) / 2, 504, 504) == cell


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown scene class 'moon'"):
        generate_scene(1, "moon")
    with pytest.raises(ValueError, match="gsd_m"):
        generate_scene(1, "forest", gsd_m=5.0)
    with pytest.raises(ValueError, match="difficulty"):
        generate_scene(1, "forest", difficulty=1.5)
    with pytest.raises(ValueError, match="n must be"):
        generate_dataset("/nonexistent", 0, seed=1)
    with pytest.raises(ValueError, match="not a synthetic referring expression"):
        parse_reference("the purple elephant")


def test_generate_dataset_writes_pngs_matching_scenes(tmp_path):
    anns = generate_dataset(tmp_path, 4, seed=5, size_px=256, difficulty=(0.0, 1.0))
    assert len(anns) == 4 and len({a.scene_class for a in anns}) == 4
    for i, ann in enumerate(anns):
        png = cv2.cvtColor(cv2.imread(ann.image_path), cv2.COLOR_BGR2RGB)
        img, again = generate_scene(sample_seed(5, i), ann.scene_class, 256, 0.3, i / 3)
        assert np.array_equal(png, img)
        assert again.objects == ann.objects and again.questions == ann.questions


def test_dataset_specs_gsd_range_and_balance(tmp_path):
    specs = sample_specs(tmp_path, 90, seed=2, gsd_m=(0.3, 0.5), difficulty=0.5)
    assert Counter(s.scene_class for s in specs) == {name: 10 for name in SCENES}
    gsds = [s.gsd_m for s in specs]
    assert 0.3 <= min(gsds) < 0.35 and 0.45 < max(gsds) <= 0.5
    assert specs == sample_specs(tmp_path, 90, seed=2, gsd_m=(0.3, 0.5), difficulty=0.5)
    with pytest.raises(ValueError, match="image_format"):
        sample_specs(tmp_path, 2, seed=2, image_format="gif")
