"""Instruction JSONL -> tokenised samples: answer-only labels, broken lines, padding."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

import skymoe
from train.dataset import (
    IGNORE_INDEX,
    DataError,
    InstructionDataset,
    PaddingCollator,
    encode_sample,
    read_instruction_jsonl,
)


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    folder = skymoe.make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), num_experts=1)
    return skymoe.load_model(folder, quant="none", device="cpu").processor


def _line(i, task="OC", conversations=None, image=None):
    convs = conversations or [
        {"from": "human", "value": "<image>\n" + skymoe.build_prompt("count", "small vehicle")},
        {"from": "gpt", "value": str(i)},
    ]
    return json.dumps({"id": f"s{i}", "image": image or f"img/{i}.png", "task": task, "granularity": "local",
                       "conversations": convs})


def _images(root, n):
    (root / "img").mkdir(exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((40, 48, 3), 30 * i, np.uint8)).save(root / "img" / f"{i}.png")


def _labelled(sample, tokenizer):
    ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
    return tokenizer.decode([t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX])


def test_labels_cover_only_the_answers_and_their_eos(tmp_path, processor):
    _images(tmp_path, 1)
    q1 = skymoe.build_prompt("ground", "the red car")
    q2 = skymoe.build_prompt("count", "ship")
    convs = [{"from": "human", "value": "<image>\n" + q1}, {"from": "gpt", "value": "{<10><20><30><40>|<0>}"},
             {"from": "human", "value": q2}, {"from": "gpt", "value": "7"}]
    (tmp_path / "d.jsonl").write_text(_line(0, "VG", convs) + "\n")
    records, bad = read_instruction_jsonl(tmp_path / "d.jsonl")
    assert not bad and records[0].task == "ground" and records[0].prompt == q1
    sample = encode_sample(records[0], processor, max_length=512)
    tok = processor.tokenizer
    assert _labelled(sample, tok).replace(" ", "") == "{<10><20><30><40>|<0>}</s>7</s>"
    image_id = tok.convert_tokens_to_ids("<image>")
    ids, labels = sample["input_ids"], sample["labels"]
    assert int((ids == image_id).sum()) == 16  # tiny model: 56 px / 14 px patches
    assert bool((labels[ids == image_id] == IGNORE_INDEX).all())
    prompt_text = tok.decode(ids[labels == IGNORE_INDEX].tolist())
    assert "Where is" in prompt_text and "How many ship" in prompt_text and "ASSISTANT:" in prompt_text
    assert int(sample["task_ids"]) == skymoe.TASK_IDS.index("ground")
    assert sample["pixel_values"].shape == (3, 56, 56)


def test_image_after_question_puts_the_image_tokens_after_the_first_question(tmp_path, processor):
    _images(tmp_path, 1)
    q1 = skymoe.build_prompt("ground", "the red car")
    convs = [{"from": "human", "value": "<image>\n" + q1}, {"from": "gpt", "value": "{<10><20><30><40>|<0>}"},
             {"from": "human", "value": "[count] How many ship are there?"}, {"from": "gpt", "value": "7"}]
    (tmp_path / "d.jsonl").write_text(_line(0, "VG", convs) + "\n")
    records, _ = read_instruction_jsonl(tmp_path / "d.jsonl")
    dataset = InstructionDataset(records, processor, 512, image_after_question=True)
    sample, tok = dataset[0], processor.tokenizer
    ids, labels = sample["input_ids"], sample["labels"]
    assert _labelled(sample, tok).replace(" ", "") == "{<10><20><30><40>|<0>}</s>7</s>"
    at = torch.nonzero(ids == tok.convert_tokens_to_ids("<image>")).flatten()
    assert at.numel() == 16 and int(at[-1] - at[0]) == 15  # one run of image tokens
    before, after = tok.decode(ids[: int(at[0])].tolist()), tok.decode(ids[int(at[-1]) + 1 :].tolist())
    assert "Where is" in before and "ASSISTANT:" not in before
    assert after.lstrip().startswith("ASSISTANT:") and "How many ship" in after


def test_broken_lines_are_reported_with_line_numbers_and_skipped(tmp_path, processor, caplog):
    _images(tmp_path, 3)
    lines = [
        _line(0),
        '{"id": "x", "image": ',  # line 2: truncated JSON
        json.dumps({"id": "y", "image": "img/1.png", "task": "OC"}),  # line 3: no conversations
        _line(1, task="XX"),  # line 4: unknown task code
        _line(5),  # line 5: image missing
        "",  # blank lines are not errors
        _line(1, conversations=[{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": " "}]),  # 7
        _line(2, conversations=[{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]),  # 8
        _line(2),
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="train.dataset"):
        records, bad = read_instruction_jsonl(tmp_path / "d.jsonl")
    assert [r.id for r in records] == ["s0", "s2"]
    assert [b.line_no for b in bad] == [2, 3, 4, 5, 7, 8]
    reasons = {b.line_no: b.reason for b in bad}
    assert "not valid JSON" in reasons[2]
    assert "missing key(s) ['conversations']" in reasons[3]
    assert "'XX'" in reasons[4]
    assert "img/5.png" in reasons[5] and "not found" in reasons[5]
    assert "empty answer" in reasons[7]
    assert 'conversations[0] must be {"from": "human"' in reasons[8]
    assert "d.jsonl:2 skipped" in caplog.text and "lines 2, 3, 4, 5, 7, 8" in caplog.text
    dataset = InstructionDataset(records, processor, 512)
    assert len(dataset) == 2


def test_a_file_without_valid_lines_is_an_error(tmp_path):
    (tmp_path / "bad.jsonl").write_text("not json\n[1, 2]\n")
    with pytest.raises(DataError, match=r"bad.jsonl: no valid sample \(2 broken line\(s\); first: 1: not valid JSON"):
        read_instruction_jsonl(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="cannot read instruction file"):
        read_instruction_jsonl(tmp_path / "missing.jsonl")


def test_collator_pads_right_and_masks_padding(tmp_path, processor):
    _images(tmp_path, 2)
    long_answer = [{"from": "human", "value": "<image>\n" + skymoe.build_prompt("caption")},
                   {"from": "gpt", "value": "many small vehicles are parked along the road near a building"}]
    (tmp_path / "d.jsonl").write_text(_line(0) + "\n" + _line(1, "IC", long_answer) + "\n")
    dataset = InstructionDataset.from_jsonl(tmp_path / "d.jsonl", processor, 512)
    a, b = dataset[0], dataset[1]
    pad = processor.tokenizer.pad_token_id
    batch = PaddingCollator(pad)([a, b])
    n_a, n_b = len(a["input_ids"]), len(b["input_ids"])
    assert n_b > n_a and batch["input_ids"].shape == (2, n_b)
    assert bool((batch["input_ids"][0, n_a:] == pad).all())
    assert int(batch["attention_mask"][0].sum()) == n_a and int(batch["attention_mask"][1].sum()) == n_b
    assert bool((batch["labels"][0, n_a:] == IGNORE_INDEX).all())
    assert batch["pixel_values"].shape == (2, 3, 56, 56) and batch["task_ids"].tolist() == [4, 0]
