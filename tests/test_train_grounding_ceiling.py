"""The grounding ceiling of a patch grid (train.grounding_ceiling) on hand cases and a real synthetic benchmark."""

from __future__ import annotations

import json

import pytest

from train.dataset import read_instruction_jsonl
from train.eval import build_synthetic_benchmark
from train.grounding_ceiling import grounding_ceiling, main, patch_snapped_answer


def test_a_box_filling_its_patch_stays_and_a_small_one_moves_to_the_patch_middle():
    # 504 px image, 18 x 18 patches of 28 px; the grid unit is 5.04 px
    assert patch_snapped_answer("{<0><0><6><6>|<0>}", 504, 504, 18) == "{<0><0><6><6>|<0>}"
    # a 2 x 2 unit box centred at (7, 7) units = 35.3 px, in patch (1, 1) whose middle is 42 px = 8.3 units
    assert patch_snapped_answer("{<6><6><8><8>|<0>}", 504, 504, 18) == "{<7><7><9><9>|<0>}"
    # several boxes, each moved on its own; the angle is kept
    assert (patch_snapped_answer("{<0><0><6><6>|<0>}{<6><6><8><8>|<30>}", 504, 504, 18)
            == "{<0><0><6><6>|<0>}{<7><7><9><9>|<30>}")


def test_a_box_at_the_far_edge_stays_on_the_grid():
    # 90-100 units = 453.6-504 px, centre 478.8 px in the last patch (476-504 px, middle 490 px):
    # moved to 464.8-515.2 px, clamped to the image (box_norm100) at 504 px = 100 units
    assert patch_snapped_answer("{<90><90><100><100>|<0>}", 504, 504, 18) == "{<92><92><100><100>|<0>}"


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory):
    path = build_synthetic_benchmark(tmp_path_factory.mktemp("bench"), 40, seed=11)
    return path, read_instruction_jsonl(path)[0]


def test_one_pixel_patches_reach_every_box_and_coarse_ones_do_not(benchmark):
    _, records = benchmark
    report = grounding_ceiling(records, 504, [1, 504])
    n = sum(r.task == "ground" for r in records)
    assert report[1]["n"] == n > 0
    assert report[1]["acc@0.5"] == 100.0 and report[1]["acc@0.7"] == 100.0
    # one patch for the whole image: every box is moved to the image centre
    assert report[504]["acc@0.5"] < 100.0


def test_patch_sizes_that_do_not_tile_the_image_and_data_without_grounding_are_refused(benchmark):
    _, records = benchmark
    with pytest.raises(ValueError, match="does not divide the image size 504"):
        grounding_ceiling(records, 504, [25])
    with pytest.raises(ValueError, match="no grounding samples"):
        grounding_ceiling([r for r in records if r.task != "ground"], 504, [28])


def test_cli_prints_the_table_and_writes_json(benchmark, tmp_path, capsys):
    path, _ = benchmark
    out = tmp_path / "ceiling.json"
    assert main(["--data", str(path), "--patch-sizes", "28", "14", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "18x18" in printed and "36x36" in printed
    saved = json.loads(out.read_text())
    assert set(saved["per_patch_size"]) == {"28", "14"} and saved["per_patch_size"]["28"]["n"] > 0
    assert main(["--data", str(path), "--patch-sizes", "25"]) == 2
    assert "does not divide" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # neither --data nor --synthetic
        main(["--patch-sizes", "28"])
    assert "one of the arguments --data --synthetic is required" in capsys.readouterr().err
