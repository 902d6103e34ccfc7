"""Sparse upcycling (Stage II initialisation): clone a dense model's FFNs into experts.

Each chosen decoder layer's FFN is copied into E identical experts and a router is added.
With ``norm_topk_prob=True`` the k selected weights sum to 1, so k identical experts give back
the dense FFN output and the upcycled model's logits equal the dense model's at initialisation.
"""

from __future__ import annotations

import copy
import logging
import re

import torch
from transformers import LlavaForConditionalGeneration

from .configuration import SkyMoEConfig, default_moe_layers
from .modeling import SkyMoEForConditionalGeneration

__all__ = ["upcycle", "model_from_state_dict"]

logger = logging.getLogger(__name__)

_FFN_KEY = re.compile(r"^model\.language_model\.layers\.(\d+)\.mlp\.(.+)$")


def upcycle(
    model: LlavaForConditionalGeneration,
    num_experts: int,
    moe_layers: list[int] | None = None,
    *,
    num_experts_per_tok: int = 2,
    router_init_std: float | None = None,
) -> SkyMoEForConditionalGeneration:
    """Turn a dense LLaVA / dense SkyMoE into a SkyMoE with ``num_experts`` experts per MoE layer.

    Every weight outside the chosen FFNs is reused unchanged; each chosen FFN is cloned
    ``num_experts`` times; routers get ``N(0, router_init_std)`` weights (``0`` gives a zero router,
    which ties all experts and selects experts ``0..k-1``); task biases start at zero. The
    input model is not modified.

    Args:
        model: A ``LlavaForConditionalGeneration`` or a SkyMoE without MoE layers, unquantized.
        num_experts: E >= 2.
        moe_layers: Decoder layers to make sparse; ``None`` = every second layer, odd indices.
        num_experts_per_tok: k.
        router_init_std: Router weight std; ``None`` = the text config's ``initializer_range``.

    Returns:
        A new :class:`SkyMoEForConditionalGeneration` (same device and dtype as the input),
        in the input's train/eval mode.

    Raises:
        TypeError: If ``model`` is not a LLaVA / SkyMoE model.
        ValueError: If it already has MoE layers, is quantized, or the MoE fields are invalid.
    """
    _check_dense(model)
    config = _moe_config(model.config, num_experts, moe_layers, num_experts_per_tok)
    std = config.text_config.initializer_range if router_init_std is None else router_init_std
    state = _expert_state_dict(model.state_dict(), config, std)
    moe_model = model_from_state_dict(config, state, dict(model.named_buffers()))
    moe_model.generation_config = copy.deepcopy(model.generation_config)
    moe_model.train(model.training)
    logger.info("upcycled %d FFNs into %d experts each (k=%d)", len(config.moe_layers), num_experts, num_experts_per_tok)
    return moe_model


def model_from_state_dict(
    config: SkyMoEConfig,
    state: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor] | None = None,
) -> SkyMoEForConditionalGeneration:
    """Build a SkyMoE around existing tensors (assigned, not copied; no random init).

    The model is created on the ``meta`` device and the tensors are assigned, so peak memory
    stays at one copy of the weights. Non-persistent buffers are not in state dicts: each is
    taken from ``buffers`` when the shape matches, otherwise rebuilt (CLIP ``position_ids`` as
    ``arange``; parameter-free modules such as rotary embeddings by constructing them again
    from their config).

    Args:
        config: The new model's config.
        state: Every persistent tensor of the new model, by state-dict key.
        buffers: Buffers of a source model by name (e.g. ``dict(model.named_buffers())``), or ``None``.

    Returns:
        The assembled model (generation config left at its defaults).

    Raises:
        RuntimeError: From ``load_state_dict`` if keys are missing or unexpected.
    """
    with torch.device("meta"):
        model = SkyMoEForConditionalGeneration(config)
    model.load_state_dict(state, strict=True, assign=True)
    device = next(iter(state.values())).device
    buffers = buffers or {}
    for name, buffer in list(model.named_buffers()):
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        old = buffers.get(name)
        if old is not None and old.shape == buffer.shape:
            new = old.clone()
        elif leaf == "position_ids":
            new = torch.arange(buffer.shape[-1], device=device).expand(buffer.shape)
        else:  # parameter-free module (rotary embedding): rebuild from its config
            new = getattr(type(owner)(owner.config), leaf).to(device)
        owner.register_buffer(leaf, new, persistent=False)
    model.tie_weights()
    return model


def _check_dense(model: object) -> None:
    """Reject inputs that are not a full-precision dense LLaVA-family model."""
    if not isinstance(model, LlavaForConditionalGeneration):
        raise TypeError(
            f"upcycle expects a LlavaForConditionalGeneration or a dense SkyMoEForConditionalGeneration, "
            f"got {type(model).__name__}"
        )
    if getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None:
        raise ValueError("upcycle needs an unquantized model: load it with quant='none' first")
    if isinstance(model.config, SkyMoEConfig) and model.config.is_moe:
        raise ValueError(f"the model already has MoE layers {model.config.moe_layers}; upcycle a dense model")


def _moe_config(dense: object, num_experts: int, moe_layers: list[int] | None, top_k: int) -> SkyMoEConfig:
    """The SkyMoE config of the upcycled model (a LLaVA config is converted field by field)."""
    if num_experts < 2:
        raise ValueError(f"upcycle needs num_experts >= 2, got {num_experts}")
    fields = dense.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "image_seq_length"):
        fields.pop(key, None)
    layers = default_moe_layers(dense.text_config.num_hidden_layers) if moe_layers is None else list(moe_layers)
    fields.update(num_experts=num_experts, num_experts_per_tok=top_k, moe_layers=layers, norm_topk_prob=True)
    return SkyMoEConfig(**fields)


def _expert_state_dict(dense_state: dict, config: SkyMoEConfig, router_std: float) -> dict:
    """Dense state dict -> SkyMoE state dict: chosen FFN weights cloned per expert, routers added."""
    moe_layers = set(config.moe_layers)
    state: dict[str, torch.Tensor] = {}
    for key, value in dense_state.items():
        match = _FFN_KEY.match(key)
        if match is None or int(match.group(1)) not in moe_layers:
            state[key] = value
            continue
        prefix = f"model.language_model.layers.{match.group(1)}.mlp"
        for e in range(config.num_experts):
            state[f"{prefix}.experts.{e}.{match.group(2)}"] = value.clone()
    reference = dense_state["lm_head.weight"]
    hidden = config.text_config.hidden_size
    for idx in config.moe_layers:
        prefix = f"model.language_model.layers.{idx}.mlp.router"
        gate = torch.empty(config.num_experts, hidden, dtype=reference.dtype, device=reference.device)
        state[f"{prefix}.gate.weight"] = gate.normal_(0.0, router_std) if router_std > 0 else gate.zero_()
        if config.router_mode == "task":
            state[f"{prefix}.task_bias.weight"] = torch.zeros(
                config.num_tasks, config.num_experts, dtype=reference.dtype, device=reference.device
            )
    return state
