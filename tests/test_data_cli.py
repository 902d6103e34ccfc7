"""``python -m train.data``: synth, convert, augment end to end (small runs)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from train.data.__main__ import main
from train.instructions import read_samples

REPO = Path(__file__).resolve().parent.parent


def _dota_src(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "labelTxt").mkdir()
    Image.fromarray(np.full((600, 700, 3), 90, np.uint8)).save(root / "images" / "A.png")
    (root / "labelTxt" / "A.txt").write_text(
        "imagesource:GoogleEarth\ngsd:0.2\n"
        "10 10 30 10 30 20 10 20 small-vehicle 0\n"
        "600 500 620 500 620 520 600 520 small-vehicle 0\n"
        "bad line here\n")
    return root


def test_convert_cli_summary_and_skips(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["-q", "convert", "dota", "--src", str(_dota_src(tmp_path / "src")), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "OC    local" in out and "skipped items 1" in out
    assert "A.txt:5: malformed labelTxt line" in out
    crops = sorted(p.name for p in (tmp_path / "out" / "images").iterdir())
    assert crops == ["A_0_0.png", "A_0_96.png", "A_196_0.png", "A_196_96.png"]  # 700x600 -> 4 crops of 504


def test_convert_cli_empty_source_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["-q", "convert", "captions", "--src", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "error: expected exactly one dataset_*.json" in capsys.readouterr().err


def test_synth_cda_and_augment(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("train.synthetic")
    assert main(["-q", "synth", "--out", str(tmp_path / "s"), "--n", "3", "--seed", "5", "--cda"]) == 0
    samples = list(read_samples(tmp_path / "s" / "data.jsonl"))
    tasks = Counter(s.task for s in samples)
    assert set(tasks) == {"SC", "IC", "VQA", "VG", "OC"}
    augmented = [s for s in samples if s.augmentation]
    assert {s.augmentation["type"] for s in augmented} == {"cutout", "spatial", "colour"}
    assert all((tmp_path / "s" / s.image).is_file() for s in samples)
    table = capsys.readouterr().out
    assert f"total{len(samples):>23}" in table
    # augment a synthetic dataset: variants only, originals' variants not re-augmented
    assert main(["-q", "augment", "--data", str(tmp_path / "s" / "data.jsonl"), "--out", str(tmp_path / "a"),
                 "--seed", "1"]) == 0
    again = list(read_samples(tmp_path / "a" / "data.jsonl"))
    assert again and all(s.augmentation for s in again)
    annotations = (tmp_path / "s" / "annotations.jsonl").read_text().splitlines()
    originals = [json.loads(line) for line in annotations if "+cda:" not in json.loads(line)["source"]]
    assert len(originals) == 3
    assert len({json.loads(line)["source"].split("+cda:")[0] for line in
                (tmp_path / "a" / "annotations.jsonl").read_text().splitlines()}) == 3


def test_synth_is_deterministic(tmp_path: Path) -> None:
    pytest.importorskip("train.synthetic")
    for name in ("a", "b"):
        assert main(["-q", "synth", "--out", str(tmp_path / name), "--n", "2", "--seed", "9"]) == 0
    assert (tmp_path / "a" / "data.jsonl").read_text() == (tmp_path / "b" / "data.jsonl").read_text()


def test_augment_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text("")
    assert main(["-q", "augment", "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    assert "no " in capsys.readouterr().err
    (tmp_path / "annotations.jsonl").write_text('{"image_path": "x.png", "width": 4, "height": 4}\n{"width": 4}\n')
    assert main(["-q", "augment", "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    assert "annotations.jsonl:2: not an annotated image record" in capsys.readouterr().err


@pytest.mark.slow  # a fresh interpreter imports torch (via skymoe): ~20 s on the shared CPU
def test_module_entry_point_help() -> None:
    result = subprocess.run([sys.executable, "-m", "train.data", "convert", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "rsvqa" in result.stdout and "--overlap" in result.stdout


def test_convert_cli_rejects_option_the_format_lacks(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = _dota_src(tmp_path / "src")
    assert main(["-q", "convert", "dota", "--src", str(src), "--out", str(tmp_path / "o"), "--split", "train"]) == 2
    assert "format dota does not take split" in capsys.readouterr().err
