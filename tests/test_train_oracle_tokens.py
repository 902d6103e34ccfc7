"""Oracle image tokens (train/oracle_tokens.py): the designed codes, the encoding, and a tiny CLI run."""

from __future__ import annotations

import json

import pytest
import torch

import skymoe
from train.box_attention import box_patch_mask
from train.dataset import IGNORE_INDEX
from train.oracle_tokens import DesignedTokens, answer_objects, encode_turns, main

WIDTH, SIDE = 256, 18
CAR = {"label": "car", "box_px": [100.8, 201.6, 151.2, 252.0], "colour": "red", "size": "small"}  # grid 20-30, 40-50
IMAGE = {"scene_class": "parking lot", "width": 504, "height": 504, "objects": [CAR]}
EMPTY = {**IMAGE, "objects": []}


@pytest.fixture(scope="module")
def tokens() -> DesignedTokens:
    return DesignedTokens(WIDTH, SIDE, seed=0)


def test_an_object_changes_its_box_patches_and_writes_its_codes_at_its_centre(tokens):
    with_car, patches = tokens(IMAGE)
    without, _ = tokens(EMPTY)
    assert with_car.shape == (SIDE * SIDE, WIDTH) and torch.equal(patches, torch.arange(SIDE * SIDE))
    changed = (with_car - without).norm(dim=1) > 1e-6
    assert torch.equal(changed, box_patch_mask((20, 40, 30, 50), SIDE))  # nothing outside the box moves
    centre = 8 * SIDE + 4  # centre (25, 45) on the grid -> row 8, column 4
    kind = tokens.classes.index("car")
    delta = with_car[centre] - without[centre]
    assert int((tokens.class_codes @ delta).argmax()) == kind
    assert int((tokens.colour_codes @ delta).argmax()) == tokens.colours.index("red")
    # each corner reads back linearly from the centre token: the nearest of the 101 grid codes
    for corner, value in enumerate((20, 40, 30, 50)):
        codes = torch.stack([tokens.corner_code(corner, v) for v in range(101)])
        assert abs(int((codes @ delta).argmax()) - value) <= 1


def test_sparse_tokens_are_the_centre_patches_only(tokens):
    dense, _ = tokens(IMAGE)
    sparse, patches = tokens(IMAGE, sparse=True)
    assert patches.tolist() == [8 * SIDE + 4]
    torch.testing.assert_close(sparse, dense[patches])
    _, none = tokens(EMPTY, sparse=True)
    assert none.tolist() == [0]  # an image without objects still gives the model one token


def test_the_same_seed_gives_the_same_codes():
    a, b = DesignedTokens(WIDTH, SIDE, seed=3), DesignedTokens(WIDTH, SIDE, seed=3)
    torch.testing.assert_close(a(IMAGE)[0], b(IMAGE)[0])
    assert not torch.allclose(a(IMAGE)[0], DesignedTokens(WIDTH, SIDE, seed=4)(IMAGE)[0])
    with pytest.raises(ValueError, match="width of at least 128"):
        DesignedTokens(64, SIDE)


def test_targets_only_keeps_the_objects_an_answer_boxes():
    bus = {"label": "bus", "box_px": [302.4, 50.4, 352.8, 100.8], "colour": "red"}  # grid 60-70, 10-20
    second_car = {**CAR, "box_px": [105.84, 201.6, 156.24, 252.0]}  # one grid unit right of CAR
    image = {**IMAGE, "objects": [CAR, bus, second_car]}
    assert answer_objects(image, ["{<20><40><30><50>|<0>}"])["objects"] == [CAR, second_car]  # within one unit
    assert answer_objects(image, ["{<22><40><32><50>|<0>}"])["objects"] == [second_car]
    assert answer_objects(image, ["{<60><10><70><20>|<0>}{<21><40><31><50>|<0>}"])["objects"] == [CAR, bus,
                                                                                                  second_car]
    assert answer_objects(image, ["no box here"])["objects"] == []
    assert answer_objects(image, ["{<60><10><70><20>|<0>}"])["scene_class"] == "parking lot"


@pytest.mark.parametrize("question_first", [False, True])
def test_encoding_expands_the_image_and_labels_only_the_answer(question_first):
    turn = ("<image>\n[refer] Where is <p>the car</p>?", "{<20><40><30><50>|<0>}")
    tokenizer = skymoe.build_tokenizer([turn[0] + " " + turn[1]] * 5, vocab_size=300)
    ids, labels = encode_turns(tokenizer, [turn], 5, question_first)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    image = [i for i, t in enumerate(ids) if t == image_id]
    assert len(image) == 5 and image == list(range(image[0], image[0] + 5))
    text_before_image = tokenizer.decode(ids[: image[0]])
    assert ("Where is" in text_before_image) == question_first
    answer = tokenizer.decode([t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX])
    assert answer.replace(" ", "").startswith("{<20><40><30><50>|<0>}")
    assert all(labels[i] == IGNORE_INDEX for i in image)


def test_a_tiny_run_trains_scores_and_writes_its_history(tmp_path, capsys):
    out = tmp_path / "oracle.json"
    code = main(["--work-dir", str(tmp_path / "work"), "--out", str(out), "--tasks", "VG,OC", "--steps", "4",
                 "--batch", "2", "--eval-scenes", "3", "--sparse", "--box-attention", "1", "--threads", "1",
                 "--set", "data.scenes=10", "--set", "data.val_scenes=1", "--set", "data.workers=1"])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["settings"]["tasks"] == ["VG", "OC"] and report["settings"]["sparse"]
    assert [point["step"] for point in report["history"]] == [1, 2, 3, 4]
    last = report["history"][-1]
    assert set(last["scores"]) == {"ground", "count"} and last["scores"]["ground"]["n"] == 3
    assert last["box_attention_loss"] is not None and last["loss"] > 0


def test_a_tiny_targets_only_run(tmp_path):
    out = tmp_path / "oracle.json"
    assert main(["--work-dir", str(tmp_path / "work"), "--out", str(out), "--tasks", "VG", "--steps", "4",
                 "--batch", "2", "--eval-scenes", "2", "--targets-only", "--threads", "1",
                 "--set", "data.scenes=10", "--set", "data.val_scenes=1", "--set", "data.workers=1"]) == 0
    report = json.loads(out.read_text())
    assert report["settings"]["targets_only"] and report["history"][-1]["scores"]["ground"]["n"] == 2


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "VG,XX"], "use task codes from"),
    (["--steps", "2"], "need --steps >= 4"),
    (["--tasks", "VG,OC", "--targets-only"], "use it with --tasks VG"),
    (["--set", "model.text_layers=four"], "text_layers"),
])
def test_bad_arguments_are_refused_with_a_message(tmp_path, capsys, argv, message):
    assert main(["--work-dir", str(tmp_path), "--out", str(tmp_path / "o.json"), *argv]) == 2
    assert message in capsys.readouterr().err
