"""A language-model attention head that starts out matching class words to the patches they name.

Why: the demo's language model is trained from scratch and does not learn, at a CPU budget, to
find the object a question names among the 324 image tokens (train/README.md, oracle tokens):
that is two hops, the answer position must first gather the class word from the question and
then look for it among the patches, and until the second hop works the first earns no
gradient. The paper's language model comes pretrained and has such heads already. This module
builds the first hop into the initialisation instead: one head of one decoder layer whose
query, at a class word (" truck"), and key, at an image token, both light up along that class's
own channel of the head. A class word's hidden state then carries what the head reads off its
patches, a few tokens before the answer that needs it, and the answer only has to copy from a
nearby position (the hop the oracle runs showed is learnt).

The word and patch sides use different directions in the model width. The query reads the
class's word direction (:func:`train.vision_pretrain.word_directions`); the key reads a
*patch direction*, the word direction turned by a fixed random rotation
(:func:`patch_directions`), and Stage 0 aligns each patch with its class's patch direction. Were
both the word direction, the class word would match itself (and every earlier mention of the
class in the conversation) more strongly than any patch.

The class channels sit on the head's lowest-frequency rotary dimensions, where RoPE turns a
query against a key by at most 0.13 radian per 300 positions (ten channels of a 64-wide head,
base 10000), so a match does not depend on how far back the image lies. The head's other
dimensions, its value and output maps and every other weight keep their random
initialisation, and all of it trains as usual.

Measured on CPU (train/README.md, "Finding the named object"): the start does not survive the
dense stage's AdamW steps (the rows end at -0.18 to 0.20 cosine with what was written) and
the demo's scores do not change; the option stays off. Fixed rows would not help either: written
afresh on a Stage 0 tower the head gives the target 1.0x its share, since small objects' patches
do not point along their class and system-line words match the patch directions by chance.
:func:`class_word_attention`
(``python -m train.word_match``) measures what any checkpoint's heads do from the class word.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import skymoe
from skymoe.parsing import parse_answer
from train.box_attention import box_patch_mask
from train.dataset import InstructionRecord, read_instruction_jsonl
from train.instructions import box_norm100
from train.synthetic.classes import OBJECT_CLASSES

__all__ = ["patch_directions", "rotary_channel_dims", "init_word_match_head", "class_word_attention", "main"]


def patch_directions(word_dirs: torch.Tensor, seed: int) -> torch.Tensor:
    """``word_dirs`` ``(n, width)`` turned by one random rotation of the width drawn from ``seed``
    (unit rows stay unit; angles between rows are kept)."""
    width = word_dirs.shape[1]
    rotation, _ = torch.linalg.qr(torch.randn(width, width, generator=torch.Generator().manual_seed(seed)))
    return word_dirs.float() @ rotation.T


def rotary_channel_dims(head_dim: int, n: int) -> list[int]:
    """``n`` dimensions of a rotary head, slowest-turning first: RoPE (``rotate_half``) pairs
    dimension ``j`` with ``j + head_dim / 2`` at frequency ``base ** (-2 j / head_dim)``, so the
    pair ``head_dim / 2 - 1`` turns slowest; both dimensions of a pair are used."""
    half = head_dim // 2
    if n > head_dim:
        raise ValueError(f"{n} channels do not fit a head of {head_dim} dimensions")
    return [d for j in range(half - 1, -1, -1) for d in (j, j + half)][:n]


def init_word_match_head(model, word_dirs: torch.Tensor, patch_dirs: torch.Tensor, layer: int = 0,
                         head: int = 0, scale: float = 1.0) -> list[int]:
    """Write class ``c``'s word direction into the query rows and its patch direction into the
    key rows of channel ``c`` of ``head`` in decoder ``layer`` (module docstring).

    The decoder normalises its input (RMS 1 per value), so a class word gives a query of about
    ``scale * sqrt(width)`` on its channel and a patch whose token has cosine ``cos`` with the
    patch direction a key of ``scale * sqrt(width) * cos``: an attention logit of
    ``scale ** 2 * width * cos / sqrt(head_dim)`` (32 ``cos`` at width 256, head 64, scale 1).

    Args:
        model: a SkyMoE (its language model a Llama decoder with rotary attention).
        word_dirs, patch_dirs: ``(classes, width)`` unit directions, one row per class.
        layer, head: which attention head (for grouped keys, the head's key group is written).
        scale: multiplies both rows.

    Returns:
        The head dimensions written (channel ``c`` = ``dims[c]``).
    """
    text = model.config.text_config
    if word_dirs.shape != patch_dirs.shape or word_dirs.shape[1] != text.hidden_size:
        raise ValueError(f"word and patch directions must both be (classes, {text.hidden_size}), "
                         f"got {tuple(word_dirs.shape)} and {tuple(patch_dirs.shape)}")
    if not 0 <= layer < text.num_hidden_layers or not 0 <= head < text.num_attention_heads:
        raise ValueError(f"no head {head} in layer {layer}: the model has {text.num_hidden_layers} layers "
                         f"of {text.num_attention_heads} heads")
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    key_head = head // (text.num_attention_heads // text.num_key_value_heads)
    dims = rotary_channel_dims(head_dim, len(word_dirs))
    attention = model.model.language_model.layers[layer].self_attn
    with torch.no_grad():
        for channel, dim in enumerate(dims):
            attention.q_proj.weight[head * head_dim + dim] = scale * word_dirs[channel]
            attention.k_proj.weight[key_head * head_dim + dim] = scale * patch_dirs[channel]
    return dims


@contextlib.contextmanager
def _eager_attention(model) -> Iterator[None]:
    """Run ``model`` with the eager attention kernel (the fast kernels return no attention
    weights), then give it back the kernel it had."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def class_word_attention(model, processor, records: Sequence[InstructionRecord], layers: Sequence[int],
                         class_names: Sequence[str]) -> dict[int, list[dict[str, float]]]:
    """How much each head of ``layers`` attends from a grounding question's class word onto the
    patches of the answer's boxes: what :func:`init_word_match_head` sets one head up to do.

    For each single-turn grounding record whose expression names one of ``class_names`` (the
    longest name found), the query position is the last token of that name in the prompt; the
    target is every patch an answer box overlaps (:func:`train.box_attention.box_patch_mask`).

    Returns:
        Per layer, per head: ``{"mass", "ratio"}``, the median over the questions of the attention
        share on the target patches and of that share divided by the target's share of the
        patches (1 = no better than spreading attention evenly over the image), and ``"queries"``.
    """
    tokenizer, side = processor.tokenizer, model.config.image_grid_size
    mass: dict[tuple[int, int], list[float]] = defaultdict(list)
    ratio: dict[tuple[int, int], list[float]] = defaultdict(list)
    queries = 0
    for record in records:
        if record.task != "ground" or len(record.turns) != 1:
            continue
        prompt, answer = record.turns[0]
        expression = prompt.split("<p>")[-1].split("</p>")[0]
        named = [name for name in class_names if f" {name} " in f" {expression} "]
        if not named:
            continue
        with Image.open(record.image_path) as img:
            image = img.convert("RGB")
        batch = processor(images=image, text=skymoe.render_conversation([(prompt, None)]), return_tensors="pt")
        ids = batch["input_ids"][0]
        name_end = tokenizer(" " + max(named, key=len), add_special_tokens=False)["input_ids"][-1]
        position = int((ids == name_end).nonzero().flatten()[-1])
        target = torch.zeros(side * side, dtype=torch.bool)
        for box in parse_answer("ground", answer, image.size).boxes:
            target |= box_patch_mask(box_norm100(box.xyxy_px, *image.size), side)
        if not target.any():
            continue
        with torch.no_grad(), _eager_attention(model):
            attentions = model(**batch.to(model.device), output_attentions=True).attentions
        image_positions = (ids == model.config.image_token_id).nonzero().flatten()
        share = float(target.float().mean())
        for layer in layers:
            on_target = attentions[layer][0, :, position, image_positions[target]].float().sum(dim=-1)
            for head, value in enumerate(on_target.tolist()):
                mass[layer, head].append(value)
                ratio[layer, head].append(value / share)
        queries += 1
    return {layer: [{"mass": float(np.median(mass[layer, head])), "ratio": float(np.median(ratio[layer, head])),
                     "queries": queries} for head in range(model.config.text_config.num_attention_heads)]
            for layer in layers} if queries else {}


def main(argv: list[str] | None = None) -> int:
    """``python -m train.word_match --model DIR --data JSONL [--layers 0 1] [--out JSON]``:
    print :func:`class_word_attention` per layer and head."""
    parser = argparse.ArgumentParser(prog="python -m train.word_match",
                                     description="attention from a grounding question's class word onto its "
                                                 "answer's patches, per decoder layer and head")
    parser.add_argument("--model", required=True, help="SkyMoE checkpoint folder")
    parser.add_argument("--data", required=True, help="instruction JSONL with grounding records (e.g. a "
                                                       "train.eval --synthetic benchmark)")
    parser.add_argument("--layers", type=int, nargs="+", default=[0], help="decoder layers (default: 0)")
    parser.add_argument("--out", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    try:
        model, processor = skymoe.load_model(args.model)
        records, _ = read_instruction_jsonl(args.data)
    except (skymoe.CheckpointError, OSError, ValueError) as exc:  # DataError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if model.config.image_after_question:
        print(f"error: {args.model} reads the image after the question, so no question word can attend to a "
              "patch; this probe measures models that read the image first", file=sys.stderr)
        return 2
    bad = [layer for layer in args.layers if not 0 <= layer < model.config.text_config.num_hidden_layers]
    if bad:
        print(f"error: --layers {bad}: the model has {model.config.text_config.num_hidden_layers} decoder layers",
              file=sys.stderr)
        return 2
    figures = class_word_attention(model, processor, records, args.layers, tuple(OBJECT_CLASSES))
    if not figures:
        print(f"error: {args.data} holds no single-turn grounding question naming a synthetic object class",
              file=sys.stderr)
        return 2
    print("layer head  attention on the target  x its share of the image  (medians)")
    for layer, heads in figures.items():
        for head, row in enumerate(heads):
            print(f"{layer:5d} {head:4d}  {row['mass']:22.3f}  {row['ratio']:24.1f}")
    print(f"{next(iter(figures.values()))[0]['queries']} grounding questions")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
