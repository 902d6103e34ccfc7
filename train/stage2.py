"""Stage II: upcycle the Stage I model into a sparse MoE and fine-tune it.

``python -m train.stage2 CONFIG [--set KEY=VALUE ...]`` loads the Stage I merged
(dense) model, clones the FFN of every second decoder layer (or
``moe.moe_layers``) into ``moe.num_experts`` experts with top-``moe.top_k``
routing (``skymoe.upcycle``), and trains with ``loss = LM + alpha * aux``.
``moe.num_experts: 1`` skips upcycling (the dense baseline of the ablation).
Which parameters train is ``moe.trainable`` (default ``"llm"``; the reason is in
:class:`train.config.MoESettings`). The final model is written to
``output_dir/final``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import torch

import skymoe
from skymoe.object_tokens import DETECTOR_MODULES
from train.config import MoESettings, Stage2Config
from train.loop import TrainResult
from train.stage1 import run_training, save_model_folder, stage_cli

__all__ = ["TRAINABLE_CHOICES", "trainable_mask", "set_trainable", "build_stage2_model", "run_stage2", "main"]

logger = logging.getLogger(__name__)

TRAINABLE_CHOICES = ("llm", "moe", "all")


def trainable_mask(model: torch.nn.Module, trainable: str) -> dict[str, bool]:
    """Which parameters train for a ``moe.trainable`` choice (pure: nothing is changed).

    - ``"llm"``: every language-model parameter (embeddings, attention, dense FFNs, experts,
      routers, lm_head, the object-code projection); the vision tower, projector and object
      detector heads (``skymoe.object_tokens.DETECTOR_MODULES``) stay frozen.
    - ``"moe"``: only routers and experts of the MoE layers.
    - ``"all"``: everything, vision tower and projector included.

    Returns:
        Parameter name -> trains.

    Raises:
        ValueError: an unknown choice.
    """
    if trainable not in TRAINABLE_CHOICES:
        raise ValueError(f"moe.trainable={trainable!r}; choose one of {list(TRAINABLE_CHOICES)}")
    moe_params = {id(p) for m in model.modules() if isinstance(m, skymoe.SkyMoESparseBlock) for p in m.parameters()}
    mask = {}
    for name, param in model.named_parameters():
        if trainable == "all":
            mask[name] = True
        elif trainable == "moe":
            mask[name] = id(param) in moe_params
        else:
            mask[name] = not any(part in name for part in ("vision_tower", "multi_modal_projector", *DETECTOR_MODULES))
    return mask


def set_trainable(model: torch.nn.Module, trainable: str) -> int:
    """Set ``requires_grad`` per :func:`trainable_mask`; return the number of trainable parameters.

    Raises:
        ValueError: an unknown choice, or one that selects no parameter (e.g. ``"moe"`` on a dense model).
    """
    mask = trainable_mask(model, trainable)
    count = 0
    for name, param in model.named_parameters():
        param.requires_grad_(mask[name])
        count += param.numel() if mask[name] else 0
    if count == 0:
        raise ValueError(f"moe.trainable={trainable!r} selects no parameter of {type(model).__name__}")
    return count


def build_stage2_model(cfg: Stage2Config) -> tuple[torch.nn.Module, Any, torch.dtype]:
    """Load the Stage I model (fp32), upcycle it and choose the trainable parameters.

    Returns:
        ``(model, processor, base_dtype)``.
    """
    loaded = skymoe.load_model(cfg.model, quant="none", device="cpu")
    model = loaded.model
    base_dtype = next(model.parameters()).dtype
    _configure_moe(model.config, cfg.moe)
    torch.manual_seed(cfg.loop.seed)  # router init
    if cfg.moe.num_experts == 1:  # the E = 1 row of the ablation: keep training the dense model
        logger.info("moe.num_experts=1: no upcycling, Stage II continues the dense model")
        model = model.float()
    else:
        model = skymoe.upcycle(model.float(), cfg.moe.num_experts, cfg.moe.moe_layers,
                               num_experts_per_tok=cfg.moe.top_k)
    count = set_trainable(model, cfg.moe.trainable)
    logger.info("Stage II: E=%d top-%d on layers %s, %s trainable (%d parameters)", cfg.moe.num_experts,
                cfg.moe.top_k, model.config.moe_layers, cfg.moe.trainable, count)
    return model, loaded.processor, base_dtype


def _configure_moe(config, moe: MoESettings) -> None:
    """Write the settings that ``upcycle`` copies from the dense config (alpha, router mode)."""
    config.router_aux_loss_coef = moe.aux_loss_coef
    config.router_mode = moe.router_mode


def run_stage2(cfg: Stage2Config, stop_after: int | None = None) -> TrainResult:
    """Train Stage II; when finished, write ``output_dir/final`` (model + processor)."""
    model, processor, base_dtype = build_stage2_model(cfg)
    result = run_training(model, processor, cfg, stop_after)
    accelerator = result.accelerator
    accelerator.wait_for_everyone()
    if result.finished and accelerator.is_main_process:
        save_model_folder(accelerator.unwrap_model(model), processor, Path(cfg.loop.output_dir) / "final",
                          base_dtype)
    return result


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m train.stage2 CONFIG [--set KEY=VALUE ...]``."""
    return stage_cli(sys.argv[1:] if argv is None else argv, "python -m train.stage2", "train/configs/stage2.yaml",
                     Stage2Config, run_stage2, "Stage II")


if __name__ == "__main__":
    sys.exit(main())
