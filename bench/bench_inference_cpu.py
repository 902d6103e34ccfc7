"""CPU inference benchmark: SkyMoE's fast path against the plain path, in one run, as ratios.

Prints (medians of --repeats alternating runs, wall and CPU seconds; the machine may be shared):
  (1) scene count of one class: ``tiling.analyze(task="count")`` plain vs fast, tiles/s;
  (2) scene count of several classes (--classes): plain = one ``tiling.analyze`` per class; fast =
      ``tiling.analyze_queries`` (each batch of tiles encoded once, every class asked of it);
  (3) chat: a first question on an unseen tile vs a second question on the same tile
      (prefix and first turn reused), and the second question without reuse (all re-encoded);
  (4) where one batch's time goes (processor, vision tower, LLM prefill, decoding), which
      explains the ratio of (1).
Each fast figure is checked to give the same answers as the plain one.

Model: ``assets/skymoe-demo`` (--model) when present, otherwise (announced) a random model from
``skymoe.presets.make_tiny_checkpoint`` with the demo's layout (504 px, 28 px patches, 324 image
tokens, Llama 4 x 256, E=4 top-2); random weights never stop early, so its answers are exactly
--max-new-tokens long.

Usage: python bench/bench_inference_cpu.py [--model assets/skymoe-demo] [--raster assets/sample_scene.tif]
           [--crop-px 2048] [--classes "car,building,ship"] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEMO_LAYOUT = {
    "vision_config": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
                      "image_size": 504, "patch_size": 28, "projection_dim": 128},
    "text_config": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
                    "num_key_value_heads": 4, "max_position_embeddings": 1024},
    "num_experts": 4,
    "vision_feature_layer": -1,
}


def load(model_dir: Path, workdir: Path):
    """The demo checkpoint, or a random demo-shaped one (announced); returns (LoadedModel, description)."""
    import skymoe
    from skymoe.presets import make_tiny_checkpoint

    if (model_dir / "config.json").is_file():
        return skymoe.load_model(model_dir, quant="none", device="cpu"), f"{model_dir} (quant none, fp32)"
    print(f"NOTICE: {model_dir} not found: using a RANDOM tiny model with the demo's layout from "
          "skymoe.presets.make_tiny_checkpoint (answers run to --max-new-tokens; figures are for the code paths)")
    folder = make_tiny_checkpoint(workdir / "demo_shaped", seed=0, **DEMO_LAYOUT)
    return skymoe.load_model(folder, quant="none", device="cpu"), "random demo-shaped tiny model (fp32)"


def timed(fn: Callable[[], object]) -> tuple[float, float, object]:
    """(wall s, CPU s of this process, result) of ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def alternate(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict]:
    """Run each callable ``repeats`` times, interleaved; medians of wall and CPU seconds, last results."""
    walls: dict[str, list[float]] = {k: [] for k in runs}
    cpus: dict[str, list[float]] = {k: [] for k in runs}
    results: dict[str, object] = {}
    for _ in range(repeats):
        for name, fn in runs.items():
            wall, cpu, results[name] = timed(fn)
            walls[name].append(wall)
            cpus[name].append(cpu)
    return {k: {"wall": statistics.median(walls[k]), "cpu": statistics.median(cpus[k]), "walls": walls[k],
                "result": results[k]} for k in runs}


def scene_single(raster, aoi, loaded, query: str, args) -> dict:
    """(1) ``tiling.analyze`` count of one class, plain vs fast (per-model switch)."""
    import tiling
    from skymoe.generation import set_fast_inference

    def run(fast: bool):
        def go():
            set_fast_inference(loaded.model, fast)
            try:
                return tiling.analyze(raster, "count", query, model=loaded, aoi=aoi, batch_size=args.batch_size,
                                      max_new_tokens=args.max_new_tokens)
            finally:
                set_fast_inference(loaded.model, True)
        return go

    figures = alternate({"plain": run(False), "fast": run(True)}, args.repeats)
    plain, fast = figures["plain"]["result"], figures["fast"]["result"]
    figures["tiles"] = plain.tiles_done
    figures["same"] = [a.text for a in plain.tile_answers] == [a.text for a in fast.tile_answers]
    figures["counts"] = (plain.counts, fast.counts)
    return figures


def _tile_batches(raster, aoi, batch_size: int):
    """Non-empty tiles of the AOI grid, in batches: (tile ids, images)."""
    import tiling

    grid = tiling.make_grid(raster, aoi=aoi)
    for batch in tiling.iter_tile_batches(raster, grid.tiles, batch_size=batch_size):
        keep = [i for i in range(len(batch.tiles)) if batch.valid[i].any()]
        if keep:
            yield [batch.tiles[i].tile_id for i in keep], [batch.images[i] for i in keep]


def scene_multi(raster, aoi, loaded, classes: list[str], args) -> dict:
    """(2) several classes: one ``tiling.analyze`` per class (plain) vs ``tiling.analyze_queries``
    (each batch of tiles read and encoded once, every class asked of it; fast path)."""
    import tiling
    from skymoe.generation import set_fast_inference

    options = dict(model=loaded, aoi=aoi, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)

    def answers(results):
        return {(c, a.tile_id): a.text for c, r in results.items() for a in r.tile_answers}

    def plain():
        set_fast_inference(loaded.model, False)
        try:
            return answers({c: tiling.analyze(raster, "count", c, **options) for c in classes})
        finally:
            set_fast_inference(loaded.model, True)

    def fast():
        return answers(tiling.analyze_queries(raster, "count", classes, **options))

    figures = alternate({"plain": plain, "fast": fast}, args.repeats)
    figures["same"] = figures["plain"]["result"] == figures["fast"]["result"]
    figures["tiles"] = len(figures["plain"]["result"]) // len(classes)
    return figures


def chat(raster, aoi, loaded, classes: list[str], args) -> dict:
    """(3) first question (prefix built) vs second question (prefix reused) vs second without reuse."""
    import torch

    import skymoe
    from skymoe.generation import generations_from_scores, inference_path
    from skymoe.prefix import TilePrefix

    _, images = next(_tile_batches(raster, aoi, 1))
    tile = images[0]
    q1, q2 = (skymoe.build_prompt("count", c) for c in (classes + classes)[:2])
    state: dict = {}

    def first():
        state["prefix"] = TilePrefix(loaded.model, loaded.processor, [tile], fast=True)
        state["a1"] = state["prefix"].ask(q1, max_new_tokens=args.max_new_tokens)[0]
        return state["a1"]

    def second():
        return state["prefix"].ask(q2, history=[(q1, state["a1"].text)], max_new_tokens=args.max_new_tokens)[0]

    @torch.inference_mode()
    def second_without_reuse():  # what a chat does without the prefix: the whole conversation again
        text = skymoe.render_conversation([(q1, state["a1"].text), (q2, None)])
        inputs = loaded.processor(images=[tile], text=[text], return_tensors="pt")
        tok = loaded.processor.tokenizer
        with inference_path(loaded.model, True):
            out = loaded.model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                                        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                        output_logits=True, return_dict_in_generate=True)
        return generations_from_scores(tok, out.sequences[:, inputs["input_ids"].shape[1]:], out.logits)[0]

    figures = alternate({"first": first, "second": second, "second_without_reuse": second_without_reuse},
                        args.repeats)
    figures["same"] = figures["second"]["result"].text == figures["second_without_reuse"]["result"].text
    figures["answers"] = (figures["first"]["result"].text, figures["second"]["result"].text)
    return figures


def breakdown(raster, aoi, loaded, query: str, args) -> dict[str, float]:
    """(4) seconds per stage of one fast ``skymoe.generate`` batch (forward hooks on the model parts)."""
    import skymoe

    _, images = next(_tile_batches(raster, aoi, args.batch_size))
    prompts = [skymoe.build_prompt("count", query)] * len(images)
    model = loaded.model
    spans: dict[str, list[float]] = {"vision": [], "llm": []}
    starts: dict[str, float] = {}
    hooks = []
    for name, module in (("vision", model.model.vision_tower), ("llm", model.model.language_model)):
        hooks.append(module.register_forward_pre_hook(lambda *_a, n=name: starts.__setitem__(n, time.perf_counter())))
        hooks.append(module.register_forward_hook(
            lambda *_a, n=name: spans[n].append(time.perf_counter() - starts[n])))
    try:
        started = time.perf_counter()
        loaded.processor(images=images, text=[skymoe.render_conversation([(p, None)]) for p in prompts],
                         return_tensors="pt")
        processor_s = time.perf_counter() - started
        total_s, _, _ = timed(lambda: skymoe.generate(model, loaded.processor, images, prompts,
                                                      max_new_tokens=args.max_new_tokens, fast=True))
    finally:
        for hook in hooks:
            hook.remove()
    prefill, decode = spans["llm"][0], sum(spans["llm"][1:])
    return {"tiles": len(images), "total": total_s, "processor": processor_s, "vision": sum(spans["vision"]),
            "llm_prefill": prefill, "decode": decode, "decode_steps": len(spans["llm"]) - 1}


def _line(label: str, plain: dict, fast: dict, units: float, unit: str) -> str:
    """One 'plain vs fast' line with throughput and ratios (wall and CPU)."""
    return (f"{label}: plain {units / plain['wall']:.2f} {unit} vs fast {units / fast['wall']:.2f} {unit}: "
            f"ratio {plain['wall'] / fast['wall']:.2f}x wall, {plain['cpu'] / fast['cpu']:.2f}x CPU time "
            f"(plain runs {', '.join(f'{w:.1f}' for w in plain['walls'])} s; "
            f"fast {', '.join(f'{w:.1f}' for w in fast['walls'])} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "assets" / "skymoe-demo")
    parser.add_argument("--raster", type=Path, default=REPO / "assets" / "sample_scene.tif")
    parser.add_argument("--crop-px", type=int, default=2048, help="square AOI (px) from the top-left; 0 = whole scene")
    parser.add_argument("--classes", default="car,building,ship")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier on a shared box)")
    args = parser.parse_args()

    import torch
    from shapely.geometry import box

    import tiling

    torch.set_num_threads(args.threads)
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        loaded, described = load(args.model, Path(tmp))
        raster = tiling.open_raster(args.raster)
        aoi = tiling.AOI(box(0, 0, args.crop_px, args.crop_px), "pixel") if args.crop_px else None
        print(f"model: {described}; raster {args.raster.name} {raster.width}x{raster.height}, AOI "
              f"{args.crop_px or 'whole'} px; batch {args.batch_size}; max_new_tokens {args.max_new_tokens}; "
              f"torch threads {args.threads}; load average {os.getloadavg()[0]:.1f}; medians of {args.repeats}")
        one = scene_single(raster, aoi, loaded, classes[0], args)
        print(_line(f"(1) scene count '{classes[0]}', {one['tiles']} tiles", one["plain"], one["fast"],
                    one["tiles"], "tiles/s") + f"; same answers: {one['same']}; counts {one['counts'][1]}")
        multi = scene_multi(raster, aoi, loaded, classes, args)
        print(_line(f"(2) scene count of {len(classes)} classes, {multi['tiles']} tiles", multi["plain"],
                    multi["fast"], multi["tiles"], "tiles/s") + f"; same answers: {multi['same']}")
        talk = chat(raster, aoi, loaded, classes, args)
        f, s, n = talk["first"], talk["second"], talk["second_without_reuse"]
        print(f"(3) chat on one tile: first question {f['wall']:.3f} s, second question {s['wall']:.3f} s "
              f"(prefix reused): {f['wall'] / s['wall']:.1f}x faster ({f['cpu'] / s['cpu']:.1f}x CPU time); "
              f"second without reuse {n['wall']:.3f} s: reuse {n['wall'] / s['wall']:.1f}x faster; "
              f"same answer: {talk['same']}; answers {talk['answers']}")
        parts = breakdown(raster, aoi, loaded, classes[0], args)
        known = parts["processor"] + parts["vision"] + parts["llm_prefill"] + parts["decode"]
        print(f"(4) one fast batch of {parts['tiles']} tiles, {parts['total']:.2f} s: processor "
              f"{parts['processor']:.2f} s, vision tower {parts['vision']:.2f} s, LLM prefill "
              f"{parts['llm_prefill']:.2f} s, decoding {parts['decode']:.2f} s ({parts['decode_steps']} steps), "
              f"other {max(parts['total'] - known, 0):.2f} s")


if __name__ == "__main__":
    main()
