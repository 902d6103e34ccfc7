"""Grounding ceiling of a patch grid: what a model scores that finds the right objects but places them only to the patch.

Why: a ViT sees an image as a grid of patches. A language model that reads the image tokens
can learn which patch holds the named object; where inside that patch the object lies, it
knows only if the tower wrote the offset into the token. Small objects (a car is about 2 x 1 %
of a 504 px synthetic scene; the demo's 28 px patch is 5.6 % wide) fail IoU 0.5 without that
offset, however well the object is found. This tool measures that limit on a benchmark, without
any model: for every grounding query it writes the answer of an idealised model that boxes
every right object, of its exact size and angle, with the box centre moved to the middle of the
patch holding the true centre (on the ``side x side`` grid of the image resized to
``image_size``, as the processor does), and scores those answers with the evaluation's own
parser and metrics (:func:`train.eval.score_results`: answer-grid rounding, set IoU for
several boxes).

Usage::

    python -m train.grounding_ceiling --synthetic --seed 2026 --n 500 --out runs/ceiling/seed2026.json
    python -m train.grounding_ceiling --data test.jsonl --patch-sizes 28 24 18 14 --image-size 504

It prints acc@0.5 / acc@0.7 and mean IoU per patch size. A model that also reads the offset
inside the patch can beat the ceiling; one that only finds patches cannot.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

import skymoe
from train.dataset import DataError, InstructionRecord, read_instruction_jsonl
from train.eval import SampleResult, add_benchmark_arguments, build_synthetic_benchmark, score_results
from train.instructions import box_norm100

__all__ = ["patch_snapped_answer", "grounding_ceiling", "main"]

logger = logging.getLogger(__name__)

DEFAULT_PATCH_SIZES = (28, 24, 18, 14)
"""The demo's patch (28 px), two in between, and CLIP ViT-L/14's (the paper's)."""


def patch_snapped_answer(reference: str, width: int, height: int, side: int) -> str:
    """The idealised answer to a grounding query whose reference answer is ``reference``.

    Args:
        reference: the reference answer in box syntax (:func:`skymoe.format_boxes`).
        width, height: the image's size in px (the frame the 0-100 grid spans).
        side: patches per side of the model's square grid (image size // patch size).

    Returns:
        Every reference box with its size and angle kept and its centre moved to the middle of
        the patch that holds it, in box syntax on the 0-100 grid.
    """
    boxes, angles = [], []
    for box in skymoe.parse_answer("ground", reference, (width, height)).boxes:
        x1, y1, x2, y2 = box.xyxy_px
        half_w, half_h = (x2 - x1) / 2, (y2 - y1) / 2
        # the patch holding the centre, on the grid of the resized square image, back in image px
        column = min(int((x1 + half_w) / width * side), side - 1)
        row = min(int((y1 + half_h) / height * side), side - 1)
        cx, cy = (column + 0.5) * width / side, (row + 0.5) * height / side
        boxes.append(box_norm100((cx - half_w, cy - half_h, cx + half_w, cy + half_h), width, height))
        angles.append(box.angle_deg)
    return skymoe.format_boxes(boxes, angles)


def grounding_ceiling(records: Sequence[InstructionRecord], image_size: int,
                      patch_sizes: Sequence[int]) -> dict[int, dict[str, float]]:
    """acc@0.5 / acc@0.7 / mean IoU (percent) and ``n`` of the patch-snapped answers per patch size.

    Args:
        records: benchmark samples; only grounding ones are used.
        image_size: the side in px the processor resizes images to.
        patch_sizes: patch sides in px, each dividing ``image_size``.

    Raises:
        ValueError: a patch size that does not divide ``image_size``, or no grounding sample.
    """
    for patch in patch_sizes:
        if patch <= 0 or image_size % patch:
            raise ValueError(f"patch size {patch} px does not divide the image size {image_size} px; "
                             "give patch sizes that tile the image (e.g. 28, 24, 18, 14 for 504)")
    grounding = [r for r in records if r.task == "ground"]
    if not grounding:
        raise ValueError("the data has no grounding samples (task 'ground'); give a benchmark with [refer] queries")
    sizes = {}
    for rec in grounding:
        with Image.open(rec.image_path) as img:
            sizes[rec.id] = img.size
    report = {}
    for patch in patch_sizes:
        side = image_size // patch
        results = [SampleResult(id=r.id, task="ground", granularity=r.granularity, prompt=r.prompt,
                                prediction=patch_snapped_answer(r.answer, *sizes[r.id], side),
                                references=[r.answer], confidence=1.0)
                   for r in grounding]
        report[patch] = score_results(results, sizes).per_task["ground"]
    return report


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.grounding_ceiling", description=__doc__.split("\n\n")[0])
    add_benchmark_arguments(parser, default_seed=2026)
    parser.add_argument("--image-size", type=int, default=504, help="model input side in px (default: %(default)s)")
    parser.add_argument("--patch-sizes", type=int, nargs="+", default=list(DEFAULT_PATCH_SIZES),
                        help="patch sides in px (default: %(default)s)")
    parser.add_argument("--out", default=None, help="JSON to write (default: print only)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (see the module docstring)."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out) if args.out else None
    data = args.data
    if args.synthetic:
        folder = (out.parent if out else Path("runs/ceiling")) / f"synthetic-seed{args.seed}-n{args.n}"
        data = build_synthetic_benchmark(folder, args.n, args.seed)
    try:
        records, bad = read_instruction_jsonl(data)
        report = grounding_ceiling(records, args.image_size, args.patch_sizes)
    except (DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"grounding ceiling (right objects, exact sizes, centres at the patch middle), {data}:")
    print("patch px  patches     n  acc@0.5  acc@0.7  mean IoU")
    for patch, metrics in report.items():
        grid = f"{args.image_size // patch}x{args.image_size // patch}"
        print(f"{patch:>8}  {grid:>7}  {metrics['n']:>4.0f}  {metrics['acc@0.5']:>7.1f}  "
              f"{metrics['acc@0.7']:>7.1f}  {metrics['mean_iou']:>8.1f}")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"data": str(data), "image_size": args.image_size,
                                   "skipped_lines": [b.line_no for b in bad],
                                   "per_patch_size": {str(p): m for p, m in report.items()}}, indent=1))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
