"""Batched answer generation with a per-answer confidence.

Prompts are rendered as Vicuna-v1 conversations, padded on the LEFT with an attention mask,
and decoded greedily by default. Confidence is ``exp(mean log p)`` of the generated tokens
under the model's raw (unprocessed) logits, up to and including the end-of-sequence token.

Two paths give the same greedy tokens (tests/test_fast_inference.py):

* **plain**: the per-expert MoE loop (``"loop"``) and transformers' dynamic KV cache;
* **fast** (default): expert weights fused into stacked views (:func:`skymoe.moe.fuse_experts`)
  and the MoE block's ``"auto"`` choice (sorted-by-expert ``torch._grouped_mm``, no host
  synchronisation; per-expert loop for quantized experts, dense-masked on CUDA when decoding);
  on CUDA also a static KV cache, which makes transformers compile each decoding step
  (``torch.compile``, CUDA graphs) when the model is not bitsandbytes-quantized.

Choose per call (``generate(..., fast=False)``) or per model (:func:`set_fast_inference`),
e.g. to compare both through code that calls :func:`generate` for you (``tiling.analyze``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .modeling import SkyMoEForConditionalGeneration
from .moe import SkyMoESparseBlock, fuse_experts, moe_blocks, moe_implementation
from .processing import SkyMoEProcessor
from .prompts import TASK_IDS, render_conversation, task_of_prompt

__all__ = [
    "Generation",
    "generate",
    "task_ids_for_prompts",
    "set_fast_inference",
    "fast_inference_enabled",
    "inference_path",
    "generations_from_scores",
]

_FAST_ATTRIBUTE = "_skymoe_fast_inference"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generation:
    """One generated answer.

    Attributes:
        text: The decoded answer, special tokens removed, stripped.
        mean_logprob: Mean natural-log probability of the generated tokens (<= 0).
        confidence: ``exp(mean_logprob)`` in ``(0, 1]``.
    """

    text: str
    mean_logprob: float
    confidence: float


def task_ids_for_prompts(prompts: Sequence[str]) -> torch.Tensor:
    """``(batch,)`` index of each prompt's task tag in ``TASK_IDS``; ``-1`` where no tag is found."""
    tasks = [task_of_prompt(p) for p in prompts]
    return torch.tensor([TASK_IDS.index(t) if t in TASK_IDS else -1 for t in tasks], dtype=torch.long)


def set_fast_inference(model: SkyMoEForConditionalGeneration, enabled: bool) -> None:
    """Choose the path :func:`generate` (and :class:`skymoe.prefix.TilePrefix`) take for ``model`` when called
    with ``fast=None``; the default is the fast path."""
    setattr(model, _FAST_ATTRIBUTE, bool(enabled))


def fast_inference_enabled(model: SkyMoEForConditionalGeneration) -> bool:
    """Whether ``fast=None`` means the fast path for ``model`` (see :func:`set_fast_inference`)."""
    return bool(getattr(model, _FAST_ATTRIBUTE, True))


@contextmanager
def inference_path(model: SkyMoEForConditionalGeneration, fast: bool | None,
                   blocks: Sequence[SkyMoESparseBlock] | None = None) -> Iterator[bool]:
    """Run the body on the fast or the plain path (module docstring); yields the resolved ``fast``.

    Fast: fuses the expert weights (memory-neutral, idempotent) and sets every MoE block to
    ``"auto"``; plain: sets them to ``"loop"``. Each block's own setting is restored on exit.

    Args:
        model: The SkyMoE.
        fast: Fast or plain path; ``None`` = :func:`fast_inference_enabled`.
        blocks: ``skymoe.moe.moe_blocks(model)`` when the caller keeps them (a chat turn runs
            this per question, and the walk over the modules is a measurable part of it); else
            the model is walked once.
    """
    fast = fast_inference_enabled(model) if fast is None else bool(fast)
    blocks = moe_blocks(model) if blocks is None else blocks
    if fast:
        fused = fuse_experts(blocks)
        logger.debug("fast inference: %d MoE blocks fused", fused)
    with moe_implementation(blocks, "auto" if fast else "loop"):
        yield fast


def generate(
    model: SkyMoEForConditionalGeneration,
    processor: SkyMoEProcessor,
    images: Sequence[Image.Image | np.ndarray],
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    do_sample: bool = False,
    batch_size: int | None = None,
    *,
    fast: bool | None = None,
) -> list[Generation]:
    """Answer one prompt per image, in batches.

    Args:
        model: A SkyMoE (any quantization), ideally in eval mode.
        processor: Its processor.
        images: RGB PIL images or uint8 ``(H, W, 3)`` arrays (other modes are converted, see
            :mod:`skymoe.processing`), one per prompt.
        prompts: User messages as from :func:`skymoe.build_prompt` (without the ``<image>`` line).
        max_new_tokens: Generation budget per answer (>= 1).
        do_sample: Sample instead of greedy decoding.
        batch_size: Prompts per forward batch; ``None`` = all at once.
        fast: Fast (True) or plain (False) path (module docstring); ``None`` = the model's
            setting (:func:`set_fast_inference`, fast by default).

    Returns:
        One :class:`Generation` per prompt, in order.

    Raises:
        ValueError: Mismatched ``images``/``prompts`` lengths or a non-positive size.
    """
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images for {len(prompts)} prompts: pass one image per prompt")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
    step = batch_size or max(len(prompts), 1)
    results: list[Generation] = []
    for start in range(0, len(prompts), step):
        chunk = slice(start, start + step)
        batch = _generate_batch(
            model, processor, list(images[chunk]), list(prompts[chunk]), max_new_tokens, do_sample, fast
        )
        results.extend(batch)
    return results


@torch.inference_mode()
def _generate_batch(
    model: SkyMoEForConditionalGeneration,
    processor: SkyMoEProcessor,
    images: list,
    prompts: list[str],
    max_new_tokens: int,
    do_sample: bool,
    fast: bool | None,
) -> list[Generation]:
    """One left-padded ``model.generate`` call and its per-row confidences."""
    tokenizer = processor.tokenizer
    texts = [render_conversation([(prompt, None)], image_after_question=model.config.image_after_question)
             for prompt in prompts]
    inputs = processor(images=images, text=texts, padding=True, padding_side="left", return_tensors="pt").to(model.device)
    extra = {"task_ids": task_ids_for_prompts(prompts).to(model.device)} if model.config.router_mode == "task" else {}
    with inference_path(model, fast) as fast:
        if fast and model.device.type == "cuda":
            extra["cache_implementation"] = "static"  # transformers compiles the decoding step (CUDA graphs)
        out = model.generate(
            **inputs,
            **extra,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
    new_tokens = out.sequences[:, inputs["input_ids"].shape[1] :]  # (batch, steps)
    return generations_from_scores(tokenizer, new_tokens, out.logits)


def generations_from_scores(tokenizer, new_tokens: torch.Tensor, logits: Sequence[torch.Tensor]) -> list[Generation]:
    """Texts and confidences of generated rows.

    Args:
        tokenizer: The processor's tokenizer (``eos_token_id``, ``decode``).
        new_tokens: ``(batch, steps)`` generated ids (after the prompt).
        logits: One raw ``(batch, vocab)`` logits tensor per step (``output_logits=True``).

    Returns:
        One :class:`Generation` per row: text up to the first EOS, mean log-probability of the
        tokens up to and including it.
    """
    stacked = torch.stack(list(logits), dim=1).float()  # (batch, steps, vocab)
    token_logprob = stacked.log_softmax(-1).gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)  # (batch, steps)
    keep = _until_first_eos(new_tokens, tokenizer.eos_token_id)  # (batch, steps) bool
    generations = []
    for row in range(new_tokens.shape[0]):
        mean_logprob = float(token_logprob[row][keep[row]].mean())
        text = tokenizer.decode(new_tokens[row][keep[row]], skip_special_tokens=True).strip()
        generations.append(Generation(text=text, mean_logprob=mean_logprob, confidence=math.exp(mean_logprob)))
    return generations


def _until_first_eos(tokens: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """``(batch, steps)`` mask of the tokens up to and including each row's first EOS."""
    is_eos = tokens == eos_token_id
    before_or_at = torch.cumsum(is_eos.long(), dim=1) - is_eos.long() == 0
    return before_or_at
