"""train/word_match.py: the class-word-to-patch head, checked through the real Llama attention (RoPE included)."""

from __future__ import annotations

import json

import pytest
import torch

import skymoe
from train.dataset import read_instruction_jsonl
from train.demo import DemoModel, build_demo_model
from train.eval import build_synthetic_benchmark
from train.stage1 import save_model_folder
from train.synthetic.classes import OBJECT_CLASSES
from train.word_match import (class_word_attention, init_word_match_head, main, patch_directions,
                              rotary_channel_dims)

WIDTH = 64
TINY_MODEL = DemoModel(image_size=56, patch_size=28, vision_hidden=64, vision_layers=1, vision_heads=2,
                       text_hidden=WIDTH, text_intermediate=128, text_layers=2, text_heads=2, bpe_vocab=300)


def test_rotary_channel_dims_take_the_slowest_pairs_first():
    assert rotary_channel_dims(64, 5) == [31, 63, 30, 62, 29]
    assert rotary_channel_dims(8, 8) == [3, 7, 2, 6, 1, 5, 0, 4]
    with pytest.raises(ValueError, match="do not fit a head of 8"):
        rotary_channel_dims(8, 9)


def test_patch_directions_keep_the_geometry_and_leave_the_words():
    words = torch.nn.functional.normalize(torch.randn(10, 256, generator=torch.Generator().manual_seed(0)), dim=-1)
    patches = patch_directions(words, seed=3)
    assert torch.allclose(patches.norm(dim=-1), torch.ones(10), atol=1e-5)
    assert torch.allclose(patches @ patches.T, words @ words.T, atol=1e-5)  # a rotation
    assert (words * patches).sum(dim=-1).abs().max() < 0.3  # near-orthogonal to its own word in 256 dims
    assert torch.equal(patches, patch_directions(words, seed=3))


@pytest.fixture(scope="module")
def model_and_words():
    texts = ["Where is the truck? Where is the tree? How many cars are there?"] * 20
    tokenizer = skymoe.build_tokenizer(texts, vocab_size=300)
    model, _ = build_demo_model(TINY_MODEL, tokenizer, 0)
    model.config.text_config._attn_implementation = "eager"  # attention weights out
    embeddings = model.get_input_embeddings().weight.detach()
    names = ["truck", "tree", "car"]
    ids = [tokenizer(" " + name, add_special_tokens=False)["input_ids"] for name in names]
    assert all(len(i) == 1 for i in ids)
    words = torch.nn.functional.normalize(torch.stack([embeddings[i[0]] for i in ids]), dim=-1)
    return model, tokenizer, words, ids


def test_a_class_word_attends_to_its_patches_not_to_itself(model_and_words):
    model, tokenizer, words, ids = model_and_words
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    patches = patch_directions(words, seed=1)
    dims = init_word_match_head(model, words, patches, layer=1, head=1, scale=1.5)
    assert dims == [15, 31, 14]  # head_dim 32
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"model.language_model.layers.1.self_attn.q_proj.weight",
                       "model.language_model.layers.1.self_attn.k_proj.weight"}
    q = model.model.language_model.layers[1].self_attn.q_proj.weight
    assert torch.allclose(q[32 + 15], 1.5 * words[0]) and torch.equal(q[15], before[
        "model.language_model.layers.1.self_attn.q_proj.weight"][15])  # head 0 untouched

    # image tokens: a truck patch and a tree patch, each mostly its class's patch direction plus noise
    # (cosine about 0.4), 100 filler tokens, then the question "Where is the truck"
    noise = torch.randn(2, WIDTH, generator=torch.Generator().manual_seed(5))
    image = 0.4 * patches[[0, 1]] + 0.9 * torch.nn.functional.normalize(noise, dim=-1)
    filler = model.get_input_embeddings().weight[tokenizer("is the", add_special_tokens=False)["input_ids"] * 50]
    question = model.get_input_embeddings().weight[tokenizer(" Where is the", add_special_tokens=False)["input_ids"]
                                                   + ids[0]]
    sequence = torch.cat([image, filler, question]).detach().unsqueeze(0)
    # the head's attention on this sequence as layer 1's input (its real attention module, RoPE and causal mask)
    layer = model.model.language_model.layers[1]
    rotary = model.model.language_model.rotary_emb
    positions = torch.arange(sequence.shape[1]).unsqueeze(0)
    cos_sin = rotary(sequence, positions)
    mask = torch.full((sequence.shape[1],) * 2, float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        _, weights = layer.self_attn(layer.input_layernorm(sequence), position_embeddings=cos_sin,
                                     attention_mask=mask)
    from_word = weights[0, 1, -1]  # head 1, the query at " truck"
    assert from_word[0] > 0.5 and from_word[0] > 20 * from_word[1]  # its patch, not the tree's
    assert from_word[-1] < 0.05  # nor itself
    assert weights[0, 0, -1, 0] < 0.2  # head 0 keeps its random start


def test_bad_arguments_are_named(model_and_words):
    model, _, words, _ = model_and_words
    with pytest.raises(ValueError, match="must both be"):
        init_word_match_head(model, words, words[:2])
    with pytest.raises(ValueError, match="no head 2 in layer 0"):
        init_word_match_head(model, words, words, layer=0, head=2)


@pytest.fixture(scope="module")
def checkpoint_and_benchmark(tmp_path_factory):
    root = tmp_path_factory.mktemp("word_match")
    bench = build_synthetic_benchmark(root / "bench", 15, seed=11, size_px=128)
    records, _ = read_instruction_jsonl(bench)
    tokenizer = skymoe.build_tokenizer([t for r in records for turn in r.turns for t in turn] * 5, vocab_size=300)
    model, processor = build_demo_model(TINY_MODEL, tokenizer, 0)
    save_model_folder(model, processor, root / "ckpt", torch.float32)
    return root / "ckpt", bench, records


def test_class_word_attention_per_head_on_the_answers_patches(checkpoint_and_benchmark):
    ckpt, _, records = checkpoint_and_benchmark
    model, processor = skymoe.load_model(ckpt)
    grounding = [r for r in records if r.task == "ground"]
    figures = class_word_attention(model, processor, records, [0, 1], tuple(OBJECT_CLASSES))
    assert set(figures) == {0, 1} and all(len(heads) == 2 for heads in figures.values())
    rows = [row for heads in figures.values() for row in heads]
    assert all(row["queries"] == len(grounding) for row in rows)  # every question names a synthetic class
    assert all(0.0 <= row["mass"] <= 1.0 and row["ratio"] >= 0.0 for row in rows)
    # questions naming no known class, and other tasks, are skipped
    assert class_word_attention(model, processor, [r for r in records if r.task != "ground"], [0],
                                tuple(OBJECT_CLASSES)) == {}
    assert class_word_attention(model, processor, grounding, [0], ("dragon",)) == {}


def test_class_word_attention_cli_prints_a_table_and_names_bad_input(checkpoint_and_benchmark, tmp_path, capsys):
    ckpt, bench, _ = checkpoint_and_benchmark
    out = tmp_path / "figures.json"
    assert main(["--model", str(ckpt), "--data", str(bench), "--layers", "0", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "x its share of the image" in printed and "grounding questions" in printed
    assert set(json.loads(out.read_text())) == {"0", "1"}
    assert main(["--model", str(ckpt), "--data", str(bench), "--layers", "5"]) == 2
    assert "the model has 2 decoder layers" in capsys.readouterr().err
    no_grounding = bench.parent / "captions.jsonl"  # beside the images it names
    no_grounding.write_text("".join(line + "\n" for line in bench.read_text().splitlines() if '"IC"' in line))
    assert main(["--model", str(ckpt), "--data", str(no_grounding)]) == 2
    assert "holds no single-turn grounding question" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "missing"), "--data", str(bench)]) == 2
    model, processor = skymoe.load_model(ckpt, quant="none")
    model.config.image_after_question = True  # no question word precedes the image: nothing to probe
    save_model_folder(model, processor, tmp_path / "question_first", torch.float32)
    capsys.readouterr()
    assert main(["--model", str(tmp_path / "question_first"), "--data", str(bench)]) == 2
    assert "reads the image after the question" in capsys.readouterr().err
