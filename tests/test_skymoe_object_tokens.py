"""Object tokens: peak selection, the tokens the language model reads, config, save/load, routing, the demo."""

import json

import numpy as np
import pytest
import torch

import skymoe
from skymoe import SkyMoEForConditionalGeneration, capture_routing, tiny_config
from skymoe.errors import SkyMoEConfigError
from skymoe.object_tokens import PEAK_THRESHOLD, object_image_tokens, select_object_patches
from skymoe.presets import make_tiny_checkpoint

OBJECTS = {"object_tokens": 4, "object_classes": 3, "object_context_grid": 2}  # 16 patches -> 4 + 4 tokens


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


def test_upcycling_keeps_the_object_scorer():
    dense = SkyMoEForConditionalGeneration(tiny_config(num_experts=1, moe_layers=[], **OBJECTS))
    upcycled = skymoe.upcycle(dense, 4)
    assert upcycled.config.image_seq_length == 8 and upcycled.config.is_moe
    assert torch.equal(upcycled.model.object_scorer.weight, dense.model.object_scorer.weight)


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


def test_stage2_llm_choice_keeps_the_object_scorer_frozen():
    from train.stage2 import trainable_mask

    mask = trainable_mask(SkyMoEForConditionalGeneration(tiny_config(**OBJECTS)), "llm")
    assert not mask["model.object_scorer.weight"] and mask["lm_head.weight"]
    assert json.dumps(tiny_config(**OBJECTS).to_dict()["object_tokens"]) == "4"


def test_4bit_loading_leaves_the_object_scorer_unquantized(object_checkpoint):
    model, _ = skymoe.load_model(object_checkpoint, quant="4bit")
    assert type(model.model.object_scorer) is torch.nn.Linear
    assert model.model.object_scorer.weight.dtype == torch.float32
