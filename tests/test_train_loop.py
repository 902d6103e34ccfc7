"""The training loop: schedule, data order, exact resume, atomic checkpoints, mismatch errors.

Runs a real tiny SkyMoE (``skymoe.tiny_config``: 4 layers, 64 wide, E=4, attention dropout so
that the RNG state matters) on token batches made here, on CPU.
"""

from __future__ import annotations

import errno
import json
import math

import pytest
import torch
from safetensors import SafetensorError

from skymoe import SkyMoEForConditionalGeneration, tiny_config
from train import loop as loop_mod
from train.config import LoopConfig, OptimConfig
from train.dataset import IGNORE_INDEX, PaddingCollator
from train.loop import (
    CheckpointMismatchError,
    CheckpointWriteError,
    accumulation_steps,
    atomic_directory,
    cosine_lr,
    epoch_batches,
    find_latest_checkpoint,
    train,
)

PAD = 3


def _samples(n: int, image_tokens: int, image_token: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        text = torch.randint(5, 400, (6 + i % 4,), generator=g)
        answer = torch.randint(5, 400, (3,), generator=g)
        ids = torch.cat([torch.tensor([0]), torch.full((image_tokens,), image_token), text, answer, torch.tensor([1])])
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[-4:] = ids[-4:]
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                    "pixel_values": torch.randn(3, 56, 56, generator=g), "task_ids": torch.tensor(i % 5)})
    return out


def _model(num_experts: int = 4, seed: int = 0) -> SkyMoEForConditionalGeneration:
    torch.manual_seed(seed)
    moe = {"num_experts": num_experts} if num_experts > 1 else {"num_experts": 1, "moe_layers": []}
    return SkyMoEForConditionalGeneration(tiny_config(
        text_config={"attention_dropout": 0.1, "num_hidden_layers": 2}, vision_config={"num_hidden_layers": 1}, **moe))


def _loop(out, **kw) -> LoopConfig:
    base = dict(output_dir=str(out), epochs=2, global_batch_size=2, per_device_batch_size=1, bf16=False,
                seed=7, save_every_steps=2, keep_checkpoints=0)
    return LoopConfig(**(base | kw))


@pytest.fixture(scope="module")
def data():
    cfg = tiny_config()
    return _samples(4, cfg.image_seq_length, cfg.image_token_index)


OPTIM = OptimConfig(lr=3e-3, warmup_ratio=0.2, weight_decay=0.01)


def test_cosine_schedule_is_a_pure_function():
    lrs = [cosine_lr(s, total_steps=20, warmup_steps=4, peak_lr=1.0, min_lr=0.1) for s in range(20)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert cosine_lr(20, 20, 4, 1.0, 0.1) == pytest.approx(0.1)
    assert cosine_lr(12, 20, 4, 1.0, 0.0) == pytest.approx(0.5)  # half way through the decay


def test_epoch_batches_cover_every_sample_with_full_global_batches():
    plans = [epoch_batches(10, 0, 3, micro_batch=2, accum=2, world_size=2, rank=r) for r in (0, 1)]
    assert len(plans[0]) == math.ceil(10 / 8)
    seen = [i for plan in plans for step in plan for mb in step for i in mb]
    assert len(seen) == 16 and set(seen) == set(range(10))
    assert all(len(mb) == 2 for plan in plans for step in plan for mb in step)
    assert epoch_batches(10, 0, 3, 2, 2) == epoch_batches(10, 0, 3, 2, 2)
    assert epoch_batches(10, 0, 3, 2, 2) != epoch_batches(10, 1, 3, 2, 2)


def test_accumulation_must_divide():
    assert accumulation_steps(144, 4, 6) == 6
    assert accumulation_steps(144, 4, 1) == 36
    with pytest.raises(ValueError, match="global_batch_size 144 must be a positive multiple of .* 5 x 6"):
        accumulation_steps(144, 5, 6)


def test_loss_has_aux_term_and_resume_matches_uninterrupted_run(tmp_path, data):
    collate = PaddingCollator(PAD)
    full = train(_model(), data, collate, _loop(tmp_path / "full"), OPTIM)
    assert [h.step for h in full.history] == [1, 2, 3, 4]  # 2 epochs x 2 steps of 2 accumulated micro-batches
    for h in full.history:  # the aux loss is logged and part of the optimised total (alpha = 0.01)
        assert h.aux_loss > 0.5
        assert h.loss == pytest.approx(h.lm_loss + 0.01 * h.aux_loss, rel=1e-6)
    assert full.history[-1].lm_loss < full.history[0].lm_loss
    logged = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert [r["aux_loss"] for r in logged] == [h.aux_loss for h in full.history]

    part = train(_model(), data, collate, _loop(tmp_path / "part"), OPTIM, stop_after=3)
    assert part.last_step == 3 and not part.finished
    assert find_latest_checkpoint(tmp_path / "part").name == "step-0000002"
    # a fresh process would build the model from scratch (other init) before resuming
    resumed = train(_model(seed=99), data, collate, _loop(tmp_path / "part"), OPTIM)
    assert resumed.finished
    got = [h.loss for h in resumed.history]
    want = [h.loss for h in full.history]
    assert got == pytest.approx(want, abs=1e-6, rel=0)
    logged = [json.loads(line)["loss"] for line in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    assert logged == got  # step 3, run twice, is logged once
    assert not list((tmp_path / "part" / "checkpoints").glob(".tmp-*"))


# What safetensors raises when the disk fills up (seen on a 1 MB tmpfs): not an OSError.
_ENOSPC = "Error while serializing: I/O error: No space left on device (os error 28)"


def test_disk_full_leaves_no_partial_checkpoint(tmp_path, data, monkeypatch):
    real_save = loop_mod.save_file
    calls = {"n": 0}

    def failing_save(tensors, filename, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:  # the first checkpoint (optimizer, rng, weights) succeeds, the second fails mid-way
            with open(filename, "wb") as fh:
                fh.write(b"partial")
            raise SafetensorError(_ENOSPC)
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(loop_mod, "save_file", failing_save)
    with pytest.raises(CheckpointWriteError, match="no space left on device") as info:
        train(_model(), data, PaddingCollator(PAD), _loop(tmp_path, save_every_steps=1), OPTIM)
    assert "step-0000002" in str(info.value) and info.value.errno == errno.ENOSPC
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-0000001"]  # no partial step-0000002, no .tmp folder
    monkeypatch.setattr(loop_mod, "save_file", real_save)
    resumed = train(_model(), data, PaddingCollator(PAD), _loop(tmp_path, save_every_steps=1), OPTIM, stop_after=2)
    assert [h.step for h in resumed.history] == [1, 2]  # step 1 came from the intact checkpoint


def test_resume_from_another_model_or_geometry_is_refused(tmp_path, data):
    train(_model(), data, PaddingCollator(PAD), _loop(tmp_path), OPTIM, stop_after=2)
    with pytest.raises(CheckpointMismatchError, match=r"another model \(missing .*unexpected"):
        train(_model(num_experts=1), data, PaddingCollator(PAD), _loop(tmp_path), OPTIM)
    with pytest.raises(CheckpointMismatchError, match="global_batch: checkpoint 2, now 4"):
        train(_model(), data, PaddingCollator(PAD), _loop(tmp_path, global_batch_size=4), OPTIM)


def test_atomic_directory_removes_a_partial_folder(tmp_path):
    final = tmp_path / "model"
    with pytest.raises(CheckpointWriteError, match="no space left on device") as info:
        with atomic_directory(final) as tmp:
            (tmp / "config.json").write_text("{}")
            raise SafetensorError(_ENOSPC)  # as from save_pretrained on a full disk
    assert info.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CheckpointWriteError, match="Permission denied"):
        with atomic_directory(final):
            raise PermissionError(errno.EACCES, "Permission denied")
    with atomic_directory(final) as tmp:
        (tmp / "config.json").write_text("{}")
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and (final / "config.json").is_file()


@pytest.mark.parametrize("native_bf16, bf16, want", [(True, True, torch.bfloat16), (True, False, torch.float32),
                                                      (False, True, torch.float32)])
def test_cpu_forward_runs_in_bf16_only_where_the_cpu_has_it_and_the_config_asks(tmp_path, data, monkeypatch,
                                                                              native_bf16, bf16, want):
    # the three cases run in one process: accelerate's process-wide precision must not pin the first
    monkeypatch.setattr(loop_mod, "_cpu_has_native_bf16", lambda: native_bf16)
    model = _model()
    seen = []
    model.model.language_model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda module, args, out: seen.append(out.dtype))
    result = train(model, data, PaddingCollator(PAD), _loop(tmp_path, bf16=bf16, max_steps=1), OPTIM)
    assert seen and set(seen) == {want}
    assert math.isfinite(result.history[0].loss)
    assert next(model.parameters()).dtype == torch.float32  # autocast: the weights stay fp32
