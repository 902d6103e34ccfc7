"""Batched generation (left padding, task ids, confidence) and 4-bit CPU inference."""

import numpy as np
import pytest
import torch

import skymoe
from skymoe import build_prompt, generate, load_model
from skymoe.generation import task_ids_for_prompts
from skymoe.presets import make_tiny_checkpoint

PROMPTS = [
    build_prompt("count", "small vehicle"),
    build_prompt("ground", "the very long red car parked next to the large grey warehouse by the river"),
    "no tag",
]


@pytest.fixture(scope="module")
def task_model(tmp_path_factory):
    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("gen") / "tiny", seed=5, router_mode="task")
    loaded = load_model(folder, quant="none", device="cpu")
    with torch.no_grad():  # give each task its own routing so task ids matter
        for layer in loaded.model.config.moe_layers:
            loaded.model.model.language_model.layers[layer].mlp.router.task_bias.weight.normal_(0, 2.0)
    return loaded


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (40 + 20 * i, 64, 3), dtype=np.uint8) for i in range(len(PROMPTS))]


def test_batched_generation_equals_one_by_one(task_model, images):
    lengths = [len(task_model.processor.tokenizer(p).input_ids) for p in PROMPTS]
    assert len(set(lengths)) == len(PROMPTS)  # really mixed lengths, so rows get different left padding
    batched = generate(task_model.model, task_model.processor, images, PROMPTS, max_new_tokens=4)
    single = [generate(task_model.model, task_model.processor, [im], [p], max_new_tokens=4)[0] for im, p in zip(images, PROMPTS)]
    for b, s in zip(batched, single):
        assert b.text == s.text
        assert b.mean_logprob == pytest.approx(s.mean_logprob, abs=1e-4)
        assert 0.0 < b.confidence <= 1.0 and b.confidence == pytest.approx(np.exp(b.mean_logprob))
    chunked = generate(task_model.model, task_model.processor, images, PROMPTS, max_new_tokens=4, batch_size=2)
    assert [c.text for c in chunked] == [b.text for b in batched]


def test_task_ids_come_from_prompt_tags_and_change_the_answer(task_model, images):
    assert task_ids_for_prompts(PROMPTS).tolist() == [4, 3, -1]
    assert task_ids_for_prompts([build_prompt("caption")]).tolist() == [0]
    model, processor = task_model
    text = skymoe.render_conversation([(PROMPTS[0], None)])
    inputs = processor(images=images[0], text=text, return_tensors="pt")
    with torch.no_grad():
        as_count = model(**inputs, task_ids=torch.tensor([4])).logits
        as_caption = model(**inputs, task_ids=torch.tensor([0])).logits
    assert not torch.allclose(as_count, as_caption)


def test_generate_rejects_mismatched_inputs(task_model, images):
    with pytest.raises(ValueError, match="got 2 images for 1 prompts"):
        generate(task_model.model, task_model.processor, images[:2], PROMPTS[:1])
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate(task_model.model, task_model.processor, images[:1], PROMPTS[:1], max_new_tokens=0)


def test_4bit_model_generates_on_cpu_close_to_fp32(tmp_path, images):
    folder = make_tiny_checkpoint(tmp_path / "tiny", seed=2)
    full = load_model(folder, quant="none", device="cpu")
    nf4 = load_model(folder, quant="4bit", device="cpu")
    assert any(type(m).__name__ == "Linear4bit" for m in nf4.model.modules())
    text = skymoe.render_conversation([(build_prompt("caption"), None)])
    inputs = full.processor(images=images[1], text=text, return_tensors="pt")
    with torch.no_grad():
        ref = full.model(**inputs).logits.float()
        quant = nf4.model(**inputs).logits.float()
    max_diff = (ref - quant).abs().max().item()
    corr = torch.corrcoef(torch.stack([ref.flatten(), quant.flatten()]))[0, 1].item()
    print(f"4-bit nf4 vs fp32 on CPU: max |logit diff| = {max_diff:.4f} (max |logit| {ref.abs().max():.4f}), corr = {corr:.4f}")
    assert np.isfinite(max_diff) and max_diff < ref.abs().max().item()
    assert corr > 0.8
    out = generate(nf4.model, nf4.processor, images[:2], PROMPTS[:2], max_new_tokens=2)
    assert len(out) == 2 and all(0.0 < g.confidence <= 1.0 for g in out)
