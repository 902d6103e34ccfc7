"""Stage 0 of the demo recipe (train/vision_pretrain.py): per-patch targets and the training phase."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import skymoe
from train.demo import (DemoData, DemoModel, _conversation_texts, _patch_vocabulary, build_demo_model,
                        build_training_data)
from train.vision_pretrain import (HEATMAP_SIGMA, PatchHeads, _flipped, _keep_detector_heads, _stack, centre_box_iou,
                                   centre_heatmap, centre_peaks, centre_probability, head_losses, heatmap_focal_loss,
                                   patch_targets, pretrain_vision, read_object_annotations, word_directions, xyxy_iou)

VOCAB = _patch_vocabulary()


def test_patch_targets_of_one_object_hand_checked():
    # 504 px image, 18 x 18 patches of 28 px: the box spans columns 1-2 and row 1 exactly
    obj = {"label": "building", "box_px": (28, 28, 84, 56), "colour": "red"}
    t = patch_targets([obj], "residential", 504, 504, 18, VOCAB)
    k = VOCAB.object_classes.index("building")
    # centre (x 2.0, y 1.5) patches -> column 2, row 1, offset (0.0, 0.5); 2 x 1 patches
    assert t.centres.sum() == 1 and t.centres[1, 2, k] == 1
    assert t.has_box.sum() == 1 and t.has_box[1, 2]
    np.testing.assert_allclose(t.box[1, 2], [0.0, 0.5, math.log(2.0), 0.0], atol=1e-6)
    assert t.colour[1, 2] == VOCAB.colours.index("red") and (t.colour >= 0).sum() == 1
    assert t.cover[1, 1, k] == 1.0 and t.cover[1, 2, k] == 1.0 and t.cover[..., k].sum() == 2.0
    assert t.scene == VOCAB.scene_classes.index("residential")


def test_patch_targets_partial_cover_shared_centre_and_scaling():
    # a 1008 px image is resized to the grid: 56 px of it is one patch
    small = {"label": "car", "box_px": (56 + 14, 56 + 14, 56 + 28, 56 + 42), "colour": None}  # 0.25 x 0.5 patch
    big = {"label": "car", "box_px": (56, 56, 112, 112), "colour": "blue"}  # exactly patch (1, 1)
    t = patch_targets([small, big, {"label": "dragon", "box_px": (0, 0, 9, 9)}], None, 1008, 1008, 18, VOCAB)
    k = VOCAB.object_classes.index("car")
    assert t.centres[1, 1, k] == 2 and t.centres.sum() == 2  # unknown labels are ignored
    np.testing.assert_allclose(t.box[1, 1], [0.5, 0.5, 0.0, 0.0], atol=1e-6)  # the larger object's box
    assert t.colour[1, 1] == VOCAB.colours.index("blue")
    assert t.cover[1, 1, k] == 1.0 and t.scene == -100
    lone = patch_targets([small], None, 1008, 1008, 18, VOCAB)
    assert lone.cover[1, 1, k] == pytest.approx(0.125) and lone.colour[1, 1] == -100


def test_box_corners_mark_the_patches_a_box_overlaps_smaller_box_on_top():
    # 504 px, 18 patches of 28 px = 5.56 grid units: the road spans columns 0-8 of rows 0-1,
    # the car sits in patch (row 1, column 2) and overwrites the road there
    road = {"label": "building", "box_px": (0, 0, 252, 56)}
    car = {"label": "car", "box_px": (60, 30, 80, 50)}
    corners = patch_targets([car, road], None, 504, 504, 18, VOCAB).corners
    assert corners.shape == (18, 18, 4)
    np.testing.assert_array_equal(corners[0, 0], [0, 0, 50, 11])  # 252 / 504 = 50, 56 / 504 = 11.1
    np.testing.assert_array_equal(corners[1, 2], [12, 6, 16, 10])  # 60 / 5.04 = 11.9 ...
    assert (corners[:2, :9, 0] >= 0).all() and (corners[2:, :, 0] == -100).all() and (corners[:, 9:, 0] == -100).all()
    assert ((corners[..., 0] == 12).sum(), (corners[..., 0] == 0).sum()) == (1, 17)
    # a box too thin to cover any patch centre still marks the patch its corner lies in
    sliver = patch_targets([{"label": "tree", "box_px": (100, 100, 100, 100)}], None, 504, 504, 18, VOCAB).corners
    assert (sliver[..., 0] >= 0).sum() == 1 and sliver[3, 3, 0] == 20


def test_flipped_boxes_mirror_in_the_pixel_frame():
    objs = [{"label": "tree", "box_px": (10, 20, 30, 60)}]
    assert _flipped(objs, 100, 200, True, False)[0]["box_px"] == (70, 20, 90, 60)
    assert _flipped(objs, 100, 200, False, True)[0]["box_px"] == (10, 140, 30, 180)


def test_word_directions_are_the_unit_mean_embedding_of_each_name():
    tokenizer = skymoe.build_tokenizer(["the storage tank is red", "a grey truck by a swimming pool"] * 20, vocab_size=300)
    embeddings = torch.randn(len(tokenizer), 64)
    names = word_directions(tokenizer, embeddings, VOCAB)
    assert names.shape == (len(VOCAB.object_classes) + len(VOCAB.colours), 64)
    assert torch.allclose(names.norm(dim=-1), torch.ones(len(names)))
    tank = tokenizer(" storage tank", add_special_tokens=False)["input_ids"]
    expected = embeddings[tank].mean(dim=0)
    assert torch.allclose(names[VOCAB.object_classes.index("storage tank")], expected / expected.norm(), atol=1e-6)
    red = embeddings[tokenizer(" red", add_special_tokens=False)["input_ids"]].mean(dim=0)
    assert torch.allclose(names[len(VOCAB.object_classes) + VOCAB.colours.index("red")], red / red.norm(), atol=1e-6)


def test_cover_and_colour_logits_read_the_word_directions():
    k, c = len(VOCAB.object_classes), len(VOCAB.colours)
    names = torch.nn.functional.normalize(torch.randn(k + c, 64, generator=torch.Generator().manual_seed(0)), dim=-1)
    heads = PatchHeads(64, VOCAB, 3, names)
    truck, red = VOCAB.object_classes.index("truck"), VOCAB.colours.index("red")
    token = (names[truck] + names[k + red]).view(1, 1, 64)  # a patch pointing at " truck" and " red"
    out = heads(token)
    assert out["cover"].shape == (1, 1, k) and out["colour"].shape == (1, 1, c)
    assert int(out["cover"].argmax()) == truck and int(out["colour"].argmax()) == red
    with pytest.raises(ValueError, match="word directions"):
        PatchHeads(64, VOCAB, 3, names[:-1])


def test_stage0_hands_its_centre_box_and_colour_heads_to_an_object_code_model():
    k, c = len(VOCAB.object_classes), len(VOCAB.colours)
    generator = torch.Generator().manual_seed(1)
    names = torch.nn.functional.normalize(torch.randn(k + c, 64, generator=generator), dim=-1)
    heads = PatchHeads(64, VOCAB, 4, names)
    with torch.no_grad():  # trained-looking heads: scales and offsets away from their init
        heads.name_scale.uniform_(0.5, 3.0, generator=generator)
        heads.name_bias.uniform_(-1.0, 1.0, generator=generator)
    model = skymoe.SkyMoEForConditionalGeneration(skymoe.tiny_config(
        object_tokens=4, object_classes=k, object_codes=True, object_colours=c))
    _keep_detector_heads(model, heads)
    tokens = torch.randn(2, 16, 64, generator=generator)
    with torch.no_grad():
        out = heads(tokens)
        assert torch.allclose(model.model.object_scorer(tokens), out["centres"], atol=1e-5)
        assert torch.allclose(model.model.object_box_head(tokens), out["box"], atol=1e-5)
        assert torch.allclose(model.model.object_colour_head(tokens), out["colour"], atol=1e-5)
    wrong = skymoe.SkyMoEForConditionalGeneration(skymoe.tiny_config(
        object_tokens=4, object_classes=k, object_codes=True, object_colours=c + 1))
    with pytest.raises(ValueError, match="object_colours"):
        _keep_detector_heads(wrong, heads)


def test_box_weight_scales_the_box_term_only():
    k, c = len(VOCAB.object_classes), len(VOCAB.colours)
    names = torch.nn.functional.normalize(torch.randn(k + c, 64, generator=torch.Generator().manual_seed(1)), dim=-1)
    heads = PatchHeads(64, VOCAB, 3, names)
    objects = [{"label": "car", "box_px": (2.0, 2.0, 10.0, 8.0), "colour": "red"}]
    targets = _stack([patch_targets(objects, None, 30, 30, 3, VOCAB)])
    outputs = heads(torch.randn(1, 9, 64, generator=torch.Generator().manual_seed(2)))
    plain, weighted = head_losses(outputs, targets), head_losses(outputs, targets, box_weight=10.0)
    assert weighted["box"].item() == pytest.approx(10.0 * plain["box"].item()) and plain["box"].item() > 0
    assert all(torch.equal(weighted[name], plain[name]) for name in plain if name != "box")


def test_read_object_annotations_names_a_broken_line(tmp_path):
    path = tmp_path / "objects.jsonl"
    path.write_text(json.dumps({"image": "a.png", "scene_class": None, "width": 1, "height": 1, "objects": []})
                    + "\n{\"image\": \"b.png\"}\n")
    with pytest.raises(ValueError, match=r"objects.jsonl:2: not an object-annotation line"):
        read_object_annotations(path)


def _tiny_model(tokenizer):
    return build_demo_model(DemoModel(image_size=112, patch_size=28, vision_hidden=64, vision_layers=1,
                                      vision_heads=2, text_hidden=64, text_intermediate=128,
                                      text_layers=2, text_heads=1, bpe_vocab=300), tokenizer, 0)


@pytest.fixture(scope="module")
def stage0_data(tmp_path_factory):
    work = tmp_path_factory.mktemp("stage0")
    _, _, objects = build_training_data(work, DemoData(scenes=6, cda_share=0.5, workers=1), seed=4)
    return objects, skymoe.build_tokenizer(_conversation_texts(work / "moe.jsonl"), vocab_size=300)


@pytest.fixture(scope="module")
def stage0_run(stage0_data):
    objects, tokenizer = stage0_data
    model, processor = _tiny_model(tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = pretrain_vision(model, processor, objects, VOCAB, seconds=6.0, lr=1e-3, batch_size=4, seed=0,
                             held_out=2, log_every=1)
    return model, before, report, objects


def test_stage0_trains_only_the_tower_and_projector(stage0_run):
    model, before, report, _ = stage0_run
    assert report.steps_done >= 1  # at least one step whatever the machine speed
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(("model.vision_tower.", "model.multi_modal_projector.")) for n in changed)
    assert any(n.startswith("model.multi_modal_projector.") for n in changed)


def test_stage0_reports_losses_and_a_held_out_check(stage0_run):
    _, _, report, objects = stage0_run
    lines = read_object_annotations(objects)
    assert report.images == len(lines) - 2  # 6 scenes + CDA variants, 2 held out
    assert set(report.last_losses) == {"loss", "centres", "cover", "box", "colour", "scene", "position", "corners"}
    assert all(np.isfinite(v) for v in report.last_losses.values())
    assert set(report.held_out) == {"images", "count_exact", "count_within1", "centre_recall", "centre_precision",
                                    "centre_error_patches", "colour_accuracy",
                                    "position_accuracy", "corner_error_grid", "word_match_accuracy",
                                    "class_direction_cosine",
                                    "centre_box_acc50", "corner_box_acc50", "patch_only_acc50"}
    assert 0.0 <= report.held_out["position_accuracy"] <= 100.0 and report.held_out["corner_error_grid"] >= 0.0
    assert report.held_out["images"] == 2 and 0.0 <= report.held_out["count_exact"] <= 100.0
    assert all(0.0 <= report.held_out[k] <= 100.0 for k in ("count_within1", "centre_recall", "centre_precision"))


def test_stage0_with_poisson_rates_still_runs(stage0_data):
    objects, tokenizer = stage0_data
    model, processor = _tiny_model(tokenizer)
    report = pretrain_vision(model, processor, objects, VOCAB, seconds=2.0, lr=1e-3, batch_size=4, seed=1,
                             held_out=2, log_every=1, centre_loss="poisson")
    assert report.steps_done >= 1 and np.isfinite(report.last_losses["centres"])
    assert 0.0 <= report.held_out["count_exact"] <= 100.0


def _grid(values: dict[tuple[int, int], float], side: int = 4) -> torch.Tensor:
    """``(1, side * side, 1)`` map with ``values`` at (row, column), 0 elsewhere."""
    grid = torch.zeros(side, side)
    for (row, column), value in values.items():
        grid[row, column] = value
    return grid.reshape(1, side * side, 1)


def test_centre_heatmap_by_hand():
    heat = centre_heatmap(_grid({(1, 1): 1.0})).reshape(4, 4)
    two_sigma2 = 2 * HEATMAP_SIGMA**2
    assert heat[1, 1].item() == 1.0  # exactly 1: the focal loss's positives
    assert heat[1, 2].item() == pytest.approx(math.exp(-1 / two_sigma2))  # 0.41
    assert heat[2, 2].item() == pytest.approx(math.exp(-2 / two_sigma2))  # 0.17
    assert heat[3, 3].item() == pytest.approx(math.exp(-8 / two_sigma2))  # two patches off diagonally
    # at the edge the bump is cut off, not wrapped round to the far side
    corner = centre_heatmap(_grid({(0, 0): 2.0})).reshape(4, 4)
    assert corner[0, 0].item() == 1.0 and corner[3, 3].item() == 0.0 and corner[0, 3].item() == 0.0
    # overlapping bumps keep the larger value; classes stay apart
    pair = centre_heatmap(torch.cat([_grid({(0, 0): 1.0, (0, 2): 1.0}), _grid({})], dim=-1))
    assert pair[0, 1, 0].item() == pytest.approx(math.exp(-1 / two_sigma2)) and pair[..., 1].abs().sum() == 0


def test_heatmap_focal_loss_by_hand():
    heat = centre_heatmap(_grid({(1, 1): 1.0}))
    logits = torch.zeros_like(heat)  # p = 0.5 everywhere
    log_half = math.log(0.5)
    expected = -(0.25 * log_half + sum((1 - h) ** 4 * 0.25 * log_half for h in heat.flatten().tolist() if h < 1))
    assert heatmap_focal_loss(logits, heat).item() == pytest.approx(expected)
    sharp = torch.where(heat >= 1, torch.tensor(4.0), torch.tensor(-4.0))
    assert heatmap_focal_loss(sharp, heat).item() < 0.05 * heatmap_focal_loss(logits, heat).item()
    # an image without objects: the sum is not divided by zero
    assert torch.isfinite(heatmap_focal_loss(torch.zeros(1, 16, 1), torch.zeros(1, 16, 1)))


def test_centre_peaks_are_local_maxima_above_the_threshold():
    probability = _grid({(0, 0): 0.9, (0, 1): 0.5, (2, 2): 0.6, (3, 3): 0.2})
    peaks = centre_peaks(probability).reshape(4, 4)
    assert peaks.nonzero().tolist() == [[0, 0], [2, 2]]  # (0, 1) is beside a larger one; (3, 3) below 0.3
    rates = torch.log(torch.tensor([[[0.5]]]))
    assert centre_probability(rates, "poisson").item() == pytest.approx(1 - math.exp(-0.5))
    assert centre_probability(torch.zeros(1, 1, 1), "heatmap").item() == 0.5


def test_xyxy_iou_by_hand():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0], [10.0, 0.0, 20.0, 10.0]])
    assert torch.allclose(xyxy_iou(a, b), torch.tensor([1.0, 50.0 / 150.0, 0.0]))  # touching edges: 0


def test_centre_box_iou_by_hand():
    log = math.log
    truth = torch.tensor([[0.5, 0.5, log(2.0), log(1.0)], [0.9, 0.1, log(0.4), log(0.4)]])
    assert torch.allclose(centre_box_iou(truth, truth), torch.ones(2))
    shifted = truth.clone()
    shifted[0, 0] = 1.0  # half a patch right: overlap 1.5 x 1 of a union 2 + 2 - 1.5
    assert centre_box_iou(shifted, truth)[0].item() == pytest.approx(0.6)
    # the right size at the patch middle: the 2 x 1 box is found, the 0.4-patch one in the corner is not
    at_middle = centre_box_iou(truth, truth, torch.tensor([0.5, 0.5]))
    assert at_middle[0].item() == pytest.approx(1.0) and at_middle[1].item() == 0.0


def test_cover_temperature_reads_the_cosine_not_the_length():
    k, c = len(VOCAB.object_classes), len(VOCAB.colours)
    names = torch.nn.functional.normalize(torch.randn(k + c, 64, generator=torch.Generator().manual_seed(3)), dim=-1)
    heads = PatchHeads(64, VOCAB, 3, names, cover_temperature=10.0)
    truck = VOCAB.object_classes.index("truck")
    short, long = names[truck].view(1, 1, 64), 50 * names[truck].view(1, 1, 64)
    assert torch.allclose(heads(short)["cover"], heads(long)["cover"], atol=1e-5)  # the length does not count
    assert heads(short)["cover"][0, 0, truck].item() == pytest.approx(5.0, abs=1e-4)  # 10 x (cosine 1 - 0.5)
    plain = PatchHeads(64, VOCAB, 3, names)
    assert heads(long)["colour"].allclose(plain(long)["colour"])  # colours keep the projection
