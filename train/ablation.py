"""The paper's Table 8 in miniature (issue 5, item 7): Stage II variants from one dense model.

``python -m train.ablation --dense DIR --data JSONL --out DIR [--steps 150] [--eval-n 250]``

Every row starts from the same dense model (the demo recipe keeps its dense-stage end point as
``dense-model`` in its run folder), trains Stage II (:func:`train.stage2.run_stage2`) for the same
number of optimizer steps with the same seed, batch and learning rate, and is scored on one fresh
synthetic benchmark (:func:`train.eval.build_synthetic_benchmark`, a seed never used in training).
The rows:

======================  ===  ======  =====================================
row                     E    router  CDA conversations kept
======================  ===  ======  =====================================
E=1 (dense)             1    token   all
E=4                     4    token   all
E=8                     8    token   all
E=8, no cutout          8    token   spatial and colour edits
E=8, no attribute edit  8    token   count-varying cutout
E=8, no CDA             8    token   none
E=8, task router        8    task    all
======================  ===  ======  =====================================

The demo's training conversations pack several tasks about one image; ``router_mode="task"``
needs one task per sequence, so every row trains on the same conversations split per task
(:func:`split_by_task`). Rows whose ``metrics.json`` exists are not run again (a stopped
ablation resumes row by row). ``table.md`` and ``table.json`` hold the result.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from skymoe.prompts import code_of_task, task_of_prompt
from train.config import DataConfig, LoopConfig, MoESettings, OptimConfig, Stage2Config
from train.dataset import read_instruction_jsonl
from train.eval import build_synthetic_benchmark, evaluate
from train.instructions import write_jsonl
from train.stage2 import run_stage2

__all__ = ["AblationRow", "ROWS", "split_by_task", "row_records", "run_ablation", "format_ablation_table", "main"]

logger = logging.getLogger(__name__)

ATTRIBUTE_EDITS = ("spatial", "colour")
"""``augmentation.type`` values of the attribute-editing half of CDA."""


@dataclass(frozen=True)
class AblationRow:
    """One Stage II variant.

    Attributes:
        name: the row label in the table.
        num_experts: E (1 = no upcycling: the dense model keeps training).
        router_mode: ``"token"`` or ``"task"``.
        dropped_augmentations: ``augmentation.type`` values whose conversations are left out.
    """

    name: str
    num_experts: int
    router_mode: str = "token"
    dropped_augmentations: tuple[str, ...] = ()

    @property
    def slug(self) -> str:
        """Folder name of the row."""
        return "".join(c if c.isalnum() else "_" for c in self.name.lower()).strip("_")


ROWS: tuple[AblationRow, ...] = (
    AblationRow("E=1 (dense), CDA", 1),
    AblationRow("E=4, CDA", 4),
    AblationRow("E=8, CDA", 8),
    AblationRow("E=8, no cutout", 8, dropped_augmentations=("cutout",)),
    AblationRow("E=8, no attribute editing", 8, dropped_augmentations=ATTRIBUTE_EDITS),
    AblationRow("E=8, no CDA", 8, dropped_augmentations=("cutout", *ATTRIBUTE_EDITS)),
    AblationRow("E=8, CDA, task router", 8, router_mode="task"),
)

_COLUMNS = (("classify", "accuracy", "SC acc"), ("vqa", "accuracy", "VQA acc"), ("count", "exact", "OC exact"),
            ("count", "within1", "OC +-1"), ("ground", "acc@0.5", "VG acc@0.5"), ("ground", "mean_iou", "VG mIoU"),
            ("caption", "BLEU-4", "IC BLEU-4"))


def split_by_task(record: dict, base_dir: Path) -> list[dict]:
    """One conversation per task from a packed multi-task conversation about one image.

    Turn order within a task is kept, ``<image>`` goes on each new conversation's first human
    message, and the image path becomes absolute (the split files live elsewhere).

    Args:
        record: a JSONL record with alternating human/gpt ``conversations``.
        base_dir: folder the record's relative image path is relative to.

    Raises:
        ValueError: a human turn names no known task.
    """
    by_task: dict[str, list[tuple[str, str]]] = {}
    turns = record["conversations"]
    for human, gpt in zip(turns[::2], turns[1::2]):
        question = human["value"].replace("<image>\n", "")
        task = task_of_prompt(question)
        if task is None:
            raise ValueError(f"record {record.get('id')!r}: no task tag in the question {question[:60]!r}")
        by_task.setdefault(task, []).append((question, gpt["value"]))
    image = str((base_dir / record["image"]).resolve())
    out = []
    for task, pairs in by_task.items():
        conversation = []
        for i, (question, answer) in enumerate(pairs):
            conversation += [{"from": "human", "value": question if i else f"<image>\n{question}"},
                             {"from": "gpt", "value": answer}]
        split = {**record, "id": f"{record['id']}_{code_of_task(task)}", "image": image, "task": code_of_task(task),
                 "conversations": conversation}
        out.append(split)
    return out


def row_records(records: list[dict], row: AblationRow, base_dir: Path) -> list[dict]:
    """The row's training conversations: CDA records of dropped types left out, then split per task."""
    kept = [r for r in records if (r.get("augmentation") or {}).get("type") not in row.dropped_augmentations]
    return [split for r in kept for split in split_by_task(r, base_dir)]


def _read_raw_jsonl(path: Path) -> list[dict]:
    """The JSONL records as dicts (the file was validated by :func:`train.dataset.read_instruction_jsonl`)."""
    _, bad = read_instruction_jsonl(path)
    if bad:
        raise ValueError(f"{path}: {len(bad)} broken lines (first: line {bad[0].line_no}: {bad[0].reason})")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def run_row(row: AblationRow, dense: Path, records: list[dict], base_dir: Path, benchmark, out: Path,
            args: argparse.Namespace) -> dict:
    """Train and score one row; writes ``out/<slug>/metrics.json`` and returns its content."""
    folder = out / row.slug
    folder.mkdir(parents=True, exist_ok=True)
    train_jsonl = folder / "train.jsonl"
    conversations = write_jsonl(train_jsonl, row_records(records, row, base_dir))
    cfg = Stage2Config(
        model=str(dense),
        data=DataConfig(train_jsonl=str(train_jsonl), max_length=args.max_length),
        loop=LoopConfig(output_dir=str(folder / "run"), epochs=1000, global_batch_size=args.global_batch,
                        per_device_batch_size=args.micro_batch, seed=args.seed, save_every_steps=args.steps,
                        keep_checkpoints=1, max_steps=args.steps, resume="auto"),
        optim=OptimConfig(lr=args.lr, min_lr_ratio=0.1, warmup_ratio=0.05, max_grad_norm=1.0),
        moe=MoESettings(num_experts=row.num_experts, top_k=min(2, row.num_experts), aux_loss_coef=0.01,
                        router_mode=row.router_mode, trainable="all"),
    )
    start = time.monotonic()
    result = run_stage2(cfg)
    train_s = time.monotonic() - start
    import skymoe  # deferred: the CLI's --help stays fast

    loaded = skymoe.load_model(folder / "run" / "final", quant="none", device="cpu")
    report = evaluate(loaded.model, loaded.processor, benchmark, batch_size=args.eval_batch_size)
    metrics = {"row": asdict(row), "conversations": conversations, "steps": result.last_step,
               "final_loss": result.history[-1].loss if result.history else None, "train_seconds": train_s,
               **report.to_json()}
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def format_ablation_table(results: list[dict]) -> str:
    """Markdown table: one line per row, the primary metric of each task (%, BLEU-4 x 100)."""
    head = "| row | " + " | ".join(label for _, _, label in _COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(_COLUMNS) + 1)]
    for result in results:
        cells = [f"{result['per_task'].get(task, {}).get(metric, float('nan')):.1f}" for task, metric, _ in _COLUMNS]
        lines.append(f"| {result['row']['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_ablation(args: argparse.Namespace) -> list[dict]:
    """All rows (module docstring); returns their metrics in table order."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data)
    records = _read_raw_jsonl(data)
    bench_jsonl = out / "benchmark" / "benchmark.jsonl"
    if not bench_jsonl.is_file():
        build_synthetic_benchmark(out / "benchmark", args.eval_n, seed=args.eval_seed)
    benchmark, _ = read_instruction_jsonl(bench_jsonl)
    results = []
    for row in ROWS:
        if args.rows and row.slug not in args.rows:
            continue
        done = out / row.slug / "metrics.json"
        if done.is_file():
            logger.info("row %r already scored (%s): kept", row.name, done)
            results.append(json.loads(done.read_text()))
            continue
        logger.info("row %r: training %d steps", row.name, args.steps)
        results.append(run_row(row, Path(args.dense), records, data.parent, benchmark, out, args))
        (out / "table.md").write_text(format_ablation_table(results) + "\n")
    (out / "table.json").write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(format_ablation_table(results) + "\n")
    return results


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dense", required=True, help="dense model folder every row starts from")
    parser.add_argument("--data", required=True, help="packed training conversations (the demo's moe.jsonl)")
    parser.add_argument("--out", required=True, help="folder for the rows, the benchmark and table.md")
    parser.add_argument("--steps", type=int, default=150, help="Stage II optimizer steps per row")
    parser.add_argument("--lr", type=float, default=3e-4, help="peak AdamW learning rate (cosine)")
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=800, help="token limit of a conversation")
    parser.add_argument("--seed", type=int, default=0, help="data order and router init, the same for every row")
    parser.add_argument("--eval-n", type=int, default=250, help="samples of the fresh benchmark")
    parser.add_argument("--eval-seed", type=int, default=2027, help="benchmark seed (never used in training)")
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--rows", nargs="*", default=None,
                        help=f"only these rows (slugs: {', '.join(r.slug for r in ROWS)})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (see the module docstring)."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for path in (Path(args.dense) / "config.json", Path(args.data)):
        if not path.is_file():
            print(f"error: {path} does not exist", file=sys.stderr)
            return 2
    results = run_ablation(args)
    print(format_ablation_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
