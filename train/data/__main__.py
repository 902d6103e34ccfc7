"""``python -m train.data``: build instruction datasets (images folder + JSONL).

Commands::

    python -m train.data synth --out DIR --n N --seed S [--cda] [--workers W]
    python -m train.data convert FORMAT --src SRC --out DIR [--split SPLIT] [--crop 504 --overlap 64]
    python -m train.data augment --data DIR/data.jsonl --out DIR2 [--seed S]

Each shows a progress bar and ends with a table of samples per task and granularity and
the number of skipped items (the first of them listed with file and line).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from train.cda import CdaOptions
from train.converters import FORMATS
from train.converters.base import ConversionError
from train.data import CropOptions, RunSummary, augment, convert, synth
from train.instructions import JsonlError, SampleOptions

_SHOWN_SKIPS = 10


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train.data", description=__doc__.split("\n\n")[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="no per-item warnings, no progress bar")
    commands = parser.add_subparsers(dest="command", required=True)

    s = commands.add_parser("synth", help="generate synthetic aerial scenes with all five tasks")
    s.add_argument("--out", type=Path, required=True, help="output folder")
    s.add_argument("--n", type=int, required=True, help="number of scenes (each yields many samples)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--cda", action="store_true", help="also write context-disentangled augmentation variants")
    s.add_argument("--workers", type=int, default=1, help="generator processes")

    c = commands.add_parser("convert", help="convert a public dataset on disk")
    c.add_argument("format", choices=sorted(FORMATS), help="; ".join(f"{k}: {v.description}" for k, v in FORMATS.items()))
    c.add_argument("--src", type=Path, required=True, help="dataset folder (or file) as distributed")
    c.add_argument("--out", type=Path, required=True, help="output folder")
    c.add_argument("--images", type=Path, default=None, help="image folder, if not under --src")
    c.add_argument("--split", default=None, help="captions: train/val/test; rsvqa: file prefix, e.g. LR_split_train")
    c.add_argument("--crop", type=int, default=504, help="crop size in px for large object-annotated images")
    c.add_argument("--overlap", type=int, default=64, help="crop overlap in px")
    c.add_argument("--min-visible", type=float, default=0.5, help="drop objects with less of their area in a crop")
    c.add_argument("--vqa-granularity", choices=("global", "local"), default="global")

    a = commands.add_parser("augment", help="write CDA variants of a converted or synthetic dataset")
    a.add_argument("--data", type=Path, required=True, help="the dataset's data.jsonl (annotations.jsonl next to it)")
    a.add_argument("--out", type=Path, required=True, help="output folder for the variants")
    a.add_argument("--annotations", type=Path, default=None, help="annotations.jsonl, if not next to --data")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--spatial", type=int, default=1, help="spatial edits per image")
    a.add_argument("--colour", type=int, default=1, help="colour edits per image")
    return parser


def _run(args: argparse.Namespace) -> RunSummary:
    progress = not args.quiet
    if args.command == "synth":
        if args.n < 1:
            raise ValueError(f"--n must be at least 1 scene, got {args.n}")
        return synth(args.out, args.n, seed=args.seed, with_cda=args.cda, workers=args.workers, progress=progress)
    if args.command == "convert":
        reader_args = {k: v for k, v in (("images_dir", args.images), ("split", args.split)) if v is not None}
        base = FORMATS[args.format].options
        options = SampleOptions(tasks=base.tasks, vqa_granularity=args.vqa_granularity,
                                max_ground_instances=base.max_ground_instances)
        crop = CropOptions(size_px=args.crop, overlap_px=args.overlap, min_visible=args.min_visible)
        return convert(args.format, args.src, args.out, options=options, crop=crop, progress=progress, **reader_args)
    cda = CdaOptions(spatial_edits=args.spatial, colour_edits=args.colour)
    return augment(args.data, args.out, seed=args.seed, cda=cda, annotations_file=args.annotations, progress=progress)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 bad input)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.WARNING, format="%(levelname)s %(message)s")
    start = time.perf_counter()
    try:
        summary = _run(args)
    except (ConversionError, JsonlError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary.table())
    for item in summary.skipped.items[:_SHOWN_SKIPS]:
        print(f"  skipped {item}")
    if len(summary.skipped) > _SHOWN_SKIPS:
        print(f"  ... and {len(summary.skipped) - _SHOWN_SKIPS} more (see the warnings above)")
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
