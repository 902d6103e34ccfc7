"""Box-attention supervision (train/box_attention.py) on a real tiny SkyMoE and its own tokenizer, on CPU."""

from __future__ import annotations

import json

import pytest
import torch

import skymoe
from skymoe import SkyMoEForConditionalGeneration, tiny_config
from train.box_attention import BoxAttentionLoss, BoxAttentionSettings, box_patch_mask
from train.config import LoopConfig, OptimConfig
from train.dataset import IGNORE_INDEX, PaddingCollator
from train.loop import train

QUESTION = "USER: [refer] Where is <p>the car</p>? ASSISTANT:"
ANSWER = " {<10><20><40><60>|<0>}{<80><80><90><95>|<0>}</s>"


@pytest.fixture(scope="module")
def tokenizer():
    return skymoe.build_tokenizer([QUESTION + ANSWER, "How many trees are there? 3"] * 10, vocab_size=300)


def _model(tokenizer, seed: int = 0) -> SkyMoEForConditionalGeneration:
    torch.manual_seed(seed)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    return SkyMoEForConditionalGeneration(tiny_config(
        text_config={"vocab_size": len(tokenizer), "num_hidden_layers": 2}, vision_config={"num_hidden_layers": 1},
        image_token_index=image_id, num_experts=4))


def _sample(tokenizer, model, box_in_question: bool = False) -> dict[str, torch.Tensor]:
    """One conversation: BOS, the image's 16 tokens, a question and a two-box answer (labels on the answer)."""
    question = QUESTION.replace("<p>the car</p>", "<p>the car</p> {<1><2><3><4>|<0>}") if box_in_question else QUESTION
    q_ids = tokenizer(question, add_special_tokens=False)["input_ids"]
    a_ids = tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
    image = [model.config.image_token_id] * model.config.image_seq_length
    ids = torch.tensor([tokenizer.bos_token_id, *image, *q_ids, *a_ids])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[-len(a_ids):] = ids[-len(a_ids):]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "pixel_values": torch.randn(3, 56, 56, generator=torch.Generator().manual_seed(0)),
            "task_ids": torch.tensor(3)}


def test_box_patch_mask_marks_the_overlapped_patches():
    # 18 x 18 grid: patch c spans [c, c + 1) * 5.56 grid units
    mask = box_patch_mask((83, 26, 100, 47), 18).reshape(18, 18)
    rows, cols = mask.nonzero(as_tuple=True)
    assert sorted(set(rows.tolist())) == [4, 5, 6, 7, 8] and sorted(set(cols.tolist())) == [14, 15, 16, 17]
    assert int(mask.sum()) == 5 * 4
    # 4 x 4 grid (25 units a patch): a box inside one patch, one on an edge, a degenerate one
    assert box_patch_mask((1, 1, 20, 20), 4).reshape(4, 4).nonzero().tolist() == [[0, 0]]
    assert box_patch_mask((1, 1, 25, 25), 4).reshape(4, 4).nonzero().tolist() == [[0, 0]]
    assert box_patch_mask((60, 80, 60, 80), 4).reshape(4, 4).nonzero().tolist() == [[3, 2]]


def test_targets_are_the_four_positions_before_each_answer_box(tokenizer):
    model = _model(tokenizer)
    loss = BoxAttentionLoss(model, tokenizer, BoxAttentionSettings(coef=1.0, layer=1, head=0))
    sample = _sample(tokenizer, model, box_in_question=True)
    found = loss.targets(sample["input_ids"][None], sample["labels"][None])
    assert len(found) == 8  # two answer boxes x (x1, y1, x2, y2); the box in the question is not supervised
    ids = sample["input_ids"].tolist()
    for i, (row, query, mask) in enumerate(found):
        assert row == 0
        predicted = tokenizer.convert_ids_to_tokens(ids[query + 1])
        assert predicted == ["<10>", "<20>", "<40>", "<60>", "<80>", "<80>", "<90>", "<95>"][i]
    grid = model.config.image_grid_size  # 4: patches of 25 grid units
    first = torch.zeros(grid, grid, dtype=torch.bool)
    first[0:3, 0:2] = True  # x 10..40 -> columns 0-1, y 20..60 -> rows 0-2
    assert torch.equal(found[0][2], first.reshape(-1))
    assert found[4][2].reshape(grid, grid).nonzero().tolist() == [[3, 3]]


def test_recomputed_head_weights_are_the_models_own_attention(tokenizer):
    model = _model(tokenizer).eval()  # no attention dropout: eager weights are the softmax itself
    box_loss = BoxAttentionLoss(model, tokenizer, BoxAttentionSettings(coef=1.0, layer=1, head=1))
    batch = PaddingCollator(tokenizer.pad_token_id)([_sample(tokenizer, model), _sample(tokenizer, model, True)])
    model.set_attn_implementation("eager")
    with torch.no_grad(), box_loss.attached():
        out = model(**batch, output_attentions=True)
        queries = [(0, 20), (1, 31), (1, batch["input_ids"].shape[1] - 1)]
        got = box_loss.head_weights(queries)
    eager = out.attentions[1][:, 1]  # (batch, query, key) of layer 1, head 1
    for (row, query), weights in zip(queries, got):
        torch.testing.assert_close(weights, eager[row, query, : query + 1], rtol=1e-5, atol=1e-6)


def test_the_loss_teaches_the_head_to_look_at_the_box(tokenizer):
    model = _model(tokenizer)
    box_loss = BoxAttentionLoss(model, tokenizer, BoxAttentionSettings(coef=1.0, layer=1, head=0))
    batch = PaddingCollator(tokenizer.pad_token_id)([_sample(tokenizer, model)])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    with box_loss.attached():
        for _ in range(25):
            model(**batch)
            loss = box_loss(batch["input_ids"], batch["labels"])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss.detach()))
        with pytest.raises(RuntimeError, match="no attention input captured"):
            box_loss(batch["input_ids"], batch["labels"])  # the input of a pass is used once
    # -log(attention mass on the box's patches): from a spread head to one that looks at the box
    assert losses[0] > 1.0 and losses[-1] < 0.1


def test_loop_adds_the_loss_with_its_coef_and_logs_it(tokenizer, tmp_path):
    model = _model(tokenizer)
    box_loss = BoxAttentionLoss(model, tokenizer, BoxAttentionSettings(coef=0.5, layer=1, head=0))
    data = [_sample(tokenizer, model) for _ in range(2)]
    loop = LoopConfig(output_dir=str(tmp_path), epochs=2, global_batch_size=2, per_device_batch_size=1, bf16=False,
                      seed=1, save_every_steps=0)
    result = train(model, data, PaddingCollator(tokenizer.pad_token_id), loop, OptimConfig(lr=3e-3),
                   box_attention=box_loss)
    for h in result.history:
        assert h.box_attention_loss > 0
        assert h.loss == pytest.approx(h.lm_loss + 0.01 * h.aux_loss + 0.5 * h.box_attention_loss, rel=1e-6)
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["box_attention_loss"] for r in logged] == [h.box_attention_loss for h in result.history]


def test_rows_that_carry_some_patches_are_scored_on_those_patches(tokenizer):
    model = _model(tokenizer).eval()
    box_loss = BoxAttentionLoss(model, tokenizer, BoxAttentionSettings(coef=1.0, layer=1, head=0))
    full = PaddingCollator(tokenizer.pad_token_id)([_sample(tokenizer, model)])
    with torch.no_grad(), box_loss.attached():
        model(**full)
        dense = box_loss(full["input_ids"], full["labels"])
        model(**full)
        all_listed = box_loss(full["input_ids"], full["labels"], [torch.arange(16)])
    torch.testing.assert_close(all_listed, dense)

    # the same conversation with only patches 0, 5 and 15 of the 4 x 4 grid as image tokens (no pixels)
    image_id = model.config.image_token_id
    ids = full["input_ids"][0]
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[(ids == image_id).nonzero().flatten()[3:]] = False
    ids, labels = ids[keep][None], full["labels"][0][keep][None]
    with torch.no_grad(), box_loss.attached():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
        sparse = box_loss(ids, labels, [torch.tensor([0, 5, 15])])
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
        found = box_loss.targets(ids, labels)
        weights = box_loss.head_weights([(row, query) for row, query, _ in found])
    image = (ids[0] == image_id).nonzero().flatten()  # the three image-token positions
    # box 1 (x 10-40, y 20-60) covers patches 0 and 5 of the three; box 2 (80-90, 80-95) covers patch 15
    expected = [-torch.log(w[image[[0, 1]]].sum() + 1e-6) for w in weights[:4]]
    expected += [-torch.log(w[image[[2]]].sum() + 1e-6) for w in weights[4:]]
    torch.testing.assert_close(sparse, torch.stack(expected).mean())


@pytest.mark.parametrize("settings, message", [
    (BoxAttentionSettings(coef=1.0, layer=2), "layer 2 does not exist"),
    (BoxAttentionSettings(coef=1.0, layer=0, head=4), "head 4 does not exist"),
])
def test_a_head_that_does_not_exist_is_refused(tokenizer, settings, message):
    with pytest.raises(ValueError, match=message):
        BoxAttentionLoss(_model(tokenizer), tokenizer, settings)


def test_a_tokenizer_that_splits_grid_values_is_refused(tokenizer):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({"<unk>": 0, "{": 1, "<1>": 2}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    plain = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")
    with pytest.raises(ValueError, match="grid values <0>..<100> as single tokens"):
        BoxAttentionLoss(_model(tokenizer), plain, BoxAttentionSettings(coef=1.0, layer=0))
