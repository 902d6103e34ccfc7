"""Two CPU processes under torchrun (gloo): data sharding, per-rank RNG, checkpoints and resume.

Slow (spawns processes): run with ``pytest -m slow tests/test_train_ddp.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from train_samples import write_instruction_jsonl

import skymoe

REPO = Path(__file__).resolve().parent.parent


def _stage2(config: Path, out: Path, nproc: int) -> list[float]:
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)] if nproc > 1 \
        else [sys.executable]
    cmd = [*launcher, "-m", "train.stage2", str(config), "--set", f"loop.output_dir={out}"]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_match_accumulation_and_resume(tmp_path):
    dense = skymoe.make_tiny_checkpoint(tmp_path / "dense", num_experts=1)
    items = [("count", "ship", str(i)) for i in range(8)]
    data = write_instruction_jsonl(tmp_path, items)
    config = tmp_path / "s2.yaml"
    config.write_text(f"model: {dense}\ndata: {{train_jsonl: {data}}}\n"
                      "loop: {output_dir: x, epochs: 1, global_batch_size: 4, per_device_batch_size: 2, "
                      "save_every_steps: 1, keep_checkpoints: 0}\nmoe: {num_experts: 4}\n")
    single = _stage2(config, tmp_path / "one", 1)  # 1 process x 2 accumulated micro-batches
    double = _stage2(config, tmp_path / "two", 2)  # 2 processes x 1 micro-batch
    assert double == pytest.approx(single, abs=1e-5)
    state = json.loads((tmp_path / "two" / "checkpoints" / "step-0000002" / "trainer_state.json").read_text())
    assert state["geometry"]["world_size"] == 2 and state["geometry"]["accum"] == 1
    assert (tmp_path / "two" / "checkpoints" / "step-0000002" / "rng-rank1.safetensors").is_file()
    shutil.rmtree(tmp_path / "two" / "checkpoints" / "step-0000002")  # as if stopped after step 1
    shutil.rmtree(tmp_path / "two" / "final")
    assert _stage2(config, tmp_path / "two", 2) == pytest.approx(double, abs=1e-6)
