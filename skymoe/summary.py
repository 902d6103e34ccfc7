"""Parameter counts and loading state of a SkyMoE model."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from torch import nn

from .moe import SkyMoESparseBlock

__all__ = ["ModelSummary", "model_summary"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSummary:
    """What a loaded SkyMoE is.

    Attributes:
        total_params: Every parameter (logical count: 4-bit packed weights count as unpacked).
        active_params_per_token: Parameters one text token goes through: the total minus the
            ``E - k`` experts a token does not use in each MoE layer (vision tower and projector
            are included, they run once per image).
        num_experts: E (1 for a dense model).
        moe_layers: MoE decoder-layer indices.
        quantization: ``"4bit"``, ``"8bit"`` or ``"none"``.
        device: Device of the first parameter, e.g. ``"cpu"``, ``"cuda:0"``, ``"meta"``.
        dtype: Dtype of the first floating parameter, e.g. ``"torch.float32"``; for a 4-/8-bit
            model that is the dtype of the layers left unquantized (embeddings, norms, vision
            tower, LM head), not of the packed Linear weights.
    """

    total_params: int
    active_params_per_token: int
    num_experts: int
    moe_layers: list[int]
    quantization: str
    device: str
    dtype: str

    def __str__(self) -> str:
        return (
            f"SkyMoE: {self.total_params / 1e9:.2f} B parameters, "
            f"{self.active_params_per_token / 1e9:.2f} B active per token, "
            f"E={self.num_experts} on {len(self.moe_layers)} MoE layers, quant={self.quantization}, "
            f"{self.device}, {self.dtype}" + ("" if self.quantization == "none" else
                                              f" outside the {self.quantization} Linear layers")
        )


def _numel(param: nn.Parameter) -> int:
    """Logical element count (bitsandbytes 4-bit stores two values per byte and keeps the true shape aside)."""
    quant_state = getattr(param, "quant_state", None)
    return math.prod(quant_state.shape) if quant_state is not None else param.numel()


def model_summary(model: nn.Module) -> ModelSummary:
    """Count total and per-token active parameters and report quantization, device and dtype.

    Args:
        model: A SkyMoE model (any device, including ``meta``; any quantization).

    Returns:
        The :class:`ModelSummary`.
    """
    total = sum(_numel(p) for p in model.parameters())
    idle = 0
    for block in model.modules():
        if isinstance(block, SkyMoESparseBlock):
            per_expert = [sum(_numel(p) for p in expert.parameters()) for expert in block.experts]
            idle += sum(per_expert) - block.top_k * max(per_expert)
    kinds = {type(m).__name__ for m in model.modules()}
    quantization = "4bit" if "Linear4bit" in kinds else "8bit" if "Linear8bitLt" in kinds else "none"
    first = next(model.parameters())
    floating = next((p for p in model.parameters() if p.is_floating_point()), first)
    config = model.config
    return ModelSummary(
        total_params=total,
        active_params_per_token=total - idle,
        num_experts=config.num_experts if config.is_moe else 1,
        moe_layers=list(config.moe_layers),
        quantization=quantization,
        device=str(first.device),
        dtype=str(floating.dtype),
    )
