"""Ready-made configurations: a tiny one for tests and benchmarks, and the full-size layout.

``make_tiny_checkpoint`` writes a random tiny model + processor as a loadable folder.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from .configuration import SkyMoEConfig
from .modeling import SkyMoEForConditionalGeneration
from .processing import SkyMoEProcessor
from .prompts import TASKS, build_prompt, render_conversation
from .tokenization import build_tokenizer

__all__ = ["tiny_config", "full_size_config", "make_tiny_checkpoint"]

logger = logging.getLogger(__name__)

_TINY_VISION = {
    "model_type": "clip_vision_model",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 56,
    "patch_size": 14,
    "projection_dim": 64,
}
_TINY_TEXT = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 3,
}


def tiny_config(**overrides: Any) -> SkyMoEConfig:
    """A tiny SkyMoE for CPU tests: CLIP 64 wide x 2 layers, Llama 64/128 wide x 4 layers, E=8, k=2.

    Every Linear that 4-bit quantization touches has an input width that is a multiple of 64
    (bitsandbytes' CPU kernels need it). Images are 56 px with 14 px patches (16 image tokens).

    Args:
        **overrides: ``SkyMoEConfig`` fields. ``vision_config`` / ``text_config`` given as dicts
            are merged into the tiny defaults (so ``text_config={"num_hidden_layers": 2}`` works).

    Returns:
        The config; ``image_token_index`` defaults to the last vocabulary id.
    """
    vision = {**_TINY_VISION, **overrides.pop("vision_config", {})}
    text = {**_TINY_TEXT, **overrides.pop("text_config", {})}
    fields: dict[str, Any] = {
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "image_token_index": text["vocab_size"] - 1,
        "projector_hidden_act": "gelu",
        "router_aux_loss_coef": 0.01,
    }
    fields.update(overrides)
    return SkyMoEConfig(vision_config=vision, text_config=text, **fields)


def full_size_config(**overrides: Any) -> SkyMoEConfig:
    """The paper's layout: CLIP ViT-L/14 at 504 px, Vicuna-7B (Llama-2 7B), E=8, top-2, every second layer.

    Vocabulary and special ids follow llava-1.5-7b-hf (32064 ids, ``<image>`` = 32000, pad = 32001),
    which :func:`~skymoe.conversion.convert_llava` starts from. Build it on the ``meta`` device to
    count parameters without allocating them.

    Args:
        **overrides: ``SkyMoEConfig`` fields.

    Returns:
        The config (1296 image tokens per 504 px image, MoE layers 1, 3, ..., 31).
    """
    text = {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32064,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "pad_token_id": 32001,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    text.update(overrides.pop("text_config", {}))
    fields: dict[str, Any] = {"image_token_index": 32000, "num_experts": 8, "num_experts_per_tok": 2}
    fields.update(overrides)
    return SkyMoEConfig(text_config=text, **fields)


def _tokenizer_corpus() -> list[str]:
    """Short task-style texts to train the tiny tokenizer on (prompts, answers, chat frame)."""
    queries = {"count": "small vehicle", "ground": "the red car near the road", "vqa": "Is there a runway?"}
    prompts = [build_prompt(task, queries.get(task)) for task in TASKS]
    answers = [
        "The image shows a parking lot with many cars and a road.",
        "There are 12 small vehicles.",
        "{<10><20><30><40>|<0>}",
        "Yes",
        "No",
        "airport",
        "harbor with ships",
    ]
    return [render_conversation([(p, a)]) for p in prompts for a in answers]


def make_tiny_checkpoint(out_dir: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Save a random tiny SkyMoE + processor as a loadable folder (safetensors, < 1 MB, ~0.1 s).

    The tokenizer comes from :func:`~skymoe.tokenization.build_tokenizer`; the config from
    :func:`tiny_config` with the vocabulary and special-token ids set to match it.

    Args:
        out_dir: Folder to create (or overwrite files in).
        seed: Torch seed for the random weights (same seed, same weights).
        **overrides: ``tiny_config`` overrides, e.g. ``router_mode="task"`` or ``moe_layers=[]``.

    Returns:
        The folder path, loadable with :func:`skymoe.load_model`.
    """
    tokenizer = build_tokenizer(_tokenizer_corpus(), vocab_size=320)
    text = {
        "vocab_size": -(-len(tokenizer) // 64) * 64,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    text.update(overrides.pop("text_config", {}))
    overrides.setdefault("image_token_index", tokenizer.convert_tokens_to_ids("<image>"))
    config = tiny_config(text_config=text, **overrides)
    torch.manual_seed(seed)
    model = SkyMoEForConditionalGeneration(config).eval()
    model.generation_config.update(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    SkyMoEProcessor.for_config(config, tokenizer).save_pretrained(out)
    logger.info("wrote a tiny SkyMoE checkpoint to %s", out)
    return out
