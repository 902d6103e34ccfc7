"""convert_llava: a tiny transformers LLaVA-1.5 folder (336 px CLIP, 24 x 24 patches) -> dense SkyMoE at 504 px."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

import skymoe
from skymoe import CheckpointError, load_model
from skymoe.conversion import convert_llava

POS_KEY = "model.vision_tower.embeddings.position_embedding.weight"


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    base = skymoe.tiny_config()
    tokenizer = skymoe.build_tokenizer(["a small red car on the road"] * 5, vocab_size=300)
    config = LlavaConfig(
        vision_config=dict(base.vision_config.to_dict(), image_size=336, patch_size=14),
        text_config=base.text_config.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    folder = tmp_path_factory.mktemp("llava") / "llava-tiny-hf"
    model.save_pretrained(folder)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    LlavaProcessor(image_processor, tokenizer, patch_size=14, vision_feature_select_strategy="default").save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def converted(llava_dir, tmp_path_factory):
    folder, _ = llava_dir
    return convert_llava(folder, tmp_path_factory.mktemp("out") / "skymoe-dense", image_size=504)


def test_llm_and_projector_weights_are_identical(llava_dir, converted):
    _, llava = llava_dir
    new = load_file(converted / "model.safetensors")
    old = llava.state_dict()
    assert set(new) == set(old)
    for key, value in old.items():
        if key != POS_KEY:
            assert torch.equal(new[key], value), key
    assert json.loads((converted / "config.json").read_text())["moe_layers"] == []


def test_position_embeddings_are_the_bicubic_24_to_36_interpolation(llava_dir, converted):
    _, llava = llava_dir
    old = llava.state_dict()[POS_KEY]
    new = load_file(converted / "model.safetensors")[POS_KEY]
    assert old.shape[0] == 1 + 24 * 24 and new.shape[0] == 1 + 36 * 36
    # independent reference: CLIP's own on-the-fly interpolation at 504 px
    embeddings = llava.model.vision_tower.embeddings
    with torch.no_grad():
        reference = embeddings.interpolate_pos_encoding(torch.zeros(1, 1 + 36 * 36, old.shape[1]), 504, 504)[0]
    torch.testing.assert_close(new, reference, atol=1e-6, rtol=1e-5)
    assert torch.equal(new[0], old[0])  # CLS position untouched


def test_504px_image_yields_1296_image_tokens_and_runs(converted):
    loaded = load_model(converted, quant="none", device="cpu")
    assert loaded.model.config.vision_config.image_size == 504
    image = np.random.default_rng(0).integers(0, 256, (504, 504, 3), dtype=np.uint8)
    inputs = loaded.processor(images=image, text="USER: <image>\nhi ASSISTANT:", return_tensors="pt")
    assert int((inputs["input_ids"] == loaded.model.config.image_token_index).sum()) == 1296
    with torch.no_grad():
        logits = loaded.model(**inputs).logits
    assert logits.shape[1] == inputs["input_ids"].shape[1] and torch.isfinite(logits).all()
    assert loaded.processor.chat_template == skymoe.VICUNA_CHAT_TEMPLATE


def test_text_only_logits_match_the_source(llava_dir, converted):
    _, llava = llava_dir
    loaded = load_model(converted, quant="none", device="cpu")
    ids = torch.randint(5, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(llava(input_ids=ids).logits, loaded.model(input_ids=ids).logits)


_HUB_PREFIXES = {
    "model.language_model.": "language_model.model.",
    "lm_head.": "language_model.lm_head.",
    "model.vision_tower.": "vision_tower.vision_model.",
    "model.multi_modal_projector.": "multi_modal_projector.",
}


@pytest.mark.parametrize("layout", ["transformers-v5", "hub-llava-1.5-7b-hf"])
def test_both_weight_layouts_convert(llava_dir, tmp_path, layout):
    folder, llava = llava_dir
    source = tmp_path / "src"
    source.mkdir()
    for f in folder.iterdir():
        if f.name != "model.safetensors":
            (source / f.name).write_bytes(f.read_bytes())
    tensors = {}
    for key, value in llava.state_dict().items():
        if layout != "transformers-v5":
            prefix = next(p for p in _HUB_PREFIXES if key.startswith(p))
            key = _HUB_PREFIXES[prefix] + key[len(prefix) :]
        tensors[key] = value.contiguous()
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    new = load_file(convert_llava(source, tmp_path / "out") / "model.safetensors")
    for key, value in llava.state_dict().items():
        if key != POS_KEY:
            assert torch.equal(new[key], value), key


def test_unmatched_weights_are_an_error_not_a_random_init(llava_dir, tmp_path):
    folder, llava = llava_dir
    source = tmp_path / "src"
    source.mkdir()
    for f in folder.iterdir():
        (source / f.name).write_bytes(f.read_bytes())
    tensors = load_file(source / "model.safetensors")
    del tensors["language_model.lm_head.weight"]
    tensors["some.other.head.weight"] = torch.zeros(2)
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"1 missing \(e\.g\. \['lm_head\.weight'\]\), 1 unexpected"):
        convert_llava(source, tmp_path / "out")


def test_pickle_only_and_foreign_sources_are_refused(llava_dir, tmp_path):
    folder, _ = llava_dir
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_bytes((folder / "config.json").read_bytes())
    (pickled / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(CheckpointError, match="refuses to unpickle"):
        convert_llava(pickled, tmp_path / "x")
    (pickled / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="model_type='bert'; convert_llava needs a 'llava' checkpoint"):
        convert_llava(pickled, tmp_path / "x")
    with pytest.raises(ValueError, match="multiple of the CLIP patch size 14"):
        convert_llava(folder, tmp_path / "y", image_size=500)
