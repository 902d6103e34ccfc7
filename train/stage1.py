"""Stage I: LoRA fine-tuning of the dense model (paper: r = 64 on W_q, W_v of the LLM).

``python -m train.stage1 CONFIG [--set KEY=VALUE ...]`` trains LoRA adapters on the
language model's ``q_proj`` / ``v_proj`` only (CLIP and the projector stay frozen;
CLIP's own q/v projections are not touched) at the checkpoint's 504 px input, and
writes ``output_dir/adapter`` (peft, safetensors) and ``output_dir/merged`` (a full
dense SkyMoE folder with the LoRA merged into the base weights: Stage II's input).

``python -m train.stage1 merge --base DIR --adapter DIR --out DIR`` merges a saved
adapter into its base model on its own.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from typing import Any

import torch

import skymoe
from train.config import ConfigError, LoraSettings, Stage1Config, config_to_dict, load_config
from train.dataset import DataError, InstructionDataset, PaddingCollator
from train.loop import CheckpointError, CheckpointWriteError, TrainResult, atomic_directory, train

__all__ = ["lora_target_pattern", "apply_lora", "build_stage1_model", "run_training", "save_model_folder",
           "run_stage1", "merge_lora", "stage_cli", "main"]

logger = logging.getLogger(__name__)


def lora_target_pattern(target_modules: list[str]) -> str:
    """peft regex (full match on module names) for the LLM's projections only, not CLIP's.

    E.g. ``model.language_model.layers.3.self_attn.q_proj`` matches,
    ``model.vision_tower.vision_model.encoder.layers.3.self_attn.q_proj`` does not.
    """
    names = "|".join(re.escape(m) for m in target_modules)
    return rf".*language_model\..*\.({names})"


def apply_lora(model: torch.nn.Module, lora: LoraSettings) -> torch.nn.Module:
    """Freeze ``model`` and wrap it with LoRA adapters on the LLM's target projections.

    Returns:
        The peft model; only the ``lora_A`` / ``lora_B`` weights require grad.
    """
    from peft import LoraConfig, get_peft_model

    for param in model.parameters():
        param.requires_grad_(False)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora_target_pattern(lora.target_modules), bias="none")
    peft_model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    logger.info("Stage I LoRA r=%d on %s: %d trainable parameters", lora.r, lora.target_modules, trainable)
    return peft_model


def build_stage1_model(cfg: Stage1Config) -> tuple[torch.nn.Module, Any, torch.dtype]:
    """Load the base checkpoint in fp32 (master weights) and add the LoRA adapters.

    Returns:
        ``(peft_model, processor, base_dtype)``; ``base_dtype`` is the checkpoint's dtype,
        used again when saving the merged model.
    """
    loaded = skymoe.load_model(cfg.model, quant="none", device="cpu")
    base_dtype = next(loaded.model.parameters()).dtype
    size_px = loaded.model.config.vision_config.image_size
    if size_px != 504:
        logger.warning("%s takes %d px images; the paper trains at 504 px (convert with image_size=504)",
                       cfg.model, size_px)
    torch.manual_seed(cfg.loop.seed)  # LoRA init
    return apply_lora(loaded.model.float(), cfg.lora), loaded.processor, base_dtype


def run_training(model: torch.nn.Module, processor, cfg, stop_after: int | None = None) -> TrainResult:
    """Train ``model`` on ``cfg.data`` with ``cfg.loop`` / ``cfg.optim`` (shared by both stages)."""
    dataset = InstructionDataset.from_jsonl(cfg.data.train_jsonl, processor, cfg.data.max_length,
                                            model.config.image_after_question)
    pad_id = processor.tokenizer.pad_token_id
    collator = PaddingCollator(pad_id if pad_id is not None else processor.tokenizer.eos_token_id)
    return train(model, dataset, collator, cfg.loop, cfg.optim, run_config=config_to_dict(cfg),
                 stop_after=stop_after)


def save_model_folder(model: torch.nn.Module, processor, out_dir: str | Path, dtype: torch.dtype) -> Path:
    """Save model (safetensors) + processor to ``out_dir`` atomically, weights cast to ``dtype``."""
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        model.to(dtype).save_pretrained(tmp)
        processor.save_pretrained(tmp)
    logger.info("saved %s", out_dir)
    return out_dir


def run_stage1(cfg: Stage1Config, stop_after: int | None = None) -> TrainResult:
    """Train Stage I; when finished, write ``adapter/`` and ``merged/`` under ``output_dir``."""
    model, processor, base_dtype = build_stage1_model(cfg)
    result = run_training(model, processor, cfg, stop_after)
    accelerator = result.accelerator
    accelerator.wait_for_everyone()
    if result.finished and accelerator.is_main_process:
        peft_model = accelerator.unwrap_model(model)
        out = Path(cfg.loop.output_dir)
        with atomic_directory(out / "adapter") as tmp:
            peft_model.save_pretrained(tmp)
        save_model_folder(peft_model.merge_and_unload(), processor, out / "merged", base_dtype)
    return result


def merge_lora(base: str | Path, adapter: str | Path, out: str | Path) -> Path:
    """Merge a Stage I adapter into its base model and save the dense model + processor.

    Raises:
        skymoe.CheckpointError: ``base`` is not a loadable SkyMoE folder.
        ValueError: ``adapter`` holds no ``adapter_config.json``.
    """
    from peft import PeftModel

    if not (Path(adapter) / "adapter_config.json").is_file():
        raise ValueError(f"{adapter} is not a peft adapter folder (no adapter_config.json); "
                         "give the output_dir/adapter folder of a Stage I run")
    loaded = skymoe.load_model(base, quant="none", device="cpu")
    dtype = next(loaded.model.parameters()).dtype
    merged = PeftModel.from_pretrained(loaded.model, str(adapter)).merge_and_unload()
    return save_model_folder(merged, loaded.processor, out, dtype)


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m train.stage1 CONFIG [--set K=V]`` or ``... merge --base --adapter --out``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "merge":
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        parser = argparse.ArgumentParser(prog="python -m train.stage1 merge", description=merge_lora.__doc__)
        parser.add_argument("--base", required=True, help="base (dense) model folder")
        parser.add_argument("--adapter", required=True, help="Stage I output_dir/adapter")
        parser.add_argument("--out", required=True, help="folder for the merged model")
        args = parser.parse_args(argv[1:])
        print(merge_lora(args.base, args.adapter, args.out))
        return 0
    return stage_cli(argv, "python -m train.stage1", "train/configs/stage1.yaml", Stage1Config, run_stage1, "Stage I")


def stage_cli(argv: list[str], prog: str, example: str, config_cls: type, run, label: str) -> int:
    """Shared CLI of both stages: ``CONFIG [--set KEY=VALUE ...]``; user errors print and return 2.

    Args:
        argv: command-line arguments.
        prog, example: program name and an example config path for the help text.
        config_cls: :class:`Stage1Config` or :class:`~train.config.Stage2Config`.
        run: ``run_stage1`` / ``run_stage2``, called with the loaded config.
        label: "Stage I" / "Stage II" for the final line.
    """
    parser = argparse.ArgumentParser(prog=prog, description=f"{label} training")
    parser.add_argument("config", help=f"YAML config ({example})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, config_cls, args.set)
        result = run(cfg)
    except (ConfigError, DataError, skymoe.CheckpointError, CheckpointError, CheckpointWriteError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{label}: {result.last_step}/{result.total_steps} steps; output in {cfg.loop.output_dir}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
