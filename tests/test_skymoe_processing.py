"""Tokenizer, processor (image-token count, image modes/sizes, chat template) and the tiny checkpoint."""

import time

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

import skymoe
from skymoe import SkyMoEProcessor, build_tokenizer, render_conversation, to_rgb_image
from skymoe.presets import make_tiny_checkpoint


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(["the red car near the road", "How many small vehicle are there?"] * 10, vocab_size=300)


def _image_tokens(processor, image):
    batch = processor(images=image, text="USER: <image>\nhi ASSISTANT:", return_tensors="pt")
    return int((batch["input_ids"] == processor.image_token_id).sum()), batch["pixel_values"]


def test_504px_image_expands_to_1296_tokens(tokenizer):
    processor = SkyMoEProcessor.for_config(skymoe.full_size_config(), tokenizer)
    count, pixels = _image_tokens(processor, Image.new("RGB", (800, 600), (0, 128, 255)))
    assert count == 1296
    assert pixels.shape == (1, 3, 504, 504)


def test_28px_patches_give_324_tokens(tokenizer):
    config = skymoe.tiny_config(vision_config={"image_size": 504, "patch_size": 28})
    assert config.image_seq_length == 324
    count, _ = _image_tokens(SkyMoEProcessor.for_config(config, tokenizer), Image.new("RGB", (504, 504)))
    assert count == 324


def test_non_square_image_is_resized_without_crop(tokenizer):
    processor = SkyMoEProcessor.for_config(skymoe.tiny_config(), tokenizer)  # 56 px
    array = np.zeros((100, 400, 3), np.uint8)
    array[:, -40:] = 255  # white strip on the right 10 %: a centre crop would cut it off
    _, pixels = _image_tokens(processor, array)
    red = pixels[0, 0]
    assert red[:, -3:].mean() > 1.5 and red[:, :40].mean() < -1.5  # strip kept at the right edge, rest dark


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "I;16", "RGB"])
def test_image_modes_become_rgb(mode):
    base = Image.new("RGB", (9, 7), (200, 100, 50))
    image = base.convert(mode) if mode != "I;16" else Image.fromarray(np.arange(63, dtype=np.uint16).reshape(7, 9) * 1000)
    rgb = to_rgb_image(image)
    assert rgb.mode == "RGB" and rgb.size == (9, 7)


def test_alpha_composites_over_black_and_16_bit_is_rescaled():
    rgba = np.full((4, 4, 4), 255, np.uint8)
    rgba[0, 0, 3] = 0  # one transparent pixel
    out = np.asarray(to_rgb_image(rgba))
    assert out[0, 0].tolist() == [0, 0, 0] and out[1, 1].tolist() == [255, 255, 255]
    deep = Image.fromarray(np.array([[1000, 3000]], dtype=np.uint16))
    assert np.asarray(to_rgb_image(deep))[0, :, 0].tolist() == [0, 255]


def test_bad_arrays_are_rejected_with_a_clear_message():
    with pytest.raises(ValueError, match="must be uint8"):
        to_rgb_image(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="channels-last"):
        to_rgb_image(np.zeros((3, 8, 8), np.uint8))  # CHW is not guessed
    with pytest.raises(TypeError, match="PIL image or a uint8 numpy array"):
        to_rgb_image("image.png")


def test_tokenizer_has_single_token_grid_coordinates_and_specials(tokenizer):
    box = "{<89><47><97><55>|<58>}"
    tokens = tokenizer.tokenize(box)
    assert tokens == ["{", "<89>", "<47>", "<97>", "<55>", "|", "<58>", "}"]
    assert tokenizer.convert_tokens_to_ids(["<s>", "</s>", "<unk>", "<pad>", "<image>"]) == [0, 1, 2, 3, 4]
    ids = tokenizer("[refer] Where is <p>the car</p>?").input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "[refer] Where is <p>the car</p>?"


def test_a_question_first_checkpoint_saves_and_loads_its_layout(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "question_first", image_after_question=True)
    model = AutoModelForImageTextToText.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    assert model.config.image_after_question and processor.chat_template == skymoe.chat_template(True)
    messages = [{"role": "user", "content": "[count] How many cars?"}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text.endswith("USER: [count] How many cars?\n<image> ASSISTANT:")
    assert text == render_conversation([("[count] How many cars?", None)], image_after_question=True)


def test_tiny_checkpoint_is_fast_safetensors_only_and_loads(tmp_path):
    start = time.perf_counter()
    folder = make_tiny_checkpoint(tmp_path / "tiny", seed=3)
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0, f"make_tiny_checkpoint took {elapsed:.2f} s"
    names = {p.name for p in folder.iterdir()}
    assert "model.safetensors" in names and not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)
    model = AutoModelForImageTextToText.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    assert isinstance(model, skymoe.SkyMoEForConditionalGeneration) and isinstance(processor, SkyMoEProcessor)
    assert processor.chat_template == skymoe.VICUNA_CHAT_TEMPLATE
    text = processor.apply_chat_template([{"role": "user", "content": "[count] How many cars?"}], add_generation_prompt=True)
    assert text == render_conversation([("[count] How many cars?", None)])
    assert model.config.image_token_index == processor.image_token_id
    assert model.config.text_config.vocab_size >= len(processor.tokenizer)
    again = AutoModelForImageTextToText.from_pretrained(make_tiny_checkpoint(tmp_path / "again", seed=3))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
