"""Router visualisation: how a SkyMoE's experts share tokens by task, granularity and image region.

``python -m train.viz_router --model DIR --data JSONL --out DIR`` runs one forward
pass per sample over the image and the prompt (no answer, as at inference) inside
:func:`skymoe.capture_routing` and writes:

- ``expert_load_per_task.png``: one heatmap per task, MoE layer x expert, share of the
  top-k assignments each expert received;
- ``expert_share_local_global.png``: per MoE layer, each expert's share on local tasks
  (VG, OC, local VQA) vs global tasks (IC, SC, global VQA);
- ``heatmaps_<i>_<task>.png``: per-expert routing heatmaps over the image's patch grid
  for the first samples of each task (:func:`plot_expert_heatmaps`);
- ``routing_summary.json``: the numbers behind the plots.

The heatmap renderer itself lives in :mod:`skymoe.routing_plots`, shared with the app.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from skymoe.routing_plots import figure_png_bytes, plot_expert_heatmaps

__all__ = [
    "plot_expert_heatmaps",
    "figure_png_bytes",
    "plot_load_per_task",
    "plot_local_global_share",
    "collect_routing",
    "write_plots",
    "main",
]

logger = logging.getLogger(__name__)


def plot_load_per_task(load_by_task: dict[str, np.ndarray], layer_indices: Sequence[int]) -> Figure:
    """One heatmap per task: rows MoE layers, columns experts, colour = share of top-k assignments.

    Args:
        load_by_task: task -> ``(num_moe_layers, num_experts)`` shares (rows sum to 1).
        layer_indices: decoder-layer index of each row.
    """
    tasks = sorted(load_by_task)
    fig = Figure(figsize=(3.2 * len(tasks) + 1, 0.35 * len(layer_indices) + 2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(tasks), squeeze=False)[0])
    vmax = max(float(v.max()) for v in load_by_task.values())
    mappable = None
    for ax, task in zip(axes, tasks):
        load = load_by_task[task]
        mappable = ax.imshow(load, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("expert")
        ax.set_xticks(range(load.shape[1]))
        ax.set_yticks(range(len(layer_indices)), [str(i) for i in layer_indices])
    axes[0].set_ylabel("MoE layer")
    fig.colorbar(mappable, ax=list(axes), label="share of top-k assignments")
    fig.suptitle(f"expert load per task (uniform = {1 / next(iter(load_by_task.values())).shape[1]:.3f})")
    return fig


def plot_local_global_share(load_by_granularity: dict[str, np.ndarray], layer_indices: Sequence[int]) -> Figure:
    """Per MoE layer, grouped bars of each expert's share on local vs global tasks.

    Args:
        load_by_granularity: ``"local"`` / ``"global"`` -> ``(num_moe_layers, num_experts)`` shares.
        layer_indices: decoder-layer index of each row.
    """
    names = [g for g in ("global", "local") if g in load_by_granularity]
    n_layers = len(layer_indices)
    cols = min(4, n_layers)
    rows = -(-n_layers // cols)
    fig = Figure(figsize=(3.4 * cols, 2.4 * rows + 0.5), layout="constrained")
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False)).ravel()
    width = 0.8 / max(1, len(names))
    for i, layer in enumerate(layer_indices):
        ax = axes[i]
        for j, name in enumerate(names):
            share = load_by_granularity[name][i]
            ax.bar(np.arange(len(share)) + (j - (len(names) - 1) / 2) * width, share, width, label=name)
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xticks(range(len(share)))
        ax.set_xlabel("expert", fontsize=8)
    for ax in axes[n_layers:]:
        ax.set_visible(False)
    axes[0].set_ylabel("share")
    axes[0].legend(fontsize=8)
    fig.suptitle("expert share: global (IC, SC, global VQA) vs local (VG, OC, local VQA) tasks")
    return fig


def _routing_of(model, processor, record) -> tuple[np.ndarray, np.ndarray]:
    """Expert load ``(L, E)`` and heatmaps ``(L, E, gh, gw)`` of one forward over image + prompt."""
    import torch

    from skymoe.prompts import TASK_IDS, render_conversation
    from skymoe.routing import capture_routing

    with Image.open(record.image_path) as img:
        image = img.convert("RGB")
    text = render_conversation([(record.prompt, None)], image_after_question=model.config.image_after_question)
    inputs = processor(images=image, text=text, return_tensors="pt")
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}  # CLIP casts pixel_values to its own dtype
    task_ids = torch.tensor([TASK_IDS.index(record.task)], device=device)
    with torch.no_grad(), capture_routing(model) as trace:
        model(**inputs, task_ids=task_ids)
    return np.asarray(trace.expert_load()), np.asarray(trace.expert_heatmaps(0))


def collect_routing(model, processor, records, max_per_task: int = 32, heatmap_samples: int = 2) -> dict:
    """Run :func:`_routing_of` over up to ``max_per_task`` records per task.

    Returns:
        ``{"layers": [...], "by_task": {task: (L, E)}, "by_granularity": {g: (L, E)},
        "heatmaps": [(record, (L, E, gh, gw)), ...]}`` (loads averaged over samples).
    """
    by_task: dict[str, list[np.ndarray]] = defaultdict(list)
    by_gran: dict[str, list[np.ndarray]] = defaultdict(list)
    heatmaps = []
    for record in records:
        if len(by_task[record.task]) >= max_per_task:
            continue
        load, maps = _routing_of(model, processor, record)
        by_task[record.task].append(load)
        by_gran[record.granularity].append(load)
        if sum(1 for r, _ in heatmaps if r.task == record.task) < heatmap_samples:
            heatmaps.append((record, maps))
    if not by_task:
        raise ValueError("no sample to route; give a non-empty --data file")
    return {
        "layers": list(model.config.moe_layers),
        "by_task": {t: np.mean(v, axis=0) for t, v in by_task.items()},
        "by_granularity": {g: np.mean(v, axis=0) for g, v in by_gran.items()},
        "counts": {t: len(v) for t, v in by_task.items()},
        "heatmaps": heatmaps,
    }


def write_plots(routing: dict, out_dir: str | Path) -> list[Path]:
    """Write the PNGs and ``routing_summary.json`` of :func:`collect_routing`'s result."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layers = routing["layers"]
    written = []
    figures = {"expert_load_per_task.png": plot_load_per_task(routing["by_task"], layers),
               "expert_share_local_global.png": plot_local_global_share(routing["by_granularity"], layers)}
    for i, (record, maps) in enumerate(routing["heatmaps"]):
        with Image.open(record.image_path) as img:
            figures[f"heatmaps_{i}_{record.task}.png"] = plot_expert_heatmaps(
                maps, img.convert("RGB"), layers, title=f"{record.id}: {record.prompt}")
    for name, fig in figures.items():
        (out_dir / name).write_bytes(figure_png_bytes(fig))
        written.append(out_dir / name)
    summary = {"layers": layers, "samples_per_task": routing["counts"],
               "load_by_task": {t: v.round(4).tolist() for t, v in routing["by_task"].items()},
               "load_by_granularity": {g: v.round(4).tolist() for g, v in routing["by_granularity"].items()}}
    (out_dir / "routing_summary.json").write_text(json.dumps(summary, indent=1))
    return written


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m train.viz_router --model DIR --data JSONL --out DIR``."""
    from skymoe import CheckpointError, load_model
    from train.dataset import DataError, read_instruction_jsonl

    parser = argparse.ArgumentParser(prog="python -m train.viz_router", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="SkyMoE checkpoint folder (a MoE model)")
    parser.add_argument("--data", required=True, help="instruction JSONL")
    parser.add_argument("--out", required=True, help="folder for the PNGs")
    parser.add_argument("--max-per-task", type=int, default=32)
    parser.add_argument("--heatmap-samples", type=int, default=2, help="heatmap figures per task")
    parser.add_argument("--quant", default="none", choices=["none", "8bit", "4bit"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        records, _ = read_instruction_jsonl(args.data)
        model, processor = load_model(args.model, quant=args.quant, device="auto")
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except CheckpointError as exc:
        print(f"error: cannot load {args.model}: {exc}", file=sys.stderr)
        return 2
    if not model.config.moe_layers:
        print(f"error: {args.model} is a dense model (no MoE layer); there is no routing to show", file=sys.stderr)
        return 2
    for path in write_plots(collect_routing(model, processor, records, args.max_per_task, args.heatmap_samples),
                            args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
