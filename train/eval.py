"""Evaluate a SkyMoE checkpoint on an instruction JSONL, per task and per granularity.

``python -m train.eval --model DIR --data JSONL --out metrics.json`` runs batched
greedy inference through :func:`skymoe.generate`, parses the answers with
:func:`skymoe.parse_answer` and scores them with :mod:`train.metrics`:

====  =====================================================================
IC    BLEU-4 / METEOR / ROUGE-L (pycocoevalcap); one generation per image and
      prompt, all reference captions of that image pooled
SC    accuracy, normalised exact match of the class name
VQA   accuracy, normalised exact match of the short answer
VG    acc@0.5 / acc@0.7 IoU of the first predicted box with the reference box (several reference
      boxes: one-to-one set IoU, train.metrics.set_box_iou)
OC    accuracy exact and within +-1
====  =====================================================================

``--synthetic --seed S --n N`` first builds a fresh benchmark of about N samples
(one per task per scene) with :mod:`train.synthetic` and :mod:`train.instructions`.
``--masking-test`` adds the paper's Figure 1 masking test (:func:`masking_test`),
``--report-params`` a Table 7-style report of trainable parameters per stage and
FLOPs per sample (:func:`params_flops_report`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

import skymoe
from skymoe.prompts import TASKS, build_prompt, render_conversation
from train.dataset import DataError, InstructionRecord, read_instruction_jsonl
from train.metrics import caption_scores, count_accuracy, exact_match_accuracy, grounding_accuracy, set_box_iou

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "SampleResult",
    "EvalReport",
    "group_queries",
    "run_generation",
    "score_results",
    "evaluate",
    "build_synthetic_benchmark",
    "add_benchmark_arguments",
    "scene_queries",
    "masking_test",
    "params_flops_report",
    "format_table",
    "main",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = {"caption": 128, "classify": 24, "vqa": 24, "ground": 96, "count": 24}
"""Generation budget per task (tokens)."""

_PRIMARY = {"caption": "BLEU-4", "classify": "accuracy", "vqa": "accuracy", "ground": "acc@0.5",
            "count": "exact"}


@dataclass
class SampleResult:
    """One generated answer and its score.

    Attributes:
        id: sample id (for captions: the ids of the pooled samples joined by ``+``).
        task: task key.
        granularity: ``"global"`` or ``"local"``.
        prompt: user message sent to the model.
        prediction: generated text.
        references: reference answers (several for pooled captions).
        confidence: ``exp(mean token log-prob)`` of the generation.
        score: per-sample score: hit (0/1) for SC/VQA, IoU for VG, |error| for OC, None for IC.
    """

    id: str
    task: str
    granularity: str
    prompt: str
    prediction: str
    references: list[str]
    confidence: float
    score: float | None = None


@dataclass
class EvalReport:
    """Scores per task and per granularity, plus the per-sample results."""

    per_task: dict[str, dict[str, float]] = field(default_factory=dict)
    per_task_granularity: dict[str, dict[str, float]] = field(default_factory=dict)
    per_granularity: dict[str, dict[str, float]] = field(default_factory=dict)
    samples: list[SampleResult] = field(default_factory=list)

    def to_json(self) -> dict:
        """Metrics only (samples go to a separate predictions file)."""
        return {"per_task": self.per_task, "per_task_granularity": self.per_task_granularity,
                "per_granularity": self.per_granularity}


def group_queries(records: Sequence[InstructionRecord]) -> list[tuple[list[InstructionRecord], str]]:
    """One query per record, except captions: one per (image, prompt) with all captions pooled."""
    groups: dict[tuple, list[InstructionRecord]] = {}
    for rec in records:
        key = (rec.image_path, rec.prompt, rec.granularity) if rec.task == "caption" else (rec.id, rec.source)
        groups.setdefault(key, []).append(rec)
    return [(recs, recs[0].prompt) for recs in groups.values()]


def run_generation(model, processor, records: Sequence[InstructionRecord], batch_size: int = 8,
                   max_new_tokens: int | None = None) -> list[SampleResult]:
    """Generate an answer for every record (captions pooled per image), batched per task.

    Args:
        model, processor: a loaded SkyMoE (``skymoe.load_model``).
        records: evaluation samples.
        batch_size: images per forward.
        max_new_tokens: budget for every task; None uses :data:`DEFAULT_MAX_NEW_TOKENS`.

    Returns:
        Unscored :class:`SampleResult` objects (see :func:`score_results`).
    """
    by_task: dict[str, list[tuple[list[InstructionRecord], str]]] = defaultdict(list)
    for recs, prompt in group_queries(records):
        by_task[recs[0].task].append((recs, prompt))
    results = []
    for task, queries in by_task.items():
        budget = max_new_tokens or DEFAULT_MAX_NEW_TOKENS[task]
        for start in range(0, len(queries), batch_size * 4):  # bounded number of images in memory
            chunk = queries[start : start + batch_size * 4]
            images = [_load_rgb(recs[0].image_path) for recs, _ in chunk]
            gens = skymoe.generate(model, processor, images, [p for _, p in chunk], max_new_tokens=budget,
                            batch_size=batch_size)
            for (recs, prompt), gen in zip(chunk, gens):
                results.append(SampleResult(id="+".join(r.id for r in recs), task=task,
                                            granularity=recs[0].granularity, prompt=prompt, prediction=gen.text,
                                            references=[r.answer for r in recs], confidence=gen.confidence))
        logger.info("generated %d %s answers", len(queries), task)
    return results


def _load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


def score_results(results: list[SampleResult], tile_sizes: dict[str, tuple[int, int]]) -> EvalReport:
    """Fill each result's score and aggregate per task, per (task, granularity) and per granularity.

    Args:
        results: from :func:`run_generation`.
        tile_sizes: sample id -> ``(width_px, height_px)`` of its image (boxes are parsed to pixels).
    """
    report = EvalReport(samples=results)
    by_task: dict[str, list[SampleResult]] = defaultdict(list)
    for res in results:
        by_task[res.task].append(res)
    for task, members in sorted(by_task.items()):
        grans = sorted({m.granularity for m in members})
        for gran in grans:
            cell = [m for m in members if m.granularity == gran]
            report.per_task_granularity[f"{task}/{gran}"] = _task_metrics(task, cell, tile_sizes)
        # one granularity: the task's row is that cell (captions are not scored twice)
        report.per_task[task] = (report.per_task_granularity[f"{task}/{grans[0]}"] if len(grans) == 1
                                 else _task_metrics(task, members, tile_sizes))
    for gran in ("global", "local"):
        cells = {k: v for k, v in report.per_task_granularity.items() if k.endswith(f"/{gran}")}
        if cells:
            primaries = [v[_PRIMARY[k.split("/")[0]]] for k, v in cells.items()]
            report.per_granularity[gran] = {"n": sum(v["n"] for v in cells.values()),
                                            "mean_primary": float(np.nanmean(primaries))}
    return report


def _task_metrics(task: str, members: list[SampleResult], tile_sizes: dict) -> dict[str, float]:
    """Metrics of one task over ``members``; sets each member's ``score``."""
    n = {"n": float(len(members))}
    if task == "caption":
        refs = {str(i): m.references for i, m in enumerate(members)}
        hyps = {str(i): skymoe.parse_answer("caption", m.prediction, 504).answer for i, m in enumerate(members)}
        return n | caption_scores(refs, hyps)
    if task in ("classify", "vqa"):
        field_ = "label" if task == "classify" else "answer"
        preds = [getattr(skymoe.parse_answer(task, m.prediction, 504), field_) for m in members]
        refs = [getattr(skymoe.parse_answer(task, m.references[0], 504), field_) or m.references[0] for m in members]
        for m, p, r in zip(members, preds, refs):
            m.score = float(exact_match_accuracy([p], [r]))
        return n | {"accuracy": exact_match_accuracy(preds, refs)}
    if task == "ground":
        ious = []
        for m in members:
            size = tile_sizes[m.id]
            pred = skymoe.parse_answer("ground", m.prediction, size).boxes
            ref = skymoe.parse_answer("ground", m.references[0], size).boxes
            m.score = set_box_iou([(b.xyxy_px, b.angle_deg) for b in pred], [(b.xyxy_px, b.angle_deg) for b in ref])
            ious.append(m.score)
        return n | grounding_accuracy(ious)
    preds = [skymoe.parse_answer("count", m.prediction, tile_sizes[m.id]).count for m in members]
    refs = [skymoe.parse_answer("count", m.references[0], tile_sizes[m.id]).count for m in members]
    for m, p, r in zip(members, preds, refs):
        m.score = float(abs(p - r)) if p is not None and r is not None else None
    return n | count_accuracy(preds, [r if r is not None else -1 for r in refs])


def evaluate(model, processor, records: Sequence[InstructionRecord], batch_size: int = 8,
             max_new_tokens: int | None = None) -> EvalReport:
    """Generate and score (see the module docstring for the metrics)."""
    results = run_generation(model, processor, records, batch_size, max_new_tokens)
    sizes = {}
    for recs, _ in group_queries(records):
        with Image.open(recs[0].image_path) as img:
            sizes["+".join(r.id for r in recs)] = img.size
    return score_results(results, sizes)


def scene_queries(scene, image_ref: str, rng: np.random.Generator, codes: Sequence[str]) -> list[list]:
    """A synthetic scene's benchmark queries: per task code of ``codes`` (in that order) that the
    scene has samples for, one sample picked with ``rng``, or for captions (IC) all of them (one
    query, its references pooled). Canonical prompt templates.

    Returns:
        One list of :class:`train.instructions.InstructionSample` per query.
    """
    from train.instructions import SampleOptions, make_samples

    by_code: dict[str, list] = defaultdict(list)
    for sample in make_samples(scene, image_ref, SampleOptions(vary_templates=False)):
        by_code[sample.task].append(sample)
    return [by_code[code] if code == "IC" else [by_code[code][rng.integers(len(by_code[code]))]]
            for code in codes if by_code[code]]


def build_synthetic_benchmark(out_dir: str | Path, n: int, seed: int, size_px: int = 504) -> Path:
    """Write a fresh synthetic benchmark of about ``n`` queries: one per task per scene.

    Scenes come from :func:`train.synthetic.generate_dataset` (``ceil(n / 5)`` scenes, full
    difficulty range); each scene contributes one SC, VQA, VG and OC sample (where it has
    one), picked with a generator seeded by ``seed``, and all of its reference captions: the
    generator words every scene in four templates, and like the caption sets of the field
    (UCM-Captions, RSICD: five per image) they are pooled into one captioning query with
    several references. Canonical prompt templates.

    Returns:
        The JSONL path (images under ``out_dir/images``).
    """
    from train.instructions import write_jsonl
    from train.synthetic import generate_dataset

    out_dir = Path(out_dir)
    scenes = generate_dataset(out_dir, math.ceil(n / 5), seed=seed, size_px=size_px)
    rng = np.random.default_rng(seed)
    records, queries = [], 0
    for scene in scenes:
        ref = str(Path(scene.image_path).resolve().relative_to(out_dir.resolve()))
        for picked in scene_queries(scene, ref, rng, sorted(spec.code for spec in TASKS.values())):
            if queries == n:
                break
            records += [sample.to_json() for sample in picked]
            queries += 1
    path = out_dir / "benchmark.jsonl"
    write_jsonl(path, records)
    logger.info("synthetic benchmark: %d queries (%d samples) from %d scenes (seed %d) in %s",
                queries, len(records), len(scenes), seed, path)
    return path


def masking_test(model, processor, work_dir: str | Path, n_scenes: int, seed: int, batch_size: int = 8,
                 max_masked: int = 3) -> dict:
    """The paper's Figure 1 test: mask k of the N objects of a class; does the count drop by k?

    For each synthetic scene (seed ``seed + 1``, never the benchmark's scenes) the class with
    the most instances (N >= 2) is counted on the original and on variants with k = 1 ..
    ``min(max_masked, N - 1)`` of its objects zero-filled (their pixels, as the count-varying
    cutout does). A model that counts instances drops by k; one that reads the background
    context keeps its answer. Overlapping objects can make a masked object still partly visible.

    Returns:
        ``{"summary": {...}, "rows": [...]}``; summary: ``variants``, ``drop_equals_k`` (%),
        ``unchanged`` (%), ``correct`` (% of variants counted N - k), ``mean_drop_per_masked``.
    """
    from collections import Counter

    from train.cda.cutout import object_mask
    from train.synthetic import generate_dataset

    scenes = generate_dataset(work_dir, n_scenes, seed=seed + 1, difficulty=(0.3, 1.0))
    rng = np.random.default_rng(seed)
    images, prompts, rows = [], [], []
    for scene in scenes:
        counts = Counter(o.label for o in scene.objects)
        if not counts or counts.most_common(1)[0][1] < 2:
            continue
        label, n = counts.most_common(1)[0]
        rgb = np.asarray(_load_rgb(Path(scene.image_path)))
        order = rng.permutation([i for i, o in enumerate(scene.objects) if o.label == label])
        for k in range(min(max_masked, n - 1) + 1):
            masked = rgb.copy()
            for index in order[:k]:
                masked[object_mask(scene.objects[index], scene.height, scene.width)] = 0
            images.append(masked)
            prompts.append(build_prompt("count", label))
            rows.append({"scene": Path(scene.image_path).name, "label": label, "n": int(n), "k": k})
    gens = skymoe.generate(model, processor, images, prompts, max_new_tokens=DEFAULT_MAX_NEW_TOKENS["count"],
                    batch_size=batch_size)
    for row, gen, image in zip(rows, gens, images):
        row["predicted"] = skymoe.parse_answer("count", gen.text, (image.shape[1], image.shape[0])).count
    return {"summary": _masking_summary(rows), "rows": rows}


def _masking_summary(rows: list[dict]) -> dict:
    """Compare each masked variant's count with its scene's unmasked count."""
    base = {r["scene"]: r["predicted"] for r in rows if r["k"] == 0}
    variants = [r for r in rows if r["k"] > 0 and r["predicted"] is not None and base.get(r["scene"]) is not None]
    if not variants:
        return {"variants": 0}
    drops = [base[r["scene"]] - r["predicted"] for r in variants]
    return {
        "variants": len(variants),
        "drop_equals_k": 100.0 * sum(d == r["k"] for d, r in zip(drops, variants)) / len(variants),
        "unchanged": 100.0 * sum(d == 0 for d in drops) / len(variants),
        "correct": 100.0 * sum(r["predicted"] == r["n"] - r["k"] for r in variants) / len(variants),
        "mean_drop_per_masked": sum(drops) / sum(r["k"] for r in variants),
    }


def _weights(module) -> int:
    """Parameters of ``module`` counted from shapes (right for bitsandbytes-packed Linears too)."""
    return sum(_weights_of_param(module, name) for name, _ in module.named_parameters())


def params_flops_report(model, processor, records: Sequence[InstructionRecord], lora_r: int = 64) -> dict:
    """Table 7-style report: trainable parameters per stage and forward FLOPs per sample.

    Stage I: LoRA rank ``lora_r`` on the LLM's q_proj / v_proj (``r * (in + out)`` each).
    Stage II: each ``moe.trainable`` choice on this model as it is (upcycle first for a dense one).
    FLOPs (forward, per sample, approximate): ``2 * params`` per token through every Linear
    (vision tower on its patches + CLS, projector on the image tokens, LLM on image + text tokens,
    MoE layers counting only k of E experts, lm_head included, embeddings excluded) plus dense
    attention ``4 * layers * seq^2 * hidden`` for CLIP and the LLM. Training is about 3x forward.
    The text length is the mean over ``records`` (prompt + answer).
    """
    from train.stage2 import TRAINABLE_CHOICES, trainable_mask

    cfg = model.config
    core = model.model
    lm, vision, projector = core.language_model, core.vision_tower, core.multi_modal_projector
    lora = sum(lora_r * (m.in_features + m.out_features) for n, m in lm.named_modules()
               if n.split(".")[-1] in ("q_proj", "v_proj") and hasattr(m, "in_features"))
    sizes = {n: _weights_of_param(model, n) for n, _ in model.named_parameters()}
    stage2 = {c: sum(sizes[n] for n, on in trainable_mask(model, c).items() if on) for c in TRAINABLE_CHOICES}
    inactive = sum(_weights(b.experts) * (len(b.experts) - b.top_k) / len(b.experts)
                   for b in model.modules() if isinstance(b, skymoe.SkyMoESparseBlock))
    lm_active = _weights(lm) - _weights(lm.embed_tokens) - inactive + _weights(model.lm_head)
    text_tokens = float(np.mean([len(processor.tokenizer(render_conversation(list(r.turns), False))["input_ids"]) - 1
                                 for r in records])) if records else 64.0
    seq = cfg.image_seq_length + text_tokens
    grid = cfg.image_grid_size**2  # the tower and projector see every patch, with object tokens too
    patches = grid + 1
    vcfg, tcfg = cfg.vision_config, cfg.text_config
    flops = (2 * _weights(vision) * patches + 4 * vcfg.num_hidden_layers * patches**2 * vcfg.hidden_size
             + 2 * _weights(projector) * grid
             + 2 * lm_active * seq + 4 * tcfg.num_hidden_layers * seq**2 * tcfg.hidden_size)
    return {"total_params": _weights(model), "stage1_lora_trainable": lora,
            "stage2_trainable": stage2, "active_llm_params_per_token": int(lm_active),
            "sequence_tokens": seq, "forward_tflops_per_sample": flops / 1e12,
            "train_tflops_per_sample": 3 * flops / 1e12}


def _weights_of_param(model, name: str) -> int:
    """Size of one named parameter; a Linear's weight counts ``in_features * out_features``."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if leaf == "weight" and hasattr(module, "in_features") and hasattr(module, "out_features"):
        return module.in_features * module.out_features
    return getattr(module, leaf).numel()


def format_table(report: EvalReport) -> str:
    """A plain-text table: one row per task and per (task, granularity), then per granularity."""
    lines = [f"{'task':<18}{'n':>6}  metrics"]
    rows = list(report.per_task.items()) + list(report.per_task_granularity.items())
    for name, metrics in rows:
        values = "  ".join(f"{k} {v:.2f}" for k, v in metrics.items() if k != "n")
        lines.append(f"{name:<18}{int(metrics['n']):>6}  {values}")
    for gran, metrics in report.per_granularity.items():
        lines.append(f"{'[' + gran + ']':<18}{int(metrics['n']):>6}  mean primary metric {metrics['mean_primary']:.2f}")
    return "\n".join(lines)


def add_benchmark_arguments(parser: argparse.ArgumentParser, default_seed: int) -> None:
    """``--data JSONL`` or ``--synthetic --seed S --n N`` (:func:`build_synthetic_benchmark`), one required."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="instruction JSONL")
    source.add_argument("--synthetic", action="store_true", help="build a fresh synthetic benchmark first")
    parser.add_argument("--seed", type=int, default=default_seed,
                        help="benchmark seed (use one never used in training; default: %(default)s)")
    parser.add_argument("--n", type=int, default=500, help="benchmark samples (default: %(default)s)")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="SkyMoE checkpoint folder")
    parser.add_argument("--out", required=True, help="metrics JSON to write (predictions go beside it)")
    add_benchmark_arguments(parser, default_seed=1234)
    parser.add_argument("--quant", default="none", choices=["none", "8bit", "4bit"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="override the per-task budgets")
    parser.add_argument("--masking-test", action="store_true", help="the paper's Figure 1 masking test")
    parser.add_argument("--masking-scenes", type=int, default=40, help="synthetic scenes for the masking test")
    parser.add_argument("--report-params", action="store_true", help="Table 7-style params / FLOPs report")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; prints the table and writes ``--out`` (+ ``*.predictions.jsonl``)."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = args.data
    if args.synthetic:
        data = build_synthetic_benchmark(out.parent / f"synthetic-seed{args.seed}-n{args.n}", args.n, args.seed)
    try:
        records, bad = read_instruction_jsonl(data)
        model, processor = skymoe.load_model(args.model, quant=args.quant, device=args.device)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except skymoe.CheckpointError as exc:
        print(f"error: cannot evaluate {args.model}: {exc}", file=sys.stderr)
        return 2
    report = evaluate(model, processor, records, args.batch_size, args.max_new_tokens)
    result = {"model": str(args.model), "data": str(data), "skipped_lines": [b.line_no for b in bad]}
    result |= report.to_json()
    print(format_table(report))
    if args.masking_test:
        result["masking_test"] = masking_test(model, processor, out.parent / "masking", args.masking_scenes,
                                              args.seed, args.batch_size)
        print("masking test:", json.dumps(result["masking_test"]["summary"]))
    if args.report_params:
        result["params_flops"] = params_flops_report(model, processor, records)
        print("params / FLOPs:", json.dumps(result["params_flops"], indent=1))
    out.write_text(json.dumps(result, indent=1))
    with out.with_suffix(".predictions.jsonl").open("w") as fh:
        for sample in report.samples:
            fh.write(json.dumps(asdict(sample)) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
