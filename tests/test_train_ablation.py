"""The Table-8 ablation runner (train/ablation.py): data per row and a tiny end-to-end run."""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import skymoe
from train.ablation import ROWS, AblationRow, format_ablation_table, row_records, run_ablation, split_by_task


def _packed(record_id: str, image: str, augmentation: str | None = None) -> dict:
    turns = [("<image>\n" + skymoe.build_prompt("count", "car"), "3"),
             (skymoe.build_prompt("vqa", "Is there a ship?"), "no"),
             (skymoe.build_prompt("count", "tree"), "5"),
             (skymoe.build_prompt("ground", "the red car"), "{<10><20><30><40>|<0>}")]
    record = {"id": record_id, "image": image, "task": "OC", "granularity": "local",
              "conversations": [m for q, a in turns for m in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]}
    return record | ({"augmentation": {"type": augmentation}} if augmentation else {})


def test_split_by_task_keeps_turn_order_and_puts_the_image_first(tmp_path):
    parts = {p["task"]: p for p in split_by_task(_packed("a", "img/a.png"), tmp_path)}
    assert sorted(parts) == ["OC", "VG", "VQA"]
    count = parts["OC"]["conversations"]
    assert [m["value"] for m in count[1::2]] == ["3", "5"]  # the two count turns, in their order
    assert count[0]["value"].startswith("<image>\n") and "<image>" not in count[2]["value"]
    for part in parts.values():
        assert part["conversations"][0]["value"].startswith("<image>\n")
        assert part["image"] == str((tmp_path / "img/a.png").resolve())
        assert part["id"] == f"a_{part['task']}"


def test_rows_drop_the_named_augmentations(tmp_path):
    records = [_packed("plain", "p.png"), _packed("cut", "c.png", "cutout"), _packed("moved", "m.png", "spatial"),
               _packed("tinted", "t.png", "colour")]
    by_name = {r.name: r for r in ROWS}

    def sources(row):
        return sorted({r["id"].rsplit("_", 1)[0] for r in row_records(records, row, tmp_path)})

    assert sources(by_name["E=8, CDA"]) == ["cut", "moved", "plain", "tinted"]
    assert sources(by_name["E=8, no cutout"]) == ["moved", "plain", "tinted"]
    assert sources(by_name["E=8, no attribute editing"]) == ["cut", "plain"]
    assert sources(by_name["E=8, no CDA"]) == ["plain"]
    assert len({r.slug for r in ROWS}) == len(ROWS) == 7
    with pytest.raises(ValueError, match="no task tag"):
        split_by_task({"id": "x", "image": "x.png", "conversations": [{"from": "human", "value": "hello"},
                                                                     {"from": "gpt", "value": "hi"}]}, tmp_path)


def test_two_rows_train_score_and_resume(tmp_path):
    dense = skymoe.make_tiny_checkpoint(tmp_path / "dense", seed=1, num_experts=1)
    (tmp_path / "img").mkdir()
    rng = np.random.default_rng(0)
    records = []
    for i, aug in enumerate([None, "cutout", None, "colour"]):
        Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
        records.append(_packed(f"r{i}", f"img/{i}.png", aug))
    data = tmp_path / "moe.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    rows = [r.slug for r in ROWS if r.name in ("E=1 (dense), CDA", "E=8, CDA, task router")]
    args = Namespace(dense=str(dense), data=str(data), out=str(tmp_path / "abl"), steps=2, lr=1e-3, global_batch=2,
                     micro_batch=2, max_length=256, seed=0, eval_n=5, eval_seed=2027, eval_batch_size=8, rows=rows)
    results = run_ablation(args)
    assert [r["row"]["name"] for r in results] == ["E=1 (dense), CDA", "E=8, CDA, task router"]
    assert all(r["steps"] == 2 and set(r["per_task"]) == {"caption", "classify", "vqa", "ground", "count"}
               for r in results)
    task_row = skymoe.load_model(tmp_path / "abl" / rows[1] / "run" / "final", quant="none", device="cpu").model
    assert task_row.config.router_mode == "task" and task_row.config.num_experts == 8
    table = (tmp_path / "abl" / "table.md").read_text()
    assert "| E=1 (dense), CDA |" in table and "| E=8, CDA, task router |" in table
    assert table.strip() == format_ablation_table(results)
    stamp = (tmp_path / "abl" / rows[0] / "metrics.json").stat().st_mtime_ns
    again = run_ablation(args)  # scored rows are kept, not trained again
    assert json.dumps(again) == json.dumps(results)
    assert (tmp_path / "abl" / rows[0] / "metrics.json").stat().st_mtime_ns == stamp


def test_row_slugs_are_folder_names():
    assert AblationRow("E=8, no CDA", 8).slug == "e_8__no_cda"
    assert all(Path(r.slug).name == r.slug for r in ROWS)
