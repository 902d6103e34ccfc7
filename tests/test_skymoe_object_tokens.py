"""Object tokens: peak selection, the tokens the language model reads, config, save/load, routing, the demo."""

import json

import numpy as np
import pytest
import torch

import skymoe
from skymoe import SkyMoEForConditionalGeneration, capture_routing, tiny_config
from skymoe.errors import SkyMoEConfigError
from skymoe.object_tokens import (CORNER_CODE_WIDTH, PEAK_THRESHOLD, box_corners_on_grid, detection_features,
                                   object_image_tokens, select_object_patches)
from skymoe.position_codes import sincos_codes
from skymoe.presets import make_tiny_checkpoint

OBJECTS = {"object_tokens": 4, "object_classes": 3, "object_context_grid": 2}  # 16 patches -> 4 + 4 tokens
CODES = {**OBJECTS, "object_codes": True, "object_colours": 5}


def _logits(side: int, classes: int, peaks: dict[tuple[int, int], float]) -> torch.Tensor:
    """``(1, side*side, classes)`` logits, very low except ``{(patch, class): probability}``."""
    probs = torch.full((1, side * side, classes), 1e-4)
    for (patch, cls), p in peaks.items():
        probs[0, patch, cls] = p
    return torch.logit(probs)


def test_peaks_come_first_strongest_first_then_in_row_major_order():
    # 4 x 4 grid; class 0 peaks at patch 5 (0.9) with a weaker neighbour at 6 (0.6, not a peak of
    # class 0); class 1 peaks at patch 6 (0.5, a peak of its own class) and at patch 15 (0.4)
    logits = _logits(4, 2, {(5, 0): 0.9, (6, 0): 0.6, (6, 1): 0.5, (15, 1): 0.4})
    chosen, strength = select_object_patches(logits, k=2)
    assert chosen.tolist() == [[5, 6]]  # the two strongest peaks, patch 15 (0.4) left out
    assert strength[0].tolist() == pytest.approx([0.9, 0.5], abs=1e-5)  # 6 is class 1's peak, not class 0's shoulder
    chosen, strength = select_object_patches(logits, k=4)
    assert {5, 6, 15} < set(chosen[0].tolist())  # the fourth slot: a background patch
    assert chosen[0].tolist() == sorted(chosen[0].tolist())
    assert sorted(strength[0].tolist(), reverse=True)[:3] == pytest.approx([0.9, 0.5, 0.4], abs=1e-5)


def test_object_image_tokens_are_pooled_context_then_the_peak_patches():
    side, width = 4, 6
    grid = torch.arange(side * side * width, dtype=torch.float32).reshape(1, side * side, width)
    logits = _logits(side, 2, {(1, 0): 0.95, (14, 1): 0.8})  # two objects; k=3 leaves one slot empty
    tokens, patches = object_image_tokens(grid, logits, k=3, context_grid=2)
    assert tokens.shape == (1, 4 + 3, width) and patches.shape == (1, 7)
    # context token 0 is the mean of the top-left 2 x 2 patches (0, 1, 4, 5)
    assert torch.allclose(tokens[0, 0], grid[0, [0, 1, 4, 5]].mean(dim=0))
    assert patches[0, :4].tolist() == [-1] * 4
    objects = patches[0, 4:].tolist()
    filled = [p for p in objects if p >= 0]
    assert filled == [1, 14]
    for slot, patch in enumerate(objects):
        expected = grid[0, patch] if patch >= 0 else torch.zeros(width)
        assert torch.equal(tokens[0, 4 + slot], expected)


def test_object_tokens_need_a_peak_above_the_threshold():
    logits = _logits(4, 1, {(3, 0): PEAK_THRESHOLD - 0.05})
    _, patches = object_image_tokens(torch.ones(1, 16, 2), logits, k=2, context_grid=1)
    assert patches[0, 1:].tolist() == [-1, -1]


def test_config_derives_the_image_tokens_and_rejects_bad_object_fields():
    config = tiny_config(**OBJECTS)
    assert config.image_seq_length == 4 + 4
    assert tiny_config().image_seq_length == 16 and tiny_config().object_tokens == 0
    with pytest.raises(SkyMoEConfigError, match="object_classes"):
        tiny_config(object_tokens=4)
    with pytest.raises(SkyMoEConfigError, match=r"object_tokens must lie in \[1, 16\]"):
        tiny_config(object_tokens=17, object_classes=3)
    with pytest.raises(SkyMoEConfigError, match="object_context_grid"):
        tiny_config(object_tokens=4, object_classes=3, object_context_grid=5)
    with pytest.raises(SkyMoEConfigError, match="vision_feature_select_strategy"):
        tiny_config(vision_feature_select_strategy="full", **OBJECTS)


def test_the_language_model_reads_context_and_object_tokens():
    torch.manual_seed(0)
    model = SkyMoEForConditionalGeneration(tiny_config(**OBJECTS)).eval()
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        grid = model.model.patch_tokens(pixels)
        expected, patches = object_image_tokens(grid, model.model.object_scorer(grid), 4, 2)
        features = torch.stack(list(model.model.get_image_features(pixel_values=pixels).pooler_output))
    assert grid.shape == (2, 16, 64) and features.shape == (2, 8, 64)
    assert torch.equal(features, expected) and torch.equal(model.model.last_image_patches, patches)
    ids = torch.full((2, 12), 5)
    ids[:, 1:9] = model.config.image_token_index
    out = model(input_ids=ids, pixel_values=pixels, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()  # gradients reach the tower through the gathered tokens, not the scorer
    assert model.model.vision_tower.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    assert model.model.object_scorer.weight.grad is None


@pytest.fixture(scope="module")
def object_checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("objects") / "tiny", seed=5, **OBJECTS)


def test_checkpoint_round_trip_processor_expands_to_the_object_tokens(object_checkpoint):
    model, processor = skymoe.load_model(object_checkpoint, quant="none")
    assert model.config.object_tokens == 4 and processor.image_seq_length == 8
    batch = processor(images=np.zeros((50, 50, 3), np.uint8), text=skymoe.render_conversation(
        [(skymoe.build_prompt("count", "car"), None)]), return_tensors="pt")
    assert int((batch["input_ids"] == model.config.image_token_index).sum()) == 8
    answers = skymoe.generate(model, processor, [np.zeros((50, 50, 3), np.uint8)] * 2,
                              [skymoe.build_prompt("caption"), skymoe.build_prompt("count", "car")],
                              max_new_tokens=3)
    assert len(answers) == 2


def test_upcycling_keeps_the_object_modules():
    dense = SkyMoEForConditionalGeneration(tiny_config(num_experts=1, moe_layers=[], **CODES))
    upcycled = skymoe.upcycle(dense, 4)
    assert upcycled.config.image_seq_length == 8 and upcycled.config.is_moe and upcycled.config.object_codes
    for name in ("object_scorer", "object_box_head", "object_colour_head", "object_code_projection"):
        assert torch.equal(getattr(upcycled.model, name).weight, getattr(dense.model, name).weight), name


def test_routing_heatmaps_put_object_tokens_on_their_patches(object_checkpoint):
    model, processor = skymoe.load_model(object_checkpoint, quant="none")
    with capture_routing(model) as trace:
        skymoe.generate(model, processor, [np.full((56, 56, 3), 90, np.uint8)], [skymoe.build_prompt("caption")],
                        max_new_tokens=2)
    recorded = trace.patch_index[trace.patch_index >= 0]
    placed = model.model.last_image_patches[0]
    assert sorted(recorded.tolist()) == sorted(placed[placed >= 0].tolist())
    maps = trace.expert_heatmaps(0)
    routed = maps.sum(axis=1)  # (layers, h, w): k where a token was routed, 0 elsewhere
    cells = set(placed[placed >= 0].tolist())
    for cell in range(16):
        expected = model.config.num_experts_per_tok if cell in cells else 0
        assert routed[:, cell // 4, cell % 4] == pytest.approx(expected)


def test_demo_cli_refuses_object_tokens_without_a_frozen_tower(tmp_path, capsys):
    from train.demo import main

    code = main(["--out", str(tmp_path / "o"), "--set", "model.object_tokens=32"])
    assert code == 2 and "language_trainable=llm" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    code = main(["--out", str(tmp_path / "o"), "--set", "model.object_codes=true"])
    assert code == 2 and "set model.object_tokens > 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_stage2_llm_choice_keeps_the_detector_frozen_and_trains_the_code_projection():
    from train.stage2 import trainable_mask

    mask = trainable_mask(SkyMoEForConditionalGeneration(tiny_config(**CODES)), "llm")
    assert not any(mask[f"model.{head}.weight"] for head in ("object_scorer", "object_box_head", "object_colour_head"))
    assert mask["model.object_code_projection.weight"] and mask["lm_head.weight"]
    assert json.dumps(tiny_config(**OBJECTS).to_dict()["object_tokens"]) == "4"


@pytest.fixture(scope="module")
def code_checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("codes") / "tiny", seed=6, **CODES)


def test_4bit_loading_leaves_the_object_modules_unquantized(code_checkpoint):
    model, processor = skymoe.load_model(code_checkpoint, quant="4bit")
    for name in ("object_scorer", "object_box_head", "object_colour_head", "object_code_projection"):
        module = getattr(model.model, name)
        assert type(module) is torch.nn.Linear and module.weight.dtype == torch.float32, name
    answers = skymoe.generate(model, processor, [np.zeros((56, 56, 3), np.uint8)], [skymoe.build_prompt("caption")],
                              max_new_tokens=2)
    assert len(answers) == 1


def test_box_corners_on_the_answer_grid():
    # 4 x 4 grid (25 grid units a patch): patch 6 is row 1, column 2; centre at its middle,
    # 1 patch wide, 2 patches tall -> x 2..3, y 0.5..2.5 patches
    box = torch.tensor([0.5, 0.5, 0.0, np.log(2.0)])
    assert box_corners_on_grid(box, torch.tensor(6), 4).tolist() == pytest.approx([50.0, 12.5, 75.0, 62.5])
    # patch 15 (row 3, column 3): a huge log size is capped at the image side (4 patches), then
    # the box is clamped to the image: x 1.9..5.9 -> 1.9..4, y 2.85..3.35 patches
    wide = torch.tensor([[0.9, 0.1, 50.0, np.log(0.5)]])
    assert box_corners_on_grid(wide, torch.tensor([15]), 4).tolist() == [pytest.approx([47.5, 71.25, 100.0, 83.75])]


def test_detection_features_read_class_colour_and_box_at_the_slot_patches():
    side, classes, colours = 4, 3, 5
    centre = torch.randn(2, side * side, classes)
    colour = torch.randn(2, side * side, colours)
    box = torch.rand(2, side * side, 4) - torch.tensor([0.0, 0.0, 0.5, 0.5])
    slots = torch.tensor([[3, 9], [0, 15]])
    features = detection_features(centre, box, colour, slots)
    assert features.shape == (2, 2, classes + colours + 4 * CORNER_CODE_WIDTH)
    for image in range(2):
        for slot in range(2):
            patch = slots[image, slot]
            row = features[image, slot]
            assert torch.allclose(row[:classes], torch.sigmoid(centre[image, patch]))
            assert torch.allclose(row[classes:classes + colours], torch.softmax(colour[image, patch], dim=0))
            corners = box_corners_on_grid(box[image, patch], patch, side)
            expected = sincos_codes(corners, CORNER_CODE_WIDTH, 4.0, 400.0).flatten()
            assert torch.allclose(row[classes + colours:], expected, atol=1e-6)


def test_object_codes_add_the_projected_detection_to_filled_object_slots_only():
    torch.manual_seed(0)
    model = SkyMoEForConditionalGeneration(tiny_config(**CODES)).eval()
    with torch.no_grad():  # one strong centre (patch 5): one filled slot of the four
        model.model.object_scorer.weight.zero_()
        model.model.object_scorer.bias.fill_(-9.0)
    pixels = torch.randn(1, 3, 56, 56)
    grid = model.model.patch_tokens(pixels).detach()
    boost = torch.full((1, 16, 3), -9.0)
    boost[0, 5, 1] = 3.0
    model.model.object_scorer.register_forward_hook(lambda module, args, out: out + (boost + 9.0))
    plain, patches = object_image_tokens(grid, boost, 4, 2)
    features = torch.stack(list(model.model.get_image_features(pixel_values=pixels).pooler_output))
    filled = [slot for slot in range(4) if patches[0, 4 + slot] >= 0]
    assert [patches[0, 4 + slot].item() for slot in filled] == [5]
    detection = detection_features(boost, model.model.object_box_head(grid), model.model.object_colour_head(grid),
                                   torch.tensor([[5]]))
    expected = plain.clone()
    expected[0, 4 + filled[0]] += model.model.object_code_projection(detection)[0, 0]
    assert torch.allclose(features, expected.detach(), atol=1e-5)  # context and empty slots unchanged
    # the projection learns; the detector heads, read without gradients, do not
    ids = torch.full((1, 12), 5)
    ids[:, 1:9] = model.config.image_token_index
    model(input_ids=ids, pixel_values=pixels, labels=ids).loss.backward()
    assert model.model.object_code_projection.weight.grad.abs().sum() > 0
    assert model.model.object_box_head.weight.grad is None and model.model.object_colour_head.weight.grad is None


def test_config_rejects_object_codes_without_object_tokens_or_colours():
    with pytest.raises(SkyMoEConfigError, match="object_codes"):
        tiny_config(object_codes=True, object_colours=5)
    with pytest.raises(SkyMoEConfigError, match="object_colours"):
        tiny_config(**OBJECTS, object_codes=True)
    assert tiny_config(**CODES).image_seq_length == 8  # the codes add to the tokens, not to their number
