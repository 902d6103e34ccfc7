"""Smoke tests of the demo-checkpoint recipe (train/demo.py) at a minutes-tiny budget and size."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import skymoe
from train.box_attention import BoxAttentionSettings
from train.dataset import IGNORE_INDEX, InstructionRecord, encode_sample, read_instruction_jsonl
from train.demo import DemoConfig, DemoData, DemoModel, DemoTraining, main, pack_conversation, run_demo
from train.instructions import make_sample
from train.synthetic.classes import COLOURS

TINY_MODEL = DemoModel(image_size=56, patch_size=28, vision_hidden=64, vision_layers=1, vision_heads=2,
                       text_hidden=64, text_intermediate=128, text_layers=2, text_heads=1, bpe_vocab=300,
                       num_experts=4, top_k=2)


def _samples():
    return [
        make_sample("a_SC", "img.png", "classify", "forest"),
        make_sample("a_VQA_0", "img.png", "vqa", "yes", "Is there a tree in the image?"),
        make_sample("a_VQA_1", "img.png", "vqa", "3", "How many trees are there?"),
        make_sample("a_VQA_2", "img.png", "vqa", "no", "Is there a ship in the image?"),
        make_sample("a_OC", "img.png", "count", "3", "tree"),
    ]


def test_pack_conversation_one_image_turn_quota_and_image_token_once():
    record = pack_conversation(_samples(), {"SC": 1, "VQA": 2, "OC": 1, "VG": 2}, np.random.default_rng(0))
    humans = [t["value"] for t in record["conversations"][::2]]
    answers = [t["value"] for t in record["conversations"][1::2]]
    assert len(humans) == len(answers) == 4  # SC 1 + VQA 2 (of 3) + OC 1; no VG sample exists
    assert humans[0].startswith("<image>\n") and not any("<image>" in h for h in humans[1:])
    assert sum(h.startswith("[vqa]") for h in humans) == 2
    assert record["image"] == "img.png"
    with pytest.raises(ValueError, match="one image"):
        pack_conversation([*_samples(), make_sample("b_SC", "other.png", "classify", "river")], {"SC": 1},
                          np.random.default_rng(0))


def test_packed_conversation_puts_loss_on_every_answer(tmp_path):
    """train.dataset handles the multi-turn records: each answer's tokens carry labels."""
    record = pack_conversation(_samples(), {"SC": 1, "VQA": 3, "OC": 1}, np.random.default_rng(1))
    turns = tuple((h["value"], g["value"]) for h, g in zip(record["conversations"][::2], record["conversations"][1::2]))
    image_path = tmp_path / "img.png"
    from PIL import Image

    Image.fromarray(np.zeros((56, 56, 3), np.uint8)).save(image_path)
    texts = [skymoe.render_conversation(list(turns), add_generation_prompt=False)] * 4
    tokenizer = skymoe.build_tokenizer(texts, vocab_size=300)
    from train.demo import demo_model_config

    processor = skymoe.SkyMoEProcessor.for_config(demo_model_config(TINY_MODEL, tokenizer), tokenizer)
    rec = InstructionRecord("x", image_path, "classify", "global", turns, "test:1")
    sample = encode_sample(rec, processor, max_length=512)
    labelled = sample["labels"] != IGNORE_INDEX
    runs = int((labelled[1:] & ~labelled[:-1]).sum()) + int(labelled[0])
    assert runs == len(turns) == 5
    decoded = tokenizer.decode(sample["labels"][labelled])
    assert all(answer in decoded for _, answer in turns)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    cfg = DemoConfig(seed=3, model=TINY_MODEL,
                     data=DemoData(scenes=6, cda_share=0.5, val_scenes=1, workers=1),
                     training=DemoTraining(budget_minutes=0.3, micro_batch=2, global_batch=2, chunk_minutes=0.05,
                                           max_length=512,
                                           box_attention=BoxAttentionSettings(coef=1.0, layer=1, head=0),
                                           word_match_scale=1.0, language_trainable="llm"))
    out = root / "ckpt"
    summary = run_demo(cfg, out, root / "work")
    return out, summary, root / "work"


def test_demo_recipe_writes_a_loadable_moe_checkpoint(demo_run):
    out, summary, _ = demo_run
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "README.md",
            "training_summary.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "skymoe" and config["num_experts"] == 4 and config["moe_layers"] == [1]
    with safe_open(out / "model.safetensors", "pt") as fh:
        keys = list(fh.keys())
        assert fh.get_tensor(keys[0]).dtype == torch.bfloat16
    assert sum(".mlp.experts." in k for k in keys) > 0 and any(".mlp.router." in k for k in keys)
    model = skymoe.SkyMoEForConditionalGeneration.from_pretrained(out)
    processor = skymoe.SkyMoEProcessor.from_pretrained(out)
    tokenizer = processor.tokenizer
    assert len(tokenizer.tokenize("<17>")) == 1 and len(tokenizer.tokenize("7")) == 1
    batch = processor(images=np.zeros((56, 56, 3), np.uint8),
                      text=skymoe.render_conversation([(skymoe.build_prompt("count", "car"), None)]),
                      return_tensors="pt")
    out_ids = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out_ids.shape[1] > batch["input_ids"].shape[1]


def test_demo_recipe_ran_both_stages_and_reports_them(demo_run):
    out, summary, work = demo_run
    phases = {p["name"]: p for p in summary["phases"]}
    assert set(phases) == {"dense", "moe"}
    assert summary["vision_pretraining"]["steps_done"] >= 1  # Stage 0 ran first
    lines = [json.loads(line) for line in (work / "objects.jsonl").read_text().splitlines()]
    assert len(lines) == len(read_instruction_jsonl(work / "moe.jsonl")[0])  # one per scene and variant
    for phase in phases.values():
        assert phase["steps_done"] >= 1 and np.isfinite(phase["final_loss"])
        assert phase["quick_eval"] and {"classify", "vqa", "count"} <= set(phase["quick_eval"][-1])
    moe_log = [json.loads(line) for line in (Path(summary["run_dir"]) / "moe" / "log.jsonl").read_text().splitlines()]
    assert all(rec["aux_loss"] > 0 for rec in moe_log)  # Stage II optimises LM + alpha * aux
    dense_log = [json.loads(line) for line in (Path(summary["run_dir"]) / "dense" / "log.jsonl").read_text().splitlines()]
    assert all(rec["aux_loss"] == 0 for rec in dense_log)
    # the grounding turns' boxes drive the box-attention loss in both stages
    assert any(rec["box_attention_loss"] > 0 for rec in dense_log) and any(rec["box_attention_loss"] > 0 for rec in moe_log)
    records, bad = read_instruction_jsonl(work / "moe.jsonl")
    assert not bad and all(len(r.turns) >= 2 for r in records)
    assert any("augmentation" in line for line in (work / "moe.jsonl").read_text().splitlines())
    card = (out / "README.md").read_text()
    assert "synthetic" in card.lower() and "python -m train.demo --config train/configs/demo.yaml" in card
    assert "Box-attention supervision" in card and "head 0 of decoder layer 1" in card
    assert "boxes read off an object's centre patch within IoU 0.5: box head" in card
    assert "Word-match head (`train.word_match`): head 0 of decoder layer 0" in card
    # language_trainable="llm": the language stages leave the tower and projector as Stage 0 left them
    for phase in ("dense", "moe"):
        saved = sorted((Path(summary["run_dir"]) / phase / "checkpoints").glob("step-*/trainable.safetensors"))
        with safe_open(saved[-1], "pt") as fh:
            keys = list(fh.keys())
        assert keys and not any("vision_tower" in k or "multi_modal_projector" in k for k in keys)
    assert "the language model (tower and projector frozen after Stage 0)" in card
    assert json.loads((out / "config.json").read_text()).get("_attn_implementation") in (None, "sdpa")
    assert summary["config_file"] == "train/configs/demo.yaml"


def test_cli_rejects_a_bad_config_field(tmp_path, capsys):
    code = main(["--out", str(tmp_path / "o"), "--set", "model.text_hidden=wide"])
    assert code == 2
    assert "model.text_hidden" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_phase_stops_at_a_chunk_boundary_when_the_machine_is_slower_than_measured(demo_run, monkeypatch):
    """A step-time calibration taken at a quiet moment must not let a phase overrun its time share."""
    out, summary, work = demo_run
    import train.demo as demo

    monkeypatch.setattr(demo, "_seconds_per_step", lambda *args: 0.001)  # 1000x too optimistic
    model = skymoe.SkyMoEForConditionalGeneration.from_pretrained(out).float()
    processor = skymoe.SkyMoEProcessor.from_pretrained(out)
    val_records, _ = read_instruction_jsonl(work / "val" / "benchmark.jsonl")
    tcfg = DemoTraining(micro_batch=2, global_batch=2, chunk_minutes=12, max_length=512)
    report = demo.run_phase("slow", model, processor, work / "moe.jsonl", val_records, tcfg, 1e-4, 0.02,
                            work / "runs-slow", seed=0)
    assert report.steps_planned == 18  # 0.9 * 0.02 s / 0.001 s
    assert report.steps_done == 3  # chunks are at most a sixth of the plan; the first one already overran
    assert len(report.quick_eval) == 1


def test_position_codes_make_neighbours_similar_and_stay_trainable():
    """init_position_codes: patch positions and grid tokens start as smooth codes of where they are."""
    from skymoe.position_codes import sincos_codes
    from train.demo import build_demo_model

    codes = sincos_codes(torch.arange(101), 64, 4.0, 400.0)
    assert codes.shape == (101, 64) and codes.abs().max() <= 1.0
    texts = [skymoe.render_conversation([("<image>\nWhere is the car?", "{<10><20><30><40>|<0>}")],
                                        add_generation_prompt=False)] * 4
    tokenizer = skymoe.build_tokenizer(texts, vocab_size=300)
    model, _ = build_demo_model(TINY_MODEL, tokenizer, seed=0)
    cos = torch.nn.functional.cosine_similarity
    rows = model.get_output_embeddings().weight
    ids = tokenizer.convert_tokens_to_ids(["<40>", "<41>", "<90>"])
    assert cos(rows[ids[0]], rows[ids[1]], dim=0) > cos(rows[ids[0]], rows[ids[2]], dim=0) + 0.3
    emb = model.get_input_embeddings().weight
    assert torch.equal(emb[ids], rows[ids])
    patches = model.model.vision_tower.embeddings.position_embedding.weight
    side = TINY_MODEL.image_size // TINY_MODEL.patch_size
    assert patches.shape[0] == side * side + 1 and torch.count_nonzero(patches[0]) == 0
    assert patches[1:].abs().max() <= 0.5 and patches[1:].std() > 0.2  # ~25x CLIP's default std 0.02
    assert patches.requires_grad and rows.requires_grad
    # the config's model.image_position_embedding reaches the model
    placed, _ = build_demo_model(replace(TINY_MODEL, image_position_embedding="2d"), tokenizer, seed=0)
    assert placed.config.image_position_embedding == "2d"
    assert placed.model.multi_modal_projector.row_embedding.shape == (side, TINY_MODEL.text_hidden // 2)


def test_training_data_are_the_same_whichever_worker_builds_a_scene(tmp_path):
    from train.demo import build_training_data

    cfg = DemoData(scenes=6, cda_share=0.5, val_scenes=1)
    outputs = []
    for workers in (1, 2):
        paths = build_training_data(tmp_path / f"w{workers}", replace(cfg, workers=workers), seed=5)
        outputs.append([p.read_text() for p in paths])
    assert outputs[0] == outputs[1]
    assert '"augmentation"' in outputs[0][1]  # CDA variants were built in the workers too


def test_demo_recipe_with_object_codes_hands_stage_0s_heads_to_the_model(tmp_path):
    cfg = DemoConfig(seed=4, model=replace(TINY_MODEL, object_tokens=2, object_context_grid=1, object_codes=True),
                     data=DemoData(scenes=4, cda_share=0.0, val_scenes=1, workers=1),
                     training=DemoTraining(budget_minutes=0.2, micro_batch=2, global_batch=2, chunk_minutes=0.05,
                                           max_length=512, language_trainable="llm"))
    out = tmp_path / "ckpt"
    run_demo(cfg, out, tmp_path / "work")
    config = json.loads((out / "config.json").read_text())
    assert config["object_tokens"] == 2 and config["image_seq_length"] == 1 + 2 and config["object_classes"] == 10
    assert config["object_codes"] and config["object_colours"] == len(COLOURS)
    model, processor = skymoe.load_model(out, quant="none")
    assert processor.image_seq_length == 3
    with safe_open(out / "model.safetensors", "pt") as fh:
        # Stage 0's centre head (bias from CenterNet's prior, -4.6), not a fresh Linear's (|bias| < 0.13)
        assert fh.get_tensor("model.object_scorer.bias").float().mean() < -2
    answers = skymoe.generate(model, processor, [np.zeros((56, 56, 3), np.uint8)], [skymoe.build_prompt("count", "car")],
                              max_new_tokens=3)
    assert len(answers) == 1
