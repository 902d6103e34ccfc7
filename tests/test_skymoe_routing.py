"""Routing capture: per-layer probabilities and top-k, the aux loss recomputed from them, patch heatmaps."""

import numpy as np
import pytest
import torch

import skymoe
from skymoe import SkyMoEForConditionalGeneration, capture_routing, generate, tiny_config
from skymoe.presets import make_tiny_checkpoint


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return skymoe.load_model(make_tiny_checkpoint(tmp_path_factory.mktemp("route") / "tiny", seed=7), quant="none")


def _training_batch(config):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 300, (3, 30), generator=g)
    ids[:, 8 : 8 + config.image_seq_length] = config.image_token_index
    ids[:, 0] = 0
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    mask[2, :2] = 0
    labels = ids.masked_fill(mask == 0, -100)
    size = config.vision_config.image_size
    return ids, torch.randn(3, 3, size, size, generator=g), mask, labels


def test_aux_loss_equals_e_sum_f_g_from_captured_probs():
    torch.manual_seed(0)
    model = SkyMoEForConditionalGeneration(tiny_config(text_config={"num_hidden_layers": 6})).eval()
    ids, pixels, mask, labels = _training_batch(model.config)
    with capture_routing(model) as trace:
        out = model(input_ids=ids, pixel_values=pixels, attention_mask=mask, labels=labels)
    E = model.config.num_experts
    assert sorted(trace.layers) == [1, 3, 5]
    per_layer = []
    for routing in trace.layers.values():
        probs = routing.probs.double()[routing.token_mask].numpy()  # (real tokens, E)
        top1 = probs.argmax(axis=1)
        F = np.array([(top1 == i).mean() for i in range(E)])
        G = probs.mean(axis=0)
        per_layer.append(E * float(np.sum(F * G)))
    assert out.aux_loss.item() == pytest.approx(float(np.mean(per_layer)), rel=1e-5)
    assert int(trace.token_mask.sum()) == int(mask.sum())


def test_trace_shapes_and_topk_agree_with_probs(loaded):
    model, processor = loaded
    images = [np.zeros((50, 50, 3), np.uint8), np.full((40, 90, 3), 180, np.uint8)]
    prompts = [skymoe.build_prompt("caption"), skymoe.build_prompt("count", "planes")]
    with capture_routing(model) as trace:
        generate(model, processor, images, prompts, max_new_tokens=3)
    k, E = model.config.num_experts_per_tok, model.config.num_experts
    for routing in trace.layers.values():
        n = routing.probs.shape[0]
        assert routing.probs.shape == (n, E) and routing.probs.dtype == torch.float32
        assert routing.topk.shape == (n, k) and routing.topk.dtype == torch.int64
        assert routing.token_mask.shape == (n,)
        best = routing.probs.topk(k, dim=-1).indices
        assert torch.equal(best, routing.topk)
    assert trace.sample_index.unique().tolist() == [0, 1]  # decode steps continue the two samples
    load = trace.expert_load()
    assert load.shape == (len(model.config.moe_layers), E)
    np.testing.assert_allclose(load.sum(axis=1), 1.0, rtol=1e-6)


def test_heatmaps_put_each_patch_top_k_on_the_grid(loaded):
    model, processor = loaded
    image = np.random.default_rng(1).integers(0, 256, (56, 56, 3), dtype=np.uint8)
    text = skymoe.render_conversation([(skymoe.build_prompt("caption"), None)])
    inputs = processor(images=image, text=text, return_tensors="pt")
    with torch.no_grad(), capture_routing(model) as trace:
        model(**inputs)
    grid = model.config.image_grid_size
    maps = trace.expert_heatmaps(sample=0)
    assert maps.shape == (len(model.config.moe_layers), model.config.num_experts, grid, grid)
    np.testing.assert_allclose(maps.sum(axis=1), model.config.num_experts_per_tok)
    # independent mapping: the j-th image token in the prompt is patch (j // grid, j % grid)
    positions = (inputs["input_ids"][0] == model.config.image_token_index).nonzero().squeeze(1)
    for row, routing in enumerate(trace.layers.values()):
        for j in (0, 5, grid * grid - 1):
            experts = routing.topk[positions[j]].tolist()
            on = np.flatnonzero(maps[row, :, j // grid, j % grid]).tolist()
            assert sorted(experts) == on


def test_hooks_are_removed_on_exit_and_errors(loaded):
    model, _ = loaded
    routers = [m for m in model.modules() if isinstance(m, skymoe.SkyMoERouter)]
    with pytest.raises(RuntimeError, match="boom"):
        with capture_routing(model):
            raise RuntimeError("boom")
    assert not model._forward_pre_hooks and all(not r._forward_hooks for r in routers)
    with capture_routing(model) as trace:
        pass
    with pytest.raises(ValueError, match="no image tokens recorded for sample 0"):
        trace.expert_heatmaps(0)


def test_dense_model_cannot_be_traced():
    with pytest.raises(ValueError, match="model is dense"):
        with capture_routing(SkyMoEForConditionalGeneration(tiny_config(moe_layers=[]))):
            pass
