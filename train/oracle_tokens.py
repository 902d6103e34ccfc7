"""Oracle image tokens: can the demo's language model learn a task when the image tokens are perfect?

Why: the demo checkpoint does not ground (README, known limits). The fault could lie in the
vision tower (its tokens do not say what is where) or in the language model (it does not learn
to find the named object among the image tokens and write that object's place). This diagnostic
takes the tower out: it trains the demo's language model, as :mod:`train.demo` builds it, on
image tokens written from the scene annotations, and scores it on fresh synthetic scenes.

Each of the 18 x 18 patches gets a token in the language model's width, a sum of fixed codes
(random unit vectors, near-orthogonal in that width, drawn once from ``seed``):

* every patch: its 2-D position (sine/cosine codes of the patch centre on the 0-100 box grid,
  32 values per axis, through a fixed orthonormal map) and half the scene class's code;
* every patch a box overlaps: half the code of that object's class ("part of a car");
* the patch holding an object's centre: the codes of its class, its colour, half its size word,
  and its four box corners x1, y1, x2, y2 (each a sine/cosine code through its own orthonormal
  map), so a head that finds the patch can read the answer's coordinates off it linearly.

Variants (``python -m train.oracle_tokens --help``): ``--sparse`` keeps only the object-centre
patches (a handful of tokens instead of 324), ``--targets-only`` (grounding) gives codes only to the
objects the answer boxes, so the model need not find the named object, only copy its corners
(it separates finding from copying), ``--box-attention COEF`` adds
:mod:`train.box_attention`'s loss, ``--question-first`` puts the image after the question, so
image tokens can see what is asked. ``--tasks`` picks which single-turn samples train and score.

Usage::

    python -m train.oracle_tokens --work-dir WORK --tasks VG --steps 600 --out runs/oracle/vg.json

``WORK`` is a :mod:`train.demo` work folder (its data is generated there when absent, as the
demo does, from ``--config`` and ``--set``). Research tool: its models are not saved.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import skymoe
from skymoe.position_codes import patch_grid_codes, sincos_codes
from skymoe.prompts import TASKS, render_conversation, task_of_code, task_of_prompt, without_image
from train.box_attention import BoxAttentionLoss, BoxAttentionSettings, box_patch_mask, supervising
from train.config import ConfigError, load_config
from train.dataset import IGNORE_INDEX, InstructionRecord, answer_char_spans, answer_token_labels, read_instruction_jsonl
from train.demo import DEFAULT_CONFIG, DemoConfig, _cached_data, _conversation_texts, _object_line, build_demo_model
from skymoe.generation import Generation, generations_from_scores
from skymoe.parsing import parse_answer
from train.eval import DEFAULT_MAX_NEW_TOKENS, SampleResult, scene_queries, score_results
from train.instructions import box_norm100
from train.loop import bf16_autocast
from train.synthetic import generate_dataset
from train.synthetic.classes import COLOURS, OBJECT_CLASSES, SCENE_CLASSES, SIZE_WORDS

__all__ = ["DesignedTokens", "OracleSettings", "answer_objects", "encode_turns", "train_oracle", "evaluate_oracle",
           "main"]

logger = logging.getLogger(__name__)

#: Code width per coordinate (a patch row or column, a box corner).
_COORD_DIM = 32


class DesignedTokens:
    """Image tokens of an annotated image (see the module docstring), for one model width.

    Args:
        width: the language model's hidden size (at least ``4 * 32``).
        grid_size: patches per side (18 for the demo model).
        seed: draws the codes; the same seed gives the same codes.
    """

    def __init__(self, width: int, grid_size: int, seed: int = 0):
        if width < 4 * _COORD_DIM:
            raise ValueError(f"designed tokens need a width of at least {4 * _COORD_DIM}, got {width}")
        generator = torch.Generator().manual_seed(seed)

        def unit_rows(n: int) -> torch.Tensor:
            rows = torch.randn(n, width, generator=generator)
            return rows / rows.norm(dim=1, keepdim=True)

        def orthonormal_map(dim: int) -> torch.Tensor:  # (width, dim), orthonormal columns
            return torch.linalg.qr(torch.randn(width, dim, generator=generator))[0]

        self.width, self.grid_size = width, grid_size
        self.classes, self.colours = list(OBJECT_CLASSES), list(COLOURS)
        self.sizes, self.scenes = list(SIZE_WORDS), sorted(SCENE_CLASSES)
        self.class_codes, self.colour_codes = unit_rows(len(self.classes)), unit_rows(len(self.colours))
        self.size_codes, self.scene_codes = unit_rows(len(self.sizes)), unit_rows(len(self.scenes))
        self.part_codes = unit_rows(len(self.classes))
        axis = patch_grid_codes(grid_size, _COORD_DIM) / math.sqrt(_COORD_DIM / 2)  # (side, 32), unit rows
        rows, columns = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
        # (grid_size ** 2, width), row-major patches: row code then column code, mapped into the width
        self.position = torch.cat([axis[rows.flatten()], axis[columns.flatten()]], dim=1) @ orthonormal_map(
            2 * _COORD_DIM).T
        self.corner_maps = [orthonormal_map(_COORD_DIM) for _ in range(4)]

    def corner_code(self, corner: int, value: float) -> torch.Tensor:
        """The code of box corner ``corner`` (0..3 = x1, y1, x2, y2) at ``value`` on the 0-100 grid."""
        code = sincos_codes(torch.tensor([float(value)]), _COORD_DIM, 3.0, 300.0)[0] / math.sqrt(_COORD_DIM / 2)
        return self.corner_maps[corner] @ code

    def __call__(self, image: dict, sparse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens of one ``objects.jsonl`` record (:func:`train.demo._object_line`).

        Returns:
            ``(tokens (n, width) float32, patches (n,) long)``: the tokens and the row-major patch
            each stands for; all ``grid_size ** 2`` patches, or with ``sparse`` only the patches
            holding an object centre (the first patch when the image has no object).
        """
        side = self.grid_size
        tokens = self.position.clone()
        if image["scene_class"] in self.scenes:
            tokens += 0.5 * self.scene_codes[self.scenes.index(image["scene_class"])]
        centres = torch.zeros(side * side, dtype=torch.bool)
        for obj in image["objects"]:
            x1, y1, x2, y2 = obj["box_px"]
            box = (100 * x1 / image["width"], 100 * y1 / image["height"],
                   100 * x2 / image["width"], 100 * y2 / image["height"])
            kind = self.classes.index(obj["label"])
            tokens[box_patch_mask(box, side)] += 0.5 * self.part_codes[kind]
            code = self.class_codes[kind].clone()
            if obj.get("colour") in self.colours:
                code += self.colour_codes[self.colours.index(obj["colour"])]
            if obj.get("size") in self.sizes:
                code += 0.5 * self.size_codes[self.sizes.index(obj["size"])]
            code += sum(self.corner_code(corner, value) for corner, value in enumerate(box))
            row = min(int((box[1] + box[3]) / 2 * side / 100), side - 1)
            column = min(int((box[0] + box[2]) / 2 * side / 100), side - 1)
            tokens[row * side + column] += code
            centres[row * side + column] = True
        if not sparse:
            return tokens, torch.arange(side * side)
        if not centres.any():
            centres[0] = True
        patches = centres.nonzero().flatten()
        return tokens[patches], patches


@dataclasses.dataclass
class OracleSettings:
    """One oracle run (the CLI flags).

    Attributes:
        tasks: task codes whose single-turn samples train and score.
        steps / batch / lr: AdamW optimizer steps, samples per step, peak learning rate (linear
            warmup over 30 steps, cosine to 10 %).
        sparse: image tokens of object-centre patches only.
        question_first: the first user turn puts the question before the image.
        targets_only: only the objects the answer boxes are drawn (:func:`answer_objects`).
        box_attention: :mod:`train.box_attention` settings (coef 0 = off).
        eval_scenes / eval_seed: fresh scenes scored at each quarter of the run (one sample per
            task per scene).
        seed: model init, codes and data order.
        bf16: train in bf16 autocast where the device runs it natively (:func:`train.loop.has_bf16`).
    """

    tasks: tuple[str, ...] = ("SC", "VQA", "VG", "OC")
    steps: int = 600
    batch: int = 16
    lr: float = 1e-3
    sparse: bool = False
    question_first: bool = False
    targets_only: bool = False
    box_attention: BoxAttentionSettings = dataclasses.field(default_factory=BoxAttentionSettings)
    eval_scenes: int = 64
    eval_seed: int = 4242
    seed: int = 0
    bf16: bool = True


def answer_objects(image: dict, answers: Sequence[str]) -> dict:
    """``image`` (an ``objects.jsonl`` record) keeping only the objects that ``answers`` box.

    An object is kept when an answer box (read by :func:`skymoe.parsing.parse_answer`) matches its
    box within one unit of the 0-100 grid per corner: answers round corners to whole grid units.
    """
    size = (image["width"], image["height"])
    boxes = [box_norm100(box.xyxy_px, *size)
             for answer in answers for box in parse_answer("ground", answer, size).boxes]
    named = [obj for obj in image["objects"]
             if any(max(abs(a - b) for a, b in zip(box_norm100(obj["box_px"], *size), box)) <= 1 + 1e-6
                    for box in boxes)]
    return {**image, "objects": named}


def _expand_image(values: list[int], at: int, n_image_tokens: int, fill: int) -> list[int]:
    """``values`` with its entry at ``at`` (the ``<image>`` token) replaced by ``n_image_tokens`` copies of ``fill``."""
    return values[:at] + [fill] * n_image_tokens + values[at + 1:]


def encode_turns(tokenizer, turns: Sequence[tuple[str, str]], n_image_tokens: int,
                 question_first: bool = False) -> tuple[list[int], list[int]]:
    """Token ids and labels (answer tokens only) with ``<image>`` expanded to ``n_image_tokens``."""
    ids, labels = answer_token_labels(tokenizer, *answer_char_spans(turns, question_first))
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    at = ids.index(image_id)
    return _expand_image(ids, at, n_image_tokens, image_id), _expand_image(labels, at, n_image_tokens, IGNORE_INDEX)


def _embed(model, input_ids: torch.Tensor, image_tokens: list[torch.Tensor]) -> torch.Tensor:
    """Input embeddings with each row's image-token positions replaced by that row's designed tokens."""
    embeds = model.get_input_embeddings()(input_ids).clone()
    for row, tokens in enumerate(image_tokens):
        embeds[row, input_ids[row] == model.config.image_token_id] = tokens.to(embeds.device, embeds.dtype)
    return embeds


def _single_turns(records: Sequence[InstructionRecord], tasks: Sequence[str]) -> list[InstructionRecord]:
    """Every turn of ``tasks`` as its own one-turn conversation about the same image."""
    keep = {task_of_code(code) for code in tasks}
    out = []
    for record in records:
        for user, answer in record.turns:
            if task_of_prompt(user) in keep:
                out.append(dataclasses.replace(record, turns=(("<image>\n" + without_image(user), answer),)))
    return out


@torch.no_grad()
def _greedy(model, tokenizer, prompts: list[str], image_tokens: list[torch.Tensor], max_new_tokens: int,
            question_first: bool) -> list[Generation]:
    """Greedy answers of one-turn prompts (left padding, ``model.generate`` from input embeddings)."""
    pad, image_id = tokenizer.pad_token_id, model.config.image_token_id
    rows = []
    for prompt, tokens in zip(prompts, image_tokens):
        ids = tokenizer(render_conversation([(prompt, None)], image_after_question=question_first))["input_ids"]
        rows.append(_expand_image(ids, ids.index(image_id), len(tokens), image_id))
    length = max(map(len, rows))
    input_ids = torch.tensor([[pad] * (length - len(row)) + row for row in rows], device=model.device)
    mask = torch.tensor([[0] * (length - len(row)) + [1] * len(row) for row in rows], device=model.device)
    out = model.generate(inputs_embeds=_embed(model, input_ids, image_tokens), attention_mask=mask,
                         max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                         eos_token_id=tokenizer.eos_token_id, output_logits=True, return_dict_in_generate=True)
    return generations_from_scores(tokenizer, out.sequences, out.logits)  # inputs_embeds: sequences are new tokens


def build_eval_set(work_dir: Path, settings: OracleSettings) -> list[tuple]:
    """``(samples, objects record, (width, height))`` per scored query: one per task per fresh scene
    (:func:`train.eval.scene_queries`; a caption query holds all of the scene's captions)."""
    out_dir = work_dir / f"oracle-eval-seed{settings.eval_seed}"
    scenes = generate_dataset(out_dir, settings.eval_scenes, seed=settings.eval_seed)
    rng = np.random.default_rng(settings.eval_seed)
    queries = []
    for scene in scenes:
        ref = str(Path(scene.image_path).resolve().relative_to(out_dir.resolve()))
        queries += [(samples, _object_line(scene, ref), (scene.width, scene.height))
                    for samples in scene_queries(scene, ref, rng, settings.tasks)]
    return queries


def _drawn(image: dict, answers: Sequence[str], settings: OracleSettings) -> dict:
    """The objects the designed tokens draw: all of ``image``'s, or with ``targets_only`` the answer's."""
    return answer_objects(image, answers) if settings.targets_only else image


def evaluate_oracle(model, tokenizer, tokens: DesignedTokens, queries: list[tuple], settings: OracleSettings,
                    batch_size: int = 16) -> dict:
    """Per-task scores (:func:`train.eval.score_results`) of greedy answers on ``queries``."""
    was_training = model.training
    model.eval()
    results, sizes = [], {}
    by_task = defaultdict(list)
    for query in queries:
        by_task[task_of_code(query[0][0].task)].append(query)
    for task, members in by_task.items():
        for start in range(0, len(members), batch_size):
            chunk = members[start:start + batch_size]
            answers = _greedy(model, tokenizer, [q[0][0].prompt for q in chunk],
                              [tokens(_drawn(q[1], [s.answer for s in q[0]], settings), settings.sparse)[0]
                               for q in chunk], DEFAULT_MAX_NEW_TOKENS[task], settings.question_first)
            for (samples, _, size), answer in zip(chunk, answers):
                first = samples[0]
                results.append(SampleResult(first.id, task, first.granularity, first.prompt, answer.text,
                                            [s.answer for s in samples], answer.confidence))
                sizes[first.id] = size
    model.train(was_training)
    report = score_results(results, sizes)
    return {task: {key: None if math.isnan(value) else round(value, 1) for key, value in scores.items()}
            for task, scores in report.per_task.items()}


def _learning_rate(settings: OracleSettings, step: int) -> float:
    warmup = min(1.0, (step + 1) / 30)
    return settings.lr * warmup * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / settings.steps)))


def train_oracle(model, tokenizer, records: list[InstructionRecord], objects: dict[str, dict],
                 queries: list[tuple], settings: OracleSettings) -> list[dict]:
    """Train ``model``'s language model on designed tokens; score after each quarter of the steps.

    Args:
        records: one-turn conversations; ``objects`` maps each image path to its annotations.

    Returns:
        One ``{"step", "minutes", "loss", "box_attention_loss", "scores"}`` per quarter.
    """
    tokens = DesignedTokens(model.config.text_config.hidden_size, model.config.image_grid_size, settings.seed)
    box = (BoxAttentionLoss(model, tokenizer, settings.box_attention) if settings.box_attention.coef > 0 else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    order = np.random.default_rng(settings.seed).permutation(len(records))
    checkpoints = {round(settings.steps * k / 4) for k in range(1, 5)}
    history, start = [], time.time()
    model.train()
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(settings, step)
        picked = [records[order[(step * settings.batch + k) % len(order)]] for k in range(settings.batch)]
        designed = [tokens(_drawn(objects[str(r.image_path)], [answer for _, answer in r.turns], settings),
                           settings.sparse) for r in picked]
        encoded = [encode_turns(tokenizer, r.turns, len(t), settings.question_first)
                   for r, (t, _) in zip(picked, designed)]
        length = max(len(ids) for ids, _ in encoded)
        input_ids = torch.full((len(encoded), length), tokenizer.pad_token_id)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        mask = torch.zeros_like(input_ids)
        for row, (ids, row_labels) in enumerate(encoded):
            input_ids[row, :len(ids)], labels[row, :len(ids)], mask[row, :len(ids)] = (
                torch.tensor(ids), torch.tensor(row_labels), 1)
        input_ids, labels, mask = input_ids.to(model.device), labels.to(model.device), mask.to(model.device)
        with supervising(box), bf16_autocast(model.device, settings.bf16):
            out = model(inputs_embeds=_embed(model, input_ids, [t for t, _ in designed]), attention_mask=mask,
                        labels=labels)
            box_loss = box(input_ids, labels, [p for _, p in designed]) if box is not None else None
        loss = out.loss + box.coef * box_loss if box is not None else out.loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 50 == 0:
            logger.info("step %d (%.1f min): loss %.3f", step + 1, (time.time() - start) / 60, out.loss.item())
        if step + 1 in checkpoints:
            point = {"step": step + 1, "minutes": round((time.time() - start) / 60, 2),
                     "loss": round(out.loss.item(), 4),
                     "box_attention_loss": None if box_loss is None else round(box_loss.item(), 4),
                     "scores": evaluate_oracle(model, tokenizer, tokens, queries, settings)}
            logger.info("step %d (%.1f min): %s", point["step"], point["minutes"], json.dumps(point["scores"]))
            history.append(point)
    return history


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.oracle_tokens", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", required=True, help="train.demo work folder (data generated there if absent)")
    parser.add_argument("--out", required=True, help="JSON file for the settings and the scores per quarter")
    parser.add_argument("--tasks", default="SC,VQA,VG,OC", help="task codes to train and score (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--sparse", action="store_true", help="only the object-centre patches as image tokens")
    parser.add_argument("--question-first", action="store_true", help="the image after the first question")
    parser.add_argument("--targets-only", action="store_true",
                        help="grounding: draw only the objects the answer boxes (copying without finding)")
    parser.add_argument("--box-attention", type=float, default=0.0, metavar="COEF",
                        help="train.box_attention loss weight (0 = off)")
    parser.add_argument("--box-layer", type=int, default=1)
    parser.add_argument("--eval-scenes", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fp32", action="store_true", help="train in fp32 even where bf16 is native")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--device", default="cpu", help="torch device of the model, e.g. cuda (default: %(default)s)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="demo YAML for the model and data")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a demo field")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (see the module docstring)."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    codes = tuple(c.strip().upper() for c in args.tasks.split(",") if c.strip())
    known = {spec.code for spec in TASKS.values()}
    if not codes or not set(codes) <= known:
        print(f"error: --tasks {args.tasks!r}: use task codes from {', '.join(sorted(known))}", file=sys.stderr)
        return 2
    if args.targets_only and codes != ("VG",):
        print("error: --targets-only draws the objects an answer boxes: use it with --tasks VG", file=sys.stderr)
        return 2
    if args.steps < 4 or args.batch < 1:
        print(f"error: need --steps >= 4 and --batch >= 1, got {args.steps} and {args.batch}", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, DemoConfig, args.set)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = OracleSettings(codes, args.steps, args.batch, args.lr, args.sparse, args.question_first,
                              args.targets_only, BoxAttentionSettings(args.box_attention, args.box_layer, 0),
                              args.eval_scenes, seed=args.seed, bf16=not args.fp32)
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    _, moe_jsonl, objects_jsonl, _ = _cached_data(work_dir, cfg)
    records, _ = read_instruction_jsonl(moe_jsonl, check_images=False)
    objects = {str((work_dir / line["image"]).resolve()): line
               for line in map(json.loads, objects_jsonl.read_text().splitlines())}
    tokenizer = skymoe.build_tokenizer(_conversation_texts(moe_jsonl), vocab_size=cfg.model.bpe_vocab)
    model, _ = build_demo_model(cfg.model, tokenizer, settings.seed)
    model.to(args.device)
    singles = _single_turns(records, codes)
    queries = build_eval_set(work_dir, settings)
    logger.info("oracle run: %d one-turn samples of %s, %d scored queries, %s", len(singles), ",".join(codes),
                len(queries), settings)
    history = train_oracle(model, tokenizer, singles, objects, queries, settings)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": dataclasses.asdict(settings), "history": history}, indent=2))
    print(json.dumps(history[-1]["scores"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
