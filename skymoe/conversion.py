"""Convert a transformers-format LLaVA-1.5 folder into a dense SkyMoE folder at a new image size.

Weights are read from the safetensors files directly (never a pickle) and renamed from either
the hub layout of llava-1.5-7b-hf (``language_model.model.*``, ``language_model.lm_head.*``,
``vision_tower.vision_model.*``, ``multi_modal_projector.*``) or the transformers v5 layout
(``model.language_model.*``, ``lm_head.*``, ``model.vision_tower.*``, ...) by the explicit rules
in ``_RENAMES``; any weight left unmatched or missing is an error, never a silent random init.

transformers' Llava forward does not pass ``interpolate_pos_encoding`` to CLIP, so the 504 px
position embeddings are baked into the weights here: CLIP's ``24 x 24`` patch position grid
(336 px / 14) is bicubically interpolated to ``36 x 36`` (504 px / 14), the CLS position kept,
giving ``1 + 1296`` positions; ``vision_config.image_size`` becomes 504. Every other weight
(CLIP, projector, LLM, LM head) is copied unchanged. The result is dense (``moe_layers=[]``);
:func:`skymoe.upcycle` turns it into the MoE model for Stage II.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoTokenizer, GenerationConfig, LlavaConfig

from .configuration import SkyMoEConfig
from .errors import CheckpointError
from .loading import check_weight_files
from .modeling import SkyMoEForConditionalGeneration
from .processing import SkyMoEProcessor
from .upcycling import model_from_state_dict

__all__ = ["convert_llava", "interpolate_position_embeddings"]

logger = logging.getLogger(__name__)

_POSITION_KEY = "model.vision_tower.embeddings.position_embedding.weight"
#: (checkpoint-key pattern, replacement), first match wins; v5 keys fall through unchanged.
_RENAMES = (
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
    (re.compile(r"^language_model\.model\."), "model.language_model."),
    (re.compile(r"^(?:model\.)?vision_tower\.vision_model\."), "model.vision_tower."),
    (re.compile(r"^vision_tower\."), "model.vision_tower."),
    (re.compile(r"^multi_modal_projector\."), "model.multi_modal_projector."),
)


def convert_llava(src_dir: str | Path, out_dir: str | Path, image_size: int = 504) -> Path:
    """Write a dense SkyMoE folder (safetensors + processor) converted from a LLaVA-1.5 folder.

    Args:
        src_dir: A transformers LLaVA folder (llava-1.5-7b-hf layout: ``config.json``,
            safetensors weights, tokenizer and processor files). Old (``language_model.*``)
            and current (``model.language_model.*``) weight layouts both load.
        out_dir: Output folder (created).
        image_size: New square input size in px; a multiple of the CLIP patch size.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`, loadable with :func:`skymoe.load_model`.

    Raises:
        CheckpointError: Missing files, pickle-only weights, a non-LLaVA config, or a tokenizer
            whose ``<image>`` id differs from the config's ``image_token_index``.
        ValueError: ``image_size`` not a multiple of the patch size.
    """
    src, out = Path(src_dir), Path(out_dir)
    _check_source(src)
    config = _skymoe_config(LlavaConfig.from_pretrained(src), image_size)
    state = _read_weights(src, config)
    state[_POSITION_KEY] = interpolate_position_embeddings(state[_POSITION_KEY], config.image_grid_size)
    model = model_from_state_dict(config, state)
    if (src / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(src)
    processor = _processor(src, config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    logger.info("converted %s -> %s (%d px, %d image tokens)", src, out, image_size, config.image_seq_length)
    return out


def interpolate_position_embeddings(weight: torch.Tensor, new_grid: int) -> torch.Tensor:
    """Bicubic resize of CLIP position embeddings ``(1 + g*g, D) -> (1 + new_grid**2, D)``.

    The CLS row is kept; the ``g x g`` patch rows are treated as a ``D``-channel image and
    resized with ``F.interpolate(mode="bicubic", align_corners=False)`` in float32 (the same
    operation as CLIP's ``interpolate_pos_encoding``), then cast back to the input dtype.

    Args:
        weight: ``(1 + g*g, D)`` position embedding table.
        new_grid: Patches per side after resizing.

    Returns:
        ``(1 + new_grid**2, D)`` table.

    Raises:
        ValueError: If the patch rows do not form a square grid.
    """
    num_patches, dim = weight.shape[0] - 1, weight.shape[1]
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise ValueError(f"position embeddings have {num_patches} patch rows, not a square grid")
    patches = weight[1:].float().reshape(1, grid, grid, dim).permute(0, 3, 1, 2)  # (1, D, g, g)
    resized = F.interpolate(patches, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    resized = resized.permute(0, 2, 3, 1).reshape(new_grid * new_grid, dim)  # (new_grid**2, D)
    return torch.cat([weight[:1], resized.to(weight.dtype)], dim=0)


def _check_source(src: Path) -> None:
    """The source must be a LLaVA folder with safetensors weights."""
    if not src.is_dir():
        raise CheckpointError(f"LLaVA folder {src} does not exist (or is not a folder)")
    config_file = src / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file} is missing: not a transformers LLaVA folder")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type != "llava":
        raise CheckpointError(f"{config_file} has model_type={model_type!r}; convert_llava needs a 'llava' checkpoint")
    check_weight_files(src)


def _read_weights(src: Path, config: SkyMoEConfig) -> dict[str, torch.Tensor]:
    """All safetensors tensors of ``src`` under SkyMoE state-dict names, checked against the model's keys."""
    index = src / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        for key, tensor in load_file(src / name).items():
            state[_renamed(key)] = tensor
    with torch.device("meta"):
        expected = set(SkyMoEForConditionalGeneration(config).state_dict())
    if config.tie_word_embeddings and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.language_model.embed_tokens.weight"]
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"weights in {src} do not match a LLaVA-1.5 of this config: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    return state


def _renamed(key: str) -> str:
    """The SkyMoE (transformers v5 Llava) name of a checkpoint key."""
    for pattern, replacement in _RENAMES:
        if pattern.match(key):
            return pattern.sub(replacement, key, count=1)
    return key


def _skymoe_config(llava_config: object, image_size: int) -> SkyMoEConfig:
    """Dense SkyMoE config from a LLaVA config, vision tower resized to ``image_size``."""
    patch = llava_config.vision_config.patch_size
    if image_size % patch:
        raise ValueError(f"image_size={image_size} must be a multiple of the CLIP patch size {patch}")
    fields = llava_config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "image_seq_length"):
        fields.pop(key, None)
    fields["vision_config"]["image_size"] = image_size
    return SkyMoEConfig(**fields, num_experts=1, moe_layers=[])


def _processor(src: Path, config: SkyMoEConfig) -> SkyMoEProcessor:
    """The source tokenizer with SkyMoE's image processing and chat template."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, padding_side="left")
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot load the tokenizer in {src}: {err}") from err
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    if image_id != config.image_token_index:
        raise CheckpointError(
            f"tokenizer in {src} maps <image> to {image_id} but config.json says image_token_index="
            f"{config.image_token_index}"
        )
    processor = SkyMoEProcessor.for_config(config, tokenizer)
    for key, value in _source_normalisation(src).items():  # keep the source's mean/std
        setattr(processor.image_processor, key, value)
    return processor


def _source_normalisation(src: Path) -> dict[str, list[float]]:
    """``image_mean`` / ``image_std`` of the source image processor (hub or v5 file layout), if any."""
    for name, section in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        file = src / name
        if file.is_file():
            raw = json.loads(file.read_text())
            raw = raw.get(section, {}) if section else raw
            found = {k: raw[k] for k in ("image_mean", "image_std") if k in raw}
            if found:
                return found
    return {}
