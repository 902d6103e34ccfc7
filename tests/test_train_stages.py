"""Stage I (LoRA) and Stage II (upcycled MoE) runs on CPU with tiny checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from train_samples import write_instruction_jsonl

import skymoe
from train.config import DataConfig, LoopConfig, LoraSettings, MoESettings, OptimConfig, Stage1Config, Stage2Config
from train.stage1 import build_stage1_model, run_stage1
from train.stage1 import main as stage1_main
from train.stage2 import main as stage2_main
from train.stage2 import run_stage2, trainable_mask


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory):
    return skymoe.make_tiny_checkpoint(tmp_path_factory.mktemp("dense"), seed=1, num_experts=1)


@pytest.fixture(scope="module")
def data_jsonl(tmp_path_factory):
    items = [("count", "small vehicle", "3"), ("ground", "the red car", "{<10><20><30><40>|<0>}"),
             ("caption", None, "two ships in a harbour"), ("classify", None, "harbor")]
    return write_instruction_jsonl(tmp_path_factory.mktemp("data"), items)


def _loop(out, **kw):
    return LoopConfig(**(dict(output_dir=str(out), epochs=1, global_batch_size=2, per_device_batch_size=1,
                              bf16=False, seed=3, save_every_steps=0) | kw))


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_stage1_lora_trains_only_llm_q_and_v(tmp_path, dense_ckpt, data_jsonl):
    cfg = Stage1Config(model=str(dense_ckpt), data=DataConfig(str(data_jsonl)), loop=_loop(tmp_path / "s1"),
                       optim=OptimConfig(lr=5e-3, warmup_ratio=0.0), lora=LoraSettings(r=8, alpha=16))
    model, _, _ = build_stage1_model(cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "language_model" in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[1] for n in trainable} == {"q_proj", "v_proj"}
    assert not any("vision_tower" in n for n in trainable)  # CLIP's own q_proj / v_proj stay frozen

    result = run_stage1(cfg)
    assert result.finished and len(result.history) == 2
    assert all(h.aux_loss == 0.0 and h.loss == h.lm_loss for h in result.history)  # dense: no aux term
    base, merged = _weights(dense_ckpt), _weights(tmp_path / "s1" / "merged")
    assert set(base) == set(merged)
    changed = sorted(k for k in base if not torch.equal(base[k], merged[k]))
    llm_qv = sorted(k for k in base if "language_model" in k and k.endswith(("q_proj.weight", "v_proj.weight")))
    assert changed == llm_qv  # merging the trained LoRA changed exactly the LLM's W_q and W_v
    assert skymoe.load_model(tmp_path / "s1" / "merged", quant="none", device="cpu").model.config.moe_layers == []

    # the merge command reproduces the merged weights from base + adapter
    assert stage1_main(["merge", "--base", str(dense_ckpt), "--adapter", str(tmp_path / "s1" / "adapter"),
                        "--out", str(tmp_path / "merged2")]) == 0
    again = _weights(tmp_path / "merged2")
    assert all(torch.allclose(again[k], merged[k], atol=1e-6) for k in merged)


def test_stage2_upcycles_and_logs_aux_loss(tmp_path, dense_ckpt, data_jsonl):
    cfg = Stage2Config(model=str(dense_ckpt), data=DataConfig(str(data_jsonl)), loop=_loop(tmp_path / "s2"),
                       optim=OptimConfig(lr=5e-3, warmup_ratio=0.0),
                       moe=MoESettings(num_experts=4, top_k=2, aux_loss_coef=0.05))
    result = run_stage2(cfg)
    assert result.finished and len(result.history) == 2
    for h in result.history:
        assert h.aux_loss > 0.5  # about 1 for a balanced router
        assert h.loss == pytest.approx(h.lm_loss + 0.05 * h.aux_loss, rel=1e-6)
    final = skymoe.load_model(tmp_path / "s2" / "final", quant="none", device="cpu").model
    assert final.config.num_experts == 4 and final.config.moe_layers == [1, 3]
    base, after = _weights(dense_ckpt), _weights(tmp_path / "s2" / "final")
    frozen = [k for k in base if "vision_tower" in k or "multi_modal_projector" in k]
    assert frozen and all(torch.equal(base[k], after[k]) for k in frozen)  # default trainable: llm
    experts = [k for k in after if ".experts." in k and k.endswith("down_proj.weight")]
    assert experts and any(not torch.equal(after[experts[0]], after[k]) for k in experts[1:])  # experts diverged
    mask = trainable_mask(final, "moe")
    assert all((".experts." in n or ".router." in n) == on for n, on in mask.items())


def test_stage_refuses_a_checkpoint_folder_of_another_model(tmp_path, data_jsonl, capsys):
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 64}))
    cfg = Stage2Config(model=str(other), data=DataConfig(str(data_jsonl)), loop=_loop(tmp_path / "o"))
    with pytest.raises(skymoe.CheckpointError, match=str(other)):
        run_stage2(cfg)
    config = tmp_path / "s2.yaml"
    config.write_text(f"model: {other}\ndata: {{train_jsonl: {data_jsonl}}}\nloop: {{output_dir: {tmp_path / 'o'}}}\n")
    assert stage2_main([str(config)]) == 2
    assert f"error: {other}" in capsys.readouterr().err
