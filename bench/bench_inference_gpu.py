"""GPU inference benchmark: the 7B-shaped SkyMoE (random weights), fast path against plain path, with floors.

One command, nothing to download: ``python bench/bench_inference_gpu.py`` on a machine with one
CUDA GPU of >= 60 GB (H100 / H200). The model is the full-size layout of
:func:`skymoe.full_size_config` (Vicuna-7B-shaped LLM, E=8 top-2 on every second layer, CLIP
ViT-L/14 at 504 px: 1296 image tokens per tile), built directly on the GPU in bfloat16 with
random weights (never through CPU RAM); nf4 figures quantize the same weights in place with
bitsandbytes (the layers ``skymoe.load_model(quant="4bit")`` quantizes: the LLM's Linears
except the routers).

Prints, plain vs fast (same process, same weights, same inputs):
  * decode ms/token at batch 1 after a one-tile prompt, bf16 and nf4: plain = per-expert loop
    + dynamic cache (eager); fast = fused experts with ``torch._grouped_mm`` (bf16) or the
    dense-masked experts (nf4) + static cache, decoding step compiled by transformers
    (``torch.compile``, CUDA graphs);
  * batched prefill tiles/s (``--prefill-tiles`` tiles per forward: vision tower + LLM);
  * peak GPU memory of each phase;
  * beside each figure its floor: bytes of weights (+ KV cache) read per token over the
    measured copy bandwidth, and prefill FLOPs over the measured bf16 matmul rate
    (both ceilings measured first on this GPU, see ../.library/device/METHOD.md);
  * whether fast and plain generate the same greedy tokens.

Usage: python bench/bench_inference_gpu.py [--new-tokens 64] [--prefill-tiles 16] [--repeats 5] [--skip-nf4]
       python bench/bench_inference_gpu.py --tiny --device cpu   (dry run of the script on a tiny model, no GPU)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

GIB = 2**30


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float:
    """Peak allocated device memory since the last reset (0 on CPU)."""
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else 0.0


def reset_peak(device: torch.device) -> None:
    """Reset the peak-memory counter (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def median_ms(fn, device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median milliseconds of ``fn()``: synchronised before and after, host clock (after ``warmup`` runs)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure_ceilings(device: torch.device, copy_gib: float) -> tuple[float, float]:
    """(copy bandwidth bytes/s counting read + write, bf16 matmul FLOP/s), measured on random data."""
    src = torch.randn(int(copy_gib * GIB) // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src), device, repeats=10, warmup=2)
    bandwidth = 2 * src.numel() * 2 / (copy_ms / 1e3)
    del src, dst
    n = 8192 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, dtype=torch.bfloat16, device=device) for _ in range(2))
    mm_ms = median_ms(lambda: a @ b, device, repeats=20, warmup=3)
    del a, b
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return bandwidth, 2 * n**3 / (mm_ms / 1e3)


def build_model(device: torch.device, tiny: bool):
    """The full-size SkyMoE (``tiny``: the test layout), random bf16 weights allocated and initialised on ``device``."""
    import skymoe

    config = skymoe.tiny_config() if tiny else skymoe.full_size_config()
    with torch.device(device):
        model = skymoe.SkyMoEForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    return model.eval()


def tile_inputs(model, tiles: int, seed: int = 0) -> dict:
    """A one-turn prompt per tile: BOS, 40 text tokens, the image tokens, 16 text tokens; random pixels."""
    config, device = model.config, model.device
    gen = torch.Generator(device=device).manual_seed(seed)
    vocab = min(config.image_token_index, config.text_config.vocab_size) - 1
    text = lambda n: torch.randint(3, vocab, (tiles, n), device=device, generator=gen)  # noqa: E731
    image = torch.full((tiles, config.image_seq_length), config.image_token_index, device=device)
    bos = torch.full((tiles, 1), config.text_config.bos_token_id, device=device)
    ids = torch.cat([bos, text(40), image, text(16)], dim=1)
    size = config.vision_config.image_size
    pixels = torch.randn(tiles, 3, size, size, device=device, generator=gen).to(torch.bfloat16)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


def step_clock(device: torch.device):
    """A logits processor that stamps the (synchronised) time of every generation step (``.stamps``)."""
    from transformers import LogitsProcessor

    class StepClock(LogitsProcessor):
        def __init__(self):
            self.stamps: list[float] = []

        def __call__(self, input_ids, scores):
            sync(device)
            self.stamps.append(time.perf_counter())
            return scores

    return StepClock()


def decode(model, inputs: dict, fast: bool, new_tokens: int, repeats: int, compile_step: bool = True) -> dict:
    """Batch-1 greedy decoding: median ms/token over steps 2.., tokens, peak GiB.

    Fast: static cache, so transformers compiles the decoding step (on CUDA) unless ``compile_step`` is False.
    """
    from transformers import LogitsProcessorList

    from skymoe.generation import inference_path

    extra = {"cache_implementation": "static", "disable_compile": not compile_step} if fast else {}
    per_token, tokens = [], None
    reset_peak(model.device)
    with torch.inference_mode(), inference_path(model, fast):
        for run in range(repeats + 1):  # run 0 warms up (and compiles the fast path)
            clock = step_clock(model.device)
            out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=0, logits_processor=LogitsProcessorList([clock]), **extra)
            steps = [b - a for a, b in zip(clock.stamps[1:], clock.stamps[2:])]
            if run:
                per_token.append(statistics.median(steps) * 1e3)
            tokens = out[0, inputs["input_ids"].shape[1]:].tolist()
    return {"ms": statistics.median(per_token), "tokens": tokens, "peak": peak_gib(model.device),
            "compiled": fast and compile_step and model.device.type == "cuda"}


def prefill(model, inputs: dict, fast: bool, repeats: int) -> dict:
    """One batched forward over every tile (vision + LLM, KV cache built, last logits): tiles/s, peak GiB."""
    from skymoe.generation import inference_path

    reset_peak(model.device)
    with torch.inference_mode(), inference_path(model, fast):
        ms = median_ms(lambda: model(**inputs, use_cache=True, logits_to_keep=1), model.device, repeats=repeats)
    return {"tiles_s": inputs["input_ids"].shape[0] / (ms / 1e3), "peak": peak_gib(model.device)}


def weight_bytes_per_token(config, nf4: bool) -> float:
    """Bytes of the weights one decoded token reads: every LLM Linear once, k of E experts, lm_head.

    nf4 weights take 4 bits plus one fp32 absmax per 64 values; routers and lm_head stay bf16.
    """
    t = config.text_config
    d, i, layers, n_moe = t.hidden_size, t.intermediate_size, t.num_hidden_layers, len(config.moe_layers)
    quantized = layers * 4 * d * d + (layers - n_moe) * 3 * d * i + n_moe * config.num_experts_per_tok * 3 * d * i
    unquantized = n_moe * d * config.num_experts + t.vocab_size * d
    return quantized * ((0.5 + 4 / 64) if nf4 else 2) + unquantized * 2


def kv_bytes_per_token(config, context: int) -> float:
    """Bytes of K and V (bf16) one decoding step reads at ``context`` cached positions."""
    t = config.text_config
    head_dim = t.hidden_size // t.num_attention_heads
    return 2 * t.num_hidden_layers * context * t.num_key_value_heads * head_dim * 2


def prefill_flops_per_tile(config, tokens: int) -> float:
    """FLOPs of one tile's prefill: CLIP tower + projector + LLM (active experts, causal attention, 1 logit row)."""
    v, t = config.vision_config, config.text_config
    patches = (v.image_size // v.patch_size) ** 2 + 1
    vision = v.num_hidden_layers * (2 * patches * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size)
                                    + 4 * patches**2 * v.hidden_size)
    projector = 2 * config.image_seq_length * (v.hidden_size * t.hidden_size + t.hidden_size**2)
    d, i, layers, n_moe = t.hidden_size, t.intermediate_size, t.num_hidden_layers, len(config.moe_layers)
    linear = layers * 4 * d * d + (layers - n_moe) * 3 * d * i + n_moe * (config.num_experts_per_tok * 3 * d * i
                                                                          + d * config.num_experts)
    llm = 2 * tokens * linear + layers * 2 * tokens**2 * d + 2 * t.vocab_size * d
    return vision + projector + llm


def quantize_nf4_in_place(model) -> int:
    """Replace the LLM's Linears (not the routers) by bitsandbytes nf4 Linear4bit, on the GPU; returns the count."""
    import bitsandbytes as bnb

    from skymoe.moe import release_fused_experts

    release_fused_experts(model)  # the bf16 expert stacks are freed as their experts are replaced
    text_model = model.model.language_model
    names = [name for name, module in text_model.named_modules()
             if type(module) is torch.nn.Linear and not name.endswith("router.gate")]
    for name in names:  # one layer at a time: the bf16 weight is freed once its module is replaced
        parent_name, _, child = name.rpartition(".")
        parent = text_model.get_submodule(parent_name)
        linear = getattr(parent, child)
        quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,
                                      compute_dtype=torch.bfloat16, compress_statistics=False, quant_type="nf4",
                                      device="meta")
        quantized.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=False,
                                             quant_type="nf4", module=quantized)
        quantized.weight._quantize(linear.weight.device)
        setattr(parent, child, quantized)
        del linear
    if model.device.type == "cuda":
        torch.cuda.empty_cache()
    return len(names)


def row(label: str, plain: float, fast: float, unit: str, floor: float, target: str, better: str) -> str:
    """One line of the result table; ``better`` is "lower" or "higher"."""
    ratio = plain / fast if better == "lower" else fast / plain
    return (f"{label:<34} {plain:>9.2f} {fast:>9.2f} {unit:<8} {ratio:>6.2f}x  floor {floor:>8.2f} {unit:<8} "
            f"{target}")


def first_difference(a: list[int], b: list[int]) -> str:
    """'all N identical' or where two token lists first differ."""
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"identical up to token {index} of {len(a)}"
    return f"all {len(a)} identical"


def run_decode_pair(model, inputs: dict, args) -> dict[bool, dict]:
    """Plain and fast decoding; a failing fast path is retried without compilation, failures are printed."""
    results = {}
    for fast, compile_step in ((False, False), (True, True), (True, False)):
        if fast in results:
            continue
        try:
            results[fast] = decode(model, inputs, fast, args.new_tokens, args.repeats, compile_step)
        except Exception as exc:  # noqa: BLE001 - report and go on: the other figures stand
            path = "fast (compiled)" if compile_step else ("fast (not compiled)" if fast else "plain")
            print(f"{path} decode failed: {type(exc).__name__}: {str(exc)[:400]}")
    if True in results and not results[True]["compiled"]:
        print("NOTE: the fast figure below ran WITHOUT torch.compile (compilation failed, see above)")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prefill-tiles", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-nf4", action="store_true")
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (with --tiny: a dry run)")
    parser.add_argument("--tiny", action="store_true", help="tiny test layout instead of the 7B shape (dry run)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_inference_gpu.py needs a CUDA GPU (>= 60 GB); none is visible to torch. Use "
                 "bench/bench_inference_cpu.py on CPU (or --tiny --device cpu for a dry run of this script).")
    from skymoe.moe import grouped_mm_kernel_available

    bandwidth, flops = measure_ceilings(device, 2.0 if device.type == "cuda" else 0.25)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    print(f"{where}: measured copy bandwidth {bandwidth / 1e12:.3f} TB/s, bf16 matmul {flops / 1e12:.1f} TFLOP/s; "
          f"torch {torch.__version__}; grouped_mm kernel: {grouped_mm_kernel_available(device, torch.bfloat16)}")
    model = build_model(device, args.tiny)
    config = model.config
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters (bf16, random) on {device}")
    one = tile_inputs(model, 1)
    prompt_len = one["input_ids"].shape[1]
    context = prompt_len + args.new_tokens // 2
    lines, peaks = [], []
    bf16 = run_decode_pair(model, one, args)
    if len(bf16) == 2:
        floor = (weight_bytes_per_token(config, False) + kv_bytes_per_token(config, context)) / bandwidth * 1e3
        lines.append(row("decode bf16 (batch 1)", bf16[False]["ms"], bf16[True]["ms"], "ms/token", floor,
                         "target <= 10", "lower"))
        peaks.append(f"bf16 decode {bf16[False]['peak']:.1f} / {bf16[True]['peak']:.1f} GiB")
    many = tile_inputs(model, args.prefill_tiles, seed=1)
    pre = {fast: prefill(model, many, fast, args.repeats) for fast in (False, True)}
    floor_tiles = flops / prefill_flops_per_tile(config, prompt_len)
    lines.append(row(f"prefill {args.prefill_tiles} tiles (bf16)", pre[False]["tiles_s"], pre[True]["tiles_s"],
                     "tiles/s", floor_tiles, "target >= 26", "higher"))
    peaks.append(f"prefill {pre[False]['peak']:.1f} / {pre[True]['peak']:.1f} GiB")
    del many
    if not args.skip_nf4:
        count = quantize_nf4_in_place(model)
        print(f"nf4: {count} Linear layers of the LLM quantized in place")
        nf4 = run_decode_pair(model, one, args)
        if len(nf4) == 2:
            floor = (weight_bytes_per_token(config, True) + kv_bytes_per_token(config, context)) / bandwidth * 1e3
            lines.append(row("decode nf4 (batch 1)", nf4[False]["ms"], nf4[True]["ms"], "ms/token", floor,
                             "target <= 15", "lower"))
            peaks.append(f"nf4 decode {nf4[False]['peak']:.1f} / {nf4[True]['peak']:.1f} GiB")
    print(f"\n{'figure':<34} {'plain':>9} {'fast':>9} {'unit':<8} {'gain':>7}  floor")
    print("\n".join(lines))
    print(f"peak memory (plain / fast): {'; '.join(peaks)}")
    if len(bf16) == 2:
        print(f"greedy tokens fast vs plain (bf16): {first_difference(bf16[False]['tokens'], bf16[True]['tokens'])}")
    print(f"floors: decode = bytes of weights per token (k={config.num_experts_per_tok} of E={config.num_experts} "
          f"experts, lm_head) + KV of {context} positions, over the measured bandwidth; prefill = "
          f"{prefill_flops_per_tile(config, prompt_len) / 1e12:.2f} TFLOP per tile of {prompt_len} tokens over the "
          "measured bf16 matmul rate")


if __name__ == "__main__":
    main()
